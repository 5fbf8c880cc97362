"""Timing, machine ceilings and CSV rows shared by every benchmark script.

Rows: op, provider, mode, shape, dtype, device, median_ms, p20_ms, p80_ms, bytes, gbps, gflops,
ratio (the provider's median over the baseline's: >1 means faster than the baseline), extra,
versions, host, date, threads, the machine's CPU count and its 1-minute load average when the script
started (load1: a load near or above the CPU count means the row was taken while others ran).
Compare ratios measured in one run, never absolute times across runs.

DALLE_FAST_BENCH_RESULTS=<dir> sends the CSVs there (run_all.py --quick uses it, so that CI-sized runs
never mix with the committed rows), and makes --quick runs write their CSV too.
"""
import argparse
import csv
import datetime
import os
import platform
import statistics
import time

import torch

DEFAULT_RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
RESULTS = os.environ.get("DALLE_FAST_BENCH_RESULTS") or DEFAULT_RESULTS
FIELDS = ["op", "provider", "mode", "shape", "dtype", "device", "median_ms", "p20_ms", "p80_ms",
          "bytes", "gbps", "gflops", "ratio", "extra", "torch", "dalle_fast", "host", "date", "threads", "load1", "cpus"]


def bench_parser(doc, threads=2):
    """An argument parser with what the newer scripts share: --quick and --threads."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI-sized run: small shapes, few repetitions")
    p.add_argument("--threads", type=int, default=threads, help="intra-op threads")
    return p


def wants_csv(quick):
    """Full runs write their CSV; --quick runs only when run_all.py (or the user) chose a results folder."""
    return (not quick) or bool(os.environ.get("DALLE_FAST_BENCH_RESULTS"))


def read_rows(name, results=None):
    """Every row of results/<name>.csv as dicts (an empty list when there is no such file)."""
    path = os.path.join(results or RESULTS, f"{name}.csv")
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


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
    """Measured GEMM ceiling of this machine for dtype (ATen's GEMM: oneDNN/AMX on the CPU).

    For a 16-bit dtype on the CPU it is the better of that dtype's GEMM and fp32's: a CPU without native
    bf16/fp16 units runs ATen's 16-bit GEMM through a slow fallback (0.5 GFLOP/s on an AVX2 machine),
    while oneDNN's 16-bit convolutions convert and use the fp32 units, so the 16-bit GEMM alone is no
    ceiling (it once reported a dVAE step at 589% of it)."""
    def peak(dt):
        a = torch.randn(n, n, device=device, dtype=dt)
        b = torch.randn(n, n, device=device, dtype=dt)
        t = measure(lambda: a @ b, device, warmup=2, reps=5)
        return 2 * n ** 3 / (t["median_ms"] * 1e-3) / 1e9

    own = peak(dtype)
    return max(own, peak(torch.float32)) if device == "cpu" and dtype != torch.float32 else own


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
                       "host": platform.node(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
                       "load1": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else "",
                       "cpus": os.cpu_count() or ""}

    def add(self, **row):
        row = {**{k: "" for k in FIELDS}, **self.common, "threads": torch.get_num_threads(), **row}
        for k in ("median_ms", "p20_ms", "p80_ms", "gbps", "gflops", "ratio"):
            if isinstance(row[k], float):
                row[k] = round(row[k], 4)
        self.rows.append(row)
        return row

    def write(self, path=None):
        path = path or os.path.join(RESULTS, f"{self.name}.csv")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        old = []
        if os.path.exists(path):
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                if reader.fieldnames != FIELDS:  # an older header: rewrite the file with today's columns
                    old = [{k: r.get(k, "") or "" for k in FIELDS} for r in reader]
                else:
                    old = None
        with open(path, "a" if old is None else "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            if old is not None:
                w.writeheader()
                w.writerows(old)
            w.writerows(self.rows)
        return path

    def finish(self, write_csv):
        """Prints the table; appends the rows to the CSV when write_csv."""
        self.print_table()
        if write_csv:
            print("wrote", self.write())

    def print_table(self, cols=("op", "provider", "mode", "shape", "dtype", "device", "median_ms", "ratio",
                                "gbps", "gflops", "extra")):
        widths = {c: max(len(c), *(len(str(r[c])) for r in self.rows)) for c in cols} if self.rows else {}
        print("  ".join(c.ljust(widths[c]) for c in cols))
        for r in self.rows:
            print("  ".join(str(r[c]).ljust(widths[c]) for c in cols))


def train_modes(loss_fn, params):
    """The three timed modes of a training step, as callables: fwd (the loss, no autograd), bwd (the
    gradients of one kept forward graph, again and again) and fwd+bwd (a whole step without the optimizer).
    loss_fn() returns a scalar loss; params are the tensors to differentiate."""
    params = list(params)

    def fwd():
        with torch.no_grad():
            return loss_fn()

    kept = []

    def bwd():
        if not kept:
            kept.append(loss_fn())
        return torch.autograd.grad(kept[0], params, retain_graph=True, allow_unused=True)

    def fwd_bwd():
        return torch.autograd.grad(loss_fn(), params, allow_unused=True)

    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd}


def import_peer():
    """dalle-pytorch (the peer of the generation and training benchmarks), or None with the reason printed.
    It imports its VQGAN, YTTM and HF tokenizer code at import time; none of it is used here (nor
    installable beside torch 2.14 without pulling old pins), so those modules are stubbed."""
    import sys
    import types
    for name, attrs in [("taming", {}), ("taming.models", {}),
                        ("taming.models.vqgan", dict(VQModel=object, GumbelVQ=object)),
                        ("youtokentome", {}), ("transformers", dict(BertTokenizer=object)),
                        ("pkg_resources", dict(get_distribution=lambda n: types.SimpleNamespace(version="?")))]:
        if name not in sys.modules:
            try:
                __import__(name)
            except Exception:
                m = types.ModuleType(name)
                m.__dict__.update(attrs)
                sys.modules[name] = m
    try:
        import dalle_pytorch
    except Exception as e:  # report exactly why the peer is missing
        print(f"dalle-pytorch could not be imported ({e!r}); `make bench` installs it "
              "(scripts/requirements-peers*.txt)")
        return None
    return dalle_pytorch
