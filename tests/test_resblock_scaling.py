"""The per-resblock gradient-scaling kernels against their float64 reference (dalle_fast/ops/resblock_scaling.py)."""
import pytest
import torch
from hypothesis import given, strategies as st

import dalle_fast  # noqa: F401  (loads the ops)
from dalle_fast import testing
from dalle_fast.ops.resblock_scaling import resblock_grad_scale, resblock_unscale_grads_
from dalle_fast.reference import resblock_scaling as ref

SHAPES = [(1,), (3,), (113,), (2, 203), (4, 3, 17)]
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _state(n, device, values=None):
    scales = torch.tensor(values or [2.0 ** 13 * 1.37 ** i for i in range(n)], dtype=torch.float32, device=device)
    return scales, torch.zeros(n, dtype=torch.bool, device=device)


def sample_inputs(device, dtype, requires_grad=False):
    """(grad, block) pairs of odd sizes, a non-contiguous one and one holding NaN/Inf."""
    g = torch.Generator().manual_seed(0)
    out = [((torch.randn(s, generator=g) * 1e-3).to(dtype).to(device), i % 3) for i, s in enumerate(SHAPES)]
    out.append((testing.make_noncontiguous(torch.randn(5, 9, generator=g).to(dtype).to(device)), 1))
    bad = torch.randn(7, 11, generator=g).to(dtype)
    bad[1, 2], bad[3, 4] = float("inf"), float("nan")
    out.append((bad.to(device), 2))
    return out


