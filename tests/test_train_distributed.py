"""`dalle-fast train-dalle` in 2 gloo processes (spawned as torchrun would start them: RANK, WORLD_SIZE,
MASTER_ADDR/PORT in the environment): FSDP2 and DDP losses equal one process's, DDP + PowerSGD trains, a rank
that dies makes the other fail with a clear error within the timeout, and a 2-process FSDP run killed after
its step-4 checkpoint and resumed under 2 processes ends with the weights of the uninterrupted run. Also: fp16
with FSDP2 and the per-resblock scaler (losses of one fp16 process; an overflow in one rank's shard skips every
rank), FSDP2 hybrid sharding on 2x1 / 1x2 meshes, DDP + PowerSGD resume with its error buffers, and one real
torchrun launch of the CLI."""
import csv
import os
import socket
import sys

import pytest
import torch

from dalle_fast.distributed.launch import run_local

sys.path.insert(0, os.path.dirname(__file__))
from test_dalle import _train_args  # noqa: E402


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(run):
    with open(os.path.join(run, "metrics.csv")) as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def _assets(tmp_path):
    from dalle_fast.data.shapes import Shapes
    from dalle_fast.models.dvae import DiscreteVAE, DVAEConfig
    from dalle_fast.tokenizer import BPETokenizer
    torch.manual_seed(0)
    DiscreteVAE(DVAEConfig.tiny()).save_pretrained(tmp_path / "vae")
    BPETokenizer.train(list(Shapes(200).captions()), vocab_size=100).save(tmp_path / "tok.json")


def _worker(rank, world, ports, runs, die):
    """Runs train_dalle once per (args, die_at) in runs; die = (run index, update call) at which rank 1 stops
    dead (os._exit(0), as a killed process: no exception, no cleanup)."""
    torch.set_num_threads(1)
    from dalle_fast.train import common
    from dalle_fast.train.dalle import train_dalle
    for i, args in enumerate(runs):
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(ports[i]))
        if die is not None and die[0] == i and rank == 1:
            calls = {"n": 0}
            real = common.Progress.update

            def update(self, n=1, **kw):
                calls["n"] += 1
                if calls["n"] == die[1]:
                    os._exit(0)
                return real(self, n, **kw)
            common.Progress.update = update
        train_dalle(args)


