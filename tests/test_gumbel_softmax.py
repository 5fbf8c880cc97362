"""dalle_fast.gumbel_softmax / one_hot_argmax against the float64 reference (same seed, same noise)."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

import dalle_fast
from dalle_fast import testing
from dalle_fast.ops import gumbel_softmax as gs_mod
from dalle_fast.reference import gumbel_softmax as ref

ops = torch.ops.dalle_fast
DEVICES = testing.devices()
LOW = testing.LOW_PRECISION

# (shape, dim): odd sizes, size 1, batch > 1, the dVAE's NCHW layout (dim=1) and the last dim.
SHAPES = [((1,), -1), ((3,), 0), ((113,), -1), ((5, 203), -1), ((2, 203, 5, 7), 1), ((4, 3, 1), 1),
          ((2, 3, 4, 5), 0), ((2, 3, 4, 5), 2), ((2, 70, 67), 1), ((7, 1), -1), ((3, 130), -1)]


def seed_tensor(seed, device):
    return torch.tensor([seed], dtype=torch.int64, device=device)


def fused(x, seed, tau=1.0, dim=-1, gumbels=None):
    return ops.gumbel_softmax(x, seed_tensor(seed, x.device), gumbels, tau, dim)


# ---- the noise ----

def test_philox_known_answers():
    """The reference Philox4x32-10 against Random123's kat_vectors."""
    kat = [((0, 0, 0, 0), (0, 0), (0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8)),
           ((0xffffffff,) * 4, (0xffffffff,) * 2, (0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd)),
           ((0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344), (0xa4093822, 0x299f31d0),
            (0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1))]
    for counter, key, want in kat:
        assert tuple(int(w) for w in ref.philox4x32(counter, key)) == want


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,dim", SHAPES)
def test_fused_noise_is_the_reference_noise(device, shape, dim):
    """In float64 the fused op reproduces the reference with the same seed: the C++ Philox and
    noise definition are the (KAT-checked) reference's, for every layout."""
    x = torch.randn(shape, dtype=torch.float64, device=device)
    for seed in (0, -1, 2 ** 62 + 12345):
        torch.testing.assert_close(fused(x, seed, 0.7, dim), ref.gumbel_softmax(x, 0.7, dim=dim, seed=seed),
                                   rtol=1e-12, atol=1e-14)


def test_noise_is_standard_gumbel():
    """Kolmogorov-Smirnov test of the noise definition (which the fused op reproduces exactly,
    test above) against the standard Gumbel CDF exp(-exp(-g)), at a fixed seed."""
    n = 100_000
    g = ref.gumbel_noise((n,), 20240607).sort().values
    cdf = torch.exp(-torch.exp(-g))
    i = torch.arange(1, n + 1, dtype=torch.float64)
    d = torch.maximum(i / n - cdf, cdf - (i - 1) / n).max().item()
    assert d < 1.95 / math.sqrt(n), f"KS distance {d:.2e}"  # p = 0.001
    assert abs(g.mean().item() - 0.5772156649) < 0.01 and abs(g.var().item() - math.pi ** 2 / 6) < 0.03


def chi_square_pvalue(counts, probs):
    n = counts.sum()
    expected = n * probs
    stat = ((counts - expected) ** 2 / expected).sum()
    dof = len(probs) - 1
    return torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2).item()


@pytest.mark.parametrize("tau", [1.0, 0.5, 1 / 16, 4.0])
@pytest.mark.parametrize("layout", ["last", "nchw"])
def test_argmax_frequencies_follow_softmax(tau, layout):
    """Gumbel-max: the argmax of logits + g is distributed as softmax(logits), whatever tau."""
    logits = torch.tensor([1.0, 0.0, -0.5, 2.0, 0.3, -2.0], dtype=torch.float64)
    k = logits.numel()
    gen = torch.Generator().manual_seed(1234)
    if layout == "last":
        x, dim = logits.expand(20000, k).float().contiguous(), -1
    else:  # the dVAE's channel dim: samples along batch and space
        x, dim = logits.view(1, k, 1, 1).expand(40, k, 25, 20).float().contiguous(), 1
    y = dalle_fast.gumbel_softmax(x, tau=tau, hard=True, dim=dim, generator=gen)
    counts = y.movedim(dim, -1).reshape(-1, k).sum(0).double()
    assert counts.sum().item() == x.numel() // k
    p = chi_square_pvalue(counts, torch.softmax(logits, 0))
    assert p > 1e-3, f"chi-square p-value {p:.2e}: counts {counts.tolist()}"


