"""dalle_fast.logit_laplace_loss (fused, C++/CUDA) against the float64 reference and torch.distributions."""
import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, strategies as st

import dalle_fast
from dalle_fast import logit_laplace_loss, map_pixels, unmap_pixels
from dalle_fast.ops.logit_laplace import sample_inputs
from dalle_fast.reference import logit_laplace as ref
from dalle_fast.testing import assert_within_pytorch_error, default_tolerance, devices, make_noncontiguous

REDUCTIONS = ("none", "sum", "mean")
# Odd sizes, size 1, batch > 1, and rows longer than one reduction chunk (16384) with a ragged tail.
SHAPES = [(1, 1, 1, 1), (2, 3, 5, 7), (3, 1, 113, 3), (2, 3, 16, 17), (2, 3, 97, 203)]


def _close(actual, expected, dtype):
    rtol, atol = default_tolerance(dtype)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol * max(1.0, expected.abs().max().item()))


def _grads(fn, x, stats, seed=0):
    out = fn(x, stats)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return out, torch.autograd.grad(out, (x, stats), g.to(device=out.device, dtype=out.dtype))


def _as64(t):
    return t.detach().double().requires_grad_(t.requires_grad)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_forward_and_gradients_match_reference(device, dtype, shape, reduction):
    x, stats = sample_inputs(shape, device, dtype, requires_grad=True, x_requires_grad=True, seed=sum(shape))
    out, (gx, gs) = _grads(lambda a, b: logit_laplace_loss(a, b, reduction=reduction), x, stats)
    want, (rx, rs) = _grads(lambda a, b: ref.logit_laplace_loss(a, b, reduction=reduction), _as64(x), _as64(stats))
    assert out.dtype == dtype and out.shape == want.shape
    _close(out, want, dtype)
    _close(gs, rs, dtype)
    _close(gx, rx, dtype)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradient_to_stats_only_and_to_x_only(device, reduction):
    x, stats = sample_inputs((2, 3, 9, 11), device, torch.float64, requires_grad=True)
    (gs,) = torch.autograd.grad(logit_laplace_loss(x, stats, reduction=reduction).sum(), stats)
    s2 = _as64(stats)
    (rs,) = torch.autograd.grad(ref.logit_laplace_loss(x, s2, reduction=reduction).sum(), s2)
    _close(gs, rs, torch.float64)
    x.requires_grad_(True)
    stats = stats.detach()
    (gx,) = torch.autograd.grad(logit_laplace_loss(x, stats, reduction=reduction).sum(), x)
    (rx,) = torch.autograd.grad(ref.logit_laplace_loss(x, stats, reduction=reduction).sum(), x)
    _close(gx, rx, torch.float64)


