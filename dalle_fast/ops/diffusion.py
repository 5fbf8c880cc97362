"""Diffusion sampling kernels: Imagen's dynamic thresholding and the fused guided sampling step.

dynamic_threshold(x0, percentile): per sample (dim 0) s = max(1, the percentile of |x0| over the
sample's elements, interpolated linearly as torch.quantile does); returns clamp(x0, -s, s) / s in
x0's dtype. The percentile is found by selection (a histogram of the float bits, then nth_element on
the few elements of the target bins; no sort), so it has no size limit (torch.quantile refuses more
than 2^24 elements). The rank q (n - 1) is computed in float64 whatever x0's dtype (torch.quantile
computes it in x0's dtype), so the op matches the float64 reference. Gradient: s is differentiated
through (s = lerp(|x_lo|, |x_hi|, w) at the two elements the percentile interpolates, when s > 1),
i.e. the true derivative wherever it exists; a sample holding NaN gives NaN (torch.quantile's rule).

guided_step(...): one classifier-free-guided DDPM or DDIM step in one pass over the data; see its
docstring. Inference only: it has no gradient and raises if asked for one.
"""
import math
import numbers

import torch

from ..reference import diffusion as ref
from .. import testing
from .gumbel_softmax import draw_seed

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_ops = torch.ops.dalle_fast

__all__ = ["dynamic_threshold", "guided_step", "sample_inputs", "selftest"]


def _check_tensor(t, name, op):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{op}: {name} must be float32, float64, float16 or bfloat16, got {t.dtype}")
    if t.dim() == 0:
        raise ValueError(f"{op}: {name} must have a batch dim (B, ...), got a 0-dim tensor")


def _check_percentile(percentile, op):
    if isinstance(percentile, torch.Tensor):
        percentile = percentile.item()
    if isinstance(percentile, bool) or not isinstance(percentile, numbers.Real):
        raise TypeError(f"{op}: percentile must be a number in (0, 1], got {type(percentile).__name__}")
    percentile = float(percentile)
    if not 0.0 < percentile <= 1.0:
        raise ValueError(f"{op}: percentile must be in (0, 1], got {percentile}")
    return percentile


def dynamic_threshold(x0, percentile=0.995, *, return_scale=False):
    """Imagen's dynamic thresholding: clamp(x0, -s, s) / s per sample, s = max(1, the percentile of |x0|
    over the sample, interpolated linearly as torch.quantile does), found by selection, not sorting.

    Args:
        x0: (B, ...) floating tensor, one sample per index of dim 0.
        percentile: in (0, 1]; 0.995 as in the common implementations.
        return_scale: also return s.
    Returns:
        The thresholded x0 in x0's dtype, or (that, s as a float64 (B,) tensor).
    """
    _check_tensor(x0, "x0", "dynamic_threshold")
    percentile = _check_percentile(percentile, "dynamic_threshold")
    if x0.shape[0] and x0.numel() == 0:
        raise ValueError(f"dynamic_threshold: x0 must have at least one element per sample, got {tuple(x0.shape)}")
    need_pivots = torch.is_grad_enabled() and x0.requires_grad
    out, scale, _ = _ops.dynamic_threshold(x0, percentile, need_pivots)
    return (out, scale) if return_scale else out