def test_reproducible_with_manual_seed_and_generator():
    x = torch.randn(4, 37, 3)
    torch.manual_seed(7)
    a = dalle_fast.gumbel_softmax(x, dim=1)
    b = dalle_fast.gumbel_softmax(x, dim=1)  # the generator advanced: new noise
    torch.manual_seed(7)
    assert torch.equal(a, dalle_fast.gumbel_softmax(x, dim=1))
    assert not torch.equal(a, b)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(dalle_fast.gumbel_softmax(x, generator=g1), dalle_fast.gumbel_softmax(x, generator=g2))
    other = dalle_fast.gumbel_softmax(x, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(dalle_fast.gumbel_softmax(x, generator=torch.Generator().manual_seed(3)), other)
    assert not torch.equal(fused(x, 1), fused(x, 2))


@pytest.mark.parametrize("shape,dim", [((3, 64, 130), 1), ((70, 300), -1)])
def test_independent_of_thread_count(shape, dim):
    x = torch.randn(shape)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fused(x, 99, 0.5, dim)
        back_one = ops._gumbel_softmax_backward(x, one, 0.5, dim)
        torch.set_num_threads(2)
        two = fused(x, 99, 0.5, dim)
        back_two = ops._gumbel_softmax_backward(x, two, 0.5, dim)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two) and torch.equal(back_one, back_two)


# ---- forward and gradients against the float64 reference ----

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", testing.FLOAT_DTYPES)
@pytest.mark.parametrize("shape,dim", SHAPES)
@pytest.mark.parametrize("tau", [1.0, 1 / 16])
def test_forward_and_grad_match_reference(device, dtype, shape, dim, tau):
    """Error against float64 at most 2x PyTorch's own error doing the same math in dtype."""
    x64 = torch.randn(shape, dtype=torch.float64, device=device)
    grad64 = torch.randn(shape, dtype=torch.float64, device=device)
    seed = 31337
    x_ref = x64.clone().requires_grad_(True)
    y_ref = ref.gumbel_softmax(x_ref, tau, dim=dim, seed=seed)
    (dx_ref,) = torch.autograd.grad(y_ref, x_ref, grad64)
    x = x64.to(dtype).requires_grad_(True)
    y = fused(x, seed, tau, dim)
    (dx,) = torch.autograd.grad(y, x, grad64.to(dtype))
    assert y.dtype == dtype and y.shape == x.shape and dx.dtype == dtype
    xt = x64.to(dtype).requires_grad_(True)
    yt = ref.gumbel_softmax(xt, tau, dim=dim, seed=seed)
    (dxt,) = torch.autograd.grad(yt, xt, grad64.to(dtype))
    testing.assert_within_pytorch_error(y, y_ref, yt, what="forward")
    testing.assert_within_pytorch_error(dx, dx_ref, dxt, what="gradient")


