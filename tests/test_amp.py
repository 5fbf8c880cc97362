"""dalle_fast.amp: the per-resblock scaler's update rule, scaled branches (wrapper, hooks, DALLE),
gradients against the fp32 reference, the filter's isolation of blocks, checkpoints and bad input."""
import math

import numpy as np
import pytest
import torch
from torch import nn

import dalle_fast  # noqa: F401
from dalle_fast import testing
from dalle_fast.amp import ResblockGradScaler, ScaledBranch, scale_branches
from dalle_fast.amp import scaler as scaler_mod
from dalle_fast.models.dalle import DALLE, DALLEConfig


# ---- the update rule ----

def _simulate(flags, num_blocks, world_size, init=None, updates0=0, last0=None):
    """The paper's rule in numpy float32, written independently of the scaler."""
    m = world_size
    s = np.full(num_blocks, np.float32(m * 2.0 ** 13), dtype=np.float32) if init is None else np.array(init, np.float32)
    last = np.full(num_blocks, -10 ** 9) if last0 is None else np.array(last0)
    grow, back = np.float32(2.0 ** (1 / 1000)), np.float32(math.sqrt(2.0))
    lo, hi = np.float32(m * 2.0 ** 7), np.float32(m * 2.0 ** 24)
    for u, f in enumerate(flags, start=updates0):
        for b in range(num_blocks):
            if f[b]:
                if u - last[b] >= 125:
                    s[b] = np.float32(s[b] / back)
                    last[b] = u
            else:
                s[b] = np.float32(s[b] * grow)
            s[b] = min(max(s[b], lo), hi)
    return s


def test_update_rule_exactly():
    rng = np.random.default_rng(0)
    n, m = 4, 3
    flags = rng.random((400, n)) < np.array([0.0, 0.02, 0.3, 1.0])  # never, rare, often, always non-finite
    sc = ResblockGradScaler(n, world_size=m)
    assert sc.scales.tolist() == [m * 2.0 ** 13] * n
    for f in flags:
        sc.update(torch.from_numpy(f))
    np.testing.assert_array_equal(sc.scales.numpy(), _simulate(flags, n, m))
    # block 3 (non-finite every update) was divided at updates 0, 125, 250, 375 only: 4 divisions, then clamped
    assert sc.scales[3].item() == pytest.approx(m * 2 ** 13 / 4, rel=1e-6)
    assert sc.last_decrease[3].item() == 375


def test_guard_125_and_clamps():
    sc = ResblockGradScaler(2, world_size=2)
    bad = torch.tensor([True, False])
    sc.update(bad)  # update 0: divided
    s0 = sc.scales[0].item()
    assert s0 == pytest.approx(2 * 2 ** 13 / math.sqrt(2), rel=1e-7)
    for _ in range(124):  # updates 1..124: not divided again, and not grown either
        sc.update(bad)
    assert sc.scales[0].item() == s0
    sc.update(bad)  # update 125: divided again
    assert sc.scales[0].item() == pytest.approx(s0 / math.sqrt(2), rel=1e-6)
    # clamps carry the factor M = 2: floor 2 * 2^7, ceiling 2 * 2^24
    state = sc.state_dict()
    state["scales"] = torch.tensor([2 * 2 ** 7 * 1.1, 2 * 2 ** 24 * 0.9999])
    state["last_decrease"] = torch.tensor([-1000, -1000])
    sc.load_state_dict(state)
    sc.update(torch.tensor([True, False]))
    assert sc.scales.tolist() == [2 * 2 ** 7, 2 * 2 ** 24]
    for _ in range(3):
        sc.update(torch.tensor([False, False]))
    assert sc.scales[1].item() == 2 * 2 ** 24


def test_disabled_scaler_keeps_scale_one_and_still_reports():
    sc = ResblockGradScaler(3, enabled=False)
    p = nn.Parameter(torch.ones(2))
    p.grad = torch.tensor([1.0, float("nan")])
    nonfinite = sc.unscale_([p])
    assert nonfinite.tolist() == [True, True, True]  # outside every branch: every block
    sc.update(nonfinite)
    assert sc.scales.tolist() == [1.0, 1.0, 1.0]


