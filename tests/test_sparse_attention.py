"""dalle_fast.sparse_attention / sparse_attention_decode / attention_mask against the dense float64 reference."""
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import dalle_fast
from dalle_fast.ops import sparse_attention as ops
from dalle_fast.reference import sparse_attention as ref
from dalle_fast.testing import assert_within_pytorch_error, devices, make_noncontiguous, max_abs_err

KINDS = dalle_fast.ops.sparse_attention.KINDS  # the one definition
# (text_len, image_size, B, heads, D, conv_kernel): text_len 0, a 1x1 image, sizes that are not
# multiples of the 64-query block (N = 151, 236, 1 + 81), head dims that are not multiples of 8.
SHAPES = [(5, 4, 1, 2, 8, 11), (0, 1, 1, 1, 4, 11), (70, 9, 2, 1, 16, 3), (67, 13, 1, 2, 32, 5), (3, 1, 2, 1, 8, 11),
          (0, 10, 1, 1, 64, 11), (1, 9, 1, 1, 7, 1)]
LOW_PRECISION_SHAPE = (19, 8, 2, 2, 32, 11)
DECODE_SHAPE = (5, 4, 2, 2, 32, 11)
# What the tests parametrized over devices() run on CUDA, as (op, shape, dtype), for tests/test_gpu_cases.py.
CUDA_CASES = ([("sparse_attention", s, torch.float32) for s in SHAPES]
              + [("sparse_attention", LOW_PRECISION_SHAPE, dt) for dt in (torch.float16, torch.bfloat16)]
              + [(op, DECODE_SHAPE, dt) for op in ("sparse_attention", "decode")
                 for dt in (torch.float64, torch.float32, torch.bfloat16)])