def test_reference_is_the_logit_laplace_density_of_the_paper():
    """-log f(x' | mu, b), f(x') = exp(-|logit x' - mu| / b) / (2 b x' (1 - x')), computed independently as
    the density of sigmoid(Y), Y ~ Laplace(mu, b), by torch.distributions' change of variables."""
    x, stats = sample_inputs((2, 3, 8, 9), dtype=torch.float64, seed=3)
    mu, ln_b = stats[:, :3], stats[:, 3:]
    dist = torch.distributions.TransformedDistribution(
        torch.distributions.Laplace(mu, ln_b.exp()), [torch.distributions.transforms.SigmoidTransform()])
    xp = 0.8 * x + 0.1
    want = -dist.log_prob(xp)
    torch.testing.assert_close(ref.logit_laplace_loss(x, stats, reduction="none"), want, rtol=1e-12, atol=1e-12)
    # ... and the density of the paper's formula, by hand.
    by_hand = -(-(torch.logit(xp) - mu).abs() / ln_b.exp() - torch.log(2 * ln_b.exp() * xp * (1 - xp)))
    torch.testing.assert_close(want, by_hand, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logit_laplace_loss(x, stats, reduction="none"), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_noncontiguous_inputs(device, reduction):
    x, stats = sample_inputs((3, 3, 11, 13), device, torch.float32, seed=5)
    wide = torch.randn(3, 9, 11, 13, device=device)
    wide[:, 1:7] = stats
    cases = {
        "stats channel slice (no copy)": (x, wide[:, 1:7]),
        "x strided in W": (make_noncontiguous(x), stats),
        "channels_last": (x.contiguous(memory_format=torch.channels_last),
                          stats.contiguous(memory_format=torch.channels_last)),
        "batch flipped": (x.flip(0).flip(0), stats.flip(0).flip(0)),
        "stats expanded over batch": (x, stats[:1].expand(3, -1, -1, -1)),
    }
    for name, (xc, sc) in cases.items():
        sc = sc.detach().requires_grad_(True)
        xc = xc.detach().requires_grad_(True)
        out, (gx, gs) = _grads(lambda a, b: logit_laplace_loss(a, b, reduction=reduction), xc, sc)
        want, (rx, rs) = _grads(lambda a, b: ref.logit_laplace_loss(a, b, reduction=reduction), _as64(xc), _as64(sc))
        _close(out, want, torch.float32)
        _close(gs, rs, torch.float32)
        _close(gx, rx, torch.float32)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_low_precision_within_twice_pytorch_error(device, dtype, reduction):
    x, stats = sample_inputs((2, 3, 24, 25), device, dtype, requires_grad=True, x_requires_grad=True, seed=7)
    x64, s64 = _as64(x), _as64(stats)  # the truth on the same (rounded) inputs
    f = lambda a, b: logit_laplace_loss(a, b, reduction=reduction)  # noqa: E731
    r = lambda a, b: ref.logit_laplace_loss(a, b, reduction=reduction)  # noqa: E731
    out, (gx, gs) = _grads(f, x, stats)
    want, (rx, rs) = _grads(r, x64, s64)
    same, (px, ps) = _grads(r, x.detach().requires_grad_(True), stats.detach().requires_grad_(True))
    assert out.dtype == dtype and gs.dtype == dtype and gx.dtype == dtype
    assert_within_pytorch_error(out, want, same, what=f"{dtype} {reduction} forward")
    assert_within_pytorch_error(gs, rs, ps, what=f"{dtype} {reduction} grad stats")
    assert_within_pytorch_error(gx, rx, px, what=f"{dtype} {reduction} grad x")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_opcheck(device, reduction):
    x, stats = sample_inputs((2, 3, 5, 6), device, torch.float32, requires_grad=True, x_requires_grad=True)
    torch.library.opcheck(torch.ops.dalle_fast.logit_laplace_loss.default, (x, stats, 0.1, reduction))
    grad = torch.ones(() if reduction != "none" else x.shape, device=device)
    torch.library.opcheck(torch.ops.dalle_fast._logit_laplace_loss_backward.default,
                          (grad, x.detach(), stats.detach(), 0.1, reduction, True))
    torch.library.opcheck(torch.ops.dalle_fast._logit_laplace_loss_backward.default,
                          (grad, x.detach(), stats.detach(), 0.05, reduction, False))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_float64(device, reduction):
    x, stats = sample_inputs((2, 2, 3, 4), device, torch.float64, requires_grad=True, seed=11)
    x = (0.05 + 0.9 * x.detach()).requires_grad_(True)  # finite differences stay inside [0, 1]
    assert torch.autograd.gradcheck(lambda a, b: logit_laplace_loss(a, b, eps=0.07, reduction=reduction),
                                    (x, stats))


@pytest.mark.parametrize("device", devices())
def test_sign_at_zero_is_torch_sign(device):
    """x = 0.5 gives logit(x') = 0 exactly, so mu = 0 is the kink: d/dmu = 0 (torch.sign(0)), d/dln b = 1."""
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        x = torch.full((1, 1, 3, 40), 0.5, device=device, dtype=dtype)
        stats = torch.zeros(1, 2, 3, 40, device=device, dtype=dtype, requires_grad=True)
        (g,) = torch.autograd.grad(logit_laplace_loss(x, stats, reduction="sum"), stats)
        (r,) = torch.autograd.grad(ref.logit_laplace_loss(x, stats, reduction="sum"), stats)
        assert torch.equal(g[:, 0], torch.zeros_like(g[:, 0])) and torch.equal(g[:, 1], torch.ones_like(g[:, 1]))
        assert torch.equal(g, r)


@pytest.mark.parametrize("device", devices())
def test_sum_is_deterministic_and_thread_count_independent(device):
    x, stats = sample_inputs((2, 3, 100, 101), device, torch.float32, seed=13)  # 2 chunks per row, ragged
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 1, 2):
            torch.set_num_threads(n)
            results.append(logit_laplace_loss(x, stats, reduction="sum"))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], r) for r in results[1:])
    want = ref.logit_laplace_loss(x.double(), stats.double(), reduction="sum")
    assert abs(results[0].double().item() - want.item()) <= 1e-6 * abs(want.item())