# ---- scaled branches ----

class Residual(nn.Module):
    """A user's own pre-norm residual MLP stack (not DALLE) for the wrapper API."""

    def __init__(self, dim=16, depth=4, scaler=None, poison=None):
        super().__init__()
        self.emb = nn.Linear(3, dim)
        branches = [nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
                    for _ in range(depth)]
        if poison is not None:
            branches[poison].insert(2, _Poison())
        self.branches = nn.ModuleList(ScaledBranch(b, scaler, i) if scaler is not None else b
                                      for i, b in enumerate(branches))
        self.head = nn.Linear(dim, 1)

    def forward(self, x):
        h = self.emb(x)
        for b in self.branches:
            h = h + b(h)
        return self.head(h).pow(2).mean()


class _PoisonFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        g.view(-1)[0] = float("inf")  # one overflow inside this branch
        return g


class _Poison(nn.Module):
    def forward(self, x):
        return _PoisonFn.apply(x)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_wrapper_gradients_equal_unscaled_fp32():
    torch.manual_seed(0)
    plain = Residual()
    sc = ResblockGradScaler(4, world_size=2)
    sc.scales.copy_(torch.tensor([2.0 ** 14, 2.0 ** 10, 2.0 ** 20, 2.0 ** 8]))
    scaled = Residual(scaler=sc)
    with torch.no_grad():
        for b_plain, b_scaled in zip(plain.branches, scaled.branches):
            for p, q in zip(b_plain.parameters(), b_scaled.module.parameters()):
                q.copy_(p)
        for name in ("emb", "head"):
            getattr(scaled, name).load_state_dict(getattr(plain, name).state_dict())
    x = torch.randn(5, 3)
    plain(x).backward()
    scaled(x).backward()
    nonfinite = sc.unscale_(scaled)
    assert not nonfinite.any()
    gp = dict(plain.named_parameters())
    for n, p in scaled.named_parameters():
        ref = gp[n.replace(".module.", ".")].grad
        # powers of two: scaling and unscaling are exact in fp32
        torch.testing.assert_close(p.grad, ref, rtol=1e-6, atol=1e-9, msg=n)


def test_filter_isolates_one_blocks_overflow():
    torch.manual_seed(0)
    sc = ResblockGradScaler(4)
    model = Residual(scaler=sc, poison=2)
    model(torch.randn(5, 3)).backward()
    before = sc.scales.clone()
    nonfinite = sc.unscale_(model)
    assert nonfinite.tolist() == [False, False, True, False]
    # the filter zeroed the overflow before it reached blocks 0 and 1 and the embedding
    for n, p in model.named_parameters():
        if not n.startswith("branches.2."):
            assert bool(torch.isfinite(p.grad).all()), n
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = model.head.weight.detach().clone()
    assert sc.step(opt, nonfinite) is True and torch.equal(model.head.weight, w)  # skipped
    sc.update(nonfinite)
    assert sc.scales[2].item() == pytest.approx(before[2].item() / math.sqrt(2), rel=1e-7)
    for b in (0, 1, 3):  # no other block's scale is lowered: they grow
        assert sc.scales[b].item() > before[b].item()
    assert not sc.activation_flags.any()  # consumed by unscale_


def _tiny_dalle(**kw):
    torch.manual_seed(0)
    return DALLE(DALLEConfig.tiny(**{"depth": 3, "backend": "dense", **kw}))


def _batch(cfg, b=2):
    g = torch.Generator().manual_seed(1)
    return (torch.randint(1, cfg.num_text_tokens, (b, cfg.text_len), generator=g),
            torch.randint(0, cfg.num_image_tokens, (b, cfg.image_len), generator=g))


