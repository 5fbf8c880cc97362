"""The diffusion trainers under torchrun: `dalle-fast train-diffusion --shard ddp` in 2 gloo processes
(spawned as torchrun would start them) takes the steps one process takes: the same losses, the same
exported weights (the loss draws t, noise and the condition drop for the whole global batch)."""
import os
import sys

import pytest
import torch

from dalle_fast.distributed.launch import run_local

sys.path.insert(0, os.path.dirname(__file__))
from test_train_distributed import _free_port, _losses  # noqa: E402


def _argv(stage, run, *extra):
    return [str(a) for a in (*stage, "--out", run, "--steps", 4, "--length", 32, "--batch-size", 4, "--width", 8,
                             "--quiet", "--threads", 1, "--ckpt-every", 0, "--log-every", 1, "--warmup", 2,
                             "--snr-gamma", 5, "--dist-timeout", 60, *extra)]


def _worker(rank, world, port, argv):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from dalle_fast.cli import main
    assert main(argv) == 0


STAGE = ["train-diffusion", "--model", "imagen", "--text-encoder", "clip"]


def test_ddp_two_processes_match_one(tmp_path):
    from dalle_fast.checkpoint import load_safetensors
    from dalle_fast.cli import main
    assert main(_argv(STAGE, tmp_path / "one")) == 0
    run_local(_worker, 2, (2, _free_port(), _argv(STAGE, tmp_path / "two", "--shard", "ddp")), timeout_s=240)
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 4
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-4, atol=1e-6)
    a = load_safetensors(str(tmp_path / "one" / "export" / "model.safetensors"))
    b = load_safetensors(str(tmp_path / "two" / "export" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:  # Adam divides by sqrt(v): a parameter with a near-zero gradient moves by about lr whichever
        # way the last bits of its (differently summed) gradient point, so 0.1 lr of absolute slack
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-4)
    assert not (tmp_path / "two" / "rank1").exists()


def test_bad_launch_arguments(tmp_path, monkeypatch, capsys):
    from dalle_fast.cli import main
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(_argv(STAGE, tmp_path / "x")) != 0
    assert "--shard none runs one process" in capsys.readouterr().err
    assert main(_argv(STAGE, tmp_path / "x", "--shard", "ddp", "--batch-size", 3)) != 0
    assert "--batch-size" in capsys.readouterr().err
