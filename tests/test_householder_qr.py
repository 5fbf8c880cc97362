"""Batched Householder QR (dalle_fast.householder_qr): against the float64 reference on many shapes, opcheck,
orthogonality on ill-conditioned 16-bit inputs where Gram-Schmidt fails, zero columns, bad input."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import dalle_fast
from dalle_fast import testing
from dalle_fast.reference import householder_qr as ref

SHAPES = [(1, 1, 1), (3, 5, 1), (2, 7, 3), (4, 113, 4), (1, 203, 17), (2, 64, 64), (5, 33, 2)]


def _input(shape, dtype, device, gen, cond=None):
    a = torch.randn(shape, generator=gen, dtype=torch.float64)
    if cond is not None:  # prescribed singular values from 1 down to 1/cond
        u, _, v = torch.linalg.svd(a, full_matrices=False)
        s = torch.logspace(0, -torch.log10(torch.tensor(float(cond))).item(), shape[-1], dtype=torch.float64)
        a = u @ torch.diag_embed(s.expand(shape[0], -1)) @ v
    return a.to(dtype).to(device)


@pytest.mark.parametrize("device", testing.devices())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("eps", [0.0, 1e-6])
def test_matches_reference(device, dtype, shape, eps):
    gen = torch.Generator().manual_seed(hash(shape) % 1000)
    a = _input(shape, dtype, device, gen)
    if device == "cuda" and dtype == torch.float64:  # the CUDA kernel is fp32/fp16/bf16 only (a clear TypeError)
        with pytest.raises(TypeError, match="float64 runs on the CPU only"):
            dalle_fast.householder_qr(a, eps)
        return
    q = dalle_fast.householder_qr(a, eps)
    assert q.shape == a.shape and q.dtype == dtype
    want = ref.householder_qr(a, eps)
    rtol, atol = testing.default_tolerance(dtype)
    torch.testing.assert_close(q.double(), want, rtol=rtol * 100, atol=atol * 100)


@pytest.mark.parametrize("device", testing.devices())
@pytest.mark.parametrize("dtype", testing.LOW_PRECISION)
def test_low_precision_within_pytorch_error(device, dtype):
    gen = torch.Generator().manual_seed(1)
    a = _input((3, 97, 6), dtype, device, gen)
    want = ref.householder_qr(a, 0.0)
    # PyTorch doing the same in dtype: LAPACK has no fp16, so its QR of the rounded input, rounded back
    theirs = ref.householder_qr(a.float(), 0.0).to(dtype)
    testing.assert_within_pytorch_error(dalle_fast.householder_qr(a), want, theirs, what=f"Q {dtype}")


@pytest.mark.parametrize("device", testing.devices())
@pytest.mark.parametrize("dtype", testing.LOW_PRECISION)
@pytest.mark.parametrize("rank", [2, 8])
def test_ill_conditioned_stays_orthonormal(device, dtype, rank):
    """Condition number 1e4 in 16-bit: Gram-Schmidt in dtype (torch's powerSGD_hook for 16-bit) loses
    orthogonality; ours is as orthonormal as torch.linalg.qr in fp32 (on the fp32 copy), to dtype rounding."""
    gen = torch.Generator().manual_seed(2)
    a = _input((4, 256, rank), dtype, device, gen, cond=1e4)
    ours = ref.orthogonality_error(dalle_fast.householder_qr(a))
    lapack = ref.orthogonality_error(torch.linalg.qr(a.float())[0].to(dtype))
    gs = ref.orthogonality_error(ref.gram_schmidt(a))
    unit = torch.finfo(dtype).eps
    assert ours <= max(2 * lapack, 8 * unit), (ours, lapack)
    assert gs > 10 * ours, (gs, ours)


@pytest.mark.parametrize("device", testing.devices())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_zero_column_gives_orthonormal_q(device, dtype):
    a = torch.randn(2, 40, 4, dtype=torch.float64).to(dtype).to(device)
    a[0, :, 1] = 0
    a[1] = 0
    for eps in (0.0, 1e-6):
        q = dalle_fast.householder_qr(a, eps)
        assert torch.isfinite(q).all()
        assert ref.orthogonality_error(q) < 8 * torch.finfo(dtype).eps
    # torch's Gram-Schmidt with its epsilon in fp16: 1e-8 rounds to 0, 0 / 0 = NaN
    if dtype == torch.float16:
        assert torch.isnan(ref.gram_schmidt(a, eps=1e-8)).any()


def test_non_finite_input_gives_nan():
    a = torch.randn(2, 9, 3)
    a[1, 4, 2] = float("inf")
    q = dalle_fast.householder_qr(a)
    assert torch.isfinite(q[0]).all() and torch.isnan(q[1]).any()


def test_noncontiguous_and_2d():
    a = torch.randn(50, 7, dtype=torch.float64)
    nc = testing.make_noncontiguous(a)
    torch.testing.assert_close(dalle_fast.householder_qr(nc), ref.householder_qr(a[None])[0])
    t = torch.randn(3, 6, 20, dtype=torch.float64).transpose(1, 2)  # strided batch
    torch.testing.assert_close(dalle_fast.householder_qr(t), ref.householder_qr(t))


@pytest.mark.parametrize("dtype", testing.FLOAT_DTYPES + (torch.float64,))
def test_opcheck(dtype):
    a = torch.randn(3, 21, 5).to(dtype)
    torch.library.opcheck(torch.ops.dalle_fast.householder_qr, (a, 1e-6))


def test_fake_cuda_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        a = torch.empty(4, 3968, 64, device="cuda", dtype=torch.bfloat16)
        q = torch.ops.dalle_fast.householder_qr(a, 1e-6)
        assert q.shape == a.shape and q.dtype == a.dtype and q.device.type == "cuda"
        with pytest.raises(TypeError, match="float64 runs on the CPU only"):
            dalle_fast.householder_qr(torch.empty(2, 9, 3, device="cuda", dtype=torch.float64))


@given(rows=st.integers(0, 6), cols=st.integers(0, 6), dims=st.sampled_from([1, 2, 3, 4]),
       dtype=st.sampled_from([torch.float32, torch.int64, torch.bool]), eps=st.sampled_from([0.0, -1.0, float("nan")]))
def test_bad_input_clear_error(rows, cols, dims, dtype, eps):
    shape = (2, rows, cols)[3 - dims:] if dims <= 3 else (1, 2, rows, cols)
    a = torch.zeros(shape, dtype=dtype)
    ok = dtype == torch.float32 and dims in (2, 3) and rows >= cols and eps == 0.0
    if ok:
        assert dalle_fast.householder_qr(a, eps).shape == a.shape
        return
    with pytest.raises((ValueError, TypeError), match="householder_qr"):
        dalle_fast.householder_qr(a, eps)
    if dims == 3 and dtype == torch.float32:  # the op itself checks too (C++ boundary)
        with pytest.raises((ValueError, TypeError, RuntimeError), match="householder_qr"):
            torch.ops.dalle_fast.householder_qr(a, eps)


def test_not_differentiable():
    with pytest.raises(RuntimeError, match="not differentiable"):
        dalle_fast.householder_qr(torch.randn(5, 2, requires_grad=True))