def test_dalle_enable_resblock_scaling_fp32_gradients_exact():
    ref, model = _tiny_dalle(), _tiny_dalle()
    text, image = _batch(model.config)
    keys = list(model.state_dict())
    sc = ResblockGradScaler(2 * 3, world_size=4)
    model.enable_resblock_scaling(sc)
    assert list(model.state_dict()) == keys  # hooks, not wrappers
    ref(text, image, return_loss=True)[0].backward()
    model(text, image, return_loss=True)[0].backward()
    nonfinite = sc.unscale_(model)
    assert nonfinite.tolist() == [False] * 6
    for (n, a), (_, b) in zip(ref.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-6, atol=1e-10, msg=n)


def _fp16_grads(model, text, image, scaler=None, loss_scale=1.0):
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(text, image, return_loss=True)[0]
    (loss * loss_scale).backward()
    if scaler is not None:
        scaler.unscale_(model)
    return {n: p.grad.double() / loss_scale for n, p in model.named_parameters()}


def test_dalle_fp16_gradients_match_fp32_reference():
    """fp16 branches with per-resblock scales: every parameter's gradient equals the float64 reference
    within twice the error of the same fp16 computation with torch's global loss scale (2^13)."""
    ref = _tiny_dalle().double()
    text, image = _batch(ref.config)
    ref(text, image, return_loss=True)[0].backward()
    truth = {n: p.grad for n, p in ref.named_parameters()}
    torch_scaled = _tiny_dalle()
    theirs = _fp16_grads(torch_scaled, text, image, loss_scale=2.0 ** 13)
    model = _tiny_dalle()
    sc = ResblockGradScaler(6)
    model.enable_resblock_scaling(sc)
    ours = _fp16_grads(model, text, image, sc)
    for n in truth:
        err = testing.max_abs_err(ours[n], truth[n])
        bar = 2 * testing.max_abs_err(theirs[n], truth[n]) + 4 * 2 ** -10 * truth[n].abs().max().item()
        assert err <= bar, f"{n}: {err:.3e} > {bar:.3e}"


def test_user_loop_in_torch_gradscaler_style():
    torch.manual_seed(0)
    sc = ResblockGradScaler(4)
    model = Residual(scaler=sc)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = model.head.weight.detach().clone()
    sc.scale(model(torch.randn(5, 3))).backward()
    sc.unscale_(opt)
    with pytest.raises(RuntimeError, match="already"):
        sc.unscale_(opt)
    assert sc.step(opt) is False and not torch.equal(model.head.weight, w)
    sc.update()
    assert sc.updates == 1 and sc.scales[0].item() > 2 ** 13


# ---- checkpoints ----

def test_state_dict_round_trip_through_safetensors(tmp_path):
    from dalle_fast.checkpoint import atomic_save_safetensors, load_safetensors
    sc = ResblockGradScaler(3, world_size=2)
    for f in ([True, False, False], [False, True, False], [False, False, False]):
        sc.update(torch.tensor(f))
    atomic_save_safetensors(sc.state_dict(), str(tmp_path / "s.safetensors"))
    other = ResblockGradScaler(3, world_size=2)
    other.load_state_dict(load_safetensors(str(tmp_path / "s.safetensors")))
    assert torch.equal(other.scales, sc.scales) and torch.equal(other.last_decrease, sc.last_decrease)
    assert other.updates == sc.updates == 3
    for s in (sc, other):
        s.update(torch.tensor([True, True, False]))
    assert torch.equal(other.scales, sc.scales)


# ---- bad input ----

