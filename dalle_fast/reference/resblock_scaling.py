"""Pure-PyTorch reference of the per-resblock gradient-scaling ops (dalle_fast/ops/resblock_scaling.py)."""
import torch


def resblock_grad_scale(grad, scales, nonfinite, block, unscale, dtype):
    """filter((grad / s if unscale else grad * s) rounded to dtype), s = scales[block]; NaN/Inf -> 0 and
    nonfinite[block] = True (in place). The arithmetic runs in float64 unless grad and dtype are both
    16-bit or 32-bit, where it runs in float32 as the kernels do."""
    acc = torch.float64 if torch.float64 in (grad.dtype, dtype) else torch.float32
    s = scales[block].to(acc)
    v = (grad.to(acc) / s if unscale else grad.to(acc) * s).to(dtype)
    finite = torch.isfinite(v)
    nonfinite[block] |= ~finite.all()
    return torch.where(finite, v, torch.zeros((), dtype=dtype, device=v.device))


def resblock_unscale_grads_(grads, blocks, scales, nonfinite):
    """grads[i] /= scales[blocks[i]] in place (in grads[i]'s accumulation type), flagging non-finite results."""
    for g, b in zip(grads, blocks):
        acc = torch.float64 if g.dtype == torch.float64 else torch.float32
        g.copy_(g.to(acc) / scales[b].to(acc))
        nonfinite[b] |= ~torch.isfinite(g).all()
