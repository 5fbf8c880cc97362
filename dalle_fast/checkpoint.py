"""Checkpoints: safetensors tensors + a small JSON, written atomically, resumable exactly. No pickle.

Layout of a run directory:
    run/checkpoints/step-00001200/{model.safetensors, ema.safetensors, optim.safetensors, meta.json}
    run/checkpoints/latest.json    -> {"step": 1200, "path": "step-00001200"}
A checkpoint is written into a temporary directory and renamed into place, then latest.json is
replaced atomically: a run killed at any moment leaves the previous checkpoint intact.
"""
import json
import os
import shutil
import tempfile

import torch
from safetensors.torch import load_file, save_file


class CheckpointError(RuntimeError):
    """A checkpoint, model directory or pointer file that is missing, corrupt or does not match."""


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _default_file_mode():
    """0o666 less the process umask: mkstemp creates files 0o600, which other users could not read."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_json(obj, path):
    """Writes JSON into a temporary file in the same folder, fsyncs it and renames it into place.

    Args:
        obj: JSON-able object.
        path: the destination.
    """
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(d)


def atomic_save_safetensors(tensors, path, metadata=None):
    """safetensors.save_file into a temp file, then rename. Tensors are made contiguous and shared
    storage is broken (safetensors refuses aliasing tensors).

    Args:
        tensors: {name: tensor}.
        path: the destination.
        metadata: optional {str: str} stored in the file.
    """
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().clone().cpu() for k, v in tensors.items()}, tmp,
                  metadata=metadata)
        os.chmod(tmp, _default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_safetensors(path, device="cpu"):
    """Args:
        path: a .safetensors file.
        device: where the tensors go.
    Returns:
        {name: tensor}.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        return load_file(path, device=str(device))
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise CheckpointError(f"cannot read safetensors file {path}: {e}") from e


def optimizer_state_to_tensors(optimizer, state_dict=None):
    """optimizer.state_dict() (or the given state dict) as tensors (flattened as 'state.<i>.<key>') and JSON metadata.

    Args:
        optimizer: a torch optimizer.
        state_dict: its state dict, if already gathered (e.g. a full state dict under FSDP2); default
            optimizer.state_dict().
    Returns:
        (tensors, json_meta).
    """
    sd = optimizer.state_dict() if state_dict is None else state_dict
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"state.{idx}.{key}"] = val
            else:
                scalars[f"{idx}.{key}"] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_state_from_tensors(tensors, meta):
    """The inverse of optimizer_state_to_tensors.

    Args:
        tensors, meta: what optimizer_state_to_tensors returned.
    Returns:
        A state dict for optimizer.load_state_dict.
    """
    state = {}
    for name, val in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = val
    for name, val in meta.get("scalars", {}).items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = val
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(run_dir, step, tensor_groups, meta, keep=3):
    """Writes run_dir/checkpoints/step-<step>/ atomically (a temp directory renamed into place), then
    points latest.json at it and keeps the newest `keep`.

    Args:
        run_dir: the run's folder.
        step: training step.
        tensor_groups: {"model": {name: tensor}, "ema": ..., "optim": ...}, one .safetensors file each.
        meta: JSON-able dict (meta.json).
        keep: checkpoints kept (0: all).
    Returns:
        The checkpoint's directory.
    """
    ckpt_root = os.path.join(run_dir, "checkpoints")
    os.makedirs(ckpt_root, exist_ok=True)
    name = f"step-{step:08d}"
    final = os.path.join(ckpt_root, name)
    tmp = tempfile.mkdtemp(dir=ckpt_root, prefix=f".tmp-{name}-")
    try:
        for group, tensors in tensor_groups.items():
            save_file({k: v.detach().contiguous().clone().cpu() for k, v in tensors.items()},
                      os.path.join(tmp, f"{group}.safetensors"))
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(dict(meta, step=step), f, indent=2, sort_keys=True)
        os.chmod(tmp, _default_file_mode() | 0o111)  # mkdtemp makes it 0o700
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(ckpt_root)
    atomic_write_json({"step": step, "path": name}, os.path.join(ckpt_root, "latest.json"))
    _prune(ckpt_root, keep)
    return final


def _prune(ckpt_root, keep):
    steps = sorted(d for d in os.listdir(ckpt_root) if d.startswith("step-"))
    for d in steps[:-keep] if keep else []:
        shutil.rmtree(os.path.join(ckpt_root, d), ignore_errors=True)
    for d in os.listdir(ckpt_root):  # leftovers of a run killed mid-write
        if d.startswith(".tmp-"):
            p = os.path.join(ckpt_root, d)
            shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.unlink(p)


def latest_checkpoint(run_dir):
    """Directory of the newest complete checkpoint of a run, or None.

    Args:
        run_dir: the run's folder.
    Returns:
        A path or None; CheckpointError for a corrupt pointer.
    """
    ptr = os.path.join(run_dir, "checkpoints", "latest.json")
    if not os.path.isfile(ptr):
        return None
    try:
        with open(ptr) as f:
            path = os.path.join(run_dir, "checkpoints", json.load(f)["path"])
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"corrupt checkpoint pointer {ptr}: {e}") from e
    return path if os.path.isdir(path) else None


def load_checkpoint(ckpt_dir, device="cpu"):
    """What save_checkpoint wrote.

    Args:
        ckpt_dir: a checkpoint directory.
        device: where the tensors go.
    Returns:
        (tensor_groups, meta).
    """
    meta_path = os.path.join(ckpt_dir, "meta.json")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint metadata {meta_path}: {e}") from e
    groups = {}
    for fn in sorted(os.listdir(ckpt_dir)):
        if fn.endswith(".safetensors"):
            groups[fn[: -len(".safetensors")]] = load_safetensors(os.path.join(ckpt_dir, fn), device)
    return groups, meta