def _args(tmp_path, name, **kw):
    return _train_args(tmp_path, run=str(tmp_path / name), dist_timeout=30.0, **kw)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 1-process run and one 2-process launch holding FSDP, DDP and DDP + PowerSGD runs (spawns cost
    seconds each, so they share)."""
    from dalle_fast.train.dalle import train_dalle
    tmp = tmp_path_factory.mktemp("dist")
    _assets(tmp)
    train_dalle(_args(tmp, "single"))
    train_dalle(_args(tmp, "single16", precision="fp16"))
    two = [_args(tmp, "fsdp", shard="fsdp"), _args(tmp, "ddp", shard="ddp"),
           _args(tmp, "psgd", shard="ddp", powersgd_rank=2), _args(tmp, "fp16", shard="ddp", precision="fp16"),
           _args(tmp, "fsdp16", shard="fsdp", precision="fp16"),
           _args(tmp, "hsdp2x1", shard="fsdp", replicate=2), _args(tmp, "hsdp1x2", shard="fsdp", replicate=1)]
    run_local(_worker, 2, (2, [_free_port() for _ in two], two, None), timeout_s=600)
    return tmp


def test_fsdp_and_ddp_losses_match_one_process(runs):
    single = _losses(runs / "single")
    assert len(single) == 8
    for mode in ("fsdp", "ddp"):
        torch.testing.assert_close(_losses(runs / mode), single, rtol=1e-4, atol=1e-5, msg=mode)


def test_fsdp2_hybrid_sharding_losses_match_one_process(runs):
    """FSDP2 on a 2-D (replicate, shard) mesh without PowerSGD (HSDP: replicate across the first dimension,
    shard within the second), as 2x1 and 1x2 meshes of 2 processes: the losses of one process."""
    single = _losses(runs / "single")
    for mode in ("hsdp2x1", "hsdp1x2"):
        torch.testing.assert_close(_losses(runs / mode), single, rtol=1e-4, atol=1e-5, msg=mode)


def test_powersgd_resume_restores_error_buffers(runs):
    """DDP + PowerSGD stopped after its step-4 checkpoint and resumed under 2 processes gives the
    uninterrupted run's losses and weights exactly: the per-rank error buffers are in the checkpoint
    (powersgd.safetensors). The same resume without that file gives other losses (the buffers matter)."""
    import json
    import shutil
    from dalle_fast.checkpoint import load_safetensors
    from dalle_fast.models.dalle import DALLE
    src = runs / "psgd" / "checkpoints" / "step-00000004"
    bufs = load_safetensors(str(src / "powersgd.safetensors"))
    assert {k.split(".")[0] for k in bufs} == {"rank0", "rank1"} and all(v.abs().max() > 0 for v in bufs.values())
    for name, keep in (("psgd_resumed", True), ("psgd_nobuffers", False)):
        dst = runs / name / "checkpoints"
        shutil.copytree(src, dst / "step-00000004")
        (dst / "latest.json").write_text(json.dumps({"path": "step-00000004"}))
        if not keep:
            (dst / "step-00000004" / "powersgd.safetensors").unlink()
    args = [_args(runs, name, shard="ddp", powersgd_rank=2, resume=True) for name in ("psgd_resumed", "psgd_nobuffers")]
    run_local(_worker, 2, (2, [_free_port() for _ in args], args, None), timeout_s=240)
    whole = _losses(runs / "psgd")
    assert _losses(runs / "psgd_resumed") == whole[4:]
    a = DALLE.from_pretrained(str(runs / "psgd" / "export" / "dalle"))
    b = DALLE.from_pretrained(str(runs / "psgd_resumed" / "export" / "dalle"))
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), k
    assert _losses(runs / "psgd_nobuffers") != whole[4:]


def test_torchrun_launch_writes_a_checkpoint_that_samples_in_one_process(runs, tmp_path):
    """One real launch: `torchrun --standalone --nproc_per_node 2 -m dalle_fast.cli train-dalle ...` (gloo,
    DDP + PowerSGD, 2 steps) exits 0; its checkpoint and export load in this one process and sample."""
    import subprocess
    from dalle_fast import cli
    from dalle_fast.checkpoint import latest_checkpoint, load_checkpoint
    run = tmp_path / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dalle_fast.cli", "train-dalle", "--vae", str(runs / "vae"), "--tokenizer", str(runs / "tok.json"),
           "--out", str(run), "--preset", "tiny", "--depth", "2", "--text-len", "12", "--steps", "2",
           "--batch-size", "4", "--length", "16", "--warmup", "1", "--ckpt-every", "2", "--log-every", "1",
           "--bpe-dropout", "0", "--precision", "fp32", "--device", "cpu", "--threads", "1", "--cache-tokens",
           "--shard", "ddp", "--powersgd-rank", "2", "--dist-timeout", "60", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                          os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    ckpt = latest_checkpoint(str(run))
    assert ckpt is not None and ckpt.endswith("step-00000002")
    groups, meta = load_checkpoint(ckpt)
    assert meta["step"] == 2 and {"rank0", "rank1"} <= {k.split(".")[0] for k in groups["powersgd"]}
    grid = tmp_path / "grid.png"
    assert cli.main(["generate", "a red circle", "--checkpoint", str(run), "-n", "2", "--no-clip", "--out",
                     str(grid), "--threads", "1"]) == 0
    assert grid.is_file() and grid.stat().st_size > 0


def test_fsdp_export_loads_in_one_process(runs):
    from dalle_fast.models.dalle import DALLE
    a = DALLE.from_pretrained(str(runs / "fsdp" / "export" / "dalle"))
    b = DALLE.from_pretrained(str(runs / "single" / "export" / "dalle"))
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=k)


def test_ddp_powersgd_trains(runs):
    import json
    psgd, ddp = _losses(runs / "psgd"), _losses(runs / "ddp")
    assert all(torch.isfinite(torch.tensor(psgd)))
    assert sum(psgd[-3:]) / 3 <= 1.1 * sum(ddp[-3:]) / 3  # 8 steps at rank 2: stated margin 10%
    with open(runs / "psgd" / "metrics.json") as f:
        summary = json.load(f)["summary"]
    assert 0 < summary["powersgd_compression_rate"] < 1
    ckpt = runs / "psgd" / "checkpoints" / "step-00000008" / "powersgd.safetensors"
    assert ckpt.is_file()  # every rank's error buffers, for exact resume


def test_ddp_fp16_with_per_resblock_scaler(runs):
    """DDP in fp16 with dalle_fast.amp's per-resblock scaler (flags all-reduced with MAX across ranks): it
    trains like fp32 DDP, and every rank's scales are the same (one saved state)."""
    from dalle_fast.checkpoint import load_safetensors
    fp16, fp32 = _losses(runs / "fp16"), _losses(runs / "ddp")
    torch.testing.assert_close(torch.tensor(fp16), torch.tensor(fp32), rtol=2e-2, atol=2e-2)
    scaler = load_safetensors(str(runs / "fp16" / "checkpoints" / "step-00000008" / "scaler.safetensors"))
    assert torch.isfinite(scaler["scales"]).all() and scaler["scales"].min() >= 2 * 2 ** 7