def brute_force_mask(kind, T, W, k):
    """The issue's definition, one pair at a time."""
    N = T + W * W
    m = torch.zeros(N, N, dtype=torch.bool)
    for i in range(N):
        for j in range(N):
            if j > i:
                continue
            if i < T or j < T:
                m[i, j] = True
                continue
            p, q = i - T, j - T
            r, c, rq, cq = p // W, p % W, q // W, q % W
            m[i, j] = {"full": True, "row": q >= p - W, "column": cq == c,
                       "conv": r - (k - 1) // 2 <= rq <= r and abs(cq - c) <= (k - 1) // 2}[kind]
    return m


def rand(shape, dtype=torch.float64, device="cpu", seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_(
        requires_grad)


def qkv(T, S, B, H, D, dtype=torch.float64, device="cpu", requires_grad=False, seed=0):
    N = T + S * S
    return [rand((B, H, N, D), dtype, device, seed + n, requires_grad) for n in range(3)]


# ---------------------------------------------------------------- masks and schedule
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T,W,k", [(0, 1, 11), (3, 4, 3), (2, 5, 11), (4, 6, 5), (0, 7, 1)])
def test_attention_mask_matches_brute_force(kind, T, W, k):
    got = dalle_fast.attention_mask(kind, T, W, k)
    assert got.dtype == torch.bool and got.shape == (T + W * W,) * 2
    assert torch.equal(got, brute_force_mask(kind, T, W, k))


def test_attention_mask_paper_facts():
    # Row attention in a 4x4 grid: 5 image keys (W + 1) for a query past the first row (the figure).
    m = dalle_fast.attention_mask("row", 0, 4)
    assert m[4 + 1].sum() == 5 and m[15].sum() == 5
    # DALL-E's shape: row keeps about 40% of the causal pairs, a fifth of all pairs.
    m = dalle_fast.attention_mask("row", 256, 32)
    causal = torch.ones(1280, 1280, dtype=torch.bool).tril()
    assert 0.38 < m.sum() / causal.sum() < 0.42 and 0.19 < m.float().mean() < 0.21


def test_attention_schedule():
    assert dalle_fast.attention_schedule(1) == ["conv"]
    assert dalle_fast.attention_schedule(6) == ["row", "column", "row", "row", "row", "conv"]
    s = dalle_fast.attention_schedule(64)
    assert s[-1] == "conv" and s[:4] == ["row", "column", "row", "row"] and s.count("column") == 16
    with pytest.raises(ValueError, match="depth"):
        dalle_fast.attention_schedule(0)


@pytest.mark.parametrize("kind", KINDS)
def test_decode_reads_exactly_the_allowed_keys(kind):
    """With q = 0 attention is uniform over the keys the kernel reads; with v_cache[j] = e_j the output
    is the indicator of that set over its size: MaskSpec.allowed_count/allowed_key, seen from C++."""
    T, S, k = 3, 5, 3
    N = T + S * S
    mask = brute_force_mask(kind, T, S, k).double()
    v = torch.eye(N, dtype=torch.float64).expand(1, 1, N, N)
    q = torch.zeros(1, 1, 1, N, dtype=torch.float64)
    for pos in range(N):
        out = dalle_fast.sparse_attention_decode(q, v, v, pos, kind, T, S, conv_kernel=k)
        expect = mask[pos] / mask[pos].sum()
        assert torch.allclose(out.view(N), expect, atol=1e-15), pos


# ---------------------------------------------------------------- forward and gradients
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_gradients_float64(device, kind, shape):
    T, S, B, H, D, k = shape
    q, k_, v = qkv(T, S, B, H, D, device=device, requires_grad=True)
    dtype = torch.float64 if device == "cpu" else torch.float32
    x = [t.detach().to(dtype).requires_grad_() for t in (q, k_, v)]
    out = dalle_fast.sparse_attention(*x, kind, T, S, conv_kernel=k)
    expect = ref.sparse_attention(q, k_, v, kind, T, S, conv_kernel=k)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    assert out.dtype == dtype and out.shape == q.shape
    assert max_abs_err(out, expect) < tol
    go = rand(out.shape, seed=9, device=device)
    got = torch.autograd.grad(out, x, go.to(dtype))
    want = torch.autograd.grad(expect, (q, k_, v), go)
    for name, a, e in zip("qkv", got, want):
        assert max_abs_err(a, e) < 10 * tol, f"d{name}"


@pytest.mark.parametrize("kind", KINDS)
def test_float32_paper_layout_block_edges(kind):
    """A shape with several query blocks per image row/column and keys spanning block edges, in fp32."""
    T, S, D = 37, 11, 32
    q, k, v = qkv(T, S, 1, 2, D, requires_grad=True)
    x = [t.detach().float().requires_grad_() for t in (q, k, v)]
    out = dalle_fast.sparse_attention(*x, kind, T, S)
    expect = ref.sparse_attention(q, k, v, kind, T, S)
    assert max_abs_err(out, expect) < 2e-5
    go = rand(out.shape, seed=5)
    for a, e in zip(torch.autograd.grad(out, x, go.float()), torch.autograd.grad(expect, (q, k, v), go)):
        assert max_abs_err(a, e) < 1e-4


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("heads", [1, 3])
def test_backward_with_few_heads_splits_key_accumulators(kind, heads):
    """Fewer (batch x heads) than threads: query blocks of one head run on several threads, each with its
    own dK/dV accumulator, summed at the end (the problem is big enough to leave the calling thread)."""
    T, S, D = 40, 12, 64
    q, k, v = qkv(T, S, 1, heads, D, requires_grad=True)
    out = dalle_fast.sparse_attention(q, k, v, kind, T, S)
    expect = ref.sparse_attention(q, k, v, kind, T, S)
    assert max_abs_err(out, expect) < 1e-12
    go = rand(out.shape, seed=4)
    for a, e in zip(torch.autograd.grad(out, (q, k, v), go), torch.autograd.grad(expect, (q, k, v), go)):
        assert max_abs_err(a, e) < 1e-11


def test_small_blocks_and_tall_columns_in_subprocess():
    """Query blocks smaller than an image row or column (several blocks per column, full and masked
    segments side by side): the block size is fixed per process, so run a child with 8-query blocks."""
    code = (
        "import torch, dalle_fast\n"
        "from dalle_fast.reference import sparse_attention as ref\n"
        "for kind in ('row', 'column', 'conv', 'full'):\n"
        "    for T, S in ((0, 11), (9, 10), (20, 3)):\n"
        "        N = T + S * S\n"
        "        q, k, v = (torch.randn(2, 1, N, 5, dtype=torch.float64, requires_grad=True) for _ in range(3))\n"
        "        out = dalle_fast.sparse_attention(q, k, v, kind, T, S, conv_kernel=5)\n"
        "        exp = ref.sparse_attention(q, k, v, kind, T, S, conv_kernel=5)\n"
        "        assert (out - exp).abs().max() < 1e-12, (kind, T, S)\n"
        "        go = torch.randn_like(out)\n"
        "        for a, b in zip(torch.autograd.grad(out, (q, k, v), go), torch.autograd.grad(exp, (q, k, v), go)):\n"
        "            assert (a - b).abs().max() < 1e-11, (kind, T, S)\n"
        "print('ok')\n")
    env = dict(os.environ, DALLE_FAST_SPARSE_BLOCK="8", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


@pytest.mark.parametrize("kind", KINDS)
def test_noncontiguous_inputs(kind):
    T, S = 6, 5
    q, k, v = qkv(T, S, 2, 2, 8)
    xs = [make_noncontiguous(t) for t in (q, k, v)]
    assert not xs[0].is_contiguous()
    out = dalle_fast.sparse_attention(*xs, kind, T, S)
    assert max_abs_err(out, ref.sparse_attention(q, k, v, kind, T, S)) < 1e-12
    # A transposed layout (B, N, heads, D).transpose(1, 2), as a qkv projection produces it.
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    assert max_abs_err(dalle_fast.sparse_attention(qt, k, v, kind, T, S), ref.sparse_attention(q, k, v, kind, T, S)) < 1e-12


def test_custom_scale():
    q, k, v = qkv(4, 3, 1, 1, 8)
    out = dalle_fast.sparse_attention(q, k, v, "row", 4, 3, scale=0.3)
    assert max_abs_err(out, ref.sparse_attention(q, k, v, "row", 4, 3, scale=0.3)) < 1e-12
    assert max_abs_err(out, ref.sparse_attention(q, k, v, "row", 4, 3)) > 1e-3


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_low_precision_within_twice_pytorch_error(device, dtype, kind):
    T, S, _, _, D, _ = LOW_PRECISION_SHAPE
    q, k, v = qkv(T, S, 2, 2, D, requires_grad=True, device=device)
    xl = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    x64 = [t.detach().double().requires_grad_() for t in xl]  # the same rounded inputs, exact math
    xp = [t.detach().clone().requires_grad_() for t in xl]
    out = dalle_fast.sparse_attention(*xl, kind, T, S)
    e64 = ref.sparse_attention(*x64, kind, T, S)
    pt = ref.sparse_attention(*xp, kind, T, S)
    assert out.dtype == dtype
    assert_within_pytorch_error(out, e64, pt, what=f"{kind} {dtype} out")
    go = rand(out.shape, seed=3, device=device).to(dtype)
    g = torch.autograd.grad(out, xl, go)
    g64 = torch.autograd.grad(e64, x64, go.double())
    gp = torch.autograd.grad(pt, xp, go)
    for name, a, e, p in zip("qkv", g, g64, gp):
        assert a.dtype == dtype
        assert_within_pytorch_error(a, e, p, what=f"{kind} {dtype} d{name}")


def _low_precision_check(kind, T, S, B, H, D, dtype, conv_kernel=11, seed=0):
    q, k, v = qkv(T, S, B, H, D, seed=seed)
    xl = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    x64 = [t.detach().double().requires_grad_() for t in xl]
    xp = [t.detach().clone().requires_grad_() for t in xl]
    out = dalle_fast.sparse_attention(*xl, kind, T, S, conv_kernel=conv_kernel)
    e64 = ref.sparse_attention(*x64, kind, T, S, conv_kernel=conv_kernel)
    pt = ref.sparse_attention(*xp, kind, T, S, conv_kernel=conv_kernel)
    assert out.dtype == dtype
    assert_within_pytorch_error(out, e64, pt, what=f"{kind} {dtype} D={D} out")
    go = rand(out.shape, seed=seed + 7).to(dtype)
    for name, a, e, p in zip("qkv", torch.autograd.grad(out, xl, go), torch.autograd.grad(e64, x64, go.double()),
                             torch.autograd.grad(pt, xp, go)):
        assert a.dtype == dtype
        assert_within_pytorch_error(a, e, p, what=f"{kind} {dtype} D={D} d{name}")


# The bf16 tile GEMMs pack operands in 16 x 16 / 32-wide pieces and pad odd key and query counts:
# head dims below, between and above those widths (odd D takes the fp32 path), odd key counts per
# block (T odd, small images), a conv window wider than the image, batch and heads > 1.
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T,S,B,H,D,ck", [(3, 5, 1, 1, 2, 3), (17, 7, 2, 3, 6, 5), (0, 9, 1, 2, 40, 11),
                                          (33, 6, 1, 1, 66, 3), (5, 4, 1, 2, 7, 3), (64, 8, 1, 1, 130, 5)])
def test_bf16_tile_shapes_within_twice_pytorch_error(kind, T, S, B, H, D, ck):
    _low_precision_check(kind, T, S, B, H, D, torch.bfloat16, conv_kernel=ck)


_BF16_CHILD = (
    "import torch, dalle_fast\n"
    "from dalle_fast.reference import sparse_attention as ref\n"
    "from dalle_fast.testing import assert_within_pytorch_error\n"
    "g = torch.Generator().manual_seed(0)\n"
    "outs = []\n"
    "for kind in ('row', 'column', 'conv', 'full'):\n"
    "    T, S, D = 9, 10, 12\n"
    "    x = [torch.randn(1, 2, T + S * S, D, generator=g).bfloat16().requires_grad_() for _ in range(3)]\n"
    "    x64 = [t.detach().double().requires_grad_() for t in x]\n"
    "    xp = [t.detach().clone().requires_grad_() for t in x]\n"
    "    out = dalle_fast.sparse_attention(*x, kind, T, S, conv_kernel=5)\n"
    "    e64, pt = ref.sparse_attention(*x64, kind, T, S, conv_kernel=5), ref.sparse_attention(*xp, kind, T, S, conv_kernel=5)\n"
    "    assert_within_pytorch_error(out, e64, pt, what=kind)\n"
    "    go = torch.randn(out.shape, generator=g).bfloat16()\n"
    "    gs = torch.autograd.grad(out, x, go)\n"
    "    for a, e, p in zip(gs, torch.autograd.grad(e64, x64, go.double()), torch.autograd.grad(pt, xp, go)):\n"
    "        assert_within_pytorch_error(a, e, p, what=kind)\n"
    "    outs += [out.detach()] + list(gs)\n"
    "torch.save(outs, OUT)\n"
    "print('ok')\n")


def _run_bf16_child(tmp_path, name, **env):
    path = tmp_path / f"{name}.pt"
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **env)
    res = subprocess.run([sys.executable, "-c", f"OUT = {str(path)!r}\n" + _BF16_CHILD], env=full_env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]
    return torch.load(path)


