"""`python -m dalle_fast.selftest [--device cpu|cuda]`: every built backend on every present device against
the reference.

Each op module under dalle_fast.ops exposes selftest(device) -> list of rows (op, case, dtype, max_err, tol);
the model-level checks (which build a DALLE, so they live here and not under ops/) return the same rows.
This prints the machine (for CUDA: the GPU, the driver, the toolkits and the archs the kernels were built
for), then the rows as a table, and says what to do on a failure. Exit status: 0 all passed, 1 a row
failed, 2 a device was asked for that is not there.
"""
import argparse
import importlib
import shutil
import subprocess
import sys

import torch

OP_MODULES = ["dalle_fast.ops.gumbel_softmax", "dalle_fast.ops.logit_laplace", "dalle_fast.ops.sparse_attention",
              "dalle_fast.ops.resblock_scaling", "dalle_fast.ops.diffusion"]

ON_FAILURE = (
    "What to do: file an issue on dalle_fast with this whole output (the table and the lines above it).\n"
    "Until the kernel is fixed, route the model's attention through FlexAttention instead of the fused\n"
    "kernels by setting DALLE_FAST_ATTENTION_BACKEND=flex (or =dense) in the environment:\n"
    "    DALLE_FAST_ATTENTION_BACKEND=flex dalle-fast generate \"...\" --device {device}")


@torch.no_grad()
def decode_step_rows(device):
    """Rows for transformer_decode_step: ten fused steps of a small model with every mask kind against
    the float64 module path, the bar being twice the module path's own error in that dtype."""
    from .models.dalle import DALLE, DALLEConfig
    from .testing import low_precision_tolerance, max_abs_err
    cfg = DALLEConfig.tiny(depth=4, attention_kinds=["row", "column", "conv", "full"], text_len=5, image_size=4,
                           dim=64, heads=2, dim_head=32, backend="fused")
    torch.manual_seed(0)
    base = DALLE(cfg).eval()
    g = torch.Generator().manual_seed(1)
    text = torch.randint(1, cfg.num_text_tokens, (2, cfg.text_len), generator=g).to(device)
    image = torch.randint(0, cfg.num_image_tokens, (2, 10), generator=g).to(device)

    def steps(dtype, fused):
        m = DALLE(cfg)
        m.load_state_dict(base.state_dict())
        m = m.to(device=device, dtype=dtype).eval()
        caches = m.new_kv_caches(2)
        out = [m.prefill(text, caches)]
        out += [m.decode_step(image[:, j], j, caches, fused=fused) for j in range(image.shape[1])]
        return torch.stack(out, 1)

    ref64 = steps(torch.float64, False)
    rows = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        rows.append(("transformer_decode_step", "row,column,conv,full x10 B=2", dtype,
                     max_abs_err(steps(dtype, True), ref64), low_precision_tolerance(ref64, steps(dtype, False))))
    return rows


def checks():
    """(name, selftest(device) -> rows) for every op module, then the model-level checks."""
    out = [(name.rsplit(".", 1)[-1], importlib.import_module(name).selftest) for name in OP_MODULES]
    return out + [("transformer_decode_step", decode_step_rows)]


def cuda_build():
    """(toolkit, arch list) the CUDA kernels were built with, or None for a CPU-only build."""
    info = str(torch.ops.dalle_fast._build_cuda_info())
    if not info:
        return None
    toolkit, _, archs = info.partition("|")
    return toolkit, archs


