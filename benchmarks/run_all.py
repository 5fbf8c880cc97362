#!/usr/bin/env python
"""Every benchmark of this folder, then the README's performance section and the plots.

    .venv/bin/python benchmarks/run_all.py            # = make bench: results/*.csv, docs/bench_*.png, README.md
    .venv/bin/python benchmarks/run_all.py --quick    # CI-sized: results/quick/*.csv, its plots and section.md
    .venv/bin/python benchmarks/run_all.py --only gumbel,logit   # the scripts whose name contains one of these

Each bench_*.py runs in its own child process (one at a time, so they do not compete for the cores),
with --quick forwarded. A full run appends to benchmarks/results/*.csv and then regenerates the
section between the bench markers of README.md and docs/bench_*.png with benchmarks/report.py. A quick
run starts from an empty benchmarks/results/quick/ and writes everything there, never touching the
committed rows or the README. The exit status is 1 when any script failed (the others still run).
"""
import argparse
import glob
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
QUICK_RESULTS = os.path.join(HERE, "results", "quick")


def scripts(only=None):
    found = sorted(glob.glob(os.path.join(HERE, "bench_*.py")))
    if only:
        found = [s for s in found if any(o in os.path.basename(s) for o in only.split(","))]
    return found


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI-sized runs, results under benchmarks/results/quick/")
    p.add_argument("--only", default=None, help="comma list of substrings of script names")
    p.add_argument("--no-report", action="store_true", help="run the scripts only")
    a = p.parse_args(argv)
    env = dict(os.environ)
    if a.quick:
        shutil.rmtree(QUICK_RESULTS, ignore_errors=True)
        os.makedirs(QUICK_RESULTS)
        env["DALLE_FAST_BENCH_RESULTS"] = QUICK_RESULTS
    failed = []
    for s in scripts(a.only):
        args = ["--quick"] if a.quick else []
        print(f"=== {os.path.basename(s)} {' '.join(args)}", flush=True)
        t0 = time.time()
        if subprocess.call([sys.executable, s, *args], env=env, cwd=ROOT) != 0:
            failed.append(os.path.basename(s))
        print(f"=== {os.path.basename(s)}: {time.time() - t0:.0f} s", flush=True)
    if not a.no_report:
        from report import main as report
        if a.quick:
            report(["--results", QUICK_RESULTS, "--readme", os.path.join(QUICK_RESULTS, "section.md"),
                    "--figures", QUICK_RESULTS])
        else:
            report([])
    if failed:
        print("benchmarks that failed:", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
