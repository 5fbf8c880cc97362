"""dalle_fast.dynamic_threshold / guided_step against the float64 reference (same seed, same noise)."""
import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

import dalle_fast
from dalle_fast import testing
from dalle_fast.ops import diffusion as mod
from dalle_fast.reference import diffusion as ref

ops = torch.ops.dalle_fast
DEVICES = testing.devices()

# odd sizes, size 1, batch 1, image-like layouts
SHAPES = [(1,), (3,), (1, 1), (5, 1), (2, 113), (1, 203), (4, 3, 5, 7), (1, 3, 16, 16), (3, 2, 13, 11), (2, 3, 64, 64)]
PERCENTILES = [0.995, 0.5, 1.0, 0.9, 1e-3]
ULP64 = 2.3e-16  # one float64 ulp, relative


def heavy(shape, scale=3.0, dtype=torch.float64, seed=0):
    """Normal data scaled so the high percentiles of |x| exceed 1 (thresholding bites)."""
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)


# ---- the reference itself ----

@pytest.mark.parametrize("q", PERCENTILES)
def test_reference_quantile_is_torch_quantile(q):
    v = heavy((4, 203)).abs()
    v[2, 7] = float("nan")
    want = torch.quantile(v, q, dim=1, interpolation="linear")
    torch.testing.assert_close(ref.quantile(v, q), want, rtol=0, atol=0, equal_nan=True)


def test_reference_noise_is_standard_normal():
    """Kolmogorov-Smirnov test of the noise definition against the normal CDF, and independence of
    two offsets (correlation)."""
    n = 40_000
    z = ref.normal_noise((n,), 20240607).sort().values
    cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    i = torch.arange(1, n + 1, dtype=torch.float64)
    d = torch.maximum(i / n - cdf, cdf - (i - 1) / n).max().item()
    assert d < 1.63 / math.sqrt(n)  # KS at 1%
    a, b = ref.normal_noise((n,), 5, 0), ref.normal_noise((n,), 5, 1)
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 0.02


# ---- dynamic_threshold ----

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("q", PERCENTILES)
def test_threshold_matches_reference_exactly(device, shape, q):
    """float64 and float32: the scale is the reference's to one ulp (both select the same two order
    statistics and lerp them in float64; torch's vectorised lerp may fuse the multiply-add, the
    kernel does not); the output to rounding."""
    for dtype in (torch.float64, torch.float32):
        x = heavy(shape, dtype=dtype).to(device)
        out, s = dalle_fast.dynamic_threshold(x, q, return_scale=True)
        want_s = ref.threshold_scale(x.double(), q)
        torch.testing.assert_close(s, want_s, rtol=ULP64, atol=0)
        want = ref.dynamic_threshold(x.double(), q).to(dtype)
        rtol = 1e-15 if dtype == torch.float64 else 2.5e-7
        torch.testing.assert_close(out, want, rtol=rtol, atol=0)
        assert out.dtype == dtype and out.shape == x.shape


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", testing.LOW_PRECISION)
@pytest.mark.parametrize("shape", [(4, 3, 5, 7), (2, 113), (1, 3, 16, 16)])
def test_threshold_low_precision_within_pytorch_error(device, dtype, shape):
    x64 = heavy(shape).to(device)
    x = x64.to(dtype)
    want = ref.dynamic_threshold(x.double(), 0.995)
    testing.assert_within_pytorch_error(dalle_fast.dynamic_threshold(x), want, ref.dynamic_threshold(x, 0.995))


