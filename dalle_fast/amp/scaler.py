"""ResblockGradScaler: one gradient scale per residual branch, updated by the paper's rule (Appendix D).

- Scales start at M * 2^13 (M = world_size, the number of data-parallel replicas: the loss is divided
  by the global batch, so the scales carry the factor M).
- After an update in which none of a block's gradients was non-finite its scale is multiplied by
  2^(1/1000); otherwise it is divided by sqrt(2) - but never twice within 125 updates (a division at
  update u blocks the divisions at u+1 .. u+124) - and the optimizer step is skipped.
- Every scale is clamped to [M * 2^7, M * 2^24] after every update.
Everything stays on the scales' device: update() and unscale_() never sync with the host; step()
reads one bool (whether to step).

Usage (the same calls a torch.amp.GradScaler loop makes, with the per-block flags explicit):
    scaler = ResblockGradScaler(num_blocks, world_size=M)
    model.enable_resblock_scaling(scaler)           # or dalle_fast.amp.scale_branches / ScaledBranch
    loss.backward()
    nonfinite = scaler.unscale_(model)              # bool (num_blocks,), one multi-tensor kernel call
    # distributed (DDP, FSDP2): scaler.unscale_(model, process_group=torch.distributed.group.WORLD)
    skipped = scaler.step(optimizer, nonfinite)
    scaler.update(nonfinite)
nonfinite may be left out of step() and update(): they then use the flags of the last unscale_(), so a
loop written for torch.amp.GradScaler (scale(loss).backward(), unscale_(opt), step(opt), update()) works.
"""
import math

import torch

from ..ops.resblock_scaling import resblock_unscale_grads_

INIT_LOG2, MIN_LOG2, MAX_LOG2 = 13, 7, 24
GROWTH = 2.0 ** (1 / 1000)
BACKOFF = math.sqrt(2.0)
GUARD = 125  # updates between two divisions of the same scale


def _positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"ResblockGradScaler: {name} must be an int >= 1, got {value!r}")
    return value


