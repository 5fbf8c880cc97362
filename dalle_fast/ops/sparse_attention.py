"""Block-sparse attention over DALL-E's row, column, conv and full masks (training and cached decode).

Sequence = text_len text tokens, then an image_size x image_size grid in raster order. The kernels
(csrc/cpu/sparse_attention_cpu.cpp, csrc/cuda/sparse_attention_cuda.cu) visit only the key blocks
each query block may attend; the dense reference is dalle_fast.reference.sparse_attention.
"""
import math

import torch

from ..reference import sparse_attention as _ref

KINDS = _ref.KINDS
CUDA_HEAD_DIMS = (32, 64, 128)
MAX_CPU_HEAD_DIM = 512


def attention_mask(kind, text_len, image_size, conv_kernel=11, device=None):
    """Dense bool (N, N) mask, N = text_len + image_size**2; True = query i may attend key j.

    Args:
        kind: 'row', 'column', 'conv' or 'full'.
        text_len: number of text tokens before the image.
        image_size: image tokens per side.
        conv_kernel: odd kernel size of the 'conv' mask.
        device: where the mask is built.
    Returns:
        A bool tensor (N, N).
    """
    _check_mask_args(kind, text_len, image_size, conv_kernel, "attention_mask")
    return _ref.attention_mask(kind, text_len, image_size, conv_kernel, device=device)


def attention_schedule(depth):
    """Mask kinds of layers 1..depth (the paper's): the last is conv; layer i < depth is column if
    (i - 2) % 4 == 0, else row (so: row, column, row, row, row, column, ...).

    Args:
        depth: number of layers.
    Returns:
        A list of depth kinds.
    """
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


def _check_head_dim(t, fn):
    D = t.shape[-1]
    if t.device.type == "cuda":
        if D not in CUDA_HEAD_DIMS:
            raise ValueError(f"{fn}: head dim D must be one of {CUDA_HEAD_DIMS} on CUDA, got {D}")
    elif not 1 <= D <= MAX_CPU_HEAD_DIM:
        raise ValueError(f"{fn}: head dim D must be in [1, {MAX_CPU_HEAD_DIM}] on the CPU, got {D}")


def _check_tensors(fn, names, tensors):
    for name, t in zip(names, tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{fn}: {name} must be a floating tensor, got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"{fn}: {name} must be 4-D (B, heads, N, D), got shape {tuple(t.shape)}")
    t0 = tensors[0]
    for name, t in zip(names[1:], tensors[1:]):
        if t.dtype != t0.dtype:
            raise TypeError(f"{fn}: {name} has dtype {t.dtype}, {names[0]} has {t0.dtype}; they must match")
        if t.device != t0.device:
            raise ValueError(f"{fn}: {name} is on {t.device}, {names[0]} on {t0.device}; they must match")


def _resolve_scale(scale, D, fn):
    if scale is None:
        return 1.0 / math.sqrt(D)
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"{fn}: scale must be finite, got {scale}")
    return scale


def sparse_attention(q, k, v, kind, text_len, image_size, conv_kernel=11, scale=None):
    """softmax(q k^T * scale + mask) v over the allowed pairs only; differentiable in q, k, v.

    Args:
        q, k, v: (B, heads, N, D) with N = text_len + image_size**2.
        kind: 'row', 'column', 'conv' or 'full' (see attention_mask).
        text_len: number of text tokens before the image.
        image_size: image tokens per side.
        conv_kernel: odd kernel size of the 'conv' mask.
        scale: score scale, default 1/sqrt(D).
    Returns:
        The attention output (B, heads, N, D) in q's dtype.
    """
    fn = "sparse_attention"
    _check_tensors(fn, ("q", "k", "v"), (q, k, v))
    _check_mask_args(kind, text_len, image_size, conv_kernel, fn)
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"{fn}: q, k, v must have the same shape, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    N = text_len + image_size * image_size
    if q.shape[2] != N:
        raise ValueError(f"{fn}: q.shape[2] = {q.shape[2]} must equal text_len + image_size**2 = {N}")
    _check_head_dim(q, fn)
    scale = _resolve_scale(scale, q.shape[-1], fn)
    out, _ = torch.ops.dalle_fast.sparse_attention(q, k, v, kind, text_len, image_size, conv_kernel, scale)
    return out