@pytest.mark.parametrize("hard", [False, True])
def test_long_softmax_dim_recomputes_instead_of_caching(hard):
    """C * 64 lanes of float64 exceeds the CPU kernel's 16 MiB scratch, so it recomputes z (noise
    included) in each pass: the result must not change."""
    x = torch.randn(1, 33000, 2, dtype=torch.float64, requires_grad=True)
    s = seed_tensor(8, "cpu")
    if hard:
        y, soft = ops.gumbel_softmax_hard(x, s, None, 0.5, 1, True)
        assert torch.equal(y.argmax(1), ref.gumbel_softmax(x.detach(), 0.5, dim=1, seed=8).argmax(1))
        y = soft
    else:
        y = ops.gumbel_softmax(x, s, None, 0.5, 1)
    torch.testing.assert_close(y, ref.gumbel_softmax(x.detach(), 0.5, dim=1, seed=8), rtol=1e-12, atol=1e-15)
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert dx.abs().max().item() < 1e-12  # the sum of a softmax has zero gradient


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape,dim", [((2, 203, 5, 7), 1), ((5, 113), -1), ((3, 4, 5), 0)])
def test_given_gumbels_is_softmax_of_perturbed_logits(device, dtype, shape, dim):
    x = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
    g = (-torch.empty(shape, dtype=dtype, device=device).exponential_().log()).requires_grad_(True)
    y = dalle_fast.gumbel_softmax(x, tau=0.3, dim=dim, gumbels=g)
    want = torch.softmax((x + g) / 0.3, dim)
    rtol, atol = testing.default_tolerance(dtype)
    torch.testing.assert_close(y, want, rtol=rtol, atol=atol)
    w = torch.randn_like(y)
    got_grads = torch.autograd.grad((y * w).sum(), (x, g))
    want_grads = torch.autograd.grad((want * w).sum(), (x, g))
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    # the drop-in: F.gumbel_softmax's formula with the same noise
    torch.testing.assert_close(dalle_fast.gumbel_softmax(x, 2.0, dim=dim, gumbels=g),
                               torch.softmax((x + g) / 2.0, dim), rtol=rtol, atol=atol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,dim", [((2, 203, 5, 7), 1), ((5, 113), -1), ((4, 6, 3), 0)])
def test_noncontiguous_inputs(device, shape, dim):
    """The noise belongs to the logical element, so a strided view gives the contiguous result."""
    x = torch.randn(shape, device=device)
    want = fused(x, 5, 0.5, dim)
    views = [testing.make_noncontiguous(x), x.transpose(0, -1).contiguous().transpose(0, -1)]
    for v in views:
        assert torch.equal(fused(v, 5, 0.5, dim), want)
        y = fused(x, 5, 0.5, dim)
        g = torch.randn_like(y)
        assert torch.equal(ops._gumbel_softmax_backward(testing.make_noncontiguous(g), y, 0.5, dim),
                           ops._gumbel_softmax_backward(g, y, 0.5, dim))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,dim,tau", [((3, 7, 4), 1, 1.0), ((5, 9), -1, 0.25)])
def test_gradcheck_float64(device, shape, dim, tau):
    x = torch.randn(shape, dtype=torch.float64, device=device, requires_grad=True)
    g = torch.randn(shape, dtype=torch.float64, device=device, requires_grad=True)
    seed = seed_tensor(11, device)
    assert torch.autograd.gradcheck(lambda v: ops.gumbel_softmax(v, seed, None, tau, dim), (x,))
    assert torch.autograd.gradcheck(lambda v, w: ops.gumbel_softmax(v, seed, w, tau, dim), (x, g))


# ---- hard ----

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", testing.FLOAT_DTYPES + (torch.float64,))
@pytest.mark.parametrize("shape,dim", [((2, 203, 5, 7), 1), ((5, 113), -1), ((2, 3, 4, 5), 2), ((7, 1), -1)])
def test_hard_is_exact_one_hot_with_soft_gradient(device, dtype, shape, dim):
    x = torch.randn(shape, dtype=torch.float64, device=device).to(dtype).requires_grad_(True)
    gen = lambda: torch.Generator(device=device).manual_seed(21)  # noqa: E731
    hard = dalle_fast.gumbel_softmax(x, 0.5, hard=True, dim=dim, generator=gen())
    soft = dalle_fast.gumbel_softmax(x, 0.5, hard=False, dim=dim, generator=gen())
    assert hard.dtype == dtype
    assert torch.all((hard == 0) | (hard == 1)) and torch.all(hard.sum(dim) == 1)
    # the argmax of the perturbed logits, computed by the reference in float64 from the same seed
    seed = int(gs_mod.draw_seed("cpu", torch.Generator(device=device).manual_seed(21)).item()) if device == "cpu" \
        else None
    if seed is not None:
        z = (x.detach().double() + ref.gumbel_noise(shape, seed)) / 0.5
        assert torch.equal(hard.argmax(dim), z.argmax(dim))
    assert torch.equal(hard.argmax(dim), soft.argmax(dim))
    w = torch.randn(shape, dtype=torch.float64, device=device).to(dtype)
    (g_hard,) = torch.autograd.grad((hard * w).sum(), x)
    (g_soft,) = torch.autograd.grad((soft * w).sum(), x)
    torch.testing.assert_close(g_hard, g_soft, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,dim", [((3, 9, 4), 1), ((5, 70), -1)])
def test_hard_ties_pick_the_first_index_like_torch_argmax(device, shape, dim):
    x = torch.zeros(shape, device=device)
    x.select(dim, 4).fill_(1.0)
    x.select(dim, 6).fill_(1.0)  # a tie between 4 and 6
    hard = dalle_fast.gumbel_softmax(x, 0.3, hard=True, dim=dim, gumbels=torch.zeros_like(x))
    assert torch.equal(hard.argmax(dim), torch.full_like(hard.argmax(dim), 4))
    assert torch.equal(hard.argmax(dim), x.argmax(dim))


def test_hard_without_grad_keeps_no_soft_sample():
    x = torch.randn(4, 10)
    hard, soft = ops.gumbel_softmax_hard(x, seed_tensor(1, "cpu"), None, 1.0, -1, False)
    assert soft.numel() == 0 and torch.all(hard.sum(-1) == 1)
    with pytest.raises(RuntimeError, match="return_soft"):
        ops.gumbel_softmax_hard(x.requires_grad_(True), seed_tensor(1, "cpu"), None, 1.0, -1, False)


# ---- one_hot_argmax ----

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", testing.FLOAT_DTYPES + (torch.float64,))
@pytest.mark.parametrize("shape,dim", SHAPES)
def test_one_hot_argmax_matches_torch_argmax(device, dtype, shape, dim):
    x = torch.randn(shape, device=device).to(dtype)
    x.view(-1)[:: 3] = x.view(-1)[0]  # ties: the first index wins, as in torch.argmax
    y = dalle_fast.one_hot_argmax(x.requires_grad_(True), dim)
    assert y.dtype == dtype and not y.requires_grad
    assert torch.equal(y, ref.one_hot_argmax(x.detach(), dim))


def test_one_hot_argmax_nan_and_inf_follow_torch_argmax():
    x = torch.tensor([[1.0, float("nan"), 3.0, float("nan")], [float("-inf")] * 4, [float("inf"), 0, float("inf"), 1]])
    for layout in ("last", "nchw"):
        v = x if layout == "last" else x.t().reshape(1, 4, 3, 1).expand(2, 4, 3, 33).contiguous()
        dim = -1 if layout == "last" else 1
        assert torch.equal(dalle_fast.one_hot_argmax(v, dim), ref.one_hot_argmax(v, dim))


# ---- NaN, inf, empty, 0-dim ----

@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("layout", ["last", "nchw"])
def test_nan_propagates_like_torch(hard, layout):
    """A slice whose softmax is NaN (a NaN or +inf in it, or all -inf) comes out all NaN, soft and
    hard, as torch's gumbel_softmax; other slices are untouched and -inf logits are never drawn."""
    x = torch.randn(5, 9, dtype=torch.float64)
    x[1, 3] = float("nan")
    x[2, :5] = float("-inf")
    x[3, :] = float("-inf")
    x[4, 2] = float("inf")
    g = -torch.empty_like(x).exponential_().log()
    if layout == "nchw":
        x, g, dim = x.t().reshape(1, 9, 5, 1).contiguous(), g.t().reshape(1, 9, 5, 1).contiguous(), 1
    else:
        dim = -1
    y = dalle_fast.gumbel_softmax(x, 0.5, hard=hard, dim=dim, gumbels=g)
    want = ref.gumbel_softmax(x, 0.5, hard, dim, g)
    assert torch.equal(torch.isnan(y), torch.isnan(want))
    torch.testing.assert_close(y.nan_to_num(7.0), want.nan_to_num(7.0), rtol=1e-12, atol=1e-12)
    finite_rows = y.movedim(dim, -1).reshape(-1, 9)
    assert torch.all(finite_rows[2, :5] == 0)
    with torch.no_grad():  # and torch itself agrees on which slices are NaN
        torch_y = F.gumbel_softmax(x, 0.5, hard=hard, dim=dim)
    assert torch.equal(torch.isnan(y).any(dim), torch.isnan(torch_y).any(dim))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,dim", [((0,), 0), ((2, 0, 3), 1), ((2, 3, 0), 1), ((0, 5), -1)])
def test_empty_tensors(device, shape, dim):
    x = torch.empty(shape, device=device, requires_grad=True)
    y = dalle_fast.gumbel_softmax(x, dim=dim)
    assert y.shape == F.gumbel_softmax(x, dim=dim).shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert dalle_fast.gumbel_softmax(x, dim=dim, hard=True).shape == x.shape
    assert dalle_fast.one_hot_argmax(x, dim).shape == x.shape


def test_zero_dim_tensor_like_torch():
    x = torch.tensor(0.3)
    assert torch.equal(dalle_fast.gumbel_softmax(x), F.gumbel_softmax(x))
    assert dalle_fast.one_hot_argmax(x).item() == 1.0


# ---- errors ----

def test_bad_input_gives_clear_errors():
    x = torch.randn(3, 4)
    for tau in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="tau"):
            dalle_fast.gumbel_softmax(x, tau=tau)
    with pytest.raises(TypeError, match="logits must be"):
        dalle_fast.gumbel_softmax(torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="logits must be"):
        dalle_fast.one_hot_argmax(torch.ones(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="gumbels must have logits' shape"):
        dalle_fast.gumbel_softmax(x, gumbels=torch.randn(4, 3))
    with pytest.raises(IndexError, match="dim"):
        dalle_fast.gumbel_softmax(x, dim=2)
    # the C++ boundary says the same to direct op callers
    s = seed_tensor(0, "cpu")
    with pytest.raises(TypeError, match="logits must be"):
        ops.gumbel_softmax(torch.ones(3, dtype=torch.int64), s, None, 1.0, 0)
    with pytest.raises(ValueError, match="tau must be"):
        ops.gumbel_softmax(x, s, None, 0.0, 0)
    with pytest.raises(ValueError, match="gumbels must have logits' shape"):
        ops.gumbel_softmax(x, s, torch.randn(2), 1.0, 0)
    with pytest.raises(TypeError, match="seed must be"):
        ops.gumbel_softmax(x, torch.zeros(2), None, 1.0, 0)
    with pytest.raises(ValueError, match="grad and y must match"):
        ops._gumbel_softmax_backward(torch.randn(2), x, 1.0, 0)


@given(shape=st.lists(st.integers(0, 5), min_size=0, max_size=4), dim=st.integers(-5, 4),
       tau=st.sampled_from([1.0, 0.1, 0.0, -2.0, float("nan")]),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.int64, torch.bool]), hard=st.booleans())