@pytest.mark.parametrize("device", DEVICES)
def test_threshold_ties_small_values_nan_and_inf(device):
    # integer-valued data: many ties around the percentile
    x = torch.randint(-6, 7, (3, 500), generator=torch.Generator().manual_seed(1)).double().to(device)
    for q in (0.995, 0.7, 0.33):
        out, s = dalle_fast.dynamic_threshold(x, q, return_scale=True)
        torch.testing.assert_close(s, ref.threshold_scale(x, q), rtol=ULP64, atol=0)
        torch.testing.assert_close(out, ref.dynamic_threshold(x, q), rtol=1e-15, atol=0)
    # all |x| below 1: s = 1 and x unchanged
    small = heavy((2, 50), scale=0.1).clamp(-0.99, 0.99).to(device)
    out, s = dalle_fast.dynamic_threshold(small, return_scale=True)
    assert torch.equal(s, torch.ones(2, dtype=torch.float64, device=device)) and torch.equal(out, small)
    # NaN poisons its own sample only (torch.quantile's rule); inf at the top
    y = heavy((3, 40)).to(device)
    y[1, 5] = float("nan")
    y[2, 9] = float("inf")
    out, s = dalle_fast.dynamic_threshold(y, 0.9, return_scale=True)
    want_s = ref.threshold_scale(y, 0.9)
    torch.testing.assert_close(s, want_s, rtol=ULP64, atol=0, equal_nan=True)
    assert out[1].isnan().all() and not out[0].isnan().any() and not out[2].isnan().any()
    torch.testing.assert_close(out, ref.dynamic_threshold(y, 0.9), rtol=1e-15, atol=0, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
def test_threshold_noncontiguous(device):
    x = heavy((3, 4, 9, 10)).to(device)
    for xs in (testing.make_noncontiguous(x), x.transpose(2, 3), x[:, ::2]):
        assert not xs.is_contiguous()
        torch.testing.assert_close(dalle_fast.dynamic_threshold(xs), ref.dynamic_threshold(xs), rtol=1e-15, atol=0)


def test_threshold_beyond_torch_quantile_limit():
    """6 x 3 x 1024 x 1024 fp32 (18.9M elements, over the 2^24 that torch.quantile refused before
    torch 2.x lifted the limit): the scale equals the two order statistics (torch.kthvalue, a
    selection) lerped in float64."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 3, 1024, 1024, generator=g) * torch.linspace(0.5, 4, 6).view(6, 1, 1, 1)
    out, s = dalle_fast.dynamic_threshold(x, 0.995, return_scale=True)
    flat = x.reshape(6, -1).abs()
    n = flat.shape[1]
    rank = 0.995 * (n - 1)
    lo, hi = int(rank), math.ceil(rank)
    v_lo = flat.kthvalue(lo + 1, dim=1).values.double()
    v_hi = flat.kthvalue(hi + 1, dim=1).values.double()
    want_s = torch.lerp(v_lo, v_hi, torch.full_like(v_lo, rank - lo)).clamp(min=1)
    torch.testing.assert_close(s, want_s, rtol=ULP64, atol=0)
    sf = s.float().view(6, 1, 1, 1)
    assert torch.equal(out, torch.maximum(torch.minimum(x, sf), -sf) / sf)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,q", [((3, 7, 4), 0.995), ((2, 40), 0.9), ((4, 30), 0.37), ((2, 25), 1.0),
                                     ((1, 9), 0.5)])
def test_threshold_gradcheck_float64(device, shape, q):
    """s differentiated through: gradcheck (s > 1 at the pivots) and the reference's autograd."""
    x = heavy(shape, seed=5).to(device).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: dalle_fast.dynamic_threshold(t, q), (x,))
    g = torch.randn(shape, dtype=torch.float64, device=device)
    (dx,) = torch.autograd.grad(dalle_fast.dynamic_threshold(x, q), x, g)
    (dx_ref,) = torch.autograd.grad(ref.dynamic_threshold(x, q), x, g)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-12, atol=1e-14)
    # s = 1 (all small): plain 1/s = 1 pass-through gradient
    small = (0.1 * x.detach()).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: dalle_fast.dynamic_threshold(t, q), (small,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_threshold_grad_low_precision(dtype):
    x64 = heavy((3, 3, 8, 8), seed=2)
    g = torch.randn(x64.shape, dtype=torch.float64)
    x = x64.to(dtype).requires_grad_(True)
    (dx,) = torch.autograd.grad(dalle_fast.dynamic_threshold(x), x, g.to(dtype))
    xr = x.detach().double().requires_grad_(True)
    (want,) = torch.autograd.grad(ref.dynamic_threshold(xr), xr, g.to(dtype).double())
    xt = x.detach().clone().requires_grad_(True)
    (theirs,) = torch.autograd.grad(ref.dynamic_threshold(xt), xt, g.to(dtype))
    testing.assert_within_pytorch_error(dx, want, theirs, what="grad")


def test_threshold_double_backward_raises():
    x = heavy((2, 30)).requires_grad_(True)
    (dx,) = torch.autograd.grad((dalle_fast.dynamic_threshold(x) * torch.randn(2, 30, dtype=torch.float64)).sum(), x,
                                create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        dx.sum().backward()


def test_threshold_bad_input():
    x = heavy((2, 5))
    for q in (0.0, -0.5, 1.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="percentile"):
            dalle_fast.dynamic_threshold(x, q)
        with pytest.raises(ValueError, match="percentile"):
            ops.dynamic_threshold(x, q, False)
    with pytest.raises(TypeError, match="percentile"):
        dalle_fast.dynamic_threshold(x, "high")
    with pytest.raises(TypeError, match="x0"):
        dalle_fast.dynamic_threshold(torch.ones(2, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="x0"):
        dalle_fast.dynamic_threshold(torch.tensor(2.0))
    with pytest.raises(ValueError, match="x0"):
        dalle_fast.dynamic_threshold(torch.ones(2, 0))
    with pytest.raises(ValueError, match="x0"):
        ops.dynamic_threshold(torch.ones(2, 0), 0.9, False)
    assert dalle_fast.dynamic_threshold(torch.ones(0, 3)).shape == (0, 3)


@given(shape=st.lists(st.integers(0, 6), min_size=0, max_size=3), q=st.floats(-0.5, 1.5),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
def test_threshold_property_valid_or_clear_error(shape, q, dtype):
    x = torch.randn(shape, dtype=torch.float64).mul(3).to(dtype)
    try:
        out = dalle_fast.dynamic_threshold(x, q)
    except (ValueError, TypeError) as e:
        assert "percentile" in str(e) or "x0" in str(e)
        return
    assert out.shape == x.shape and out.dtype == dtype
    if x.numel():
        torch.testing.assert_close(out.double(), ref.dynamic_threshold(x.double(), q).to(dtype).double(),
                                   rtol=1e-2 if dtype == torch.bfloat16 else 3e-7, atol=0)


# ---- the CPU kernel's two selections (csrc/cpu/diffusion_cpu_select.h) ----
# DALLE_FAST_THRESHOLD_SELECT forces one (read per call): "histogram" (any rank) or "extreme" (the
# k most extreme values, k = n - lo near p = 1 or hi + 1 near 0, never giving up); unset, the kernel
# picks extreme-k when k <= max(n / 64, 256) and falls back to the histogram on data that would make
# it churn (ascending).

SELECT_ENV = "DALLE_FAST_THRESHOLD_SELECT"
SELECT_METHODS = ("histogram", "extreme", "auto")
# near 1 and near 0 (extreme-k under auto), the middle (histogram under auto), either side of the
# auto boundary (k = 256 at n = 12288 is p = 0.9792), k = 1 (p = 1), k = 2 (lo = 0, hi = 1: the tiniest p)
SELECT_PERCENTILES = (0.995, 1.0, 0.98, 0.975, 0.5, 0.005, 1e-9)
# tiny n, n around the extreme-k buffer (k + 512 = 513..) and its 32-element blocks, one 64x64x3 sample
SELECT_SIZES = (1, 2, 3, 31, 97, 577, 641, 2000, 12288)


def select_sample(kind, n, seed=0):
    """Three samples of n values (float64) of one kind."""
    g = torch.Generator().manual_seed(seed + n)
    x = 3 * torch.randn(3, n, generator=g, dtype=torch.float64)
    if kind == "ties":  # integers: long runs of equal |x| across the two ranks
        x = torch.randint(-4, 5, (3, n), generator=g).double()
    elif kind == "all_equal":  # one value everywhere, signs mixed; a row of +-0
        x = torch.full((3, n), 2.5, dtype=torch.float64) * torch.randint(0, 2, (3, n), generator=g).mul(2).sub(1)
        x[2] = torch.where(torch.arange(n) % 2 == 0, 0.0, -0.0)
    elif kind == "ascending":  # the top values at the very end (every element beats the threshold)
        x = x.abs().sort(dim=1).values * torch.randint(0, 2, (3, n), generator=g).mul(2).sub(1)
    elif kind == "descending":
        x = x.abs().sort(dim=1, descending=True).values
    elif kind == "spike_end":  # small values, then the largest 1% in the last positions (the tail block)
        m = max(1, n // 100)
        x[:, -m:] = 50 + torch.rand(3, m, generator=g, dtype=torch.float64)
    elif kind == "inf":  # a few infinities (fewer than k for p = 0.995 at large n) and many (row 2)
        x[0, n // 2] = float("inf")
        x[1, -1] = -float("inf")
        x[2, : max(1, n // 10)] = float("inf")
    elif kind == "nan":  # NaN first, last, or in a block past the buffer: NaN for that sample only
        x[0, 0] = float("nan")
        x[1, -1] = float("nan")
    return x


def run_selected(monkeypatch, method, fn):
    if method == "auto":
        monkeypatch.delenv(SELECT_ENV, raising=False)
    else:
        monkeypatch.setenv(SELECT_ENV, method)
    return fn()


def identical(a, b):
    """Equal values, NaN where the other has NaN (torch.equal, which is fast, with NaN made comparable)."""
    return a.dtype == b.dtype and torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0), b.nan_to_num(0))


@pytest.mark.parametrize("kind", ["normal", "ties", "all_equal", "ascending", "descending", "spike_end", "inf",
                                  "nan"])
def test_threshold_selections_agree_bit_for_bit(monkeypatch, kind):
    """Histogram, extreme-k and the automatic choice give the same scale, output and pivots (bit for
    bit), and the scale is the reference's (torch.quantile's) to one ulp: every dtype the op takes,
    each percentile picking each path, tiny samples, ties, infinities, NaN."""
    for n in SELECT_SIZES:
        x64 = select_sample(kind, n)
        # fp16 / bf16 are selected as float32 after conversion: two sizes of them are enough
        for dtype in (torch.float64, torch.float32) + ((torch.float16, torch.bfloat16) if n in (97, 2000) else ()):
            x = x64.to(dtype)
            for q in SELECT_PERCENTILES:
                got = [run_selected(monkeypatch, m, lambda: ops.dynamic_threshold(x, q, True)) for m in SELECT_METHODS]
                assert all(identical(a, b) for other in got[1:] for a, b in zip(got[0], other)), (n, dtype, q)
                out, s, piv = got[0]
                want = ref.threshold_scale(x.double(), q)
                assert identical(s, want) or ((s - want).abs() <= ULP64 * want.abs()).all(), (n, dtype, q, s, want)
                acc = torch.float64 if dtype == torch.float64 else torch.float32  # the kernel's arithmetic
                assert identical(out, ref.dynamic_threshold(x.to(acc), q, scale=s).to(dtype)), (n, dtype, q)
                nan_rows = x.isnan().any(1)  # (lerping inf with inf gives NaN too, as in torch.quantile)
                assert s[nan_rows].isnan().all() and out[nan_rows].isnan().all()
                if kind != "inf":
                    assert not s[~nan_rows].isnan().any()


def test_threshold_selection_pivots_point_at_the_order_statistics(monkeypatch):
    """The pivots (for the backward) index elements whose |x| are the two order statistics."""
    x = select_sample("ties", 3001).abs().add(1.5).add(select_sample("normal", 3001, seed=1).abs() * 1e-3)
    x = x * torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(0)).mul(2).sub(1)
    for q in (0.995, 0.01):  # every |x| > 1: s is the percentile at both ends
        for method in SELECT_METHODS:
            _, s, piv = run_selected(monkeypatch, method, lambda: ops.dynamic_threshold(x, q, True))
            a = x.abs().sort(dim=1).values
            rank = q * (x.shape[1] - 1)
            lo, hi = int(rank), math.ceil(rank)
            assert (piv >= 0).all()
            assert torch.equal(x.abs().gather(1, piv), a[:, [lo, hi]])


def test_guided_step_selections_agree(monkeypatch):
    """guided_step thresholds with the same selection: identical steps whichever path runs."""
    cond, uncond, x_t = mod.sample_inputs((3, 3, 64, 64), "cpu", torch.float32, seed=2)
    x_t[1, 2, -1, -8:] = 40.0  # the largest x0 at the end of a sample
    for q in (0.995, 0.5, 0.02):
        def step():
            return dalle_fast.guided_step(cond, uncond, x_t, 0.3, 0.4, guidance=5.0, percentile=q, seed=1,
                                          return_x0=True)
        got = [run_selected(monkeypatch, m, step) for m in SELECT_METHODS]
        for other in got[1:]:
            for a, b in zip(got[0], other):
                assert torch.equal(a, b)


@given(n=st.integers(1, 1500), q=st.floats(1e-6, 1.0), values=st.integers(1, 50), seed=st.integers(0, 2 ** 16),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_threshold_selection_property(n, q, values, seed, dtype):
    """Any size, percentile and number of distinct values (ties): extreme-k equals the histogram."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randint(-values, values + 1, (2, n), generator=g) * 0.37).to(dtype)
    got = []
    for method in ("histogram", "extreme"):
        os.environ[SELECT_ENV] = method
        try:
            got.append(ops.dynamic_threshold(x, q, True))
        finally:
            del os.environ[SELECT_ENV]
    for a, b in zip(*got):
        assert torch.equal(a, b)
    torch.testing.assert_close(got[0][1], ref.threshold_scale(x.double(), q), rtol=ULP64, atol=0)


# The extreme-k scan exists in AVX2 and portable code; ATEN_CPU_CAPABILITY=default makes a process run
# the portable one (the in-process tests run what this CPU picks).
_PORTABLE_SELECT_SCRIPT = r"""
import os, torch
ops = torch.ops.dalle_fast
import dalle_fast
bad = 0
g = torch.Generator().manual_seed(0)
for n in (97, 641, 2000, 12288):
    base = 3 * torch.randn(3, n, generator=g, dtype=torch.float64)
    ends = base.clone()
    ends[:, -max(1, n // 100):] = 50.0  # the largest at the very end
    asc = base.abs().sort(dim=1).values
    ties = torch.randint(-4, 5, (3, n), generator=g).double()
    nan = base.clone()
    nan[1, -1] = float("nan")
    for x64 in (base, ends, asc, ties, nan):
        for dtype in (torch.float32, torch.float64):
            for q in (0.995, 1.0, 0.98, 0.005, 1e-9):
                got = []
                for method in ("histogram", "extreme"):
                    os.environ["DALLE_FAST_THRESHOLD_SELECT"] = method
                    got.append(ops.dynamic_threshold(x64.to(dtype), q, True))
                for a, b in zip(*got):
                    bad += not (torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0), b.nan_to_num(0)))
print(torch.backends.cpu.get_cpu_capability(), bad)
"""


def test_threshold_selections_agree_in_portable_code():
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", _PORTABLE_SELECT_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    cap, bad = res.stdout.split()[-2:]
    assert cap == "DEFAULT" and bad == "0", res.stdout


# ---- guided_step ----

STEP_CASES = [  # (parameterization, sampler, eta, threshold)
    ("eps", "ddpm", 0.0, "dynamic"), ("v", "ddpm", 0.0, "dynamic"), ("x0", "ddpm", 0.0, "static"),
    ("eps", "ddim", 0.0, "dynamic"), ("v", "ddim", 1.0, "none"), ("eps", "ddim", 0.3, "static"),
    ("x0", "ddim", 0.7, "dynamic"), ("eps", "ddpm", 0.0, "none")]
STEP_SHAPES = [(1, 1), (3,), (2, 113), (1, 3, 16, 16), (4, 3, 5, 7), (2, 3, 33, 31)]


def step_both(cond, uncond, x_t, a, p, **kw):
    got = dalle_fast.guided_step(cond, uncond, x_t, a, p, return_x0=True, **kw)
    kw = {k: v for k, v in kw.items() if k != "generator"}
    want = ref.guided_step(*(None if t is None else t.double() for t in (cond, uncond, x_t)),
                           a if not isinstance(a, torch.Tensor) else a.double(),
                           p if not isinstance(p, torch.Tensor) else p.double(), **kw)
    return got, want


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", STEP_CASES)
@pytest.mark.parametrize("shape", STEP_SHAPES)
def test_step_matches_reference(device, case, shape):
    param, sampler, eta, thr = case
    cond, uncond, x_t = mod.sample_inputs(shape, device, torch.float64, seed=len(shape))
    kw = dict(guidance=4.0, parameterization=param, sampler=sampler, eta=eta, threshold=thr, seed=-12345, offset=7)
    for a, p in ((0.3, 0.45), (0.02, 1.0), (0.9, 0.9)):
        (x_prev, x0), (want, want_x0) = step_both(cond, uncond, x_t, a, p, **kw)
        torch.testing.assert_close(x0, want_x0, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x_prev, want, rtol=1e-12, atol=1e-12)
    # fp32: the same math in fp32 inside, float64 coefficients
    (x_prev, x0), (want, want_x0) = step_both(*(t.float() for t in (cond, uncond, x_t)), 0.3, 0.45, **kw)
    torch.testing.assert_close(x0, want_x0.float(), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(x_prev, want.float(), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", STEP_CASES)
def test_last_step_returns_the_thresholded_x0_without_noise(device, case):
    """alpha_bar_prev = 1 (the sampler's step to t = -1): every sampler, eta and parameterisation returns
    exactly its (thresholded) x0 estimate, no noise; so the speckle of undertrained samples does not
    come from the last step (README, Imagen and unCLIP)."""
    param, sampler, eta, thr = case
    cond, uncond, x_t = mod.sample_inputs((2, 3, 16, 16), device, torch.float32, seed=5)
    kw = dict(guidance=3.0, parameterization=param, sampler=sampler, eta=eta, threshold=thr, offset=49)
    x_prev, x0 = dalle_fast.guided_step(cond, uncond, x_t, 0.9999, 1.0, return_x0=True, seed=1, **kw)
    torch.testing.assert_close(x_prev, x0, rtol=0, atol=1e-6)
    again = dalle_fast.guided_step(cond, uncond, x_t, 0.9999, 1.0, seed=2, **kw)  # other noise, same output
    torch.testing.assert_close(again, x_prev, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_step_per_sample_schedule_and_no_guidance(device):
    cond, uncond, x_t = mod.sample_inputs((3, 2, 9, 9), device, torch.float64)
    a = torch.tensor([0.1, 0.5, 0.98], dtype=torch.float64)
    p = torch.tensor([0.2, 0.5, 1.0], dtype=torch.float64)
    for unc in (uncond, None):
        (x_prev, x0), (want, want_x0) = step_both(cond, unc, x_t, a.to(device), p.to(device), guidance=2.5, seed=3)
        torch.testing.assert_close(x_prev, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x0, want_x0, rtol=1e-12, atol=1e-12)
    # each sample equals a step of its own with scalar coefficients
    # guidance 1 with uncond equals cond alone (to rounding)
    one = dalle_fast.guided_step(cond, uncond, x_t, 0.4, 0.6, guidance=1.0, seed=3)
    torch.testing.assert_close(one, dalle_fast.guided_step(cond, None, x_t, 0.4, 0.6, seed=3), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("param", ["eps", "v", "x0"])
def test_ddim_eta_one_is_the_ddpm_posterior(device, param):
    """Two derivations, one distribution: DDIM with eta = 1 is the DDPM posterior (same mean, same
    sigma, same noise for one seed), for any pair of steps."""
    cond, uncond, x_t = mod.sample_inputs((2, 3, 9, 10), device, torch.float64)
    for a, p in ((0.3, 0.45), (0.05, 0.9), (0.7, 1.0)):
        kw = dict(guidance=3.0, parameterization=param, seed=21, offset=4)
        ddpm = dalle_fast.guided_step(cond, uncond, x_t, a, p, sampler="ddpm", **kw)
        ddim = dalle_fast.guided_step(cond, uncond, x_t, a, p, sampler="ddim", eta=1.0, **kw)
        torch.testing.assert_close(ddim, ddpm, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", testing.FLOAT_DTYPES)
@pytest.mark.parametrize("case", STEP_CASES[:4])
def test_step_low_precision_within_pytorch_error(device, dtype, case):
    param, sampler, eta, thr = case
    cond, uncond, x_t = mod.sample_inputs((2, 3, 16, 16), device, dtype, seed=4)
    kw = dict(guidance=3.0, parameterization=param, sampler=sampler, eta=eta, threshold=thr, seed=9, offset=1)
    got = dalle_fast.guided_step(cond, uncond, x_t, 0.25, 0.4, **kw)
    want, _ = ref.guided_step(cond.double(), uncond.double(), x_t.double(), 0.25, 0.4, **kw)
    theirs, _ = ref.guided_step(cond, uncond, x_t, 0.25, 0.4, **kw)
    testing.assert_within_pytorch_error(got, want, theirs)


@pytest.mark.parametrize("device", DEVICES)
def test_step_noise_is_the_reference_noise(device):
    """cond = uncond = x_t = 0 (x0 = 0): x_prev = sigma z, so z comes out; float64 equals the
    reference to rounding, float32 (polynomial log/sincos) to a few ulps."""
    shape = (3, 5, 67)
    zero = torch.zeros(shape, dtype=torch.float64, device=device)
    a, p = 0.5, 0.8
    sigma = ref.step_coefficients(a, p)[4].item()
    for seed, offset in ((0, 0), (-1, 5), (2 ** 62 + 1, 2 ** 32 - 1)):
        want = ref.normal_noise(shape, seed, offset, device=device)
        z = dalle_fast.guided_step(zero, zero, zero, a, p, seed=seed, offset=offset) / sigma
        torch.testing.assert_close(z, want, rtol=1e-12, atol=1e-12)
        z32 = dalle_fast.guided_step(zero.float(), zero.float(), zero.float(), a, p, seed=seed, offset=offset) / sigma
        torch.testing.assert_close(z32.double(), want, rtol=1e-5, atol=1e-5)
    z1 = dalle_fast.guided_step(zero, None, zero, a, p, seed=0, offset=1)
    assert not torch.allclose(z1, dalle_fast.guided_step(zero, None, zero, a, p, seed=0, offset=0))


def test_step_reproducible_and_thread_independent():
    cond, uncond, x_t = mod.sample_inputs((5, 3, 20, 20), "cpu", torch.float32)
    run = lambda **kw: dalle_fast.guided_step(cond, uncond, x_t, 0.2, 0.3, guidance=6.0, **kw)  # noqa: E731
    assert torch.equal(run(generator=torch.Generator().manual_seed(1)), run(generator=torch.Generator().manual_seed(1)))
    gen = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
    assert not torch.equal(run(generator=gen(1)), run(generator=gen(2)))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(seed=4)
        torch.set_num_threads(2)
        assert torch.equal(one, run(seed=4))
    finally:
        torch.set_num_threads(threads)
    # DDIM with eta = 0 draws no noise: the seed does not matter
    d = lambda seed: dalle_fast.guided_step(cond, uncond, x_t, 0.2, 0.3, sampler="ddim", seed=seed)  # noqa: E731
    assert torch.equal(d(1), d(2))


@pytest.mark.parametrize("device", DEVICES)
def test_step_noncontiguous(device):
    cond, uncond, x_t = mod.sample_inputs((2, 3, 12, 14), device, torch.float64)
    nc = [testing.make_noncontiguous(t) for t in (cond, uncond)] + [x_t.transpose(2, 3).contiguous().transpose(2, 3)]
    assert not any(t.is_contiguous() for t in nc)
    got = dalle_fast.guided_step(*nc, 0.3, 0.5, guidance=3.0, seed=1)
    torch.testing.assert_close(got, dalle_fast.guided_step(cond, uncond, x_t, 0.3, 0.5, guidance=3.0, seed=1),
                               rtol=0, atol=0)


def test_step_bad_input():
    cond, uncond, x_t = mod.sample_inputs((2, 3, 4, 4), "cpu", torch.float32)
    step = lambda *a, **kw: dalle_fast.guided_step(*(a or (cond, uncond, x_t, 0.3, 0.5)), **kw)  # noqa: E731
    with pytest.raises(ValueError, match="guidance"):
        step(guidance=-1.0)
    with pytest.raises(ValueError, match="guidance"):
        ops.guided_step(cond, uncond, x_t, torch.full((2,), 0.3, dtype=torch.float64),
                        torch.full((2,), 0.5, dtype=torch.float64), -0.5, "eps", "ddpm", 0.0, "dynamic", 0.995,
                        torch.zeros(1, dtype=torch.int64), 0, False)
    for q in (0.0, 1.01):
        with pytest.raises(ValueError, match="percentile"):
            step(percentile=q)
    step(percentile=5.0, threshold="static")  # unused percentile is not checked
    for kw, what in ((dict(parameterization="noise"), "parameterization"), (dict(sampler="euler"), "sampler"),
                     (dict(threshold="soft"), "threshold"), (dict(eta=-1.0), "eta"), (dict(offset=-1), "offset"),
                     (dict(offset=2 ** 32), "offset")):
        with pytest.raises(ValueError, match=what):
            step(**kw)
    for a, p in ((0.0, 0.5), (1.0, 1.0), (0.6, 0.5), (0.3, 1.5), (float("nan"), 0.5)):
        with pytest.raises(ValueError, match="alpha_bar"):
            step(cond, uncond, x_t, a, p)
    with pytest.raises(ValueError, match="alpha_bar"):
        step(cond, uncond, x_t, torch.tensor([0.3, 0.7]), torch.tensor([0.5, 0.6]))
    with pytest.raises(ValueError, match="alpha_bar"):  # the C++ kernel checks the values too
        ops.guided_step(cond, uncond, x_t, torch.tensor([0.3, 0.7], dtype=torch.float64),
                        torch.tensor([0.5, 0.6], dtype=torch.float64), 1.0, "eps", "ddpm", 0.0, "dynamic", 0.995,
                        torch.zeros(1, dtype=torch.int64), 0, False)
    with pytest.raises(ValueError, match="alpha_bar_t"):
        step(cond, uncond, x_t, torch.full((3,), 0.3), 0.5)
    with pytest.raises(ValueError, match="uncond"):
        step(cond, uncond[:1], x_t, 0.3, 0.5)
    with pytest.raises(TypeError, match="cond"):
        step(cond.double(), uncond, x_t, 0.3, 0.5)
    with pytest.raises(ValueError, match="x_t"):
        step(cond[0, 0, 0, 0], uncond[0, 0, 0, 0], x_t[0, 0, 0, 0], 0.3, 0.5)
    with pytest.raises(RuntimeError, match="inference only"):
        step(cond.clone().requires_grad_(True), uncond, x_t, 0.3, 0.5)
    with torch.no_grad():
        step(cond.clone().requires_grad_(True), uncond, x_t, 0.3, 0.5)
    assert dalle_fast.guided_step(cond[:0], uncond[:0], x_t[:0], 0.3, 0.5).shape == (0, 3, 4, 4)


# ---- the op library contract ----

def sample_inputs(device, dtype):
    cond, uncond, x_t = mod.sample_inputs((2, 3, 5, 7), device, dtype)
    a = torch.tensor([0.3, 0.6], dtype=torch.float64, device=device)
    p = torch.tensor([0.5, 1.0], dtype=torch.float64, device=device)
    seed = torch.tensor([11], dtype=torch.int64, device=device)
    x = cond.clone().requires_grad_(True)
    out, scale, piv = ops.dynamic_threshold(cond, 0.9, True)
    return [(ops.dynamic_threshold, (x, 0.9, True)), (ops.dynamic_threshold, (cond, 0.995, False)),
            (ops._dynamic_threshold_backward, (uncond, cond, scale, piv, 0.9)),
            (ops.guided_step, (cond, uncond, x_t, a, p, 3.0, "eps", "ddpm", 0.0, "dynamic", 0.995, seed, 2, True)),
            (ops.guided_step, (cond, None, x_t, a, p, 1.0, "v", "ddim", 0.5, "static", 0.995, seed, 0, False))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(device, dtype):
    for op, args in sample_inputs(device, dtype):
        torch.library.opcheck(op, args)


def test_fake_kernels_on_cuda_tensors():
    """The fake kernels give the shapes and dtypes of the GPU path (FakeTensorMode, no GPU needed)."""
    with FakeTensorMode(allow_non_fake_inputs=False):
        x = torch.empty(4, 3, 8, 8, device="cuda", dtype=torch.bfloat16)
        a = torch.empty(4, device="cuda", dtype=torch.float64)
        seed = torch.empty(1, device="cuda", dtype=torch.int64)
        out, scale, piv = ops.dynamic_threshold(x, 0.995, True)
        assert out.shape == x.shape and out.dtype == x.dtype and out.device.type == "cuda"
        assert scale.shape == (4,) and scale.dtype == torch.float64 and piv.shape == (4, 2)
        x_prev, x0 = ops.guided_step(x, x, x, a, a, 2.0, "eps", "ddpm", 0.0, "dynamic", 0.995, seed, 0, True)
        assert x_prev.shape == x.shape and x0.shape == x.shape and x_prev.device.type == "cuda"
        _, x0 = ops.guided_step(x, None, x, a, a, 2.0, "eps", "ddpm", 0.0, "dynamic", 0.995, seed, 0, False)
        assert x0.shape == (0,)


def test_torch_compile_sees_the_ops():
    cond, uncond, x_t = mod.sample_inputs((2, 3, 8, 8), "cpu", torch.float32)
    f = torch.compile(lambda c, u, x: dalle_fast.dynamic_threshold(
        dalle_fast.guided_step(c, u, x, 0.3, 0.5, guidance=2.0, seed=1)), fullgraph=False, backend="eager")
    want = dalle_fast.dynamic_threshold(dalle_fast.guided_step(cond, uncond, x_t, 0.3, 0.5, guidance=2.0, seed=1))
    torch.testing.assert_close(f(cond, uncond, x_t), want, rtol=0, atol=0)


def test_selftest_rows_pass():
    rows = mod.selftest("cpu")
    assert rows and all(err <= tol for _, _, _, err, tol in rows), rows


@pytest.mark.skipif(not testing.cuda_available(), reason="needs a CUDA device and the CUDA kernels")
@pytest.mark.parametrize("shape", [(1, 1), (2, 113), (4, 3, 33, 31), (2, 3, 256, 256)])
def test_cuda_matches_cpu(shape):
    """One definition on both devices: the same scale (bit for bit), outputs to rounding, the same noise."""
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        cond, uncond, x_t = mod.sample_inputs(shape, "cpu", dtype)
        out_c, s_c = dalle_fast.dynamic_threshold(cond, 0.995, return_scale=True)
        out_g, s_g = dalle_fast.dynamic_threshold(cond.cuda(), 0.995, return_scale=True)
        assert torch.equal(s_g.cpu(), s_c)
        tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-2, atol=1e-5)
        torch.testing.assert_close(out_g.cpu(), out_c, **tol)
        for case in STEP_CASES:
            param, sampler, eta, thr = case
            kw = dict(guidance=4.0, parameterization=param, sampler=sampler, eta=eta, threshold=thr, seed=5,
                      offset=2, return_x0=True)
            xc, x0c = dalle_fast.guided_step(cond, uncond, x_t, 0.3, 0.45, **kw)
            xg, x0g = dalle_fast.guided_step(cond.cuda(), uncond.cuda(), x_t.cuda(), 0.3, 0.45, **kw)
            tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-2, atol=2e-3)
            torch.testing.assert_close(x0g.cpu(), x0c, **tol)
            torch.testing.assert_close(xg.cpu(), xc, **tol)
