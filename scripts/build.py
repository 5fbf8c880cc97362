#!/usr/bin/env python
"""Build the extension in place (editable install), log the compiler output to build/build.log,
and fail on any register spill that ptxas reports for our CUDA kernels.

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


def main():
    os.makedirs(os.path.join(ROOT, "build"), exist_ok=True)
    with open(os.path.join(ROOT, "build", ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-v", "-e", ROOT]
        print("[build]", " ".join(cmd), f"(log: {LOG})", flush=True)
        with open(LOG, "w") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for line in proc.stdout:
                log.write(line)
                if line.startswith("[dalle_fast]") or "error" in line.lower() and "werror" not in line.lower():
                    print(line, end="", flush=True)
            rc = proc.wait()
        if rc != 0:
            print(f"[build] FAILED (exit {rc}); last lines of {LOG}:")
            with open(LOG) as f:
                print("".join(f.readlines()[-60:]))
            return rc
        with open(LOG) as f:
            text = f.read()
        n_kernels = len(re.findall(r"Compiling entry function", text))
        bad = check_spills(text)
        if bad:
            print(f"[build] FAILED: ptxas reports register spills in {len(bad)} kernel(s):")
            print("\n".join(bad))
            return 1
        print(f"[build] ok; ptxas compiled {n_kernels} kernel entries, no spills")
        return 0


if __name__ == "__main__":
    sys.exit(main())