def test_property_valid_output_or_clear_error(shape, dim, tau, dtype, hard):
    x = (torch.randn(shape) * 3).to(dtype)
    nd = max(len(shape), 1)
    # the first bad argument, in the order the wrapper checks them, decides the exception and its words
    error = ((IndexError, f"dim {dim} is out of range for a tensor of {len(shape)} dimensions") if not -nd <= dim < nd
             else (TypeError, "logits must be float32, float64, float16 or bfloat16")
             if dtype in (torch.int64, torch.bool) else
             (ValueError, "tau must be a finite number > 0") if not tau > 0 else None)
    call = lambda: dalle_fast.gumbel_softmax(x, tau=tau, hard=hard, dim=dim,  # noqa: E731
                                             generator=torch.Generator().manual_seed(0))
    if error is not None:
        with pytest.raises(error[0], match=error[1]):
            call()
        return
    y = call()
    assert y.shape == x.shape and y.dtype == dtype
    if y.numel():
        d = dim if len(shape) else -1
        sums = y.sum(d) if len(shape) else y
        torch.testing.assert_close(sums, torch.ones_like(sums), rtol=1e-5, atol=1e-5)


def test_double_backward_raises():
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    y = dalle_fast.gumbel_softmax(x, generator=torch.Generator().manual_seed(0))
    (dx,) = torch.autograd.grad((y * torch.randn_like(y)).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        dx.sum().backward()


# ---- the op library contract ----

def sample_inputs(device, dtype):
    x = torch.randn(2, 17, 3, 5, device=device, dtype=dtype, requires_grad=True)
    s = seed_tensor(3, device)
    g = torch.randn(2, 17, 3, 5, device=device, dtype=dtype)
    return [(ops.gumbel_softmax, (x, s, None, 0.7, 1)), (ops.gumbel_softmax, (x, s, g, 1.0, -1)),
            (ops.gumbel_softmax_hard, (x, s, None, 0.7, 1, True)),
            (ops.gumbel_softmax_hard, (x.detach(), s, None, 0.7, -1, False)),
            (ops.one_hot_argmax, (x.detach(), 1)),
            (ops._gumbel_softmax_backward, (g, x.detach().softmax(1), 0.5, 1))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(device, dtype):
    for op, args in sample_inputs(device, dtype):
        torch.library.opcheck(op, args)


@pytest.mark.skipif(not testing.cuda_available(), reason="needs a CUDA device and the CUDA kernels")
@pytest.mark.parametrize("shape,dim", [((2, 203, 5, 7), 1), ((5, 1130), -1), ((3, 4, 5), 0)])
def test_cuda_matches_cpu_for_the_same_seed(shape, dim):
    """One noise definition: CPU and CUDA agree for a seed (float64: to rounding)."""
    x = torch.randn(shape, dtype=torch.float64)
    cpu = fused(x, 77, 0.5, dim)
    torch.testing.assert_close(fused(x.cuda(), 77, 0.5, dim).cpu(), cpu, rtol=1e-12, atol=1e-14)
    hard_cpu = ops.gumbel_softmax_hard(x, seed_tensor(77, "cpu"), None, 0.5, dim, False)[0]
    hard_cuda = ops.gumbel_softmax_hard(x.cuda(), seed_tensor(77, "cuda"), None, 0.5, dim, False)[0]
    assert torch.equal(hard_cuda.cpu(), hard_cpu)
    g = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(ops._gumbel_softmax_backward(g.cuda(), cpu.cuda(), 0.5, dim).cpu(),
                               ops._gumbel_softmax_backward(g, cpu, 0.5, dim), rtol=1e-12, atol=1e-14)


def test_selftest_rows_pass():
    rows = gs_mod.selftest("cpu")
    assert rows and all(err <= tol for _, _, _, err, tol in rows), rows