def test_fsdp_fp16_with_per_resblock_scaler_matches_one_process(runs):
    """FSDP2 in fp16 (16-bit branch parameters and compute via MixedPrecisionPolicy, per-resblock scales
    unscaled on the local gradient shards, flags all-reduced with MAX): the losses of one fp16 process."""
    from dalle_fast.checkpoint import load_safetensors
    one, two = _losses(runs / "single16"), _losses(runs / "fsdp16")
    assert len(two) == 8 and all(torch.isfinite(torch.tensor(two)))
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-2, atol=1e-2)
    a = load_safetensors(str(runs / "fsdp16" / "checkpoints" / "step-00000008" / "scaler.safetensors"))
    b = load_safetensors(str(runs / "single16" / "checkpoints" / "step-00000008" / "scaler.safetensors"))
    assert torch.equal(a["updates"], b["updates"]) and torch.equal(a["scales"], b["scales"] * 2)  # M = 2


class _TwoBranches(torch.nn.Module):
    """Two residual MLP branches and a final fp32 norm: the smallest model with two scaled blocks."""

    def __init__(self):
        super().__init__()
        self.branches = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(),
                                                                torch.nn.Linear(16, 8)) for _ in range(2))
        self.norm = torch.nn.LayerNorm(8)

    def resblocks(self):
        return self.branches

    def forward(self, x):
        for b in self.branches:
            x = x + b(x)
        return self.norm(x).square().mean()


def _fsdp16_overflow_worker(rank, world, init_file, out_dir):
    import json
    import torch.distributed as dist
    from dalle_fast.amp import ResblockGradScaler, scale_branches
    from dalle_fast.distributed.launch import init_file_group
    from dalle_fast.distributed.sharding import apply_fsdp, full_tensor, make_mesh
    torch.set_num_threads(1)
    init_file_group(rank, world, init_file)
    try:
        torch.manual_seed(0)
        model = _TwoBranches()
        scaler = ResblockGradScaler(2, world_size=world)
        scale_branches(model.resblocks(), scaler)
        apply_fsdp(model, make_mesh("cpu", world), "fp16")
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        res = {}
        for step in range(2):
            before = [full_tensor(p.detach()).clone() for p in model.parameters()]
            model(torch.randn(4, 8, generator=torch.Generator().manual_seed(10 * step + rank))).backward()
            w = model.branches[1][0].weight.grad
            res[f"dtensor{step}"] = type(w).__name__
            if step == 0 and rank == 1:  # an fp16 overflow in block 1, in rank 1's shard only
                w.to_local()[0, 0] = float("inf")
            nonfinite = scaler.unscale_(opt, dist.group.WORLD)
            res[f"flags{step}"] = nonfinite.tolist()
            res[f"skipped{step}"] = bool(scaler.step(opt, nonfinite))
            scaler.update(nonfinite)
            opt.zero_grad()
            res[f"scales{step}"] = scaler.scales.tolist()
            res[f"moved{step}"] = any(not torch.equal(a, full_tensor(p.detach())) for a, p in
                                      zip(before, model.parameters()))
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(res, f)
    finally:
        dist.destroy_process_group()