def sparse_attention_decode(q, k_cache, v_cache, position, kind, text_len, image_size, conv_kernel=11, scale=None):
    """Row `position` of sparse_attention for one new query per sequence. Reads only the allowed keys.
    Not differentiable (inference).

    Args:
        q: (B, heads, 1, D), the query at `position`.
        k_cache, v_cache: (B, heads, L, D), L > position, holding the keys/values of positions 0..position.
        position: the query's index in the sequence.
        kind, text_len, image_size, conv_kernel, scale: as for sparse_attention.
    Returns:
        (B, heads, 1, D): the attention output of the query.
    """
    # A sampling step is tens of microseconds: the op checks shapes, dtypes and the mask arguments itself
    # (ValueError/TypeError naming the argument); only what it cannot see is checked here.
    if type(position) is not int:
        raise TypeError(f"sparse_attention_decode: position must be an int, got {type(position).__name__}")
    if type(kind) is not str:
        raise TypeError(f"sparse_attention_decode: kind must be a str, got {type(kind).__name__}")
    if q.device.type != "cpu":  # the other backends get the full Python-side validation
        _check_decode_args(q, k_cache, v_cache, position, kind, text_len, image_size, conv_kernel)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return torch.ops.dalle_fast.sparse_attention_decode(q, k_cache, v_cache, position, kind, text_len, image_size,
                                                        conv_kernel, scale)


def _check_decode_args(q, k_cache, v_cache, position, kind, text_len, image_size, conv_kernel):
    fn = "sparse_attention_decode"
    _check_tensors(fn, ("q", "k_cache", "v_cache"), (q, k_cache, v_cache))
    _check_mask_args(kind, text_len, image_size, conv_kernel, fn)
    B, H, one, D = q.shape
    if one != 1:
        raise ValueError(f"{fn}: q must be (B, heads, 1, D), got {tuple(q.shape)}")
    if k_cache.shape != v_cache.shape or k_cache.shape[:2] != (B, H) or k_cache.shape[3] != D:
        raise ValueError(f"{fn}: caches must be (B, heads, L, D) = ({B}, {H}, L, {D}), got {tuple(k_cache.shape)} "
                         f"and {tuple(v_cache.shape)}")
    N = text_len + image_size * image_size
    if not 0 <= position < N:
        raise ValueError(f"{fn}: position must be in [0, {N}), got {position}")
    if k_cache.shape[2] <= position:
        raise ValueError(f"{fn}: the caches hold {k_cache.shape[2]} positions; position {position} is past their end")
    _check_head_dim(q, fn)


# ---------------------------------------------------------------- fake kernels (shapes for torch.compile)
@torch.library.register_fake("dalle_fast::sparse_attention")
def _(q, k, v, kind, text_len, image_size, conv_kernel, scale):
    torch._check(q.dim() == 4, lambda: "sparse_attention: q must be 4-D")
    torch._check(k.shape == q.shape and v.shape == q.shape, lambda: "sparse_attention: q, k, v shapes differ")
    torch._check(q.shape[2] == text_len + image_size * image_size,
                 lambda: "sparse_attention: N != text_len + image_size**2")
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=lse_dtype)  # contiguous, as the kernels


@torch.library.register_fake("dalle_fast::_sparse_attention_backward")
def _(grad_out, q, k, v, out, lse, kind, text_len, image_size, conv_kernel, scale):
    torch._check(grad_out.shape == q.shape and out.shape == q.shape,
                 lambda: "_sparse_attention_backward: grad_out/out shapes differ from q")
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@torch.library.register_fake("dalle_fast::sparse_attention_decode")
def _(q, k_cache, v_cache, position, kind, text_len, image_size, conv_kernel, scale):
    torch._check(q.dim() == 4 and q.shape[2] == 1, lambda: "sparse_attention_decode: q must be (B, heads, 1, D)")
    torch._check(k_cache.shape == v_cache.shape, lambda: "sparse_attention_decode: cache shapes differ")
    return q.new_empty(q.shape)


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


def selftest(device):
    """Rows (op, case, dtype, max_err, tol): forward and gradients against the float64 reference, the
    bar being twice PyTorch's own error doing the same math in that dtype."""
    from ..testing import low_precision_tolerance, max_abs_err
    rows = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for n, ((q, k, v, kind, T, S), kw) in enumerate(sample_inputs(device, dtype, requires_grad=True)):
            if n >= 4:
                break
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
