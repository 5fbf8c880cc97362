import json
import os

import pytest
import torch

from dalle_fast.checkpoint import (CheckpointError, atomic_save_safetensors, latest_checkpoint, load_checkpoint,
                                   load_safetensors, optimizer_state_from_tensors, optimizer_state_to_tensors,
                                   save_checkpoint)


def _model_and_opt():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        m(torch.randn(5, 4)).square().sum().backward()
        opt.step()
    return m, opt


def test_roundtrip_model_and_optimizer(tmp_path):
    m, opt = _model_and_opt()
    ot, ometa = optimizer_state_to_tensors(opt)
    d = save_checkpoint(str(tmp_path), 3, {"model": m.state_dict(), "optim": ot}, {"optim": ometa, "x": 1})
    assert latest_checkpoint(str(tmp_path)) == d
    groups, meta = load_checkpoint(d)
    assert meta["step"] == 3 and meta["x"] == 1
    m2, opt2 = _model_and_opt()
    with torch.no_grad():
        for p in m2.parameters():
            p.add_(1.0)
    m2.load_state_dict(groups["model"])
    opt2.load_state_dict(optimizer_state_from_tensors(groups["optim"], meta["optim"]))
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    # the optimiser continues identically
    x = torch.randn(5, 4)
    for mm, oo in ((m, opt), (m2, opt2)):
        oo.zero_grad()
        mm(x).square().sum().backward()
        oo.step()
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_keeps_last_n_and_ignores_partial_writes(tmp_path):
    for step in range(1, 6):
        save_checkpoint(str(tmp_path), step, {"model": {"w": torch.full((2,), float(step))}}, {}, keep=2)
    root = tmp_path / "checkpoints"
    assert sorted(p for p in os.listdir(root) if p.startswith("step-")) == ["step-00000004", "step-00000005"]
    # a run killed mid-write leaves a temp dir; the pointer still names the last complete checkpoint
    os.makedirs(root / ".tmp-step-00000006-abc")
    groups, meta = load_checkpoint(latest_checkpoint(str(tmp_path)))
    assert meta["step"] == 5 and groups["model"]["w"][0].item() == 5.0


def test_corrupt_files_raise_clear_errors(tmp_path):
    p = tmp_path / "t.safetensors"
    atomic_save_safetensors({"a": torch.ones(3)}, str(p))
    assert torch.equal(load_safetensors(str(p))["a"], torch.ones(3))
    p.write_bytes(b"\x00garbage" * 3)
    with pytest.raises(CheckpointError, match="cannot read safetensors"):
        load_safetensors(str(p))
    with pytest.raises(CheckpointError, match="not found"):
        load_safetensors(str(tmp_path / "missing.safetensors"))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt checkpoint pointer"):
        latest_checkpoint(str(tmp_path))
    assert latest_checkpoint(str(tmp_path / "nothing-here")) is None
    d = tmp_path / "ck"
    d.mkdir()
    (d / "meta.json").write_text(json.dumps({"step": 1})[:-3])
    with pytest.raises(CheckpointError, match="metadata"):
        load_checkpoint(str(d))