@pytest.mark.parametrize("device", testing.devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("unscale", [False, True])
def test_grad_scale_matches_reference(device, dtype, out_dtype, unscale):
    for grad, block in sample_inputs(device, dtype):
        scales, flags = _state(3, device)
        scales_r, flags_r = scales.clone(), flags.clone()
        out = resblock_grad_scale(grad, scales, flags, block, unscale, out_dtype)
        expect = ref.resblock_grad_scale(grad, scales_r, flags_r, block, unscale, out_dtype)
        assert out.dtype == out_dtype and out.shape == grad.shape
        assert torch.equal(out, expect), f"{dtype}->{out_dtype} block {block}: {testing.max_abs_err(out, expect)}"
        assert torch.equal(flags, flags_r)
        assert bool(torch.isfinite(out).all())
        if not bool(torch.isfinite(grad).all()):
            assert bool(flags[block])


@pytest.mark.parametrize("device", testing.devices())
def test_grad_scale_flags_overflow_of_the_rounding_only_its_block(device):
    # 1.0 * 2^17 fits in fp32 but not in fp16: the rounded value overflows, is zeroed and flagged
    scales, flags = _state(4, device, [1.0, 2.0 ** 17, 1.0, 1.0])
    grad = torch.tensor([1.0, -1e-6, 0.5], device=device)
    out = resblock_grad_scale(grad, scales, flags, 1, False, torch.float16)
    assert flags.tolist() == [False, True, False, False]
    assert out[0].item() == 0 and out[2].item() == 0
    assert out[1].item() == pytest.approx(-1e-6 * 2 ** 17, rel=1e-3)
    # flags are only set, never cleared
    resblock_grad_scale(torch.ones(3, device=device), scales, flags, 1, True, torch.float32)
    assert flags.tolist() == [False, True, False, False]


@pytest.mark.parametrize("device", testing.devices())
def test_unscale_grads_matches_reference_mixed_dtypes(device):
    g = torch.Generator().manual_seed(1)
    grads = [(torch.randn(s, generator=g) * 2 ** 13).to(dt).to(device)
             for s, dt in [((3, 5), torch.float16), ((113,), torch.float32), ((1,), torch.bfloat16),
                           ((0,), torch.float32), ((7, 203), torch.float64), ((2, 3), torch.float32)]]
    grads[5][1, 1] = float("inf")
    blocks = [0, 2, 1, 3, 2, 3]
    scales, flags = _state(4, device)
    expect = [t.clone() for t in grads]
    scales_r, flags_r = scales.clone(), flags.clone()
    ref.resblock_unscale_grads_(expect, blocks, scales_r, flags_r)
    ptrs = [t.data_ptr() for t in grads]
    resblock_unscale_grads_(grads, blocks, scales, flags)
    assert [t.data_ptr() for t in grads] == ptrs  # in place
    for a, e in zip(grads, expect):
        assert torch.equal(a, e)
    assert flags.tolist() == flags_r.tolist() == [False, False, False, True]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_unscale_grads_bit_equal_to_division_over_every_exponent(dtype):
    """The vectorised CPU loop gives the correctly rounded g / s bit for bit (the reference's division): fp32
    bit patterns of every exponent, signed zeros, subnormals, Inf and NaN, at non-power-of-two scales."""
    g = torch.Generator().manual_seed(3)
    bits = torch.randint(0, 2 ** 31 - 1, (200_000,), generator=g, dtype=torch.int64)
    sign = torch.randint(0, 2, (200_000,), generator=g, dtype=torch.int64) << 31
    x = ((bits | sign) - (1 << 32) * ((bits | sign) >= 2 ** 31)).to(torch.int32).view(torch.float32)
    x[: 50_000] = torch.randn(50_000, generator=g) * 2.0 ** 10  # whole chunks of ordinary gradients
    x[50_000:50_300] = 0.0
    x[50_300:50_600] = -0.0
    x = x.to(dtype)
    scales = torch.tensor([8192.0 * 2 ** (7 / 1000), 300.7, 2.0 ** 24 * 1.37])
    for b in range(3):
        flags, flags_r = (torch.zeros(3, dtype=torch.bool) for _ in range(2))
        got, want = [x.clone()], [x.clone()]
        resblock_unscale_grads_(got, [b], scales, flags)
        ref.resblock_unscale_grads_(want, [b], scales, flags_r)
        finite = torch.isfinite(want[0])  # bits of every finite result (signed zeros included); NaN by position
        as_int = torch.int32 if dtype == torch.float32 else torch.int16
        assert torch.equal(got[0][finite].view(as_int), want[0][finite].view(as_int)), b
        assert torch.equal(torch.isnan(got[0]), torch.isnan(want[0])) and flags.tolist() == flags_r.tolist()


@pytest.mark.parametrize("device", testing.devices())
def test_power_of_two_scale_round_trips_exactly(device):
    x = torch.randn(1000, device=device) * 1e-4
    scales, flags = _state(1, device, [2.0 ** 13])
    up = resblock_grad_scale(x, scales, flags, 0, False, torch.float32)
    back = resblock_grad_scale(up, scales, flags, 0, True, torch.float32)
    assert torch.equal(back, x) and not flags.any()
    grads = [up.clone()]
    resblock_unscale_grads_(grads, [0], scales, flags)
    assert torch.equal(grads[0], x)


def test_opcheck():
    scales, flags = _state(3, "cpu")
    for dtype, out_dtype in [(torch.float32, torch.float16), (torch.float64, torch.float64)]:
        grad = torch.randn(4, 5, dtype=dtype)
        torch.library.opcheck(torch.ops.dalle_fast.resblock_grad_scale.default,
                              (grad, scales, flags, 1, True, out_dtype))
    grads = [torch.randn(3, 4), torch.randn(5, dtype=torch.float16)]
    torch.library.opcheck(torch.ops.dalle_fast.resblock_unscale_grads_.default, (grads, [0, 2], scales, flags))


def test_fake_kernels_on_cuda_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        grad = torch.empty(3, 8, device="cuda")
        scales = torch.empty(2, device="cuda")
        flags = torch.zeros(2, dtype=torch.bool, device="cuda")
        out = torch.ops.dalle_fast.resblock_grad_scale(grad, scales, flags, 1, False, torch.float16)
        assert out.shape == (3, 8) and out.dtype == torch.float16 and out.device.type == "cuda"
        torch.ops.dalle_fast.resblock_unscale_grads_([grad], [0], scales, flags)


@pytest.mark.parametrize("device", testing.devices())
def test_bad_input_names_the_argument(device):
    scales, flags = _state(2, device)
    g = torch.ones(3, device=device)
    with pytest.raises(TypeError, match="nonfinite"):
        resblock_grad_scale(g, scales, flags.float(), 0, True)
    with pytest.raises(ValueError, match="nonfinite"):
        resblock_grad_scale(g, scales, torch.zeros(3, dtype=torch.bool, device=device), 0, True)
    with pytest.raises(TypeError, match="scales"):
        resblock_grad_scale(g, scales.double(), flags, 0, True)
    with pytest.raises(ValueError, match="block"):
        resblock_grad_scale(g, scales, flags, 2, True)
    with pytest.raises(TypeError, match="grad"):
        resblock_grad_scale(g.long(), scales, flags, 0, True)
    with pytest.raises(ValueError, match="blocks"):
        resblock_unscale_grads_([g, g.clone()], [0], scales, flags)
    with pytest.raises(ValueError, match=r"grads\[0\] must be contiguous"):
        resblock_unscale_grads_([torch.ones(4, 4, device=device).t()], [0], scales, flags)
    with pytest.raises(ValueError, match="block"):
        resblock_unscale_grads_([g], [-1], scales, flags)
    # the C++ boundary checks too (the ops called directly)
    ops = torch.ops.dalle_fast
    with pytest.raises(ValueError, match="block must be in"):
        ops.resblock_grad_scale(g, scales, flags, 5, True, torch.float32)
    with pytest.raises(TypeError, match="nonfinite must be a bool"):
        ops.resblock_unscale_grads_([g], [0], scales, flags.int())
    with pytest.raises(ValueError, match="grads\\[0\\] must be contiguous"):
        ops.resblock_unscale_grads_([torch.ones(4, 4, device=device).t()], [0], scales, flags)


@given(n=st.integers(0, 300), block=st.integers(-2, 4), unscale=st.booleans(),
       dtype=st.sampled_from(DTYPES), special=st.sampled_from([0.0, float("inf"), float("-inf"), float("nan"), 7e4]))
def test_property_any_input_is_handled(n, block, unscale, dtype, special):
    scales, flags = _state(3, "cpu")
    grad = torch.randn(n).to(dtype)
    if n:
        grad[n // 2] = special
    if not 0 <= block < 3:
        with pytest.raises(ValueError, match="block"):
            resblock_grad_scale(grad, scales, flags, block, unscale)
        return
    out = resblock_grad_scale(grad, scales, flags, block, unscale, torch.float16)
    assert bool(torch.isfinite(out).all())
    assert flags.sum().item() <= 1


def test_selftest_rows_pass():
    from dalle_fast.ops.resblock_scaling import selftest
    rows = selftest("cpu")
    assert len(rows) == 13 and all(err <= bar for *_, err, bar in rows), rows
