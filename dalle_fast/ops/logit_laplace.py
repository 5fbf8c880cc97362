"""The logit-Laplace reconstruction loss of the dVAE (Ramesh et al. 2021), fused.

logit_laplace_loss(x, stats, eps=0.1, reduction='mean'): x (B, C, H, W) is the target image in [0, 1];
stats (B, 2C, H, W) is the decoder output, the first C channels mu and the last C channels ln b. With
x' = (1 - 2 eps) x + eps, each element's loss is

    ln(2 b) + ln(x' (1 - x')) + |logit(x') - mu| / b,

the negative log density of x' under the logit-Laplace distribution (b = exp(ln b)).

Behaviour worth knowing:
- One pass forward. For 'sum'/'mean' it keeps nothing but the scalar: fp32 partial sums per fixed
  chunk of 16384 elements (double for double inputs), added in chunk order, so the result is the
  same run to run and whatever the thread count. The backward recomputes from (x, stats) in one pass.
- Gradients: d/dmu = -sign(logit(x') - mu) / b, d/dln b = 1 - |logit(x') - mu| / b, and to x through
  x' when x requires grad. sign is torch.sign's: 0 where logit(x') == mu exactly (the subgradient
  eager autograd of |.| gives too) and 0 for NaN, as in eager autograd of the formula.
- x outside [0, 1], or NaN in x, raises a ValueError naming x (checked inside the forward kernel,
  at no extra pass; on CUDA reading the flag synchronises). NaN or inf in stats is not an error: it
  propagates into the loss and the gradients as in the eager formula.
- Empty inputs behave like torch: 'none' gives an empty tensor, 'sum' 0, 'mean' NaN (0 / 0).
- The result has the inputs' dtype (fp32, fp16, bf16, fp64; x and stats must share it); the math
  runs in fp32 (fp64 for fp64). A 'sum' in fp16 can overflow to inf, as torch's fp16 sum does.
- Double backward is not supported (a clear RuntimeError).
"""
import torch

from ..reference import logit_laplace as _ref
from ..reference.logit_laplace import map_pixels, unmap_pixels  # noqa: F401  (public, plain torch)

__all__ = ["logit_laplace_loss", "map_pixels", "unmap_pixels", "sample_inputs", "selftest"]



