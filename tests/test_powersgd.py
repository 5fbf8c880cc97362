"""PowerSGD (dalle_fast.distributed) in 2 and 4 gloo processes on the CPU: full rank equals the exact
all-reduce (directly and as a DDP hook), the error-feedback identity over several steps, no NaN on a zero
gradient where torch's powerSGD_hook gives NaN in fp16, non-finite gradients skip the update (with several
DDP buckets too: nothing added to any error buffer), a small
model trained at rank r within a stated margin of uncompressed training, and bad input."""
import json
import os

import pytest
import torch
import torch.distributed as dist

from dalle_fast.distributed import PowerSGDState, powersgd_hook
from dalle_fast.distributed.launch import init_file_group, run_local

SHAPES = [(24, 10), (10, 24), (24, 10), (7, 5), (16,)]  # two of one shape (one batched QR), a wide one, a bias


def _params(shapes, dtype=torch.float64):
    return [torch.nn.Parameter(torch.zeros(s, dtype=dtype)) for s in shapes]


def _grads(shapes, rank, step, dtype=torch.float64):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]


def _exact_mean(grads):
    out = []
    for g in grads:
        t = g.clone()
        dist.all_reduce(t)
        out.append(t / dist.get_world_size())
    return out


def _check_full_rank_exact(rank):
    params = _params(SHAPES)
    state = PowerSGDState(None, 10, compress=[p for p in params if p.dim() == 2], error_dtype=torch.float64,
                          comm_dtype=torch.float64, min_compression_rate=0.0, eps=0.0)
    grads = _grads(SHAPES, rank, 0)
    want = _exact_mean(grads)
    assert state.allreduce_(params, grads) is False
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
    # the paper's eps = 1e-6 in fp32: exact to eps / sigma_min(P)
    state = PowerSGDState(None, 10, compress=[p for p in params if p.dim() == 2], error_dtype=torch.float32,
                          min_compression_rate=0.0)
    grads = _grads(SHAPES, rank, 0, torch.float32)
    want = _exact_mean(grads)
    state.allreduce_(params, grads)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def _check_error_feedback_identity(rank, steps=5):
    """With rank 1 and fp64 buffers: sum of applied updates + final local error = sum of local gradients."""
    params = _params(SHAPES)
    state = PowerSGDState(None, 1, compress=[p for p in params if p.dim() == 2], error_dtype=torch.float64)
    applied = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
    true = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
    for step in range(steps):
        grads = _grads(SHAPES, rank, step)
        for t, g in zip(true, grads):
            t += g
        state.allreduce_(params, grads)
        for a, g in zip(applied, grads):
            a += g
    comp = [i for i, s in enumerate(SHAPES) if len(s) == 2]
    worst = 0.0
    for i in comp:
        e = state.errors[comp.index(i)]  # in the gradient's own layout
        assert e.abs().max() > 1e-3  # rank 1 does leave an error: the identity is not vacuous
        worst = max(worst, (applied[i] + e - true[i]).abs().max().item())
    assert worst < 1e-10, worst
    # the uncompressed bias got the exact mean every step
    mean_true = true[-1].clone()
    dist.all_reduce(mean_true)
    torch.testing.assert_close(applied[-1], mean_true / dist.get_world_size())
    rate = state.compression_rate()
    dense = sum(torch.Size(s).numel() for s in SHAPES)
    sent = 16 + sum(1 * (max(s) + min(s)) for s in SHAPES if len(s) == 2)
    assert abs(rate - (1 - sent / dense)) < 1e-12, rate


def _check_nonfinite_skips(rank):
    params = _params(SHAPES)
    state = PowerSGDState(None, 2, compress=[p for p in params if p.dim() == 2], error_dtype=torch.float16)
    state.allreduce_(params, _grads(SHAPES, rank, 0))
    before = {k: v.clone() for k, v in state.errors.items()}
    grads = _grads(SHAPES, rank, 1)
    if rank == 1:
        grads[0][3, 3] = float("nan")  # one rank, one value: every rank skips
    kept = [g.clone() for g in grads]
    assert state.allreduce_(params, grads) is True and state.pop_skipped() is True
    assert state.pop_skipped() is False
    for k, v in before.items():
        assert torch.equal(state.errors[k], v)
    for g, k in zip(grads, kept):
        assert torch.equal(g.nan_to_num(), k.nan_to_num())
    # overflow in the fp16 buffer is clamped to the format's max, keeping the sign: no skip, finite buffer
    grads = _grads(SHAPES, rank, 2)
    grads[0][0, 0] = -1e6
    assert state.allreduce_(params, grads) is False
    assert all(torch.isfinite(e).all() for e in state.errors.values())
    assert state.errors[0].float().min() >= -65504


