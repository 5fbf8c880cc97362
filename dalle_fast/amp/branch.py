"""Scaled residual branches: x + f(x) where the backward through f is
    d out of f  ->  multiplied by the block's scale, rounded to f's output dtype (16-bit)
    d x from f  ->  NaN/Inf set to 0 (the block flagged), divided by the scale, in the stream's dtype
so the residual stream and its gradient stay in their own dtype (fp32) while f runs in fp16/bf16
(under torch.autocast, or with 16-bit weights). f's output is returned in the stream's dtype.

Three ways in, all the same math (scaled_call):
  ScaledBranch(module, scaler, block)      a wrapper module (its state_dict keys gain "module.")
  scale_branches(branches, scaler)         hooks on existing modules (state_dict keys unchanged);
                                           DALLE.enable_resblock_scaling uses it
  scaled_call(fn, x, scaler, block, ...)   a function call
The branch's first positional argument is the residual stream.
"""
import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ..ops.resblock_scaling import resblock_grad_scale


class _BranchInput(torch.autograd.Function):
    """Identity forward; backward filters and unscales the gradient leaving the branch."""

    @staticmethod
    def forward(ctx, x, scales, flags, block):
        ctx.scales, ctx.flags, ctx.block, ctx.dtype = scales, flags, block, x.dtype
        return x.view_as(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        return resblock_grad_scale(grad, ctx.scales, ctx.flags, ctx.block, True, ctx.dtype), None, None, None


class _BranchOutput(torch.autograd.Function):
    """Casts f's output to the stream's dtype; backward scales the gradient entering the branch and
    rounds it to f's output dtype in the same pass."""

    @staticmethod
    def forward(ctx, y, stream_dtype, scales, flags, block):
        ctx.scales, ctx.flags, ctx.block, ctx.dtype = scales, flags, block, y.dtype
        return y.to(stream_dtype) if y.dtype != stream_dtype else y.view_as(y)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        return resblock_grad_scale(grad, ctx.scales, ctx.flags, ctx.block, False, ctx.dtype), None, None, None, None


def _active(scaler, x):
    return scaler.enabled and torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.is_floating_point()


def _enter(scaler, block, x):
    scales, flags = scaler._state_on(x.device)
    return _BranchInput.apply(x, scales, flags, block)


def _leave(scaler, block, y, stream_dtype):
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"scaled branch {block}: the branch must return one tensor, got {type(y).__name__}")
    return _BranchOutput.apply(y, stream_dtype, scaler.scales, scaler.activation_flags, block)


def scaled_call(fn, x, scaler, block, *args, **kwargs):
    """fn(x, *args, **kwargs) as the scaled branch `block` of `scaler`."""
    if not _active(scaler, x):
        return fn(x, *args, **kwargs)
    return _leave(scaler, block, fn(_enter(scaler, block, x), *args, **kwargs), x.dtype)


def _claim(scaler, module, block):
    if not 0 <= block < scaler.num_blocks:
        raise ValueError(f"scaled branch: block must be in [0, {scaler.num_blocks}) (the scaler's num_blocks), "
                         f"got {block}")
    if getattr(module, "_resblock_scaler", None) is not None:
        raise ValueError(f"scaled branch: {type(module).__name__} is already a scaled branch")
    if scaler.branches[block] is not None and scaler.branches[block] is not module:
        raise ValueError(f"scaled branch: block {block} of the scaler already belongs to another module")
    mine = {id(p) for p in module.parameters()}
    for b, other in enumerate(scaler.branches):
        if other is not None and other is not module and mine & {id(p) for p in other.parameters()}:
            raise ValueError(f"scaled branch: block {block} shares parameters with block {b}; each parameter "
                             "must belong to one branch (one scale)")
    scaler.branches[block] = module
    module._resblock_scaler = scaler


class ScaledBranch(nn.Module):
    """module as the scaled residual branch `block_index` of `scaler`: use as x = x + branch(x)."""

    def __init__(self, module, scaler, block_index):
        super().__init__()
        self.module = module
        self.block_index = int(block_index)
        _claim(scaler, module, self.block_index)
        self._scaler = scaler

    def forward(self, x, *args, **kwargs):
        return scaled_call(self.module, x, self._scaler, self.block_index, *args, **kwargs)


class BranchHooks:
    """The hook handles of scale_branches; remove() turns the branches back into plain ones."""

    def __init__(self, scaler, modules, handles):
        self.scaler, self.modules, self.handles = scaler, modules, handles

    def remove(self):
        for h in self.handles:
            h.remove()
        for b, m in enumerate(self.modules):
            m._resblock_scaler = None
            if self.scaler.branches[b] is m:
                self.scaler.branches[b] = None
        self.handles = []


def scale_branches(branches, scaler):
    """Makes branches[i] (modules computing f(x) of x + f(x)) the scaled branch i of scaler, with
    forward hooks: parameters and state_dict keys stay as they are. len(branches) must equal
    scaler.num_blocks. Returns a BranchHooks (remove() undoes it)."""
    branches = list(branches)
    if len(branches) != scaler.num_blocks:
        raise ValueError(f"scale_branches: {len(branches)} branches for a scaler with num_blocks="
                         f"{scaler.num_blocks}")
    for i, m in enumerate(branches):
        if not isinstance(m, nn.Module):
            raise TypeError(f"scale_branches: branches[{i}] must be an nn.Module, got {type(m).__name__}")
    handles, claimed = [], []
    try:
        for block, module in enumerate(branches):
            _claim(scaler, module, block)
            claimed.append(module)
            handles.append(module.register_forward_pre_hook(_pre_hook(scaler, block), with_kwargs=True))
            handles.append(module.register_forward_hook(_post_hook(scaler, block), with_kwargs=True))
    except Exception:
        BranchHooks(scaler, claimed, handles).remove()  # nothing half done
        raise
    return BranchHooks(scaler, branches, handles)


def _pre_hook(scaler, block):
    def hook(module, args, kwargs):
        if not args or not _active(scaler, args[0]):
            return None
        return (_enter(scaler, block, args[0]),) + tuple(args[1:]), kwargs
    return hook


def _post_hook(scaler, block):
    def hook(module, args, kwargs, output):
        if not args or not _active(scaler, args[0]):
            return None
        return _leave(scaler, block, output, args[0].dtype)
    return hook