def test_fsdp_fp16_overflow_in_one_shard_skips_every_rank(tmp_path):
    """A non-finite gradient in block 1 of rank 1's shard: every rank skips the step and lowers block 1's
    scale only (by sqrt 2; block 0 grows by 2^(1/1000)); the next, finite step updates the weights."""
    import json
    import math
    run_local(_fsdp16_overflow_worker, 2, (2, str(tmp_path / "init"), str(tmp_path)), timeout_s=120)
    init = 2 * 2.0 ** 13
    for rank in (0, 1):
        with open(tmp_path / f"rank{rank}.json") as f:
            res = json.load(f)
        assert res["dtensor0"] == "DTensor"  # the scaler did see sharded gradients
        assert res["flags0"] == [False, True] and res["skipped0"] and not res["moved0"], (rank, res)
        assert res["scales0"] == pytest.approx([init * 2 ** 0.001, init / math.sqrt(2)], rel=1e-6)
        assert res["flags1"] == [False, False] and not res["skipped1"] and res["moved1"], (rank, res)


def test_dead_rank_fails_others_and_resume_matches(runs):
    """Rank 1 stops dead after step 6 (a kill); rank 0 must fail with PeerFailureError, not hang. Resuming
    under 2 processes from the step-4 checkpoint ends with the uninterrupted FSDP run's weights."""
    import time
    from dalle_fast.models.dalle import DALLE
    from dalle_fast.train import common
    args = [_args(runs, "killed", shard="fsdp")]
    t0 = time.monotonic()
    with pytest.raises(Exception) as err:
        run_local(_worker, 2, (2, [_free_port()], args, (0, 6)), timeout_s=240)
    assert "PeerFailureError" in str(err.value) and "another process died" in str(err.value), str(err.value)[-2000:]
    assert time.monotonic() - t0 < 200
    assert common.ckpt.latest_checkpoint(str(runs / "killed")).endswith("step-00000004")
    resume = [_args(runs, "killed", shard="fsdp", resume=True)]
    run_local(_worker, 2, (2, [_free_port()], resume, None), timeout_s=240)
    a = DALLE.from_pretrained(str(runs / "fsdp" / "export" / "dalle"))
    b = DALLE.from_pretrained(str(runs / "killed" / "export" / "dalle"))
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), k
    assert _losses(runs / "killed") == _losses(runs / "fsdp")


@pytest.mark.parametrize("kw, env, match", [
    (dict(shard="none"), {"WORLD_SIZE": "2", "RANK": "0"}, "--shard none runs one process"),
    (dict(shard="ddp", batch_size=3), {"WORLD_SIZE": "2", "RANK": "0"}, "--batch-size"),
    (dict(shard="ddp", replicate=2), {"WORLD_SIZE": "2", "RANK": "0"}, "--replicate"),
    (dict(shard="fsdp", replicate=3), {"WORLD_SIZE": "2", "RANK": "0"}, "--replicate must divide"),
    (dict(shard="fsdp", powersgd_rank=2), {"WORLD_SIZE": "2", "RANK": "0"}, "needs --replicate"),
    (dict(shard="none", powersgd_rank=0), {}, "--powersgd-rank must be >= 1"),
    (dict(shard="ddp"), {"WORLD_SIZE": "2", "RANK": "2"}, "RANK < WORLD_SIZE"),
])
def test_bad_launch_arguments(tmp_path, monkeypatch, kw, env, match):
    from dalle_fast.train.dalle import train_dalle
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=match):
        train_dalle(_args(tmp_path, "bad", **kw))
    assert not (tmp_path / "bad").exists()  # nothing written, nothing lost


def test_fsdp_2d_mesh_powersgd_matches_ddp_powersgd(runs):
    """The paper's layout on a (replicate 2, shard 1) mesh: FSDP2 on the shard dimension, PowerSGD at rank 2
    on the local shards across the replicate dimension gives DDP + PowerSGD's losses (same Q, same buffers)."""
    args = [_args(runs, "fsdp2d", shard="fsdp", replicate=2, powersgd_rank=2)]
    run_local(_worker, 2, (2, [_free_port()], args, None), timeout_s=240)
    torch.testing.assert_close(_losses(runs / "fsdp2d"), _losses(runs / "psgd"), rtol=1e-3, atol=1e-4)
