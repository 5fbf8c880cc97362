"""Block-sparse attention over DALL-E's row, column, conv and full masks (training and cached decode).

Sequence = text_len text tokens, then an image_size x image_size grid in raster order. The kernels
(csrc/cpu/sparse_attention_cpu.cpp, csrc/cuda/sparse_attention_cuda.cu) visit only the key blocks
each query block may attend; the dense reference is dalle_fast.reference.sparse_attention.
"""
import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

from ..reference import sparse_attention as _ref

KINDS = _ref.KINDS
# What each device's kernels accept lives in one place, the C++ boundary
# (csrc/include/dalle_fast/sparse_attention_checks.h); these mirror it for docs and tests, and a test
# checks them against the boundary. CUDA: any head dim in [1, 256] (run in head-dim tiles of 64, 128
# or 256, padded internally); float32, float64, float16, bfloat16 on both devices.
MAX_HEAD_DIM = {"cpu": 512, "cuda": 256}
CUDA_HEAD_DIM_TILES = (64, 128, 256)
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def attention_mask(kind, text_len, image_size, conv_kernel=11, device=None):
    """Dense bool (N, N) mask, N = text_len + image_size**2; True = query i may attend key j."""
    _check_mask_args(kind, text_len, image_size, conv_kernel, "attention_mask")
    return _ref.attention_mask(kind, text_len, image_size, conv_kernel, device=device)


def attention_schedule(depth):
    """Mask kinds of layers 1..depth (the paper's): the last is conv; layer i < depth is column if
    (i - 2) % 4 == 0, else row (so: row, column, row, row, row, column, ...)."""
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
        raise ValueError(f"attention_schedule: depth must be a positive int, got {depth!r}")
    return ["conv" if i == depth else ("column" if (i - 2) % 4 == 0 else "row") for i in range(1, depth + 1)]


def mask_density(kind, text_len, image_size, conv_kernel=11):
    """Fraction of the N x N pairs the mask allows (benchmarks: ideal speedup over dense = 1/density)."""
    m = attention_mask(kind, text_len, image_size, conv_kernel)
    return m.sum().item() / m.numel()


def _check_mask_args(kind, text_len, image_size, conv_kernel, fn):
    if kind not in KINDS:
        raise ValueError(f"{fn}: kind must be one of {KINDS}, got {kind!r}")
    for name, val in (("text_len", text_len), ("image_size", image_size), ("conv_kernel", conv_kernel)):
        if not isinstance(val, int) or isinstance(val, bool):
            raise TypeError(f"{fn}: {name} must be an int, got {type(val).__name__}")
    if text_len < 0:
        raise ValueError(f"{fn}: text_len must be >= 0, got {text_len}")
    if image_size < 1:
        raise ValueError(f"{fn}: image_size must be >= 1, got {image_size}")
    if conv_kernel < 1 or conv_kernel % 2 == 0:
        raise ValueError(f"{fn}: conv_kernel must be odd and positive, got {conv_kernel}")


def _check_python_args(fn, tensors, ints, kind):
    """What the op cannot say clearly itself: Python types (the op's schema would reject them with a
    generic message). Shapes, dtypes, ranges and the mask arguments are the op's own boundary."""
    for name, t in tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a Tensor, got {type(t).__name__}")
    for name, val in ints:
        if not isinstance(val, int) or isinstance(val, bool):
            raise TypeError(f"{fn}: {name} must be an int, got {type(val).__name__}")
    if not isinstance(kind, str):
        raise TypeError(f"{fn}: kind must be a str, got {type(kind).__name__}")


def sparse_attention(q, k, v, kind, text_len, image_size, conv_kernel=11, scale=None):
    """softmax(q k^T * scale + mask) v over the allowed pairs only; q, k, v (B, heads, N, D) with
    N = text_len + image_size**2; differentiable in q, k, v. scale defaults to 1/sqrt(D)."""
    _check_python_args("sparse_attention", (("q", q), ("k", k), ("v", v)),
                       (("text_len", text_len), ("image_size", image_size), ("conv_kernel", conv_kernel)), kind)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out, _ = torch.ops.dalle_fast.sparse_attention(q, k, v, kind, text_len, image_size, conv_kernel, scale)
    return out


def sparse_attention_decode(q, k_cache, v_cache, position, kind, text_len, image_size, conv_kernel=11, scale=None):
    """Row `position` of sparse_attention for one new query per sequence: q (B, heads, 1, D); the caches
    (B, heads, L, D), L > position, hold the keys/values of positions 0..position. Reads only the
    allowed keys. Returns (B, heads, 1, D). Not differentiable (inference)."""
    # A sampling step is tens of microseconds: the op checks shapes, dtypes and the mask arguments itself
    # (ValueError/TypeError naming the argument, on every device); only Python types are checked here.
    if type(position) is not int:
        raise TypeError(f"sparse_attention_decode: position must be an int, got {type(position).__name__}")
    if type(kind) is not str:
        raise TypeError(f"sparse_attention_decode: kind must be a str, got {type(kind).__name__}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return torch.ops.dalle_fast.sparse_attention_decode(q, k_cache, v_cache, position, kind, text_len, image_size,
                                                        conv_kernel, scale)