def test_bad_input_clear_errors():
    with pytest.raises(ValueError, match="num_blocks"):
        ResblockGradScaler(0)
    with pytest.raises(ValueError, match="world_size"):
        ResblockGradScaler(2, world_size=0)
    sc = ResblockGradScaler(6)
    with pytest.raises(TypeError, match="bool"):
        sc.update(torch.zeros(6))
    with pytest.raises(ValueError, match=r"\(6,\)"):
        sc.update(torch.zeros(5, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        sc.step(torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=1), [False] * 6)
    with pytest.raises(RuntimeError, match="unscale_"):
        sc.update()
    model = _tiny_dalle(depth=2)  # 4 branches
    with pytest.raises(ValueError, match="num_blocks=6"):
        model.enable_resblock_scaling(sc)
    assert not any(m._forward_hooks for m in model.modules())  # nothing half done
    # a scaler state from another model
    with pytest.raises(ValueError, match="4 blocks.*num_blocks=6"):
        sc.load_state_dict(ResblockGradScaler(4).state_dict())
    with pytest.raises(ValueError, match="world_size"):
        sc.load_state_dict(ResblockGradScaler(6, world_size=2).state_dict())
    assert sc.updates == 0 and sc.scales[0].item() == 2 ** 13  # unchanged
    # one module cannot be two scaled branches
    sc4 = ResblockGradScaler(4)
    model.enable_resblock_scaling(sc4)
    with pytest.raises(ValueError, match="already"):
        model.enable_resblock_scaling(ResblockGradScaler(4))
    with pytest.raises(TypeError, match="nn.Module"):
        scale_branches([1, 2], ResblockGradScaler(2))


def test_hooks_remove_and_no_grad_forward_unchanged():
    model = _tiny_dalle(depth=2)
    text, image = _batch(model.config)
    with torch.no_grad():
        before = model(text, image)[1]
    sc = ResblockGradScaler(4)
    hooks = model.enable_resblock_scaling(sc)
    with torch.no_grad():
        assert torch.equal(model(text, image)[1], before)
    assert torch.equal(model(text, image)[1], before)  # the scaled forward computes the same values
    hooks.remove()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    model.enable_resblock_scaling(ResblockGradScaler(4))  # free again


# ---- train-dalle --precision fp16 ----

def test_train_dalle_fp16_uses_the_scaler_and_resumes_exactly(tmp_path, monkeypatch):
    """train-dalle --precision fp16: per-resblock scales (saved in the checkpoint as scaler.safetensors)
    and a run stopped after its step-4 checkpoint resumes to the weights and scales of an uninterrupted run."""
    from test_dalle import _train_args
    from dalle_fast.checkpoint import load_checkpoint
    from dalle_fast.data.shapes import Shapes
    from dalle_fast.models.dvae import DiscreteVAE, DVAEConfig
    from dalle_fast.tokenizer import BPETokenizer
    from dalle_fast.train import common
    from dalle_fast.train.dalle import train_dalle
    torch.manual_seed(0)
    DiscreteVAE(DVAEConfig.tiny()).save_pretrained(tmp_path / "vae")
    BPETokenizer.train(list(Shapes(200).captions()), vocab_size=100).save(tmp_path / "tok.json")
    kw = dict(precision="fp16", steps=6, ckpt_every=3, ema_decay=0.0)
    train_dalle(_train_args(tmp_path, run=str(tmp_path / "a"), **kw))
    groups, _ = load_checkpoint(common.ckpt.latest_checkpoint(str(tmp_path / "a")))
    scales = groups["scaler"]["scales"]
    assert scales.shape == (4,) and int(groups["scaler"]["updates"]) == 6
    assert bool((scales != 2.0 ** 13).all())  # every scale moved by the rule (grown, or divided on an overflow)

    real_update, calls = common.Progress.update, {"n": 0}

    def interrupt(self, n=1, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_update(self, n, **k)

    monkeypatch.setattr(common.Progress, "update", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train_dalle(_train_args(tmp_path, run=str(tmp_path / "b"), **kw))
    monkeypatch.setattr(common.Progress, "update", real_update)
    train_dalle(_train_args(tmp_path, run=str(tmp_path / "b"), resume=True, **kw))
    a, _ = load_checkpoint(common.ckpt.latest_checkpoint(str(tmp_path / "a")))
    b, _ = load_checkpoint(common.ckpt.latest_checkpoint(str(tmp_path / "b")))
    for group in ("model", "scaler"):
        for k in a[group]:
            assert torch.equal(a[group][k], b[group][k]), (group, k)
