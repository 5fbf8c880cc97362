"""Pieces every trainer of dalle_fast shares (the dVAE's in train/vae.py, the transformer's in
train/dalle.py): schedules, EMA, device and autocast choice, gradient clipping with non-finite
detection, exact checkpoint/resume, a resumable batch iterator, metric logs and a progress bar.

Exact resume: a checkpoint holds the model, the EMA, the optimizer, the RNG states (CPU and
CUDA) and the data position, so a run stopped after any checkpoint and resumed produces the same
weights bit for bit (on the CPU, with the same thread count) as an uninterrupted run.
"""
import contextlib
import csv
import json
import math
import os
import time

import torch

from dalle_fast import checkpoint as ckpt


# ---- schedules -----------------------------------------------------------------------------------
def cosine(step, total, start, end):
    """Half-cosine from `start` (step 0) to `end` (step >= total); the paper's shape for beta, tau
    and the learning rate. Works for increasing and decreasing schedules; total <= 0 gives `end`."""
    if total <= 0 or step >= total:
        return float(end)
    t = max(step, 0) / total
    return float(end + (start - end) * 0.5 * (1 + math.cos(math.pi * t)))


def time_box_steps(step, steps_done, elapsed_s, max_minutes, upper):
    """The total step count that fits a run into `max_minutes` of wall time at the pace so far
    (`steps_done` steps of this process in `elapsed_s` seconds), never beyond `upper` nor below
    `step`. Called again as the run goes, so a machine whose load rises mid-run shortens it."""
    per_step = elapsed_s / max(1, steps_done)
    fit = step + int((max_minutes * 60 - elapsed_s) / per_step)
    return max(step, min(upper, fit))


def scaled_steps(paper_steps, paper_total, total, minimum=1):
    """A schedule length of the paper (e.g. 150,000 of 3M updates) scaled to a run of `total`."""
    return max(minimum, round(total * paper_steps / paper_total))


# ---- device and precision ------------------------------------------------------------------------
def choose_device(name="auto"):
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA device is available")
    return dev


def choose_precision(device, precision="auto", allow_cpu_fp16=False):
    """'auto' -> bf16 where the device computes it natively (CUDA with bf16; CPUs whose oneDNN has
    bf16 kernels: AVX512-BF16 or AMX), else fp32. On this project's AVX512-BF16 CPU bf16 autocast
    with channels_last made the dVAE's training step about 2x faster (bench_dvae_train.py).
    allow_cpu_fp16: accept fp16 on the CPU (slow, emulated; train-dalle allows it so its per-resblock
    scaling runs in tests). Returns one of 'fp32', 'bf16', 'fp16'."""
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu" and not allow_cpu_fp16:
            raise ValueError("fp16 autocast is for GPUs; use bf16 or fp32 on the CPU")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def cpu_has_fast_bf16():
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def memory_format(device):
    """channels_last on the CPU (oneDNN's convolutions run in NHWC without reorders), the
    default elsewhere."""
    return torch.channels_last if device.type == "cpu" else torch.contiguous_format


def autocast(device, precision):
    """Context manager for the forward pass in `precision` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(device, precision, model=None, world_size=1):
    """fp16 and a model with per-resblock scaling (DALLE.enable_resblock_scaling): the paper's
    ResblockGradScaler (dalle_fast.amp), one scale per residual branch, already attached to the model;
    it takes the GradScaler calls (scale, unscale_, step - returning True when it skipped -, update).
    Otherwise torch's GradScaler for fp16; bf16 and fp32 need none (a disabled GradScaler)."""
    if precision == "fp16" and hasattr(model, "enable_resblock_scaling"):
        from ..amp import ResblockGradScaler
        scaler = ResblockGradScaler(len(list(model.resblocks())), world_size=world_size, device=device)
        model.enable_resblock_scaling(scaler)
        return scaler
    return torch.amp.GradScaler(device.type, enabled=(precision == "fp16"))


def clip_gradients(parameters, max_norm):
    """Clips the global gradient norm to max_norm (None/0: no clipping). Returns (norm, finite): a
    non-finite norm means the caller must skip the update (the weights stay untouched)."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return 0.0, True
    if max_norm:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.linalg.vector_norm(torch.stack([_full(p.grad.detach().float().norm()) for p in params]))
    norm = float(_full(norm))
    return norm, math.isfinite(norm)


def _full(t):
    """A sharded (DTensor) value gathered, e.g. the gradient norm of an FSDP2 model."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# ---- EMA -----------------------------------------------------------------------------------------