# The CPU kernels exist per instruction set (AVX-512, AVX2, portable); ATEN_CPU_CAPABILITY picks one per process.
_ISA_SCRIPT = r"""
import torch, dalle_fast
from dalle_fast.ops.logit_laplace import sample_inputs
from dalle_fast.reference import logit_laplace as ref
worst = 0.0
for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
    x, stats = sample_inputs((2, 3, 37, 41), dtype=dtype, requires_grad=True, x_requires_grad=True)
    for red in ("none", "sum"):
        out = dalle_fast.logit_laplace_loss(x, stats, reduction=red)
        gx, gs = torch.autograd.grad(out.sum(), (x, stats))
        x64, s64 = x.detach().double().requires_grad_(), stats.detach().double().requires_grad_()
        want = ref.logit_laplace_loss(x64, s64, reduction=red)
        rx, rs = torch.autograd.grad(want.sum(), (x64, s64))
        tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-2)
        for a, b in ((out, want), (gs, rs), (gx, rx)):
            worst = max(worst, ((a.double() - b).abs().max() / b.abs().max()).item() / tol)
print(torch.backends.cpu.get_cpu_capability(), worst)
"""


@pytest.mark.parametrize("isa", ["default", "avx2"])
def test_every_cpu_instruction_set_matches_reference(isa):
    env = {**os.environ, "ATEN_CPU_CAPABILITY": isa, "OMP_NUM_THREADS": "2"}
    res = subprocess.run([sys.executable, "-c", _ISA_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    cap, worst = res.stdout.split()[-2:]
    if isa == "avx2" and cap != "AVX2":
        pytest.skip(f"this CPU does not run AVX2 (capability {cap})")
    assert cap == isa.upper()
    assert float(worst) <= 1.0, f"{cap}: error {worst} x the tolerance"


@pytest.mark.parametrize("device", devices())
def test_nan_in_stats_propagates_like_eager(device):
    x, stats = sample_inputs((2, 3, 4, 40), device, torch.float32, seed=17)
    stats[1, 0, 2, 5] = float("nan")  # a mu
    stats[0, 4, 1, 33] = float("nan")  # a ln b
    stats.requires_grad_(True)
    out = logit_laplace_loss(x, stats, reduction="none")
    want = ref.logit_laplace_loss(x, stats, reduction="none")
    assert torch.equal(out.isnan(), want.isnan()) and out.isnan().sum() == 2
    (g,) = torch.autograd.grad(out.sum(), stats)
    (r,) = torch.autograd.grad(want.sum(), stats)
    assert torch.equal(g.isnan(), r.isnan())
    assert logit_laplace_loss(x, stats.detach(), reduction="mean").isnan()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("bad", [-1e-3, 1.001, float("nan"), float("inf")])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_x_outside_unit_interval_or_nan_is_an_error(device, bad, reduction):
    x, stats = sample_inputs((2, 3, 5, 45), device, torch.float32)
    x[1, 2, 4, 44] = bad  # in the scalar tail of the last row
    with pytest.raises(ValueError, match=r"x must lie in \[0, 1\]"):
        logit_laplace_loss(x, stats, reduction=reduction)
    x, _ = sample_inputs((2, 3, 5, 45), device, torch.float32)
    x[0, 0, 0, 3] = bad  # in a vector body
    with pytest.raises(ValueError, match=r"x must lie in \[0, 1\]"):
        logit_laplace_loss(x, stats, reduction=reduction)


def test_bad_arguments_give_clear_errors():
    x, stats = sample_inputs((2, 3, 4, 5))
    with pytest.raises(TypeError, match="floating"):
        logit_laplace_loss((x * 255).long(), stats.long())
    with pytest.raises(TypeError, match="dtype"):
        logit_laplace_loss(x, stats.double())
    with pytest.raises(TypeError, match="tensors"):
        logit_laplace_loss(x.tolist(), stats)
    with pytest.raises(ValueError, match=r"stats must be \(B, 2C, H, W\)"):
        logit_laplace_loss(x, stats[:, :5])
    with pytest.raises(ValueError, match=r"stats must be \(B, 2C, H, W\)"):
        logit_laplace_loss(x, stats[:, :, :3])
    with pytest.raises(ValueError, match=r"stats must be \(B, 2C, H, W\)"):
        logit_laplace_loss(x, stats[:1])
    with pytest.raises(ValueError, match=r"x must be \(B, C, H, W\)"):
        logit_laplace_loss(x[0], stats[0])
    for eps in (0.0, 0.5, -0.1, 0.7, float("nan"), True):
        with pytest.raises(ValueError, match="eps"):
            logit_laplace_loss(x, stats, eps=eps)
    with pytest.raises(ValueError, match="reduction"):
        logit_laplace_loss(x, stats, reduction="avg")
    # The op itself checks too (for callers of torch.ops.dalle_fast directly).
    with pytest.raises(ValueError, match="eps must be in"):
        torch.ops.dalle_fast.logit_laplace_loss(x, stats, 0.5, "mean")
    with pytest.raises(ValueError, match="reduction must be"):
        torch.ops.dalle_fast.logit_laplace_loss(x, stats, 0.1, "avg")
    with pytest.raises(TypeError, match="floating"):
        torch.ops.dalle_fast.logit_laplace_loss(x.long(), stats.long(), 0.1, "mean")
    with pytest.raises(ValueError, match="grad must have x's shape"):
        torch.ops.dalle_fast._logit_laplace_loss_backward(torch.ones(3), x, stats, 0.1, "none", False)


@given(b=st.integers(0, 3), c=st.integers(0, 4), h=st.integers(0, 6), w=st.integers(0, 6),
       sc=st.integers(0, 9), sh=st.integers(0, 6), reduction=st.sampled_from(REDUCTIONS))
def test_any_shapes_give_a_result_or_a_clear_error(b, c, h, w, sc, sh, reduction):
    x = torch.rand(b, c, h, w)
    stats = torch.randn(b, sc, sh, w)
    if sc == 2 * c and sh == h:
        out = logit_laplace_loss(x, stats, reduction=reduction)
        want = ref.logit_laplace_loss(x.double(), stats.double(), reduction=reduction)
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5, equal_nan=True)
    else:
        with pytest.raises(ValueError, match=r"stats must be \(B, 2C, H, W\)"):
            logit_laplace_loss(x, stats, reduction=reduction)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 0, 4, 4), (2, 3, 0, 4)])
