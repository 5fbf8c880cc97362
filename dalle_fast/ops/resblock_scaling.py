"""Per-resblock gradient scaling kernels (the paper's Appendix D), used by dalle_fast.amp.

resblock_grad_scale: an activation gradient at a residual branch's boundary, multiplied by the
  block's scale (entering the branch, rounded to the branch's 16-bit dtype) or divided by it
  (leaving the branch, rounded to the residual stream's dtype), with NaN/Inf set to 0 and the
  block's flag in `nonfinite` set: one pass, no host sync.
resblock_unscale_grads_: every parameter gradient of every block divided in place by its block's
  scale in one call (a list of tensors, mixed dtypes), flagging blocks with non-finite results.

Both ops write into `nonfinite` (flags are only ever set, never cleared) and are not
differentiable themselves: dalle_fast.amp calls them from the backward of its own autograd
Functions.
"""
import torch

from ..reference import resblock_scaling as ref

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_ops = torch.ops.dalle_fast

reference = ref


def _check_state(scales, nonfinite, device, name):
    if not isinstance(scales, torch.Tensor) or scales.dtype != torch.float32 or scales.dim() != 1:
        raise TypeError(f"{name}: scales must be a 1-D float32 tensor (one scale per block), got "
                        f"{getattr(scales, 'dtype', type(scales).__name__)} {tuple(getattr(scales, 'shape', ()))}")
    if not isinstance(nonfinite, torch.Tensor) or nonfinite.dtype != torch.bool:
        raise TypeError(f"{name}: nonfinite must be a bool tensor, got {getattr(nonfinite, 'dtype', type(nonfinite))}")
    if nonfinite.shape != scales.shape:
        raise ValueError(f"{name}: nonfinite must have one flag per block {tuple(scales.shape)}, got "
                         f"{tuple(nonfinite.shape)}")
    if scales.device != device or nonfinite.device != device:
        raise ValueError(f"{name}: scales and nonfinite must be on the gradients' device {device}, got "
                         f"{scales.device} and {nonfinite.device}")


def _check_block(block, num_blocks, name):
    if isinstance(block, bool) or not isinstance(block, int):
        raise TypeError(f"{name}: block must be an int, got {type(block).__name__}")
    if not 0 <= block < num_blocks:
        raise ValueError(f"{name}: block must be in [0, {num_blocks}), got {block}")


def resblock_grad_scale(grad, scales, nonfinite, block, unscale, dtype=None):
    """Scales (or unscales) an activation gradient at a branch boundary and filters it, in one pass.

    Args:
        grad: the float gradient.
        scales: fp32 (num_blocks,) per-block scales.
        nonfinite: bool (num_blocks,) flags, updated in place: nonfinite[block] = True when any value
            was NaN/Inf.
        block: the branch's block index.
        unscale: divide by scales[block] if True, else multiply.
        dtype: the output dtype (default grad's).
    Returns:
        grad / scales[block] (or grad * scales[block]) in `dtype`, NaN/Inf set to 0.
    """
    if not isinstance(grad, torch.Tensor) or grad.dtype not in _FLOATS:
        raise TypeError(f"resblock_grad_scale: grad must be a float tensor, got {getattr(grad, 'dtype', type(grad))}")
    dtype = grad.dtype if dtype is None else dtype
    if dtype not in _FLOATS:
        raise TypeError(f"resblock_grad_scale: dtype must be one of {_FLOATS}, got {dtype}")
    _check_state(scales, nonfinite, grad.device, "resblock_grad_scale")
    _check_block(block, scales.numel(), "resblock_grad_scale")
    return _ops.resblock_grad_scale(grad, scales, nonfinite, block, bool(unscale), dtype)


def resblock_unscale_grads_(grads, blocks, scales, nonfinite):
    """grads[i] /= scales[blocks[i]] in place, in one call; nonfinite[blocks[i]] = True where a result
    is NaN/Inf.

    Args:
        grads: contiguous float tensors on scales' device (dtypes may differ).
        blocks: one block index per gradient.
        scales: fp32 (num_blocks,) per-block scales.
        nonfinite: bool (num_blocks,) flags, updated in place.
    Returns:
        None (everything is in place).
    """
    grads, blocks = list(grads), [int(b) for b in blocks]
    if len(grads) != len(blocks):
        raise ValueError(f"resblock_unscale_grads_: blocks must give one block per gradient ({len(grads)}), "
                         f"got {len(blocks)}")
    _check_state(scales, nonfinite, scales.device, "resblock_unscale_grads_")
    for i, (g, b) in enumerate(zip(grads, blocks)):
        if not isinstance(g, torch.Tensor) or g.dtype not in _FLOATS:
            raise TypeError(f"resblock_unscale_grads_: grads[{i}] must be a float tensor, got "
                            f"{getattr(g, 'dtype', type(g))}")
        if g.device != scales.device:
            raise ValueError(f"resblock_unscale_grads_: grads[{i}] is on {g.device}, scales on {scales.device}")
        if not g.is_contiguous():
            raise ValueError(f"resblock_unscale_grads_: grads[{i}] must be contiguous")
        _check_block(b, scales.numel(), "resblock_unscale_grads_")
    if grads:
        _ops.resblock_unscale_grads_(grads, blocks, scales, nonfinite)