def test_bf16_odd_query_blocks_in_subprocess(tmp_path):
    """7-query blocks: odd query counts per block (padded contraction of dK/dV), blocks cut inside rows."""
    _run_bf16_child(tmp_path, "block7", DALLE_FAST_SPARSE_BLOCK="7")


@pytest.mark.skipif(not torch.backends.cpu.get_cpu_capability().startswith("AVX512"),
                    reason="the bf16 tile GEMMs need AVX-512 (brgemm's VNNI bf16 path)")
def test_bf16_tile_gemm_path_is_taken(tmp_path):
    """bf16 on an AVX-512 CPU runs the bf16 GEMM path: its results differ from the fp32-upcast path
    (DALLE_FAST_SPARSE_BF16_GEMM=0) by the rounding of P and dS, and both stay within the error bar."""
    fast = _run_bf16_child(tmp_path, "bf16")
    upcast = _run_bf16_child(tmp_path, "fp32", DALLE_FAST_SPARSE_BF16_GEMM="0")
    assert any(not torch.equal(a, b) for a, b in zip(fast, upcast))


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_float64(kind):
    q, k, v = qkv(2, 3, 1, 1, 3, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: dalle_fast.sparse_attention(a, b, c, kind, 2, 3, conv_kernel=3),
                                    (q, k, v))