def _alpha_bars(alpha_bar_t, alpha_bar_prev, x_t):
    """float64 (B,) tensors on x_t's device, their values checked (a host sync for tensors on a GPU;
    pass Python floats to avoid it)."""
    b = x_t.shape[0]
    out = []
    for name, a in (("alpha_bar_t", alpha_bar_t), ("alpha_bar_prev", alpha_bar_prev)):
        if isinstance(a, torch.Tensor):
            if a.dim() > 1 or (a.dim() == 1 and a.shape[0] not in (1, b)):
                raise ValueError(f"guided_step: {name} must be a number or a (B,) = ({b},) tensor, "
                                 f"got shape {tuple(a.shape)}")
            a = a.detach().to(device=x_t.device, dtype=torch.float64).expand(b).contiguous()
        elif isinstance(a, numbers.Real) and not isinstance(a, bool):
            a = torch.full((b,), float(a), dtype=torch.float64, device=x_t.device)
        else:
            raise TypeError(f"guided_step: {name} must be a number or a tensor, got {type(a).__name__}")
        out.append(a)
    a, p = out
    if isinstance(alpha_bar_t, torch.Tensor) or isinstance(alpha_bar_prev, torch.Tensor):
        ok = bool(((a > 0) & (a < 1) & (a <= p) & (p <= 1)).all()) if b else True
        bad = "" if ok else f" (alpha_bar_t={a.tolist()}, alpha_bar_prev={p.tolist()})"
    else:
        ok = 0 < float(alpha_bar_t) < 1 and float(alpha_bar_t) <= float(alpha_bar_prev) <= 1
        bad = f" (alpha_bar_t={alpha_bar_t}, alpha_bar_prev={alpha_bar_prev})"
    if not ok:
        raise ValueError(f"guided_step: need 0 < alpha_bar_t < 1 and alpha_bar_t <= alpha_bar_prev <= 1{bad}")
    return a, p


