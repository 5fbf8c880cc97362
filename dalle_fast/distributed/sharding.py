"""Wrapping a model for data-parallel training on torch.distributed: DDP (optionally with the PowerSGD hook),
FSDP2 (`fully_shard` per residual branch with a MixedPrecisionPolicy), and the paper's 2-D layout (a
(replicate, shard) DeviceMesh: FSDP2 within a shard group, PowerSGD on the local gradient shards across
the replicate dimension after backward). Also the gathered (full) state dicts that keep checkpoints
single-file safetensors, loadable in one process.

FSDP2 layout: each residual branch's linear layers (qkv, output projection, MLP) form one FSDP group whose
parameters are all-gathered in 16-bit (param_dtype) with gradients reduced in fp32; everything else (gains
and biases of the layer norms, embeddings, the logit heads) is the root group, kept in fp32.
"""
import torch
import torch.distributed as dist
from torch import nn

from .powersgd import PowerSGDState, compressible_parameters, powersgd_hook

SHARD_MODES = ("none", "ddp", "fsdp")
_LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _is_dtensor(t):
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def full_tensor(t):
    """A DTensor gathered into a plain tensor (collective); other tensors as they are."""
    return t.full_tensor() if _is_dtensor(t) else t


def load_full_into(dst, full):
    """Copies a full (unsharded) tensor into dst, sharding it first when dst is a DTensor."""
    if _is_dtensor(dst):
        from torch.distributed.tensor import distribute_tensor
        full = distribute_tensor(full.to(dst.dtype).to(dst.device), dst.device_mesh, dst.placements)
    dst.copy_(full)


def check_world(shard, world_size, replicate=None, batch_size=None, powersgd_rank=None, precision=None):
    """Bad launch arguments as ValueErrors naming the argument."""
    if shard not in SHARD_MODES:
        raise ValueError(f"--shard must be one of {SHARD_MODES}, got {shard!r}")
    if shard == "none" and world_size > 1:
        raise ValueError(f"--shard none runs one process, but WORLD_SIZE is {world_size}; use --shard ddp or fsdp")
    if powersgd_rank is not None and powersgd_rank < 1:
        raise ValueError(f"--powersgd-rank must be >= 1, got {powersgd_rank}")
    if powersgd_rank and shard == "none":
        raise ValueError("--powersgd-rank needs --shard ddp or --shard fsdp (there is nothing to compress in one process)")
    if replicate is not None:
        if shard != "fsdp":
            raise ValueError("--replicate (a 2-D mesh) needs --shard fsdp")
        if replicate < 1 or world_size % replicate:
            raise ValueError(f"--replicate must divide the world size {world_size}, got {replicate}")
    if powersgd_rank and shard == "fsdp" and not replicate:
        raise ValueError("--shard fsdp with --powersgd-rank needs --replicate R: PowerSGD compresses the local "
                         "shards across the replicate dimension of a (R, world / R) mesh")
    if batch_size is not None and batch_size % world_size:
        raise ValueError(f"--batch-size (the global batch) must be divisible by the world size {world_size}, "
                         f"got {batch_size}")


def branch_linears(branch):
    return [m for m in branch.modules() if isinstance(m, nn.Linear)]


def make_mesh(device_type, world_size, replicate=None):
    from torch.distributed.device_mesh import init_device_mesh
    if replicate:
        return init_device_mesh(device_type, (replicate, world_size // replicate),
                                mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(device_type, (world_size,), mesh_dim_names=("shard",))


def apply_fsdp(model, mesh, precision="fp32"):
    """fully_shard per residual branch (its linear layers, 16-bit all-gather and compute under bf16/fp16,
    fp32 gradient reduction), then the root (gains, biases, embeddings, heads: fp32). In place; returns model."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    low = _LOW.get(precision)
    policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32) if low else MixedPrecisionPolicy()
    for branch in model.resblocks():
        fully_shard(branch_linears(branch), mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=MixedPrecisionPolicy())
    return model


class Parallel:
    """A model prepared for one of SHARD_MODES: .model (what to call and step), .module (the DALLE inside),
    .powersgd (a PowerSGDState or None) and after_backward() (PowerSGD on FSDP's local shards; returns True
    when the update must be skipped on every rank)."""

    def __init__(self, model, shard="none", device=torch.device("cpu"), precision="fp32", powersgd_rank=None,
                 replicate=None, error_dtype=None, seed=0):
        world = dist.get_world_size() if dist.is_initialized() else 1
        check_world(shard, world, replicate, powersgd_rank=powersgd_rank)
        self.shard, self.module, self.powersgd, self.mesh = shard, model, None, None
        error_dtype = error_dtype or (torch.float16 if precision == "fp16" else torch.bfloat16)
        if shard == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP
            # few buckets: few collectives (a PowerSGD skip covers the whole step whatever the bucket count)
            self.model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                             bucket_cap_mb=1024)
            if powersgd_rank:
                self.powersgd = PowerSGDState(None, powersgd_rank, compress=compressible_parameters(model),
                                              error_dtype=error_dtype, seed=seed)
                self.model.register_comm_hook(self.powersgd, powersgd_hook)
        elif shard == "fsdp":
            self.mesh = make_mesh(device.type, world, replicate)
            shard_mesh = self.mesh["shard"] if replicate and powersgd_rank else self.mesh
            self.model = apply_fsdp(model, shard_mesh, precision)
            if powersgd_rank:
                self.powersgd = PowerSGDState(self.mesh.get_group("replicate"), powersgd_rank,
                                              compress=compressible_parameters(model), error_dtype=error_dtype,
                                              seed=seed)
        else:
            self.model = model

    def after_backward(self):
        if self.powersgd is None:
            return False
        if self.shard == "fsdp":
            params = [p for p in self.module.parameters() if p.grad is not None]
            grads = [p.grad.to_local() if _is_dtensor(p.grad) else p.grad for p in params]
            self.powersgd.allreduce_(params, grads)
        return self.powersgd.pop_skipped()

    # ---- full (gathered) state for single-file checkpoints ----
    def full_state(self, optimizer):
        """(model state dict, optimizer state dict keyed by parameter index as optimizer.state_dict() of an
        unsharded model). Collective under FSDP: every rank calls it; the tensors are complete on rank 0."""
        if self.shard != "fsdp":
            return self.module.state_dict(), optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
        msd, osd = get_state_dict(self.module, optimizer,
                                  options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        names = [n for g in osd.get("param_groups", []) for n in g["params"]]
        index = {n: i for i, n in enumerate(names)}
        osd = {"state": {index[n]: s for n, s in osd.get("state", {}).items()},
               "param_groups": [dict(g, params=[index[n] for n in g["params"]]) for g in osd.get("param_groups", [])]}
        return msd, osd

    def load_full_state(self, optimizer, model_sd, optim_sd):
        """Loads full state dicts (as full_state returns them, on every rank) into the wrapped model."""
        if self.shard != "fsdp":
            self.module.load_state_dict(model_sd)
            optimizer.load_state_dict(optim_sd)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
        name_of = {id(p): n for n, p in self.module.named_parameters()}
        fqn_groups = [dict(saved, params=[name_of[id(p)] for p in live["params"]])
                      for saved, live in zip(optim_sd["param_groups"], optimizer.param_groups)]
        flat = [n for g in fqn_groups for n in g["params"]]
        osd = {"state": {flat[int(i)]: s for i, s in optim_sd["state"].items()}, "param_groups": fqn_groups}
        set_state_dict(self.module, optimizer, model_state_dict=model_sd, optim_state_dict=osd,
                       options=StateDictOptions(full_state_dict=True))