class _ZeroBranch(torch.nn.Module):
    """The first layer's output is multiplied by 0: its weight's gradient is exactly zero."""

    def __init__(self, dtype):
        super().__init__()
        self.dead = torch.nn.Linear(8, 8, bias=False, dtype=dtype)
        self.live = torch.nn.Linear(8, 8, bias=False, dtype=dtype)

    def forward(self, x):
        return self.live(x) + 0 * self.dead(x)


def _ddp_grads(model, hook, state, rank, steps=3):
    from torch.nn.parallel import DistributedDataParallel as DDP
    ddp = DDP(model)
    if hook is not None:
        ddp.register_comm_hook(state, hook)
    for step in range(steps):
        g = torch.Generator().manual_seed(step * 10 + rank)
        x = torch.randn(4, 8, generator=g).to(next(model.parameters()).dtype)
        ddp.zero_grad()
        ddp(x).float().square().mean().backward()
    return {n: p.grad.clone() for n, p in ddp.module.named_parameters()}


def _check_fp16_zero_gradient(rank):
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as torch_psgd
    torch.manual_seed(0)
    theirs_state = torch_psgd.PowerSGDState(None, matrix_approximation_rank=1, start_powerSGD_iter=2,
                                            min_compression_rate=0.0, orthogonalization_epsilon=1e-8)
    theirs = _ddp_grads(_ZeroBranch(torch.float16), torch_psgd.powerSGD_hook, theirs_state, rank)
    assert torch.isnan(theirs["dead.weight"]).all()  # 0 / (0 + fp16(1e-8) = 0)
    torch.manual_seed(0)
    model = _ZeroBranch(torch.float16)
    ours_state = PowerSGDState(None, 1, compress=[model.dead.weight, model.live.weight], min_compression_rate=0.0)
    ours = _ddp_grads(model, powersgd_hook, ours_state, rank)
    assert torch.equal(ours["dead.weight"], torch.zeros_like(ours["dead.weight"]))
    assert torch.isfinite(ours["live.weight"]).all()


def _check_ddp_full_rank(rank):
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    b = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    b.load_state_dict(a.state_dict())
    plain = _ddp_grads(a, None, None, rank)
    state = PowerSGDState(None, 8, compress=[b[0].weight, b[2].weight], error_dtype=torch.float64,
                          comm_dtype=torch.float64, min_compression_rate=0.0, eps=0.0)
    hooked = _ddp_grads(b, powersgd_hook, state, rank)
    for n in plain:
        torch.testing.assert_close(hooked[n], plain[n], rtol=1e-9, atol=1e-10)