# ---- fake kernels ----
# They mirror the C++ boundary checks (include/dalle_fast/resblock_scaling_checks.h) with the same
# exception classes and messages, so a direct op call with bad input fails alike on real and fake tensors.

def _fake_check_state(scales, nonfinite, device, op):
    torch._check_type(scales.dtype == torch.float32, lambda: f"{op}: scales must be float32, got {scales.dtype}")
    torch._check_value(scales.dim() == 1 and scales.numel() >= 1,
                       lambda: f"{op}: scales must be 1-D with one scale per block, got shape {tuple(scales.shape)}")
    torch._check_type(nonfinite.dtype == torch.bool,
                      lambda: f"{op}: nonfinite must be a bool tensor, got {nonfinite.dtype}")
    torch._check_value(nonfinite.dim() == 1 and nonfinite.numel() == scales.numel(),
                       lambda: f"{op}: nonfinite must be 1-D with one flag per block ({scales.numel()}), got "
                               f"shape {tuple(nonfinite.shape)}")
    torch._check_value(scales.device == device and nonfinite.device == device,
                       lambda: f"{op}: scales and nonfinite must be on the gradients' device {device}")


def _fake_check_block(block, num_blocks, op):
    torch._check_value(0 <= block < num_blocks, lambda: f"{op}: block must be in [0, {num_blocks}), got {block}")


@torch.library.register_fake("dalle_fast::resblock_grad_scale")
def _(grad, scales, nonfinite, block, unscale, dtype):
    op = "resblock_grad_scale"
    torch._check_type(grad.dtype in _FLOATS, lambda: f"{op}: grad must be float32, float64, float16 or bfloat16, "
                                                     f"got {grad.dtype}")
    torch._check_type(dtype in _FLOATS, lambda: f"{op}: dtype must be float32, float64, float16 or bfloat16, got {dtype}")
    _fake_check_state(scales, nonfinite, grad.device, op)
    _fake_check_block(block, scales.shape[0], op)
    return torch.empty(grad.shape, dtype=dtype, device=grad.device)


@torch.library.register_fake("dalle_fast::resblock_unscale_grads_")
def _(grads, blocks, scales, nonfinite):
    op = "resblock_unscale_grads_"
    torch._check_value(len(grads) == len(blocks), lambda: f"{op}: blocks must give one block per gradient "
                                                          f"({len(grads)} gradients), got {len(blocks)}")
    for i, (g, b) in enumerate(zip(grads, blocks)):
        torch._check_type(g.dtype in _FLOATS, lambda: f"{op}: grads[{i}] must be float32, float64, float16 or "
                                                      f"bfloat16, got {g.dtype}")
        torch._check_value(g.is_contiguous(), lambda: f"{op}: grads[{i}] must be contiguous")
        torch._check_value(g.device == scales.device, lambda: f"{op}: grads[{i}] is on {g.device}, scales on "
                                                              f"{scales.device} (all must share one device)")
        _fake_check_block(b, scales.shape[0], op)
    _fake_check_state(scales, nonfinite, scales.device, op)
    return None


def selftest(device):
    """Rows (op, case, dtype, max_err, bar): both kernels against the reference, which does the same
    correctly rounded arithmetic, so the bar is 0 (bit-equal); a wrong flag counts as an error of 1."""
    rows = []
    gen = torch.Generator().manual_seed(0)
    scales = torch.tensor([2.0 ** 13, 3000.0, 2.0 ** 20], device=device)
    for dtype in _FLOATS:
        grad = (torch.randn(3, 203, generator=gen) * 1e-2).to(dtype).to(device)
        grad[1, 7] = float("inf")
        for unscale, out_dtype in ((False, torch.float16), (True, torch.float32), (False, dtype)):
            flags, flags_r = (torch.zeros(3, dtype=torch.bool, device=device) for _ in range(2))
            got = resblock_grad_scale(grad, scales, flags, 1, unscale, out_dtype)
            want = ref.resblock_grad_scale(grad, scales, flags_r, 1, unscale, out_dtype)
            err = (got.double() - want.double()).abs().max().item() + float(not torch.equal(flags, flags_r))
            rows.append(("resblock_grad_scale", f"{'unscale' if unscale else 'scale'} -> {out_dtype}".replace(
                "torch.", ""), dtype, err, 0.0))
    grads = [(torch.randn(s, generator=gen) * 1e4).to(dt).to(device)
             for s, dt in (((113,), torch.float16), ((7, 33), torch.float32), ((5,), torch.bfloat16),
                           ((300001,), torch.float32))]
    grads[3][-1] = float("nan")
    blocks = [0, 1, 2, 1]
    want = [g.clone() for g in grads]
    flags, flags_r = (torch.zeros(3, dtype=torch.bool, device=device) for _ in range(2))
    resblock_unscale_grads_(grads, blocks, scales, flags)
    ref.resblock_unscale_grads_(want, blocks, scales, flags_r)
    err = max((a.double() - b.double()).nan_to_num(0.0).abs().max().item() for a, b in zip(grads, want))
    rows.append(("resblock_unscale_grads_", "4 tensors, mixed dtypes", "mixed",
                 err + float(not torch.equal(flags, flags_r)), 0.0))
    return rows