class EMA:
    """Exponential moving average of a model's floating-point parameters and buffers.
    decay_at(step) = min(decay, (1 + step) / (10 + step)): the warm-up keeps short runs from being
    dominated by the random initialisation."""

    def __init__(self, model, decay=0.999, warmup=True):
        self.decay, self.warmup = decay, warmup
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()
                       if v.is_floating_point()}

    def decay_at(self, step):
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model, step):
        d = self.decay_at(step)
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v.detach().float(), 1 - d)

    def state_dict(self):
        return dict(self.shadow)

    def load_state_dict(self, tensors):
        missing = set(self.shadow) - set(tensors)
        if missing:
            raise ckpt.CheckpointError(f"EMA checkpoint lacks {sorted(missing)[:5]}")
        for k in self.shadow:
            if hasattr(self.shadow[k], "device_mesh"):  # a sharded model's EMA (FSDP2): shard the full tensor
                from ..distributed.sharding import load_full_into
                load_full_into(self.shadow[k], tensors[k])
            else:
                self.shadow[k].copy_(tensors[k])

    @torch.no_grad()
    def copy_to(self, model):
        """Loads the averaged weights into `model` (e.g. a copy used for evaluation and export)."""
        sd = model.state_dict()
        for k, v in self.shadow.items():
            sd[k].copy_(v.to(sd[k].dtype))
        return model


# ---- RNG state -----------------------------------------------------------------------------------
def rng_state_tensors():
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda{i}"] = s
    return out


def set_rng_state_tensors(tensors):
    torch.set_rng_state(tensors["cpu"].to(torch.uint8))
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.to(torch.uint8) for t in cuda])


# ---- batches with a resumable position -----------------------------------------------------------
def collate(items):
    images, captions = zip(*items)
    return torch.stack(images), list(captions)


class ResumableBatches:
    """Endless batches of a dataset whose position is part of the checkpoint.
    Map-style datasets: a fresh permutation per epoch from (seed, epoch), full batches only;
    state = (epoch, batch index). Iterable datasets: read in order (repeat is the dataset's job);
    state = samples consumed, restored through the dataset's `skip` attribute."""

    def __init__(self, dataset, batch_size, seed=0, shuffle=True, num_workers=0, collate_fn=collate):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset, self.batch_size, self.seed, self.shuffle = dataset, batch_size, seed, shuffle
        self.num_workers, self.collate_fn = num_workers, collate_fn
        self.iterable = isinstance(dataset, torch.utils.data.IterableDataset)
        if not self.iterable and len(dataset) < batch_size:
            raise ValueError(f"dataset has {len(dataset)} items, fewer than one batch of {batch_size}")
        self.epoch, self.index, self.consumed = 0, 0, 0
        self._it = None

    def state(self):
        return {"epoch": self.epoch, "index": self.index, "consumed": self.consumed}

    def load_state(self, state):
        self.epoch, self.index, self.consumed = state["epoch"], state["index"], state["consumed"]
        self._it = None

    def _loader(self, **kw):
        # a private generator: creating a DataLoader iterator draws a base seed from its generator,
        # which must not be the global one (that would shift the Gumbel noise after a resume)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.utils.data.DataLoader(self.dataset, num_workers=self.num_workers,
                                           collate_fn=self.collate_fn, generator=g, **kw)

    def _epoch_iter(self):
        if self.iterable:
            self.dataset.skip = self.consumed
            return iter(self._loader(batch_size=self.batch_size))
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        batches = [order[i:i + self.batch_size] for i in range(0, n - self.batch_size + 1, self.batch_size)]
        return iter(self._loader(batch_sampler=batches[self.index:]))

    def __iter__(self):
        return self

    def __next__(self):
        for _ in range(2):
            if self._it is None:
                self._it = self._epoch_iter()
            try:
                batch = next(self._it)
            except StopIteration:
                self._it = None
                if self.iterable:
                    raise RuntimeError("the data stream ended (no readable samples left)")
                self.epoch, self.index = self.epoch + 1, 0
                continue
            self.index += 1
            self.consumed += len(batch[1]) if isinstance(batch, (tuple, list)) else self.batch_size
            return batch
        raise RuntimeError("the dataset yields no batches")


