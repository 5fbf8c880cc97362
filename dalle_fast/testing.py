"""Devices, dtypes, error measures and tolerances shared by tests, benchmarks and the selftest."""
import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOW_PRECISION = (torch.float16, torch.bfloat16)


def cuda_available():
    """True when a CUDA device is present and the CUDA kernels were compiled in."""
    from . import backends
    return "cuda" in backends() and torch.cuda.is_available()


def devices():
    """'cpu' always; 'cuda' only when a device is present (checked when called, never at import)."""
    return ["cpu"] + (["cuda"] if cuda_available() else [])


def max_abs_err(actual, expected):
    """Largest absolute difference, in float64; 0 for empty tensors."""
    if actual.numel() == 0:
        return 0.0
    return (actual.detach().double() - expected.detach().double()).abs().max().item()


def low_precision_tolerance(expected64, pytorch_same_dtype, factor=2.0):
    """The bar for a kernel in a low precision: `factor` times the error of the same math done by
    PyTorch in that dtype, against the float64 truth (the flash-attention convention). A floor of a
    few ulps of the output's scale keeps the bar meaningful where PyTorch happens to be exact."""
    dtype = pytorch_same_dtype.dtype
    torch_err = max_abs_err(pytorch_same_dtype, expected64)
    scale = expected64.detach().abs().max().item() if expected64.numel() else 0.0
    floor = 4 * torch.finfo(dtype).eps * max(scale, 1e-3)
    return factor * torch_err + floor


def assert_within_pytorch_error(actual, expected64, pytorch_same_dtype, factor=2.0, what="output"):
    """Asserts |actual - truth| <= factor * |pytorch_in_dtype - truth| (+ a floor of a few ulps)."""
    err = max_abs_err(actual, expected64)
    tol = low_precision_tolerance(expected64, pytorch_same_dtype, factor)
    assert err <= tol, (f"{what}: error {err:.3e} against the float64 reference exceeds {factor}x "
                        f"PyTorch's own {pytorch_same_dtype.dtype} error (bar {tol:.3e})")
    return err, tol


def default_tolerance(dtype):
    """(rtol, atol) for fp32/fp64 kernels against a float64 reference."""
    return {torch.float64: (1e-10, 1e-12), torch.float32: (1e-5, 1e-5),
            torch.float16: (1e-2, 1e-2), torch.bfloat16: (2e-2, 2e-2)}[dtype]


def make_noncontiguous(t):
    """A copy of t with the same values whose storage is strided (every other element)."""
    big = torch.empty(t.shape[:-1] + (t.shape[-1] * 2,), dtype=t.dtype, device=t.device) if t.dim() else None
    if big is None or t.shape[-1] == 0:
        return t.clone()
    out = big[..., ::2]
    out.copy_(t)
    out.requires_grad_(t.requires_grad)
    return out


def find_cuobjdump():
    """Path of cuobjdump, or None. It ships with triton (a torch dependency: triton/backends/nvidia/bin),
    pip's nvidia-cuda-cuobjdump, or the CUDA toolkit."""
    import glob
    import importlib.util
    import os
    import shutil
    candidates = []
    spec = importlib.util.find_spec("triton")
    if spec and spec.origin:
        candidates.append(os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", "cuobjdump"))
    candidates.append(shutil.which("cuobjdump"))
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"))):
        if home:
            candidates.append(os.path.join(home, "bin", "cuobjdump"))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def sass_opcodes(library, keep=lambda name: True):
    """{(arch, mangled kernel name): [opcode, ...]} read with cuobjdump -sass from a built library, for the
    kernels whose name `keep` accepts. Needs no GPU. Args: library: path of a .so; keep: name filter.
    Returns: the dict (empty for a library without device code)."""
    import re
    import subprocess
    tool = find_cuobjdump()
    if not tool:
        raise FileNotFoundError("cuobjdump not found: it ships with triton (triton/backends/nvidia/bin), "
                                "`pip install nvidia-cuda-cuobjdump`, or the CUDA toolkit")
    text = subprocess.run([tool, "-sass", library], check=True, capture_output=True, text=True).stdout
    out, arch, fn = {}, None, None
    for line in text.splitlines():
        m = re.search(r"arch = (sm_\d+)", line)
        if m:
            arch, fn = m.group(1), None
            continue
        m = re.search(r"Function : (\S+)", line)
        if m:
            fn = m.group(1) if keep(m.group(1)) else None
            if fn:
                out[(arch, fn)] = []
            continue
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if fn and m:
            out[(arch, fn)].append(m.group(1))
    return out
