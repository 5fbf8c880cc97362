"""Timing, machine ceilings and CSV rows shared by every benchmark script.

Rows: op, provider, mode, shape, dtype, device, median_ms, p20_ms, p80_ms, bytes, gbps, gflops,
ratio (the provider's median over the baseline's: >1 means faster than the baseline), extra,
version, date. Compare ratios measured in one run, never absolute times across runs.
"""
import csv
import datetime
import os
import platform
import statistics
import time

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
FIELDS = ["op", "provider", "mode", "shape", "dtype", "device", "median_ms", "p20_ms", "p80_ms",
          "bytes", "gbps", "gflops", "ratio", "extra", "torch", "dalle_fast", "host", "date"]


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def measure(fn, device="cpu", warmup=3, reps=10, min_time=0.0):
    """p20/p50/p80 wall time of fn() in milliseconds, after warm-up."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    t_start = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - t_start) < min_time:
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = lambda p: times[min(len(times) - 1, int(p * len(times)))]  # noqa: E731
    return {"median_ms": statistics.median(times), "p20_ms": q(0.2), "p80_ms": q(0.8)}


def matmul_peak_gflops(device="cpu", dtype=torch.float32, n=1024):
    """Measured GEMM ceiling of this machine for dtype (ATen's GEMM: oneDNN/AMX on the CPU)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = measure(lambda: a @ b, device, warmup=2, reps=5)
    return 2 * n ** 3 / (t["median_ms"] * 1e-3) / 1e9


def copy_peak_gbps(device="cpu", mb=256):
    """Measured memory ceiling: a large tensor copy, bytes read + written per second."""
    x = torch.empty(mb * 2 ** 20 // 4, device=device)
    y = torch.empty_like(x)
    t = measure(lambda: y.copy_(x), device, warmup=2, reps=5)
    return 2 * x.numel() * 4 / (t["median_ms"] * 1e-3) / 1e9


class Recorder:
    """Collects rows, fills the common columns, prints a table and appends to a CSV."""

    def __init__(self, name):
        import dalle_fast
        self.name = name
        self.rows = []
        self.common = {"torch": torch.__version__, "dalle_fast": dalle_fast.__version__,
                       "host": platform.node(), "date": datetime.datetime.now().isoformat(timespec="seconds")}

    def add(self, **row):
        row = {**{k: "" for k in FIELDS}, **self.common, **row}
        for k in ("median_ms", "p20_ms", "p80_ms", "gbps", "gflops", "ratio"):
            if isinstance(row[k], float):
                row[k] = round(row[k], 4)
        self.rows.append(row)
        return row

    def write(self, path=None):
        path = path or os.path.join(RESULTS, f"{self.name}.csv")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        new = not os.path.exists(path)
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            if new:
                w.writeheader()
            w.writerows(self.rows)
        return path

    def print_table(self, cols=("op", "provider", "mode", "shape", "dtype", "device", "median_ms", "ratio",
                                "gbps", "gflops", "extra")):
        widths = {c: max(len(c), *(len(str(r[c])) for r in self.rows)) for c in cols} if self.rows else {}
        print("  ".join(c.ljust(widths[c]) for c in cols))
        for r in self.rows:
            print("  ".join(str(r[c]).ljust(widths[c]) for c in cols))
