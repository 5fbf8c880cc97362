"""Process groups from torchrun's environment, and a local multi-process runner with a deadline (tests,
benchmarks): every collective has a timeout, so a rank that dies makes the others fail, never hang."""
import datetime
import os
import time

import torch
import torch.distributed as dist


class PeerFailureError(RuntimeError):
    """A collective failed because another process died or stopped answering within the timeout."""


def env_world():
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) outside torchrun."""
    try:
        rank = int(os.environ.get("RANK", 0))
        world = int(os.environ.get("WORLD_SIZE", 1))
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError as e:
        raise ValueError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers: {e}") from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"WORLD_SIZE must be >= 1 and 0 <= RANK < WORLD_SIZE, got RANK={rank} WORLD_SIZE={world}")
    return rank, world, local


def init_from_env(device_type="cpu", timeout_s=300.0):
    """Initialises the default process group when torchrun started several processes (gloo on the CPU,
    nccl on CUDA) with a collective timeout of timeout_s. Returns (rank, world_size, local_rank)."""
    rank, world, local = env_world()
    if world > 1 and not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    return rank, world, local


def init_file_group(rank, world_size, init_file, timeout_s=60.0):
    """A gloo group rendezvousing through a file (local tests: no ports)."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))


def run_local(fn, nprocs, args=(), timeout_s=120.0):
    """Runs fn(rank, *args) in nprocs spawned processes and waits at most timeout_s. A process that raises
    or dies ends the others (torch.multiprocessing's join), and the error is raised here; past the deadline
    every process is killed and TimeoutError raised. Never hangs."""
    ctx = torch.multiprocessing.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=0.2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            for p in ctx.processes:
                p.join(5)
            raise TimeoutError(f"run_local: {nprocs} processes did not finish within {timeout_s} s")
    return True


def guard_collectives(what):
    """Context manager turning a collective's failure (a dead peer, a timeout) into PeerFailureError that
    says so, naming this rank and what it was doing."""
    return _Guard(what)


class _Guard:
    def __init__(self, what):
        self.what = what

    def __enter__(self):
        return self

    def __exit__(self, typ, value, tb):
        if typ is None or not dist.is_initialized() or issubclass(typ, PeerFailureError):
            return False
        names = ("DistError", "DistBackendError", "DistNetworkError", "DistStoreError")
        if any(issubclass(typ, getattr(dist, n)) for n in names if hasattr(dist, n)) or \
                (issubclass(typ, RuntimeError) and any(s in str(value) for s in (
                    "Connection closed by peer", "Connection reset", "Timed out", "timed out", "Gloo", "gloo"))):
            raise PeerFailureError(f"rank {dist.get_rank()} of {dist.get_world_size()}: {self.what} failed: another "
                                   f"process died or stopped answering ({typ.__name__}: {value})") from value
        return False
