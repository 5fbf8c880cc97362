"""Fused Gumbel-softmax (DALL-E's dVAE relaxation) and the one-hot argmax used to encode tokens.

The Gumbel noise is drawn inside the kernel from Philox4x32-10 keyed by one int64 seed that is
drawn from torch's generator (the given one, else the default generator of logits' device), so
torch.manual_seed / generator= make it reproducible, and each device is deterministic whatever
its thread count. The seed stays a device tensor: no host sync on CUDA.

NaN and ties (documented, tested): a slice (the elements along `dim` of one position) whose
softmax is NaN (it holds a NaN or +inf, or is all -inf) comes out all NaN, soft or hard, as in
torch.nn.functional.gumbel_softmax; -inf logits are never drawn. The hard sample is otherwise the
exact one-hot of the argmax of (logits + g) / tau computed in fp32 (fp64 for fp64), first index
on ties. one_hot_argmax(x) equals one_hot(torch.argmax(x)): ties go to the first
index and NaN counts as the largest value (the first NaN wins), as torch.argmax.
"""

import torch

from .. import testing
from ..reference import gumbel_softmax as ref

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_ops = torch.ops.dalle_fast


# Dtypes, shapes, devices and tau's range are the op's own boundary (csrc/include/dalle_fast/
# gumbel_softmax_checks.h, ValueError/TypeError on every device); here only what it cannot say:
# Python types, and dim named as such.
def _check_logits(logits, dim, name):
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name}: logits must be a tensor, got {type(logits).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{name}: dim must be an int, got {type(dim).__name__}")
    nd = max(logits.dim(), 1)
    if not -nd <= dim < nd:
        raise IndexError(f"{name}: dim {dim} is out of range for a tensor of {logits.dim()} dimensions")


def _check_tau(tau):
    if isinstance(tau, torch.Tensor):
        tau = tau.item()
    try:
        tau = float(tau)
    except (TypeError, ValueError):
        raise TypeError(f"gumbel_softmax: tau must be a number, got {type(tau).__name__}") from None
    return tau


def _check_gumbels(gumbels, logits):
    if not isinstance(gumbels, torch.Tensor) or not gumbels.is_floating_point():
        raise TypeError("gumbel_softmax: gumbels must be a floating-point tensor of standard-Gumbel noise")
    return gumbels.to(logits.dtype) if logits.is_floating_point() else gumbels


def draw_seed(device, generator=None):
    """One int64 from torch's generator (the given one, else device's default), as a one-element
    tensor on `device`."""
    device = torch.device(device)
    gen_device = generator.device if generator is not None else device
    seed = torch.randint(-2 ** 63, 2 ** 63 - 1, (1,), dtype=torch.int64, device=gen_device, generator=generator)
    return seed.to(device)


def gumbel_softmax(logits, tau=1.0, hard=False, dim=-1, generator=None, gumbels=None, *, eps=1e-10):
    """Drop-in for torch.nn.functional.gumbel_softmax, fused: noise, 1/tau scaling and softmax in
    one pass over logits, one fused pass for the backward.

    generator: torch.Generator the noise seed is drawn from (default: logits' device's default).
    gumbels: standard-Gumbel noise of logits' shape that replaces the drawn noise; then the
      output is softmax((logits + gumbels) / tau, dim) (gradients flow to gumbels too).
    hard: returns the exact one-hot of the argmax with the soft sample's gradient (straight through).
    eps: accepted for compatibility with torch's signature, unused (torch deprecates it too).
    """
    _check_logits(logits, dim, "gumbel_softmax")
    tau = _check_tau(tau)
    if gumbels is not None:
        gumbels = _check_gumbels(gumbels, logits)
        seed = torch.zeros(1, dtype=torch.int64, device=logits.device)  # unused; draws nothing
    else:
        seed = draw_seed(logits.device, generator)
    if not hard:
        return _ops.gumbel_softmax(logits, seed, gumbels, tau, dim)
    need_soft = torch.is_grad_enabled() and (logits.requires_grad or (gumbels is not None and gumbels.requires_grad))
    return _ops.gumbel_softmax_hard(logits, seed, gumbels, tau, dim, need_soft)[0]


def one_hot_argmax(logits, dim=-1):
    """One-hot of torch.argmax(logits, dim) in logits' dtype, fused (no index tensor). Not
    differentiable (like argmax): the result never requires grad."""
    _check_logits(logits, dim, "one_hot_argmax")
    return _ops.one_hot_argmax(logits.detach(), dim)


# ---- fake kernels (shapes and dtypes for torch.compile / meta tensors) ----

def _fake_check(logits, dim, name):
    torch._check(logits.dtype in _FLOATS, lambda: f"{name}: logits must be a float tensor, got {logits.dtype}")
    nd = max(logits.dim(), 1)
    torch._check(-nd <= dim < nd, lambda: f"{name}: dim {dim} out of range")


@torch.library.register_fake("dalle_fast::gumbel_softmax")
def _(logits, seed, gumbels, tau, dim):
    _fake_check(logits, dim, "gumbel_softmax")
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.register_fake("dalle_fast::gumbel_softmax_hard")
def _(logits, seed, gumbels, tau, dim, return_soft):
    _fake_check(logits, dim, "gumbel_softmax_hard")
    soft_shape = logits.shape if return_soft else (0,)
    return (torch.empty(logits.shape, dtype=logits.dtype, device=logits.device),
            torch.empty(soft_shape, dtype=logits.dtype, device=logits.device))


@torch.library.register_fake("dalle_fast::one_hot_argmax")
def _(logits, dim):
    _fake_check(logits, dim, "one_hot_argmax")
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.register_fake("dalle_fast::_gumbel_softmax_backward")
def _(grad, y, tau, dim):
    torch._check(grad.shape == y.shape, lambda: "_gumbel_softmax_backward: grad and y shapes differ")
    return torch.empty(y.shape, dtype=y.dtype, device=y.device)


# ---- autograd ----

def _grads(ctx, grad, y):
    """Gradient to (logits, seed, gumbels, tau, dim): the same tensor for logits and gumbels."""
    need_logits, need_gumbels = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    if not (need_logits or need_gumbels):
        return None, None, None, None, None
    dx = _ops._gumbel_softmax_backward(grad, y, ctx.tau, ctx.dim)
    return dx if need_logits else None, None, dx if need_gumbels else None, None, None


def _setup_soft(ctx, inputs, output):
    _, _, _, ctx.tau, ctx.dim = inputs
    ctx.save_for_backward(output if (ctx.needs_input_grad[0] or ctx.needs_input_grad[2]) else None)


def _backward_soft(ctx, grad):
    (y,) = ctx.saved_tensors
    return _grads(ctx, grad, y)


def _setup_hard(ctx, inputs, output):
    _, _, _, ctx.tau, ctx.dim, return_soft = inputs
    needs = ctx.needs_input_grad[0] or ctx.needs_input_grad[2]
    if needs and not return_soft:
        raise RuntimeError("dalle_fast.gumbel_softmax_hard: return_soft=False keeps no soft sample, so it cannot "
                           "be differentiated; call it with return_soft=True (dalle_fast.gumbel_softmax does this)")
    ctx.save_for_backward(output[1] if needs else None)


def _backward_hard(ctx, grad_hard, grad_soft):
    (y,) = ctx.saved_tensors
    # Straight through: the one-hot's gradient is the soft sample's gradient.
    return _grads(ctx, grad_hard + grad_soft if grad_soft.numel() else grad_hard, y) + (None,)


def _setup_double(ctx, inputs, output):
    pass


def _no_double_backward(ctx, grad):
    raise RuntimeError("dalle_fast.gumbel_softmax: double backward (grad of the gradient) is not supported")


torch.library.register_autograd("dalle_fast::gumbel_softmax", _backward_soft, setup_context=_setup_soft)
torch.library.register_autograd("dalle_fast::gumbel_softmax_hard", _backward_hard, setup_context=_setup_hard)
torch.library.register_autograd("dalle_fast::_gumbel_softmax_backward", _no_double_backward,
                                setup_context=_setup_double)


# ---- selftest ----

def selftest(device):
    """Rows (op, case, dtype, max_err, bar): the fused op against the float64 reference (same seed,
    so the same noise), forward and gradient, at the dVAE layout (dim=1) and the last dim. The bar
    for each dtype is twice PyTorch's own error doing the same math in that dtype."""
    rows = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    cases = [("nchw dim=1 tau=1", (2, 203, 5, 7), 1, 1.0), ("last dim tau=1/16", (6, 113), -1, 1 / 16)]
    for case, shape, dim, tau in cases:
        x64 = torch.randn(shape, generator=gen, dtype=torch.float64).to(device)
        grad64 = torch.randn(shape, generator=gen, dtype=torch.float64).to(device)
        seed = int(torch.randint(-2 ** 63, 2 ** 63 - 1, (), generator=gen))
        g64 = ref.gumbel_noise(shape, seed, torch.float64, device)
        x_ref = x64.clone().requires_grad_(True)
        y_ref = ref.gumbel_softmax(x_ref, tau, dim=dim, gumbels=g64)
        (dx_ref,) = torch.autograd.grad(y_ref, x_ref, grad64)
        for dtype in testing.FLOAT_DTYPES:
            x = x64.to(dtype).requires_grad_(True)
            seed_t = torch.tensor([seed], dtype=torch.int64, device=device)
            y = _ops.gumbel_softmax(x, seed_t, None, tau, dim)
            (dx,) = torch.autograd.grad(y, x, grad64.to(dtype))
            xt = x64.to(dtype).requires_grad_(True)  # PyTorch doing the same math in dtype
            yt = ref.gumbel_softmax(xt, tau, dim=dim, gumbels=ref.gumbel_noise(shape, seed, dtype, device))
            (dxt,) = torch.autograd.grad(yt, xt, grad64.to(dtype))
            for what, got, want, theirs in (("fwd", y, y_ref, yt), ("grad", dx, dx_ref, dxt)):
                rows.append(("gumbel_softmax", f"{case} {what}", dtype, testing.max_abs_err(got, want),
                             testing.low_precision_tolerance(want, theirs)))
        x = x64.float()
        hard = one_hot_argmax(x, dim)
        rows.append(("one_hot_argmax", case, torch.float32,
                     testing.max_abs_err(hard, ref.one_hot_argmax(x, dim)), 0.0))
    return rows