def test_opcheck():
    for n, (args, kw) in enumerate(ops.sample_inputs("cpu", torch.float32, requires_grad=True)):
        if n % 2:
            continue  # half of the samples keep this test short; all of them run elsewhere in this file
        q, k, v, kind, T, S = args
        scale = 1.0 / q.shape[-1] ** 0.5
        torch.library.opcheck(torch.ops.dalle_fast.sparse_attention, (q, k, v, kind, T, S, kw["conv_kernel"], scale))
    # Views of one qkv buffer, as SparseSelfAttention passes them: the fake kernel must still promise
    # the contiguous outputs the kernel returns.
    qkv_ = torch.randn(2, 7, 3, 2, 8).permute(2, 0, 3, 1, 4).requires_grad_()
    torch.library.opcheck(torch.ops.dalle_fast.sparse_attention, (*qkv_.unbind(0), "row", 3, 2, 11, 0.3))
    kc = torch.randn(2, 9, 2, 8).transpose(1, 2)
    torch.library.opcheck(torch.ops.dalle_fast.sparse_attention_decode,
                          (qkv_[0, :, :, :1].detach(), kc, kc, 4, "column", 3, 2, 11, 0.3))


def test_double_backward_raises_clearly():
    q, k, v = qkv(2, 2, 1, 1, 4, requires_grad=True)
    out = dalle_fast.sparse_attention(q, k, v, "row", 2, 2)
    (gq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gq.sum().backward()


def test_only_requested_gradients():
    q, k, v = qkv(3, 3, 1, 1, 4)
    v.requires_grad_()
    out = dalle_fast.sparse_attention(q, k, v, "column", 3, 3)
    (gv,) = torch.autograd.grad(out.sum(), v)
    (gv_ref,) = torch.autograd.grad(ref.sparse_attention(q, k, v, "column", 3, 3).sum(), v)
    assert q.grad is None and max_abs_err(gv, gv_ref) < 1e-12


def test_empty_batch_behaves_like_torch():
    q, k, v = (torch.randn(0, 2, 5, 8, requires_grad=True) for _ in range(3))
    out = dalle_fast.sparse_attention(q, k, v, "row", 1, 2)
    assert out.shape == (0, 2, 5, 8)
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape
    dec = dalle_fast.sparse_attention_decode(torch.randn(0, 2, 1, 8), k.detach(), v.detach(), 3, "row", 1, 2)
    assert dec.shape == (0, 2, 1, 8)


# ---------------------------------------------------------------- decode
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_decode_equals_rows_of_the_full_op(device, kind, dtype):
    T, S, B, H, D, _ = DECODE_SHAPE
    N = T + S * S
    q, k, v = qkv(T, S, B, H, D, dtype=dtype, device=device)
    full = dalle_fast.sparse_attention(q, k, v, kind, T, S)
    L = N + 3  # caches longer than the sequence, garbage past `position`
    kc, vc = rand((B, H, L, D), dtype, device, 7), rand((B, H, L, D), dtype, device, 8)
    e64 = ref.sparse_attention(q.double(), k.double(), v.double(), kind, T, S)
    for pos in range(N):
        kc[:, :, :pos + 1], vc[:, :, :pos + 1] = k[:, :, :pos + 1], v[:, :, :pos + 1]
        out = dalle_fast.sparse_attention_decode(q[:, :, pos:pos + 1], kc, vc, pos, kind, T, S)
        assert out.shape == (B, H, 1, D) and out.dtype == dtype
        tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
        assert max_abs_err(out, full[:, :, pos:pos + 1]) <= tol, pos
        assert max_abs_err(out, e64[:, :, pos:pos + 1]) <= tol, pos


@pytest.mark.parametrize("kind", KINDS)
def test_decode_paper_positions_strided_cache(kind):
    """The paper's layout at positions 0, T-1, T, the last; caches laid out (B, L, heads, D) and viewed
    as (B, heads, L, D), as a fused qkv projection writes them (read in place, not copied)."""
    T, S, H, D = 256, 32, 2, 32
    N = T + S * S
    q, k, v = (torch.randn(1, H, N, D) for _ in range(3))
    full = ref.sparse_attention(q.double(), k.double(), v.double(), kind, T, S)
    kc = k.transpose(1, 2).contiguous().transpose(1, 2)
    vc = v.transpose(1, 2).contiguous().transpose(1, 2)
    for pos in (0, T - 1, T, T + S, N - 1):
        out = dalle_fast.sparse_attention_decode(q[:, :, pos:pos + 1], kc, vc, pos, kind, T, S)
        assert max_abs_err(out, full[:, :, pos:pos + 1]) < 1e-5, pos


# ---------------------------------------------------------------- bad input
def _bad_calls():
    q, k, v = qkv(2, 3, 1, 1, 8, dtype=torch.float32)
    sa, dec = dalle_fast.sparse_attention, dalle_fast.sparse_attention_decode
    return [
        (lambda: sa(q, k[:, :, :5], v, "row", 2, 3), ValueError, "k must have q's shape"),
        (lambda: sa(q, k, v, "row", 3, 3), ValueError, "text_len \\+ image_size"),
        (lambda: sa(q, k, v, "diagonal", 2, 3), ValueError, "kind"),
        (lambda: sa(q, k, v, "conv", 2, 3, conv_kernel=4), ValueError, "odd"),
        (lambda: sa(q, k, v, "row", -1, 3), ValueError, "text_len"),
        (lambda: sa(q, k, v, "row", 2, 0), ValueError, "image_size"),
        (lambda: sa(q[0], k[0], v[0], "row", 2, 3), ValueError, "4-D"),
        (lambda: sa(q, k.double(), v, "row", 2, 3), TypeError, "dtype"),
        (lambda: sa(q.long(), k.long(), v.long(), "row", 2, 3), TypeError, "floating"),
        (lambda: sa(q, k, v, "row", 2.0, 3), TypeError, "int"),
        (lambda: sa(torch.randn(1, 1, 11, 1024), torch.randn(1, 1, 11, 1024), torch.randn(1, 1, 11, 1024), "row", 2, 3),
         ValueError, "head dim"),
        (lambda: sa(q, k, v, "row", 2, 3, scale=float("nan")), ValueError, "scale"),
        (lambda: dec(q[:, :, :1], k, v, 11, "row", 2, 3), ValueError, "position"),
        (lambda: dec(q[:, :, :1], k[:, :, :4], v[:, :, :4], 4, "row", 2, 3), ValueError, "past their end"),
        (lambda: dec(q[:, :, :2], k, v, 3, "row", 2, 3), ValueError, "\\(B, heads, 1, D\\)"),
        (lambda: dec(q[:, :, :1], k, v[:, :, :9], 3, "row", 2, 3), ValueError, "caches"),
        (lambda: dec(q[:, :, :1], k, v, 3.0, "row", 2, 3), TypeError, "position"),
        (lambda: dec(q[:, :, :1], k, v, 3, "diag", 2, 3), ValueError, "kind"),
        (lambda: dec(q[:, :, :1], k, v, 3, "conv", 2, 3, conv_kernel=2), ValueError, "odd"),
        (lambda: dec(q[:, :, :1], k.double(), v.double(), 3, "row", 2, 3), TypeError, "dtype"),
        (lambda: dec(q[:, :, :1].long(), k.long(), v.long(), 3, "row", 2, 3), TypeError, "floating"),
    ]


@pytest.mark.parametrize("n", range(len(_bad_calls())))
def test_bad_input_raises_clear_errors(n):
    call, exc, match = _bad_calls()[n]
    with pytest.raises(exc, match=match):
        call()


def test_cpp_boundary_checks():
    """The raw op checks its inputs too (it is reachable without the Python wrapper)."""
    q, k, v = qkv(2, 3, 1, 1, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="text_len \\+ image_size"):
        torch.ops.dalle_fast.sparse_attention(q, k, v, "row", 1, 3, 11, 0.3)
    with pytest.raises(ValueError, match="kind must be one of"):
        torch.ops.dalle_fast.sparse_attention(q, k, v, "diag", 2, 3, 11, 0.3)
    with pytest.raises(ValueError, match="past their end"):
        torch.ops.dalle_fast.sparse_attention_decode(q[:, :, :1], k[:, :, :3], v[:, :, :3], 5, "row", 2, 3, 11, 0.3)


@given(kind=st.sampled_from(KINDS + ("bogus",)), T=st.integers(-2, 6), S=st.integers(-1, 4), N=st.integers(1, 24),
       D=st.sampled_from([1, 3, 8]), ck=st.integers(-1, 6))
def test_property_valid_matches_reference_or_raises(kind, T, S, N, D, ck):
    q, k, v = (torch.randn(1, 2, N, D, dtype=torch.float64) for _ in range(3))
    valid = kind in KINDS and T >= 0 and S >= 1 and ck >= 1 and ck % 2 == 1 and N == T + S * S
    if not valid:
        with pytest.raises(ValueError):
            dalle_fast.sparse_attention(q, k, v, kind, T, S, conv_kernel=ck)
        return
    out = dalle_fast.sparse_attention(q, k, v, kind, T, S, conv_kernel=ck)
    assert max_abs_err(out, ref.sparse_attention(q, k, v, kind, T, S, conv_kernel=ck)) < 1e-12


def test_selftest_rows_pass():
    rows = ops.selftest("cpu")
    assert rows and all(err <= tol for _, _, _, err, tol in rows), [r for r in rows if r[3] > r[4]]