# ---------------------------------------------------------------- the shared boundary, from Python
def check_arguments(device_type, q, k, v, kind, text_len, image_size, conv_kernel=11, scale=None):
    """Raises what the `device_type` ("cpu" or "cuda") kernels of sparse_attention raise for these
    arguments (their shapes and dtypes; tensors on any device, meta included), else returns None.
    Lets a machine without a GPU ask whether the CUDA kernels would accept a configuration."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    torch.ops.dalle_fast._check_sparse_attention(q, k, v, kind, text_len, image_size, conv_kernel, scale, device_type)


def check_decode_arguments(device_type, q, k_cache, v_cache, position, kind, text_len, image_size, conv_kernel=11,
                           scale=None):
    """As check_arguments, for sparse_attention_decode."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    torch.ops.dalle_fast._check_sparse_attention_decode(q, k_cache, v_cache, position, kind, text_len, image_size,
                                                        conv_kernel, scale, device_type)


def _boundary(check_op, args, device_type=None):
    """Runs an op's C++ boundary (check_op, one of the _check_sparse_attention* ops, for device_type,
    by default that of the first tensor) in a fake kernel, on stand-ins of the tensor arguments:
    under torch.compile or FakeTensorMode a call fails as the real kernel would, with the same
    message. Symbolic shapes are left to the kernel at run time."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if device_type is None:  # an op's fake kernel: the boundary of the tensors' device
        device_type = tensors[0].device.type
        if device_type not in ("cpu", "cuda"):
            return
    if any(not isinstance(s, int) for t in tensors for s in t.shape):
        return
    # Zero-stride CPU stand-ins with the arguments' sizes and dtypes: the check reads nothing else, and
    # meta tensors would come back to the fake kernels (register_fake serves the Meta key too).
    with unset_fake_temporarily():
        check_op(*(torch.empty((), dtype=a.dtype).expand(a.shape) if isinstance(a, torch.Tensor) else a
                   for a in args), device_type)


# ---------------------------------------------------------------- fake kernels (shapes for torch.compile)
@torch.library.register_fake("dalle_fast::sparse_attention")
def _(q, k, v, kind, text_len, image_size, conv_kernel, scale):
    _boundary(torch.ops.dalle_fast._check_sparse_attention, (q, k, v, kind, text_len, image_size, conv_kernel, scale))
    torch._check(q.dim() == 4, lambda: "sparse_attention: q must be 4-D")
    torch._check(k.shape == q.shape and v.shape == q.shape, lambda: "sparse_attention: q, k, v shapes differ")
    torch._check(q.shape[2] == text_len + image_size * image_size,
                 lambda: "sparse_attention: N != text_len + image_size**2")
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=lse_dtype)  # contiguous, as the kernels


@torch.library.register_fake("dalle_fast::_sparse_attention_backward")
def _(grad_out, q, k, v, out, lse, kind, text_len, image_size, conv_kernel, scale):
    _boundary(torch.ops.dalle_fast._check_sparse_attention_backward,
              (grad_out, q, k, v, out, lse, kind, text_len, image_size, conv_kernel, scale))
    torch._check(grad_out.shape == q.shape and out.shape == q.shape,
                 lambda: "_sparse_attention_backward: grad_out/out shapes differ from q")
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@torch.library.register_fake("dalle_fast::sparse_attention_decode")
def _(q, k_cache, v_cache, position, kind, text_len, image_size, conv_kernel, scale):
    _boundary(torch.ops.dalle_fast._check_sparse_attention_decode,
              (q, k_cache, v_cache, position, kind, text_len, image_size, conv_kernel, scale))
    torch._check(q.dim() == 4 and q.shape[2] == 1, lambda: "sparse_attention_decode: q must be (B, heads, 1, D)")
    torch._check(k_cache.shape == v_cache.shape, lambda: "sparse_attention_decode: cache shapes differ")
    return q.new_empty(q.shape)


# The check ops' fake (and meta) kernels run the check itself on stand-ins and return nothing.
@torch.library.register_fake("dalle_fast::_check_sparse_attention")
def _(q, k, v, kind, text_len, image_size, conv_kernel, scale, device_type):
    _boundary(torch.ops.dalle_fast._check_sparse_attention,
              (q, k, v, kind, text_len, image_size, conv_kernel, scale), device_type)


@torch.library.register_fake("dalle_fast::_check_sparse_attention_backward")
def _(grad_out, q, k, v, out, lse, kind, text_len, image_size, conv_kernel, scale, device_type):
    _boundary(torch.ops.dalle_fast._check_sparse_attention_backward,
              (grad_out, q, k, v, out, lse, kind, text_len, image_size, conv_kernel, scale), device_type)


@torch.library.register_fake("dalle_fast::_check_sparse_attention_decode")
def _(q, k_cache, v_cache, position, kind, text_len, image_size, conv_kernel, scale, device_type):
    _boundary(torch.ops.dalle_fast._check_sparse_attention_decode,
              (q, k_cache, v_cache, position, kind, text_len, image_size, conv_kernel, scale), device_type)


# ---------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    q, k, v, kind, text_len, image_size, conv_kernel, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.args = (kind, text_len, image_size, conv_kernel, scale)
    if any(ctx.needs_input_grad[:3]):
        ctx.save_for_backward(q, k, v, out, lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.dalle_fast._sparse_attention_backward(grad_out.contiguous(), q, k, v, out, lse, *ctx.args)
    need = ctx.needs_input_grad
    return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None,
            None, None, None, None, None)


torch.library.register_autograd("dalle_fast::sparse_attention", _backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("sparse_attention: double backward (gradients of gradients) is not supported")


def _setup_backward_context(ctx, inputs, output):
    pass


torch.library.register_autograd("dalle_fast::_sparse_attention_backward", _no_double_backward,
                                setup_context=_setup_backward_context)


# ---------------------------------------------------------------- samples and selftest
def sample_inputs(device="cpu", dtype=torch.float32, requires_grad=False, seed=0):
    """(args, kwargs) for sparse_attention: every kind, text_len 0, a 1x1 image, odd sizes, batch > 1."""
    g = torch.Generator().manual_seed(seed)
    cases = [("row", 5, 4, 1, 2, 32, 11), ("column", 3, 5, 2, 1, 32, 11), ("conv", 7, 6, 1, 2, 64, 3),
             ("full", 0, 3, 2, 1, 32, 11), ("row", 4, 1, 1, 1, 32, 11), ("conv", 0, 9, 1, 1, 32, 11)]
    for kind, T, S, B, H, D, ck in cases:
        N = T + S * S
        q, k, v = (torch.randn(B, H, N, D, generator=g).to(device=device, dtype=dtype).requires_grad_(requires_grad)
                   for _ in range(3))
        yield (q, k, v, kind, T, S), {"conv_kernel": ck}


# The selftest's CUDA rows cover every head-dim tile of the CUDA kernels, at and below its size.
SELFTEST_HEAD_DIMS = (16, 40, 48, 80, 96, 128, 160, 256)


def selftest_cases(device, dtype, head_dim_sweep=None):
    """The (args, kwargs) the selftest runs: the first four sample_inputs, plus (on CUDA, or when
    head_dim_sweep) one conv case per SELFTEST_HEAD_DIMS entry. tests/test_gpu_cases.py checks these
    against the CUDA boundary on the CPU (device "meta")."""
    cases = [c for n, c in zip(range(4), sample_inputs(device, dtype, requires_grad=True))]
    if head_dim_sweep if head_dim_sweep is not None else torch.device(device).type == "cuda":
        g = torch.Generator().manual_seed(1)
        for D in SELFTEST_HEAD_DIMS:
            q, k, v = (torch.randn(1, 2, 3 + 5 * 5, D, generator=g).to(device=device, dtype=dtype).requires_grad_()
                       for _ in range(3))
            cases.append(((q, k, v, "conv", 3, 5), {"conv_kernel": 3}))
    return cases


def selftest(device):
    """Rows (op, case, dtype, max_err, tol): forward and gradients against the float64 reference, the
    bar being twice PyTorch's own error doing the same math in that dtype."""
    from ..testing import low_precision_tolerance, max_abs_err
    rows = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for (q, k, v, kind, T, S), kw in selftest_cases(device, dtype):
            case = f"{kind} T={T} S={S} D={q.shape[-1]}"
            x64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
            xdt = [t.detach().clone().requires_grad_() for t in (q, k, v)]
            ref64 = _ref.sparse_attention(*x64, kind, T, S, **kw)
            refdt = _ref.sparse_attention(*xdt, kind, T, S, **kw)
            out = sparse_attention(q, k, v, kind, T, S, **kw)
            rows.append(("sparse_attention", case, dtype, max_abs_err(out, ref64), low_precision_tolerance(ref64, refdt)))
            go = torch.randn_like(out)
            g64 = torch.autograd.grad(ref64, x64, go.double())
            gdt = torch.autograd.grad(refdt, xdt, go)
            got = torch.autograd.grad(out, (q, k, v), go)
            for name, a, e, p in zip(("dq", "dk", "dv"), got, g64, gdt):
                rows.append(("sparse_attention." + name, case, dtype, max_abs_err(a, e), low_precision_tolerance(e, p)))
            pos = T + S * S - 1
            dec = sparse_attention_decode(q[:, :, pos:pos + 1].detach(), k.detach(), v.detach(), pos, kind, T, S, **kw)
            rows.append(("sparse_attention_decode", case + f" p={pos}", dtype,
                         max_abs_err(dec, ref64[:, :, pos:pos + 1]),
                         low_precision_tolerance(ref64[:, :, pos:pos + 1], refdt[:, :, pos:pos + 1])))
    return rows