def _check_args(x, stats, eps, reduction):
    """Python types only: shapes, dtypes, eps's range and the reduction are the op's own boundary
    (csrc/include/dalle_fast/logit_laplace_checks.h, ValueError/TypeError on every device)."""
    if not isinstance(x, torch.Tensor) or not isinstance(stats, torch.Tensor):
        raise TypeError(f"logit_laplace_loss: x and stats must be tensors, got {type(x).__name__} and "
                        f"{type(stats).__name__}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise ValueError(f"logit_laplace_loss: eps must be a number in (0, 0.5), got {eps!r}")
    if not isinstance(reduction, str):
        raise ValueError(f"logit_laplace_loss: reduction must be 'none', 'sum' or 'mean', got {reduction!r}")


def logit_laplace_loss(x, stats, eps=0.1, reduction="mean"):
    """Negative log-likelihood of the image x under the decoder's logit-Laplace output stats.

    x: (B, C, H, W) in [0, 1]; stats: (B, 2C, H, W) = (mu, ln b); reduction 'none' | 'sum' | 'mean'
    (mean over B*C*H*W elements). See the module docstring for gradients, NaN and empty inputs."""
    _check_args(x, stats, eps, reduction)
    return torch.ops.dalle_fast.logit_laplace_loss(x, stats, float(eps), reduction)


# ---- fake kernels (shapes and dtypes for torch.compile / meta tensors) ----

def _check_shapes(x, stats):
    torch._check(x.dim() == 4, lambda: f"logit_laplace_loss: x must be (B, C, H, W), got {tuple(x.shape)}")
    torch._check(stats.dim() == 4 and stats.shape[0] == x.shape[0] and stats.shape[1] == 2 * x.shape[1]
                 and stats.shape[2:] == x.shape[2:],
                 lambda: f"logit_laplace_loss: stats must be (B, 2C, H, W) for x {tuple(x.shape)}, got "
                         f"{tuple(stats.shape)}")
    torch._check(stats.dtype == x.dtype, lambda: "logit_laplace_loss: stats must have x's dtype")


@torch.library.register_fake("dalle_fast::logit_laplace_loss")
def _logit_laplace_loss_fake(x, stats, eps, reduction):
    _check_shapes(x, stats)
    if reduction == "none":
        return x.new_empty(x.shape)
    return x.new_empty(())


@torch.library.register_fake("dalle_fast::_logit_laplace_loss_backward")
def _logit_laplace_loss_backward_fake(grad, x, stats, eps, reduction, compute_grad_x):
    _check_shapes(x, stats)
    grad_x = x.new_empty(x.shape) if compute_grad_x else x.new_empty((0,))
    return stats.new_empty(stats.shape), grad_x


# ---- autograd ----

def _setup_context(ctx, inputs, output):
    x, stats, eps, reduction = inputs
    ctx.eps, ctx.reduction = eps, reduction
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        ctx.save_for_backward(x, stats)


def _backward(ctx, grad):
    x, stats = ctx.saved_tensors
    grad_stats, grad_x = torch.ops.dalle_fast._logit_laplace_loss_backward(
        grad, x, stats, ctx.eps, ctx.reduction, bool(ctx.needs_input_grad[0]))
    return (grad_x if ctx.needs_input_grad[0] else None,
            grad_stats if ctx.needs_input_grad[1] else None, None, None)


torch.library.register_autograd("dalle_fast::logit_laplace_loss", _backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("logit_laplace_loss: double backward (differentiating the gradient again) is not "
                       "supported; use the reference dalle_fast.reference.logit_laplace for that")


torch.library.register_autograd("dalle_fast::_logit_laplace_loss_backward", _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None)


# ---- sample inputs and selftest ----

def sample_inputs(shape=(2, 3, 5, 7), device="cpu", dtype=torch.float32, requires_grad=False, seed=0,
                  x_requires_grad=False):
    """(x, stats) like a dVAE's: x in [0, 1] with exact 0s and 1s, mu ~ N(0, 1.5^2), ln b ~ N(-0.5, 0.5^2)."""
    g = torch.Generator().manual_seed(seed)
    b, c, h, w = shape
    x = torch.rand(shape, generator=g, dtype=torch.float64)
    if x.numel() >= 4:
        flat = x.view(-1)
        flat[0], flat[-1], flat[flat.numel() // 2] = 0.0, 1.0, 0.5
    mu = 1.5 * torch.randn((b, c, h, w), generator=g, dtype=torch.float64)
    ln_b = -0.5 + 0.5 * torch.randn((b, c, h, w), generator=g, dtype=torch.float64)
    stats = torch.cat([mu, ln_b], dim=1)
    x = x.to(device=device, dtype=dtype).requires_grad_(x_requires_grad)
    stats = stats.to(device=device, dtype=dtype).requires_grad_(requires_grad)
    return x, stats


def selftest(device):
    """Rows (op, case, dtype, max_abs_err, tolerance): the fused op against the float64 reference."""
    from ..testing import default_tolerance, low_precision_tolerance, max_abs_err
    rows = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x, stats = sample_inputs((2, 3, 17, 19), device=device, dtype=dtype, requires_grad=True,
                                 x_requires_grad=True)
        x64 = x.detach().double().requires_grad_(True)
        s64 = stats.detach().double().requires_grad_(True)
        for reduction in ("none", "mean"):
            out = logit_laplace_loss(x, stats, reduction=reduction)
            ref = _ref.logit_laplace_loss(x64, s64, reduction=reduction)
            same = _ref.logit_laplace_loss(x.detach(), stats.detach(), reduction=reduction)  # PyTorch in dtype
            seed = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
            gx, gs = torch.autograd.grad(out, (x, stats), seed.to(device=device, dtype=dtype))
            rx, rs = torch.autograd.grad(ref, (x64, s64), seed.to(device))
            checks = [("fwd", out, ref, same), ("grad stats", gs, rs, None), ("grad x", gx, rx, None)]
            for name, got, want, in_dtype in checks:
                if dtype == torch.float32:
                    rtol, atol = default_tolerance(dtype)
                    tol = atol + rtol * want.abs().max().item()
                elif in_dtype is not None:
                    tol = low_precision_tolerance(want, in_dtype)
                else:  # gradients: a few ulps of the dtype at the gradient's scale
                    tol = 8 * torch.finfo(dtype).eps * max(want.abs().max().item(), 1e-3)
                rows.append(("logit_laplace_loss", f"{reduction} {name}", dtype, max_abs_err(got, want), tol))
    return rows