class ResblockGradScaler:
    """Per-resblock gradient scales. enabled=False (bf16, fp32): every scale is 1 and never changes,
    but unscale_() still reports non-finite gradients per block."""

    def __init__(self, num_blocks, world_size=1, enabled=True, device="cpu"):
        self.num_blocks = _positive_int(num_blocks, "num_blocks")
        self.world_size = _positive_int(world_size, "world_size")
        self.enabled = bool(enabled)
        self.min_scale = float(self.world_size * 2 ** MIN_LOG2)
        self.max_scale = float(self.world_size * 2 ** MAX_LOG2)
        init = float(self.world_size * 2 ** INIT_LOG2) if self.enabled else 1.0
        self.scales = torch.full((self.num_blocks,), init, dtype=torch.float32, device=device)
        # update index of each scale's last division; -GUARD lets the first one happen at once
        self.last_decrease = torch.full((self.num_blocks,), -GUARD, dtype=torch.int64, device=device)
        self.updates = 0
        self.activation_flags = torch.zeros(self.num_blocks, dtype=torch.bool, device=device)
        self.branches = [None] * self.num_blocks  # the module of each block, set by scale_branches
        self._last_nonfinite = None

    # ---- device ----
    def to(self, device):
        """Moves the scales and flags (in place of the attributes; branches read them at backward)."""
        for name in ("scales", "last_decrease", "activation_flags"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def _state_on(self, device):
        if self.scales.device != device:
            self.to(device)
        return self.scales, self.activation_flags

    # ---- the flags ----
    def check_nonfinite(self, nonfinite, name="nonfinite"):
        if not isinstance(nonfinite, torch.Tensor) or nonfinite.dtype != torch.bool:
            raise TypeError(f"ResblockGradScaler: {name} must be a bool tensor (one flag per block), got "
                            f"{getattr(nonfinite, 'dtype', type(nonfinite).__name__)}")
        if tuple(nonfinite.shape) != (self.num_blocks,):
            raise ValueError(f"ResblockGradScaler: {name} must have shape ({self.num_blocks},) (num_blocks), "
                             f"got {tuple(nonfinite.shape)}")
        return nonfinite.to(self.scales.device)

    def _flags(self, nonfinite):
        if nonfinite is None:
            if self._last_nonfinite is None:
                raise RuntimeError("ResblockGradScaler: pass nonfinite, or call unscale_() first")
            return self._last_nonfinite
        return self.check_nonfinite(nonfinite)

    # ---- the step ----
    def scale(self, loss):
        """Returns loss unchanged: the scales act inside the branches (torch.amp.GradScaler's API)."""
        return loss

    def param_blocks(self):
        """{parameter: block} for the parameters of every scaled branch."""
        out = {}
        for b, module in enumerate(self.branches):
            for p in (module.parameters() if module is not None else ()):
                out[p] = b
        return out

    @torch.no_grad()
    def unscale_(self, params, process_group=None):
        """Divides every parameter gradient of every block by its block's scale in one kernel call and
        returns bool (num_blocks,): True for a block with a non-finite parameter gradient or a filtered
        activation gradient since the last call. params: a module, an optimizer, param groups, or an
        iterable of parameters. A non-finite gradient of a parameter outside every branch (embeddings,
        heads, final gains: fp32, so only a non-finite loss makes one) flags every block.
        Sharded gradients (FSDP2's DTensors) are unscaled on their local shards; process_group (e.g.
        torch.distributed.group.WORLD): the flags are then all-reduced (MAX) over it, so that a block
        non-finite on any rank (any shard) is skipped and backed off on every rank."""
        if self._last_nonfinite is not None:
            raise RuntimeError("ResblockGradScaler: unscale_() was already called since the last update()")
        blocks_of = self.param_blocks()
        grads, blocks, seen, copy_back = [], [], set(), []
        for p in _parameters(params):
            if p in seen or p.grad is None:
                continue
            seen.add(p)
            if p.grad.is_sparse:
                raise TypeError("ResblockGradScaler.unscale_: sparse gradients are not supported")
            g = _local(p.grad)
            if not g.is_contiguous():
                if g is p.grad:
                    p.grad = g = g.contiguous()
                else:  # a strided local shard: unscaled in a contiguous copy, written back
                    copy_back.append((g, g.contiguous()))
                    g = copy_back[-1][1]
            grads.append(g)
            blocks.append(blocks_of.get(p, self.num_blocks))  # the extra slot: outside every branch
        device = grads[0].device if grads else self.scales.device
        scales, act = self._state_on(device)
        one = torch.ones(1, dtype=scales.dtype, device=device)
        scales_ext = torch.cat([scales, one])
        flags_ext = torch.cat([act, torch.zeros(1, dtype=torch.bool, device=device)])
        resblock_unscale_grads_(grads, blocks, scales_ext, flags_ext)
        for dst, src in copy_back:
            dst.copy_(src)
        nonfinite = flags_ext[:-1] | flags_ext[-1]
        act.zero_()
        if process_group is not None:
            import torch.distributed as dist
            flags = nonfinite.to(torch.uint8)  # gloo has no MAX over bool
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=process_group)
            nonfinite = flags.bool()
        self._last_nonfinite = nonfinite
        return nonfinite

    def step(self, optimizer, nonfinite=None):
        """optimizer.step() unless a block is non-finite; returns True when the step was skipped."""
        skipped = bool(self._flags(nonfinite).any())
        if not skipped:
            optimizer.step()
        return skipped

    @torch.no_grad()
    def update(self, nonfinite=None):
        """Applies the paper's rule once (call once per optimizer update, skipped or not)."""
        nf = self._flags(nonfinite)
        self._last_nonfinite = None
        if self.enabled:
            s = self.scales
            may_divide = (self.updates - self.last_decrease) >= GUARD
            divide = nf & may_divide
            grown = s * torch.tensor(GROWTH, dtype=s.dtype, device=s.device)
            shrunk = s / torch.tensor(BACKOFF, dtype=s.dtype, device=s.device)
            new = torch.where(nf, torch.where(may_divide, shrunk, s), grown)
            s.copy_(new.clamp_(self.min_scale, self.max_scale))
            self.last_decrease.copy_(torch.where(divide, torch.full_like(self.last_decrease, self.updates),
                                                 self.last_decrease))
        self.updates += 1

    # ---- checkpoints (all tensors: safetensors-ready) ----
    def state_dict(self):
        return {"scales": self.scales.detach().cpu().clone(),
                "last_decrease": self.last_decrease.detach().cpu().clone(),
                "updates": torch.tensor([self.updates], dtype=torch.int64),
                "num_blocks": torch.tensor([self.num_blocks], dtype=torch.int64),
                "world_size": torch.tensor([self.world_size], dtype=torch.int64),
                "enabled": torch.tensor([int(self.enabled)], dtype=torch.int64)}

    def load_state_dict(self, state):
        """Validates everything before changing anything: a state of another block count, world size or
        enabled setting raises ValueError naming it."""
        need = ("scales", "last_decrease", "updates", "num_blocks", "world_size", "enabled")
        missing = [k for k in need if k not in state]
        if missing:
            raise ValueError(f"ResblockGradScaler.load_state_dict: the state lacks {missing}")
        n, m, en = int(state["num_blocks"].item()), int(state["world_size"].item()), bool(state["enabled"].item())
        if n != self.num_blocks or tuple(state["scales"].shape) != (self.num_blocks,) or \
                tuple(state["last_decrease"].shape) != (self.num_blocks,):
            raise ValueError(f"ResblockGradScaler.load_state_dict: the state is of a model with {n} blocks "
                             f"(scales {tuple(state['scales'].shape)}), this scaler has num_blocks={self.num_blocks}")
        if m != self.world_size:
            raise ValueError(f"ResblockGradScaler.load_state_dict: the state was saved with world_size={m}, "
                             f"this scaler has world_size={self.world_size} (its scales carry that factor)")
        if en != self.enabled:
            raise ValueError(f"ResblockGradScaler.load_state_dict: the state has enabled={en}, this scaler "
                             f"enabled={self.enabled}")
        scales = state["scales"].to(torch.float32)
        if not bool(torch.isfinite(scales).all()) or bool((scales <= 0).any()):
            raise ValueError("ResblockGradScaler.load_state_dict: scales must be finite and > 0")
        self.scales.copy_(scales)
        self.last_decrease.copy_(state["last_decrease"].to(torch.int64))
        self.updates = int(state["updates"].item())
        self._last_nonfinite = None


def _local(grad):
    """A DTensor gradient's local shard (the same memory), other gradients as they are."""
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor
        if isinstance(grad, DTensor):
            return grad.to_local()
    return grad


def _parameters(params):
    if isinstance(params, torch.nn.Module):
        return list(params.parameters())
    if isinstance(params, torch.optim.Optimizer):
        params = params.param_groups
    out = []
    for item in params:
        if isinstance(item, dict):
            out += list(item["params"])
        elif isinstance(item, torch.Tensor):
            out.append(item)
        else:
            raise TypeError(f"ResblockGradScaler.unscale_: expected a module, an optimizer, param groups or "
                            f"parameters, got an iterable holding {type(item).__name__}")
    return out