def test_empty_tensors_behave_like_torch(device, shape):
    x = torch.rand(shape, device=device)
    stats = torch.randn(shape[0], 2 * shape[1], *shape[2:], device=device, requires_grad=True)
    none = logit_laplace_loss(x, stats, reduction="none")
    assert none.shape == shape and none.numel() == 0
    total = logit_laplace_loss(x, stats, reduction="sum")
    assert total.shape == () and total.item() == 0.0
    mean = logit_laplace_loss(x, stats, reduction="mean")
    assert mean.shape == () and math.isnan(mean.item()) and ref.logit_laplace_loss(x, stats).isnan()
    (g,) = torch.autograd.grad(total, stats)
    assert g.shape == stats.shape


def test_double_backward_is_a_clear_error():
    x, stats = sample_inputs((1, 3, 4, 4), dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(logit_laplace_loss(x, stats), stats, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(g.sum(), stats)


def test_map_and_unmap_pixels():
    x = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64, requires_grad=True)
    y = map_pixels(x)
    torch.testing.assert_close(y, torch.tensor([0.1, 0.3, 0.5, 0.9], dtype=torch.float64))
    torch.testing.assert_close(unmap_pixels(y), x)
    torch.testing.assert_close(map_pixels(x, eps=0.2), 0.6 * x + 0.2)
    torch.testing.assert_close(unmap_pixels(torch.tensor([0.0, 0.05, 0.95, 1.0])), torch.tensor([0.0, 0.0, 1.0, 1.0]))
    (g,) = torch.autograd.grad(map_pixels(x).sum(), x)
    torch.testing.assert_close(g, torch.full_like(x, 0.8))
    assert dalle_fast.map_pixels is map_pixels and dalle_fast.unmap_pixels is unmap_pixels


def test_selftest_rows_pass():
    from dalle_fast.ops.logit_laplace import selftest
    rows = selftest("cpu")
    assert len(rows) == 18
    assert all(err <= tol for _, _, _, err, tol in rows), [r for r in rows if r[3] > r[4]]