# ---- checkpoints ---------------------------------------------------------------------------------
def save_training_state(run_dir, step, model, ema, optimizer, meta, keep=3, scaler=None, model_state=None,
                        optim_state=None, ema_state=None, extra_groups=None):
    """Model + EMA + optimizer + RNG states + JSON meta (anything JSON-able: config, data position,
    counters), written atomically by dalle_fast.checkpoint; a ResblockGradScaler's state too.
    model_state / optim_state / ema_state replace model.state_dict() / optimizer.state_dict() /
    ema.state_dict() (a sharded model's gathered state); extra_groups: more {file: tensors}."""
    opt_tensors, opt_meta = ckpt.optimizer_state_to_tensors(optimizer, optim_state)
    groups = {"model": model.state_dict() if model_state is None else model_state, "optim": opt_tensors,
              "rng": rng_state_tensors()}
    groups.update(extra_groups or {})  # e.g. PowerSGD's error buffers
    if ema is not None:
        groups["ema"] = ema.state_dict() if ema_state is None else ema_state
    if _is_resblock_scaler(scaler):
        groups["scaler"] = scaler.state_dict()
    return ckpt.save_checkpoint(run_dir, step, groups, dict(meta, optim=opt_meta), keep=keep)


def _is_resblock_scaler(scaler):
    from ..amp import ResblockGradScaler
    return isinstance(scaler, ResblockGradScaler)


def load_training_state(ckpt_dir, model, ema, optimizer, device, scaler=None, load=None):
    """Restores what save_training_state wrote; returns its meta. Raises CheckpointError with the
    file's name on a missing or corrupt file (or a ResblockGradScaler's state of another model).
    load(model_state, optim_state) replaces model.load_state_dict + optimizer.load_state_dict (a
    sharded model loads the full state its way)."""
    groups, meta = ckpt.load_checkpoint(ckpt_dir)
    resblock = _is_resblock_scaler(scaler)
    for need in ("model", "optim", "rng") + (("ema",) if ema is not None else ()) + (("scaler",) if resblock else ()):
        if need not in groups:
            raise ckpt.CheckpointError(f"checkpoint {ckpt_dir} lacks {need}.safetensors")
    try:
        optim_state = ckpt.optimizer_state_from_tensors(groups["optim"], meta["optim"])
        if load is not None:
            load(groups["model"], optim_state)
        else:
            model.load_state_dict(groups["model"])
            optimizer.load_state_dict(optim_state)
    except (RuntimeError, KeyError, ValueError) as e:
        raise ckpt.CheckpointError(f"checkpoint {ckpt_dir} does not match this model/optimizer: {e}") from e
    for state in optimizer.state.values():  # optimizer tensors were loaded on the CPU
        for k, v in state.items():
            if torch.is_tensor(v) and k != "step" and v.device != device and not hasattr(v, "device_mesh"):
                state[k] = v.to(device)
    if ema is not None:
        ema.load_state_dict(groups["ema"])
    if resblock:
        try:
            scaler.load_state_dict(groups["scaler"])
        except ValueError as e:
            raise ckpt.CheckpointError(f"checkpoint {ckpt_dir}: {e}") from e
    set_rng_state_tensors(groups["rng"])
    meta["_groups"] = groups  # every tensor group, for state kept beside the model (PowerSGD's buffers)
    return meta


# ---- logs ----------------------------------------------------------------------------------------
class MetricLog:
    """metrics.csv (one row per logged step) and metrics.json (history + summary) in a run dir.
    On resume, rows written after the checkpoint's step are dropped so the log matches the weights."""

    def __init__(self, run_dir, fields, resume_step=None):
        self.csv_path = os.path.join(run_dir, "metrics.csv")
        self.json_path = os.path.join(run_dir, "metrics.json")
        self.fields = list(fields)
        self.rows = []
        if resume_step is not None and os.path.exists(self.csv_path):
            with open(self.csv_path, newline="") as f:
                for row in csv.DictReader(f):
                    if int(float(row["step"])) <= resume_step:
                        self.rows.append({k: _num(v) for k, v in row.items()})
        os.makedirs(run_dir, exist_ok=True)
        with open(self.csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(self.rows)

    def log(self, row):
        row = {k: row.get(k, "") for k in self.fields}
        self.rows.append(row)
        with open(self.csv_path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore").writerow(row)

    def write_json(self, summary):
        ckpt.atomic_write_json({"summary": summary, "history": self.rows}, self.json_path)


def _num(v):
    try:
        f = float(v)
        return int(f) if f.is_integer() and "." not in v and "e" not in v.lower() else f
    except (TypeError, ValueError):
        return v


class Progress:
    """A tqdm bar over steps (disabled when not wanted); set(**metrics) updates the postfix."""

    def __init__(self, total, initial=0, enabled=True, desc="train"):
        from tqdm.auto import tqdm
        self.bar = tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True)
        self.t0, self.n0 = time.perf_counter(), initial

    def update(self, n=1, **metrics):
        self.bar.update(n)
        if metrics:
            self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in metrics.items()},
                                 refresh=False)

    def close(self):
        self.bar.close()
