"""`python -m dalle_fast.selftest`: every built backend on every present device against the reference.

Each op module under dalle_fast.ops exposes selftest(device) -> list of rows
(op, case, dtype, max_err, tol); this prints them as a table and exits 1 on any failure.
"""
import importlib
import sys

OP_MODULES = ["dalle_fast.ops.gumbel_softmax", "dalle_fast.ops.logit_laplace", "dalle_fast.ops.sparse_attention",
              "dalle_fast.ops.decode_step", "dalle_fast.ops.diffusion"]


def run(devices=None, out=sys.stdout):
    import torch
    import dalle_fast
    from dalle_fast.testing import devices as present_devices
    devices = devices or present_devices()
    print(f"dalle_fast {dalle_fast.__version__}, torch {torch.__version__}, compiled backends: "
          f"{','.join(dalle_fast.backends())}, devices tested: {','.join(devices)}", file=out)
    if "cuda" in dalle_fast.backends() and "cuda" not in devices:
        print("(CUDA kernels are compiled in, but no CUDA device is present: they are not exercised)", file=out)
    header = f"{'op':<28}{'device':<8}{'dtype':<10}{'case':<34}{'max err':>11}{'bar':>11}  result"
    print(header, file=out)
    print("-" * len(header), file=out)
    failures = 0
    for name in OP_MODULES:
        mod = importlib.import_module(name)
        for device in devices:
            try:
                rows = mod.selftest(device)
            except Exception as e:  # a crash in one op must not hide the others
                print(f"{name.rsplit('.', 1)[-1]:<28}{device:<8}{'':<10}{'':<34}{'':>11}{'':>11}  ERROR {e!r}",
                      file=out)
                failures += 1
                continue
            for op, case, dtype, err, tol in rows:
                ok = err <= tol
                failures += not ok
                print(f"{op:<28}{device:<8}{str(dtype).replace('torch.', ''):<10}{case:<34}{err:>11.2e}{tol:>11.2e}"
                      f"  {'ok' if ok else 'FAIL'}", file=out)
    print(f"selftest: {'all passed' if failures == 0 else f'{failures} FAILED'}", file=out)
    return failures


def main():
    sys.exit(1 if run() else 0)


if __name__ == "__main__":
    main()
