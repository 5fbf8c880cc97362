"""Static evidence per CUDA kernel, without a GPU: registers, spills, stack and shared memory from the
ptxas -v report in the build log, and the instruction mix (tensor-core HMMA/HGMMA, local-memory
LDL/STL, total) from the SASS of the built library, read with cuobjdump (shipped with triton).

    .venv/bin/python benchmarks/bench_gpu_static.py [--log build/build.log] [--lib dalle_fast/_C*.so]

One CSV row per (kernel template instance, architecture) in results/gpu_static.csv. The ptxas report
exists only in a log of a build that compiled the .cu files (scripts/build.py writes build/build.log);
the SASS only in a library built with CUDA. What is missing is said, not invented. --quick is accepted
(and changes nothing: reading the log and the SASS takes seconds).
"""
import argparse
import csv
import datetime
import os
import platform
import re
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import RESULTS  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMNS = ["kernel", "arch", "registers", "spill_stores", "spill_loads", "stack_bytes", "smem_bytes",
           "hmma", "hgmma", "local_mem_ops", "instructions", "mangled", "torch", "host", "date"]
TENSOR_OPS = ("HMMA", "HGMMA")


def parse_ptxas(text):
    """{(mangled, arch): {registers, spill_stores, spill_loads, stack_bytes, smem_bytes}} from ptxas -v."""
    out, key = {}, None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'", line)
        if m:
            key = (m.group(1), m.group(2))
            out[key] = {"registers": "", "spill_stores": "", "spill_loads": "", "stack_bytes": "", "smem_bytes": 0}
            continue
        if key is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            out[key].update(stack_bytes=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            out[key]["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            out[key]["smem_bytes"] = int(s.group(1)) if s else 0
    return out


def short_name(mangled):
    """A readable kernel name: the demangled name without namespaces and parameter lists."""
    name = mangled
    if shutil.which("c++filt"):
        name = subprocess.run(["c++filt", mangled], capture_output=True, text=True).stdout.strip() or mangled
    name = re.sub(r"\(anonymous namespace\)::", "", name)
    if name.endswith(")"):  # drop the parameter list: the last balanced (...) group
        depth = 0
        for i in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                name = name[:i]
                break
    name = re.sub(r"^void ", "", name)
    name = name.replace("dalle_fast::", "").replace("c10::", "").replace("__nv_bfloat16", "bf16")
    name = name.replace("__half", "half")
    return re.sub(r"\s+", " ", name)[:160]


def collect(log_path, lib_path):
    ptxas = {}
    if log_path and os.path.exists(log_path):
        with open(log_path, errors="ignore") as f:
            ptxas = parse_ptxas(f.read())
    print(f"ptxas report: {len(ptxas)} kernel entries from {log_path}" if ptxas else
          f"no ptxas report in {log_path!r} (a CPU-only build, or a log of an incremental build)")
    sass = {}
    if lib_path:
        try:
            from dalle_fast.testing import sass_opcodes
            sass = sass_opcodes(lib_path, keep=lambda n: "dalle_fast" in n)
        except (FileNotFoundError, subprocess.CalledProcessError) as e:
            print(f"no SASS read from {lib_path}: {e}")
    print(f"SASS: {len(sass)} kernel entries from {lib_path}")
    rows = []
    for key in sorted(set(ptxas) | set((fn, arch) for arch, fn in sass)):
        mangled, arch = key
        ops = sass.get((arch, mangled))
        p = ptxas.get(key, {})
        rows.append({"kernel": short_name(mangled), "arch": arch, **{k: p.get(k, "") for k in
                     ("registers", "spill_stores", "spill_loads", "stack_bytes", "smem_bytes")},
                     "hmma": "" if ops is None else sum(op.startswith("HMMA") for op in ops),
                     "hgmma": "" if ops is None else sum(op.startswith("HGMMA") for op in ops),
                     "local_mem_ops": "" if ops is None else sum(op.startswith(("LDL", "STL")) for op in ops),
                     "instructions": "" if ops is None else len(ops), "mangled": mangled})
    return rows


def default_library():
    try:
        import dalle_fast
        return dalle_fast._C.__file__
    except Exception as e:  # an unbuilt checkout: report it, read the log alone
        print(f"dalle_fast is not importable ({e}); reading the build log only")
        return None


def write(rows, path=None):
    import torch
    path = path or os.path.join(RESULTS, "gpu_static.csv")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    common = {"torch": torch.__version__, "host": platform.node(),
              "date": datetime.datetime.now().isoformat(timespec="seconds")}
    with open(path, "w", newline="") as f:  # a snapshot of one build, not a history
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows({**r, **common} for r in rows)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="accepted for run_all.py; changes nothing")
    p.add_argument("--log", default=os.path.join(ROOT, "build", "build.log"))
    p.add_argument("--lib", default=None, help="default: the imported dalle_fast._C")
    a = p.parse_args(argv)
    rows = collect(a.log, a.lib or default_library())
    if not rows:
        print("no CUDA kernels found: nothing to write (built without CUDA?)")
        return 0
    old = os.path.join(RESULTS, "gpu_static.csv")
    if not any(r["registers"] != "" for r in rows) and os.path.exists(old):
        # an incremental build's log has no ptxas report: keep the rows of the last full build
        print(f"the log has no ptxas report (an incremental build?): keeping {old}")
        return 0
    spilled = [r for r in rows if (r["spill_stores"] or 0) or (r["spill_loads"] or 0)]
    tensor = [r for r in rows if (r["hmma"] or 0) or (r["hgmma"] or 0)]
    print(f"{len(rows)} kernel entries; {len(spilled)} with spills; {len(tensor)} using tensor cores")
    print("wrote", write(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
