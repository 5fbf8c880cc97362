#!/usr/bin/env python
"""Run every benchmark script (bench_*.py) in this folder, one after the other, in one process each.
Pass --quick to forward it to every script. Results accumulate in benchmarks/results/*.csv;
benchmarks/summarize.py turns them into the README's markdown table."""
import glob
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv):
    scripts = sorted(glob.glob(os.path.join(HERE, "bench_*.py")))
    failed = []
    for s in scripts:
        print(f"=== {os.path.basename(s)} {' '.join(argv)}", flush=True)
        if subprocess.call([sys.executable, s, *argv]) != 0:
            failed.append(os.path.basename(s))
    if failed:
        print("benchmarks that failed:", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