def _check_bucket_skip(rank):
    """Four matrices in >= 3 DDP buckets: a NaN in one middle bucket's gradient on rank 1 skips the whole
    step on every rank (pop_skipped) and adds nothing to any error buffer, whichever bucket came first;
    the next finite step commits again."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(32, 32, bias=False) for _ in range(4)])
    ddp = DDP(model, bucket_cap_mb=4096 / 2 ** 20, gradient_as_bucket_view=False)
    state = PowerSGDState(None, 2, compress=[m.weight for m in model], error_dtype=torch.float32)
    calls = []

    def counting_hook(st, bucket):
        calls.append(bucket.index())
        return powersgd_hook(st, bucket)
    ddp.register_comm_hook(state, counting_hook)
    poison = {"on": False}
    model[1].weight.register_hook(lambda g: g * float("nan") if poison["on"] and rank == 1 else g)
    history = []
    for step in range(4):
        calls.clear()
        poison["on"] = step == 2
        before = {k: v.clone() for k, v in state.errors.items()}
        x = torch.randn(8, 32, generator=torch.Generator().manual_seed(step * 10 + rank))
        ddp.zero_grad()
        ddp(x).square().mean().backward()
        skipped = state.pop_skipped()
        same = all(torch.equal(before[k], v) for k, v in state.errors.items()) if before else None
        history.append((len(set(calls)), skipped, same))
    # DDP's first step runs in one bucket, then it rebuilds them (the buffers move to the new plans)
    assert history[0][0] == 1 and all(n >= 3 for n, _, _ in history[1:]), history
    assert [s for _, s, _ in history] == [False, False, True, False], history
    assert history[2][2] is True and history[1][2] is False and history[3][2] is False, history
    assert len(state.errors) == 4 and all(torch.isfinite(e).all() for e in state.errors.values())


def _check_mismatched_rank(rank):
    with pytest.raises(ValueError, match="matrix_approximation_rank differs"):
        PowerSGDState(None, 2 + rank)


def _train(rank, psgd_rank, steps=60):
    """A 2-layer MLP on a fixed regression task; returns the loss curve (mean over ranks)."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))
    teacher = torch.nn.Linear(32, 16)
    ddp = DDP(model)
    if psgd_rank:
        ddp.register_comm_hook(PowerSGDState(None, psgd_rank, compress=[model[0].weight, model[2].weight],
                                             error_dtype=torch.bfloat16), powersgd_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    g = torch.Generator().manual_seed(rank)
    losses = []
    for _ in range(steps):
        x = torch.randn(32, 32, generator=g)
        with torch.no_grad():
            y = teacher(x).tanh()
        loss = (ddp(x) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        t = loss.detach().clone()
        dist.all_reduce(t)
        losses.append(t.item() / dist.get_world_size())
    return losses


def _worker(rank, world, init_file, out_dir, checks):
    torch.set_num_threads(1)
    init_file_group(rank, world, init_file)
    try:
        results = {}
        for name in checks:
            if name == "train":
                results["train"] = {r: _train(rank, r) for r in (0, 8)}
            else:
                globals()[name](rank)
        if rank == 0:
            with open(os.path.join(out_dir, "results.json"), "w") as f:
                json.dump(results, f)
    finally:
        dist.destroy_process_group()


def _run(tmp_path, world, checks, timeout_s=180):
    run_local(_worker, world, (world, str(tmp_path / "init"), str(tmp_path), checks), timeout_s=timeout_s)
    with open(tmp_path / "results.json") as f:
        return json.load(f)


def test_two_processes(tmp_path):
    """Every 2-process check in one launch (a spawn costs seconds), then: rank 8 of a 64-wide MLP (DDP, bf16
    error buffers, SGD with momentum) ends within 30% of the uncompressed loss after 60 steps (mean of the
    last 10; measured 0.0233 against 0.0205, and 2-6x worse at ranks 1-4 on this rank-16 task)."""
    res = _run(tmp_path, 2, ["_check_full_rank_exact", "_check_error_feedback_identity", "_check_nonfinite_skips",
                             "_check_fp16_zero_gradient", "_check_ddp_full_rank", "_check_bucket_skip",
                             "_check_mismatched_rank", "train"])
    plain, compressed = res["train"]["0"], res["train"]["8"]
    assert plain[-1] < 0.5 * plain[0]  # it does learn
    end = lambda xs: sum(xs[-10:]) / 10  # noqa: E731
    assert end(compressed) <= 1.3 * end(plain), (end(compressed), end(plain))


def test_four_processes(tmp_path):
    _run(tmp_path, 4, ["_check_full_rank_exact", "_check_error_feedback_identity"])


def test_needs_process_group():
    with pytest.raises(ValueError, match="process_group"):
        PowerSGDState(None, 2)


def _bad_args_worker(rank, world, init_file):
    init_file_group(rank, world, init_file)
    try:
        with pytest.raises(ValueError, match="matrix_approximation_rank"):
            PowerSGDState(None, 0)
        with pytest.raises(ValueError, match=r"compress\[1\] must be a matrix"):
            PowerSGDState(None, 2, compress=[torch.zeros(3, 3), torch.zeros(3)])
        with pytest.raises(TypeError, match="error_dtype"):
            PowerSGDState(None, 2, error_dtype=torch.int8)
        with pytest.raises(TypeError, match="state must be a PowerSGDState"):
            powersgd_hook(object(), None)
    finally:
        dist.destroy_process_group()


def test_bad_arguments(tmp_path):
    run_local(_bad_args_worker, 1, (1, str(tmp_path / "init")), timeout_s=60)
