#!/usr/bin/env python
"""Build the extension in place (editable install), log the compiler output to build/build.log,
and fail on any register spill that ptxas reports for our CUDA kernels.

`scripts/build.py --wheel DIR` (= make wheel, DIR = dist) builds a binary wheel into DIR instead, with
`pip wheel --no-build-isolation --no-deps`: it links the torch it runs with, whose version setup.py
pins as the wheel's requirement, and it reuses the objects of the in-place build (build/temp), so after
`make build` it only relinks. Its log is build/wheel.log.

Serialised with a file lock so that concurrent builds in one checkout do not collide."""
import fcntl
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOG = os.path.join(ROOT, "build", "build.log")
SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def check_spills(log_text):
    """Lines naming a kernel whose ptxas report shows spills. ptxas prints 'Function properties for
    <mangled>' followed by a line with the spill counts."""
    bad, current = [], None
    for line in log_text.splitlines():
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            current = m.group(1)
            continue
        m = SPILL.search(line)
        if m and (int(m.group(1)) or int(m.group(2))):
            bad.append(f"{current}: {line.strip()}")
    return bad


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    wheel_dir = argv[argv.index("--wheel") + 1] if "--wheel" in argv else None
    os.makedirs(os.path.join(ROOT, "build"), exist_ok=True)
    with open(os.path.join(ROOT, "build", ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if wheel_dir:
            cmd = [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-v",
                   "-w", os.path.abspath(wheel_dir), ROOT]
            log_path = os.path.join(ROOT, "build", "wheel.log")
        else:
            cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-v", "-e", ROOT]
            log_path = LOG
        print("[build]", " ".join(cmd), f"(log: {log_path})", flush=True)
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for line in proc.stdout:
                log.write(line)
                if line.startswith("[dalle_fast]") or "error" in line.lower() and "werror" not in line.lower():
                    print(line, end="", flush=True)
            rc = proc.wait()
        if rc != 0:
            print(f"[build] FAILED (exit {rc}); last lines of {log_path}:")
            with open(log_path) as f:
                print("".join(f.readlines()[-60:]))
            return rc
        with open(log_path) as f:
            text = f.read()
        n_kernels = len(re.findall(r"Compiling entry function", text))
        bad = check_spills(text)
        if bad:
            print(f"[build] FAILED: ptxas reports register spills in {len(bad)} kernel(s):")
            print("\n".join(bad))
            return 1
        print(f"[build] ok; ptxas compiled {n_kernels} kernel entries, no spills")
        if wheel_dir:
            n_compiled = len(re.findall(r"^\s*\[\d+/\d+\] ", text, re.M))
            print(f"[build] wheel in {os.path.abspath(wheel_dir)}; ninja ran {n_compiled} compile step(s)"
                  + (" (incremental: nothing recompiled)" if n_compiled == 0 else ""))
        return 0


if __name__ == "__main__":
    sys.exit(main())