def driver_version():
    """The NVIDIA driver's version from nvidia-smi, or a sentence saying why it is unknown."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "unknown (no nvidia-smi on PATH)"
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return f"unknown (nvidia-smi: {e})"
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else f"unknown (nvidia-smi exit {out.returncode})"


def _arch_covered(capability, archs):
    """Does an arch list such as '8.0;9.0+PTX' hold SASS for this capability (or PTX it can JIT)?"""
    major, minor = capability
    for a in archs.replace(" ", ";").split(";"):
        ptx = a.endswith("+PTX")
        try:
            am, an = (int(x) for x in a.replace("+PTX", "").split(".")[:2])
        except ValueError:
            continue
        if (am, an) == (major, minor) or (am == major and an <= minor) or (ptx and (am, an) <= (major, minor)):
            return True
    return False


def describe_cuda(out):
    """Prints the GPUs, the driver, the toolkits and the built archs. Returns False when no CUDA device
    can be tested (and says why)."""
    build = cuda_build()
    if build is None:
        print("CUDA: no CUDA device can be tested: this dalle_fast build has no CUDA kernels (it was built "
              "CPU-only; rebuild with nvcc on PATH and without DALLE_FAST_CPU_ONLY=1)", file=out)
        return False
    toolkit, archs = build
    print(f"CUDA kernels: built with toolkit {toolkit} for archs {archs}; torch {torch.__version__} uses CUDA "
          f"runtime {torch.version.cuda}", file=out)
    if not torch.cuda.is_available():
        print("CUDA: no CUDA device (torch.cuda.is_available() is False): nothing to test on cuda", file=out)
        return False
    print(f"driver: {driver_version()}", file=out)
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        cap = (p.major, p.minor)
        print(f"GPU {i}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2 ** 30:.1f} GiB", file=out)
        if not _arch_covered(cap, archs):
            print(f"  WARNING: dalle_fast was built for {archs}, which has no code for sm_{p.major}{p.minor}: "
                  f"rebuild with TORCH_CUDA_ARCH_LIST=\"{p.major}.{p.minor}\"", file=out)
    return True


def run(devices=None, out=None):
    """Prints the report (to stdout by default); returns 0 when every row passed, 1 on a failed row, 2 when
    a device asked for is not present."""
    out = out or sys.stdout
    import dalle_fast
    from dalle_fast.testing import devices as present_devices
    present = present_devices()
    asked = list(devices) if devices else present
    print(f"dalle_fast {dalle_fast.__version__}, torch {torch.__version__}, compiled backends: "
          f"{','.join(dalle_fast.backends())}, devices tested: {','.join(d for d in asked if d in present) or '-'}",
          file=out)
    if "cuda" in asked or "cuda" in dalle_fast.backends():
        describe_cuda(out)
    missing = [d for d in asked if d not in present]
    if missing:
        print(f"selftest: {', '.join(missing)}: no such device here, nothing tested on it", file=out)
        return 2
    header = f"{'op':<28}{'device':<8}{'dtype':<10}{'case':<34}{'max err':>11}{'bar':>11}  result"
    print(header, file=out)
    print("-" * len(header), file=out)
    failures, failed_devices = 0, set()
    for name, selftest in checks():
        for device in asked:
            try:
                rows = selftest(device)
            except Exception as e:  # a crash in one op must not hide the others
                print(f"{name:<28}{device:<8}{'':<10}{'':<34}{'':>11}{'':>11}  ERROR {e!r}", file=out)
                failures += 1
                failed_devices.add(device)
                continue
            for op, case, dtype, err, tol in rows:
                ok = err <= tol
                failures += not ok
                if not ok:
                    failed_devices.add(device)
                print(f"{op:<28}{device:<8}{str(dtype).replace('torch.', ''):<10}{case:<34}{err:>11.2e}{tol:>11.2e}"
                      f"  {'ok' if ok else 'FAIL'}", file=out)
    print(f"selftest: {'all passed' if failures == 0 else f'{failures} FAILED'}", file=out)
    if failures:
        print(ON_FAILURE.format(device=sorted(failed_devices)[-1]), file=out)
    return 1 if failures else 0


def add_arguments(parser):
    parser.add_argument("--device", choices=("cpu", "cuda"), action="append",
                        help="test this device (repeatable); default: every present device")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m dalle_fast.selftest", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run(args.device)


if __name__ == "__main__":
    sys.exit(main())