def guided_step(cond, uncond, x_t, alpha_bar_t, alpha_bar_prev, *, guidance=1.0, parameterization="eps",
                sampler="ddpm", eta=0.0, threshold="dynamic", percentile=0.995, generator=None, seed=None,
                offset=0, return_x0=False):
    """One classifier-free-guided sampling step from x_t to x_{t-1}, fused into one pass.

    Args (all described below): cond, uncond, x_t, alpha_bar_t, alpha_bar_prev, guidance,
    parameterization, threshold, percentile, sampler, eta, generator, seed, offset, return_x0.

    cond, uncond: the model's conditional and unconditional outputs, x_t's shape (B, ...) and dtype;
      uncond None: no guidance (pred = cond).
    alpha_bar_t, alpha_bar_prev: cumulative alpha products of this step and the next (prev = 1 for
      the last step); Python floats (all samples at one step) or (B,) tensors (a step per sample).
      Need 0 < alpha_bar_t < 1, alpha_bar_t <= alpha_bar_prev <= 1.
    guidance: w >= 0, pred = uncond + w (cond - uncond) (w = 1: the conditional model alone).
    parameterization: what the model predicts, "eps", "v" or "x0".
    threshold: "dynamic" (Imagen: s = max(1, percentile of |x0|), x0 = clamp(x0, -s, s) / s), "static"
      (clamp to [-1, 1]) or "none".
    sampler: "ddpm" (the posterior mean + sigma z, sigma^2 the posterior variance) or "ddim" (eta = 0:
      deterministic; eta = 1: DDPM-like noise).
    generator / seed / offset: the noise z is drawn inside the kernel from Philox keyed by a 64-bit
      seed (given, else drawn from `generator` or the default generator of x_t's device) and offset
      in [0, 2^32) (e.g. the step index), so CPU and CUDA draw the same noise for one seed.
    return_x0: also return the thresholded x0 estimate.

    Returns:
        x_prev, or (x_prev, x0). Inference only: raises if autograd would need a gradient.
    """
    op = "guided_step"
    _check_tensor(x_t, "x_t", op)
    for name, t in (("cond", cond), ("uncond", uncond)):
        if t is None and name == "uncond":
            continue
        _check_tensor(t, name, op)
        if t.shape != x_t.shape:
            raise ValueError(f"{op}: {name} must have x_t's shape {tuple(x_t.shape)}, got {tuple(t.shape)}")
        if t.dtype != x_t.dtype:
            raise TypeError(f"{op}: {name} must have x_t's dtype {x_t.dtype}, got {t.dtype}")
        if t.device != x_t.device:
            raise ValueError(f"{op}: {name} must be on x_t's device {x_t.device}, got {t.device}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (cond, uncond, x_t)):
        raise RuntimeError(f"{op} is inference only (no gradient): call it under torch.no_grad() or pass "
                           "detached tensors")
    if not isinstance(guidance, numbers.Real) or isinstance(guidance, bool) or not math.isfinite(guidance):
        raise TypeError(f"{op}: guidance must be a finite number >= 0, got {guidance!r}")
    if guidance < 0:
        raise ValueError(f"{op}: guidance must be >= 0, got {guidance}")
    if parameterization not in ref.PARAMETERIZATIONS:
        raise ValueError(f"{op}: parameterization must be one of {ref.PARAMETERIZATIONS}, got {parameterization!r}")
    if sampler not in ref.SAMPLERS:
        raise ValueError(f"{op}: sampler must be one of {ref.SAMPLERS}, got {sampler!r}")
    if threshold not in ref.THRESHOLDS:
        raise ValueError(f"{op}: threshold must be one of {ref.THRESHOLDS}, got {threshold!r}")
    if not isinstance(eta, numbers.Real) or not math.isfinite(eta) or eta < 0:
        raise ValueError(f"{op}: eta must be a finite number >= 0, got {eta!r}")
    percentile = _check_percentile(percentile, op) if threshold == "dynamic" else 1.0
    if isinstance(offset, bool) or not isinstance(offset, numbers.Integral) or not 0 <= offset < 2 ** 32:
        raise ValueError(f"{op}: offset must be an int in [0, 2^32), got {offset!r}")
    if x_t.shape[0] and x_t.numel() == 0:
        raise ValueError(f"{op}: x_t must have at least one element per sample, got {tuple(x_t.shape)}")
    a, p = _alpha_bars(alpha_bar_t, alpha_bar_prev, x_t)
    if seed is None:
        seed_t = draw_seed(x_t.device, generator)
    elif isinstance(seed, torch.Tensor):
        seed_t = seed.to(device=x_t.device, dtype=torch.int64).reshape(1)
    else:
        seed_t = torch.tensor([((int(seed) + 2 ** 63) % 2 ** 64) - 2 ** 63], dtype=torch.int64, device=x_t.device)
    x_prev, x0 = _ops.guided_step(cond, uncond, x_t, a, p, float(guidance), parameterization, sampler, float(eta),
                                  threshold, percentile, seed_t, int(offset), bool(return_x0))
    return (x_prev, x0) if return_x0 else x_prev


# ---- fake kernels ----

@torch.library.register_fake("dalle_fast::dynamic_threshold")
def _(x0, percentile, return_pivots):
    torch._check(x0.dtype in _FLOATS, lambda: f"dynamic_threshold: x0 must be a float tensor, got {x0.dtype}")
    torch._check(x0.dim() >= 1, lambda: "dynamic_threshold: x0 must have a batch dim")
    torch._check(0.0 < percentile <= 1.0, lambda: f"dynamic_threshold: percentile must be in (0, 1], got {percentile}")
    b = x0.shape[0]
    return (torch.empty(x0.shape, dtype=x0.dtype, device=x0.device),
            torch.empty((b,), dtype=torch.float64, device=x0.device),
            torch.empty((b, 2) if return_pivots else (0,), dtype=torch.int64, device=x0.device))


@torch.library.register_fake("dalle_fast::_dynamic_threshold_backward")
def _(grad, x0, scale, pivots, percentile):
    torch._check(grad.shape == x0.shape, lambda: "_dynamic_threshold_backward: grad and x0 shapes differ")
    return torch.empty(x0.shape, dtype=x0.dtype, device=x0.device)


@torch.library.register_fake("dalle_fast::guided_step")
def _(cond, uncond, x_t, alpha_bar_t, alpha_bar_prev, guidance, parameterization, sampler, eta, threshold,
      percentile, seed, offset, return_x0):
    torch._check(x_t.dtype in _FLOATS, lambda: f"guided_step: x_t must be a float tensor, got {x_t.dtype}")
    torch._check(x_t.dim() >= 1, lambda: "guided_step: x_t must have a batch dim")
    for t in (cond, uncond):
        if t is not None:
            torch._check(t.shape == x_t.shape and t.dtype == x_t.dtype,
                         lambda: "guided_step: cond and uncond must have x_t's shape and dtype")
    torch._check(guidance >= 0, lambda: f"guided_step: guidance must be >= 0, got {guidance}")
    return (torch.empty(x_t.shape, dtype=x_t.dtype, device=x_t.device),
            torch.empty(x_t.shape if return_x0 else (0,), dtype=x_t.dtype, device=x_t.device))


# ---- autograd ----

def _setup_threshold(ctx, inputs, output):
    x0, ctx.percentile, return_pivots = inputs
    if ctx.needs_input_grad[0]:
        if not return_pivots:
            raise RuntimeError("dalle_fast.dynamic_threshold: return_pivots=False keeps no pivots, so it cannot be "
                               "differentiated; call it with return_pivots=True (dalle_fast.dynamic_threshold does)")
        ctx.save_for_backward(x0, output[1], output[2])


def _backward_threshold(ctx, grad, grad_scale, grad_pivots):
    x0, scale, pivots = ctx.saved_tensors
    return _ops._dynamic_threshold_backward(grad, x0, scale, pivots, ctx.percentile), None, None


def _no_double_backward(ctx, *grads):
    raise RuntimeError("dalle_fast.dynamic_threshold: double backward (grad of the gradient) is not supported; "
                       "use dalle_fast.reference.diffusion.dynamic_threshold for that")


def _no_backward(ctx, *grads):
    raise RuntimeError("dalle_fast.guided_step is inference only: it has no gradient")


torch.library.register_autograd("dalle_fast::dynamic_threshold", _backward_threshold, setup_context=_setup_threshold)
torch.library.register_autograd("dalle_fast::_dynamic_threshold_backward", _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None)
torch.library.register_autograd("dalle_fast::guided_step", _no_backward, setup_context=lambda ctx, inputs, output: None)


# ---- sample inputs and selftest ----

def sample_inputs(shape=(3, 3, 17, 19), device="cpu", dtype=torch.float32, seed=0, scale=2.0):
    """(cond, uncond, x_t) with a heavy tail so the percentile lands above 1 and thresholding bites."""
    g = torch.Generator().manual_seed(seed)
    cond, uncond, x_t = (scale * torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
    return tuple(t.to(device=device, dtype=dtype) for t in (cond, uncond, x_t))


def selftest(device):
    """Rows (op, case, dtype, max_abs_err, bar): the fused ops against the float64 reference (same seed,
    so the same noise); bar: twice PyTorch's own error doing the same math in that dtype."""
    rows = []
    cases = [("ddpm eps w=5 dynamic", dict(parameterization="eps", sampler="ddpm", guidance=5.0)),
             ("ddim v eta=0.5 dynamic", dict(parameterization="v", sampler="ddim", eta=0.5, guidance=3.0))]
    cond64, uncond64, xt64 = sample_inputs(device=device, dtype=torch.float64)
    want_thr = ref.dynamic_threshold(cond64, 0.995)
    for dtype in testing.FLOAT_DTYPES:
        got = dynamic_threshold(cond64.to(dtype), 0.995)
        theirs = ref.dynamic_threshold(cond64.to(dtype), 0.995)
        rows.append(("dynamic_threshold", "p=0.995", dtype, testing.max_abs_err(got, want_thr),
                     testing.low_precision_tolerance(want_thr, theirs)))
        for case, kw in cases:
            want, _ = ref.guided_step(cond64, uncond64, xt64, 0.3, 0.5, seed=7, offset=3, **kw)
            got = guided_step(*(t.to(dtype) for t in (cond64, uncond64, xt64)), 0.3, 0.5, seed=7, offset=3, **kw)
            theirs, _ = ref.guided_step(*(t.to(dtype) for t in (cond64, uncond64, xt64)), 0.3, 0.5, seed=7,
                                        offset=3, **kw)
            rows.append(("guided_step", case, dtype, testing.max_abs_err(got, want),
                         testing.low_precision_tolerance(want, theirs)))
    return rows
