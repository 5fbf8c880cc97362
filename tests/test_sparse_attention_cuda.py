"""The CUDA sparse attention kernels.

On any machine with g++: the host-side block layout that the CUDA kernels iterate
(csrc/include/dalle_fast/sparse_attention_layout.h, compiled alone) against the dense mask of the
issue's definition, and a float64 emulation of the kernels' tile algorithm (online softmax over the
listed key tiles; dQ over the forward lists, dK/dV over the transposed lists) against autograd.
On a GPU: the kernels against the float64 reference for every kind and dtype, gradients, decode,
the CPU op, opcheck and gradcheck; they skip cleanly without one.
"""
import functools
import os
import shutil
import subprocess

import pytest
import torch

import dalle_fast
from dalle_fast.testing import assert_within_pytorch_error, cuda_available, make_noncontiguous, max_abs_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TILE = 64
KINDS = dalle_fast.ops.sparse_attention.KINDS  # the one definition


@pytest.fixture
def gpu():
    if not cuda_available():  # checked when the test runs, never at import
        pytest.skip("needs a CUDA device and dalle_fast's CUDA build")


needs_gpu = pytest.mark.usefixtures("gpu")


def dense_mask(kind, T, S, k=11):
    """The issue's definition, vectorised (True = query i may attend key j)."""
    N = T + S * S
    i, j = torch.arange(N)[:, None], torch.arange(N)[None, :]
    p, q, W, h = i - T, j - T, max(S, 1), (k - 1) // 2
    r, c, rq, cq = p // W, p % W, q // W, q % W
    image = {"full": torch.ones(N, N, dtype=torch.bool), "row": q >= p - W, "column": cq == c,
             "conv": (rq >= r - h) & ((cq - c).abs() <= h)}[kind]
    return (j <= i) & ((i < T) | (j < T) | image)


# ---------------------------------------------------------------- the host-side layout, via g++
HARNESS = r"""
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include "dalle_fast/sparse_attention_layout.h"
using namespace dalle_fast;
int main(int argc, char** argv) {
  const char* k = argv[1];
  MaskKind kind = !strcmp(k, "full") ? MaskKind::Full : !strcmp(k, "row") ? MaskKind::Row
                : !strcmp(k, "column") ? MaskKind::Column : MaskKind::Conv;
  MaskSpec spec{kind, atoi(argv[2]), atoi(argv[3]), atoi(argv[4])};
  BlockLayout L = build_block_layout(spec);
  SeqPerm perm = seq_perm_for(spec);
  printf("%d %d %d %d %d\n", L.n_tiles, L.fwd_ptr, L.fwd_idx, L.bwd_ptr, L.bwd_idx);
  for (int x : L.data) printf("%d ", x);
  printf("\n");
  for (unsigned long long w : L.masks) printf("%llu ", w);
  printf("\n");
  for (int i = 0; i < spec.seq_len(); ++i) printf("%d ", perm.phys(i));
  printf("\n");
  for (int i = 0; i < spec.seq_len(); ++i) printf("%d ", perm.logical(i));
  printf("\n");
}
"""


@functools.lru_cache(maxsize=None)
def _harness(tmpdir):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler to build the layout harness")
    src, exe = os.path.join(tmpdir, "layout.cpp"), os.path.join(tmpdir, "layout")
    with open(src, "w") as f:
        f.write(HARNESS)
    subprocess.run([cxx, "-std=c++17", "-O1", "-I", os.path.join(ROOT, "csrc", "include"), src, "-o", exe],
                   check=True, capture_output=True)
    return exe


@pytest.fixture(scope="module")
def build_layout(tmp_path_factory):
    exe = _harness(str(tmp_path_factory.mktemp("layout")))

    def run(kind, T, S, k):
        lines = subprocess.run([exe, kind, str(T), str(S), str(k)], check=True, capture_output=True,
                               text=True).stdout.split("\n")
        nt, fwd_ptr, fwd_idx, bwd_ptr, bwd_idx = map(int, lines[0].split())
        data = list(map(int, lines[1].split()))
        masks = list(map(int, lines[2].split()))

        def lists(ptr, idx):
            return [[(data[idx + 2 * e], data[idx + 2 * e + 1]) for e in range(data[ptr + t], data[ptr + t + 1])]
                    for t in range(nt)]
        return dict(n_tiles=nt, fwd=lists(fwd_ptr, fwd_idx), bwd=lists(bwd_ptr, bwd_idx), masks=masks,
                    phys=list(map(int, lines[3].split())), logical=list(map(int, lines[4].split())))
    return run


def _padded_block(ml, qt, kt):
    blk = torch.zeros(TILE, TILE, dtype=torch.bool)
    part = ml[qt * TILE:(qt + 1) * TILE, kt * TILE:(kt + 1) * TILE]
    blk[:part.shape[0], :part.shape[1]] = part
    return blk


def _bits(words):
    """uint64 mask words (Python ints) as a (len, 64) bool tensor: [r, c] = bit c of word r."""
    halves = torch.tensor([[w & 0xFFFFFFFF, w >> 32] for w in words], dtype=torch.int64)
    shifts = torch.arange(32)
    return ((halves[:, :, None] >> shifts) & 1).reshape(len(words), TILE).bool()


LAYOUT_CASES = [(0, 1, 11), (5, 1, 3), (0, 8, 11), (3, 7, 3), (16, 12, 5), (70, 9, 11), (37, 11, 11), (64, 8, 3),
                (0, 16, 5), (1, 2, 1), (256, 32, 11)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T,S,k", LAYOUT_CASES)
def test_block_layout_matches_dense_mask(build_layout, kind, T, S, k):
    N = T + S * S
    L = build_layout(kind, T, S, k)
    nt = L["n_tiles"]
    assert nt == -(-N // TILE)
    phys = L["phys"]
    assert sorted(phys) == list(range(N))
    assert [L["logical"][x] for x in phys] == list(range(N))
    if kind == "column" and S > 1:  # the transposed grid: logical T + c*S + r is raster T + r*S + c
        assert phys[T:] == [T + r * S + c for c in range(S) for r in range(S)]
    else:
        assert phys == list(range(N))
    perm = torch.tensor(phys)
    ml = dense_mask(kind, T, S, k)[perm][:, perm]  # the mask in the kernels' logical order
    masks = L["masks"]
    for qt in range(nt):
        want = [kt for kt in range(nt) if ml[qt * TILE:(qt + 1) * TILE, kt * TILE:(kt + 1) * TILE].any()]
        assert [kt for kt, _ in L["fwd"][qt]] == want, f"key tiles of query tile {qt}"
        for kt, slot in L["fwd"][qt]:
            blk = _padded_block(ml, qt, kt)
            assert (slot < 0) == bool(blk.all()), f"full flag of ({qt}, {kt})"
            if slot >= 0:
                words = _bits(masks[slot * 2 * TILE:(slot + 1) * 2 * TILE])
                assert torch.equal(words[:TILE], blk), f"row mask words of ({qt}, {kt})"
                assert torch.equal(words[TILE:], blk.t()), f"column mask words of ({qt}, {kt})"
    for kt in range(nt):
        assert L["bwd"][kt] == [(qt, s) for qt in range(nt) for kk, s in L["fwd"][qt] if kk == kt]
    # Every query attends itself, so no tile list is empty (the kernels rely on it for lse).
    assert all(L["fwd"]) and all(L["bwd"])


def test_block_layout_is_sparse_at_the_paper_shape(build_layout):
    """Row and column attention at T=256, 32x32 visit far fewer tile pairs than causal attention;
    the transposed grid keeps column attention as cheap as row attention."""
    visits = {kind: sum(len(x) for x in build_layout(kind, 256, 32, 11)["fwd"]) for kind in KINDS}
    assert visits["full"] == 20 * 21 // 2
    assert visits["row"] < 0.6 * visits["full"] and visits["column"] < 0.6 * visits["full"]


def _emulate(L, q, k, v, scale):
    """float64 emulation of the CUDA kernels' algorithm over the layout: forward with the online
    softmax in tile order, dQ over the forward lists, dK/dV over the transposed lists."""
    N, D = q.shape
    nt, masks = L["n_tiles"], L["masks"]
    perm = torch.tensor(L["phys"])
    ql, kl, vl = q[perm], k[perm], v[perm]

    def bits(slot, qt, kt):
        rows, cols = min(TILE, N - qt * TILE), min(TILE, N - kt * TILE)
        if slot < 0:
            return torch.ones(rows, cols, dtype=torch.bool)
        return _bits(masks[slot * 2 * TILE:][:TILE])[:rows, :cols]

    out, lse = torch.empty_like(ql), torch.empty(N, dtype=q.dtype)
    for qt in range(nt):
        rq = slice(qt * TILE, min(N, (qt + 1) * TILE))
        m = torch.full((rq.stop - rq.start, 1), -float("inf"), dtype=q.dtype)
        lsum, acc = torch.zeros_like(m), torch.zeros(rq.stop - rq.start, D, dtype=q.dtype)
        for kt, slot in L["fwd"][qt]:
            rk = slice(kt * TILE, min(N, (kt + 1) * TILE))
            s = (ql[rq] @ kl[rk].t() * scale).masked_fill(~bits(slot, qt, kt), -float("inf"))
            m_new = torch.maximum(m, s.max(1, keepdim=True).values)
            m_use = torch.where(m_new == -float("inf"), torch.zeros_like(m_new), m_new)
            alpha, p = torch.exp(m - m_use), torch.exp(s - m_use)
            lsum, acc, m = lsum * alpha + p.sum(1, keepdim=True), acc * alpha + p @ vl[rk], m_new
        out[rq], lse[rq] = acc / lsum, (m + lsum.log()).squeeze(1)
    return out, lse, perm, (ql, kl, vl)


def _emulate_backward(L, q, k, v, scale, grad):
    N, D = q.shape
    out_l, lse_l, perm, (ql, kl, vl) = _emulate(L, q, k, v, scale)
    gl = grad[perm]
    delta = (gl * out_l).sum(1)
    dq, dk, dv = torch.zeros_like(ql), torch.zeros_like(kl), torch.zeros_like(vl)
    masks = L["masks"]

    def block(qt, kt, slot, key_major):
        # dq reads the query-major mask words, dkdv the key-major ones (words 64..127 of a slot).
        rq, rk = slice(qt * TILE, min(N, (qt + 1) * TILE)), slice(kt * TILE, min(N, (kt + 1) * TILE))
        allowed = torch.ones(rq.stop - rq.start, rk.stop - rk.start, dtype=torch.bool)
        if slot >= 0:
            b = _bits(masks[slot * 2 * TILE + (TILE if key_major else 0):][:TILE])
            allowed = (b.t() if key_major else b)[:allowed.shape[0], :allowed.shape[1]]
        p = torch.exp(ql[rq] @ kl[rk].t() * scale - lse_l[rq, None]) * allowed
        ds = p * (gl[rq] @ vl[rk].t() - delta[rq, None])
        return rq, rk, p, ds

    for qt in range(L["n_tiles"]):  # the dq kernel
        for kt, slot in L["fwd"][qt]:
            rq, rk, p, ds = block(qt, kt, slot, False)
            dq[rq] += scale * ds @ kl[rk]
    for kt in range(L["n_tiles"]):  # the dkdv kernel
        for qt, slot in L["bwd"][kt]:
            rq, rk, p, ds = block(qt, kt, slot, True)
            dv[rk] += p.t() @ gl[rq]
            dk[rk] += scale * ds.t() @ ql[rq]
    unperm = lambda t: torch.empty_like(t).index_copy_(0, perm, t)  # noqa: E731
    return unperm(out_l), unperm(lse_l), unperm(dq), unperm(dk), unperm(dv)


def reference(q, k, v, kind, T, S, conv_kernel, scale):
    """Dense masked softmax attention in the inputs' dtype; returns (out, lse)."""
    mask = dense_mask(kind, T, S, conv_kernel).to(q.device)
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, -float("inf"))
    return torch.softmax(s, -1) @ v, torch.logsumexp(s.float() if s.dtype != torch.float64 else s, -1)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T,S,k", [(37, 11, 11), (0, 12, 3), (70, 9, 5)])
def test_emulated_tile_algorithm_matches_dense_attention(build_layout, kind, T, S, k):
    N, D, scale = T + S * S, 8, 0.3
    L = build_layout(kind, T, S, k)
    g = torch.Generator().manual_seed(0)
    q, kk, v, grad = (torch.randn(N, D, generator=g, dtype=torch.float64) for _ in range(4))
    out, lse, dq, dk, dv = _emulate_backward(L, q, kk, v, scale, grad)
    x = [t.clone().requires_grad_() for t in (q, kk, v)]
    e_out, e_lse = reference(*x, kind, T, S, k, scale)
    want = torch.autograd.grad(e_out, x, grad)
    assert max_abs_err(out, e_out) < 1e-12 and max_abs_err(lse, e_lse) < 1e-12
    for name, a, b in zip("qkv", (dq, dk, dv), want):
        assert max_abs_err(a, b) < 1e-12, f"d{name}"


# ---------------------------------------------------------------- on a GPU
# Every configuration the GPU tests below run is module-level data, collected into CUDA_CASES, which
# tests/test_gpu_cases.py runs through the CUDA boundary on the CPU: a GPU test that the CUDA kernels
# would reject cannot be written. Shapes are (B, heads, T, S, D, conv_kernel).
GPU_SHAPES = [  # N < 64, N = 64k, text_len 0, image 1x1, ragged tails
    (2, 3, 5, 7, 64, 3), (1, 2, 0, 9, 32, 11), (2, 1, 16, 1, 128, 11), (1, 2, 64, 8, 64, 5), (1, 1, 37, 12, 32, 11),
    (1, 2, 3, 13, 128, 5)]
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Every head dim the CUDA kernels are held to: each head-dim tile (64, 128, 256) at and below its
# size, dims that are not multiples of 16 (run with zero-padded columns), the bundled model's 48, and
# 20 (not a multiple of 8: padded to 24 on the host).
HEAD_DIMS = (16, 20, 40, 48, 80, 96, 128, 160, 256)
HEAD_DIM_SHAPES = [(2, 1, 20, 9, D, 5) for D in HEAD_DIMS]  # N = 101: a full and a ragged tile
PAPER_SHAPE = (1, 2, 256, 32, 64, 11)
MATCH_CPU_SHAPE = (2, 2, 19, 9, 64, 5)
DECODE_SHAPE = (2, 3, 11, 9, 64, 5)
DECODE_PAPER_SHAPE = (2, 4, 256, 32, 64, 11)
NONCONTIG_SHAPE = (3, 2, 7, 6, 32, 3)
GRADCHECK_SHAPE = (1, 2, 3, 3, 32, 3)
BOUNDARY_SHAPE, EMPTY_SHAPE = (1, 1, 2, 3, 32, 3), (0, 2, 2, 3, 32, 11)
ALL_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
CUDA_CASES = (  # (op, shape, dtype): op "sparse_attention" also runs its backward
    [("sparse_attention", s, dt) for s in GPU_SHAPES for dt in GPU_DTYPES]
    + [(op, s, dt) for s in HEAD_DIM_SHAPES for dt in GPU_DTYPES for op in ("sparse_attention", "decode")]
    + [("sparse_attention", PAPER_SHAPE, dt) for dt in (torch.float16, torch.bfloat16)]
    + [("sparse_attention", MATCH_CPU_SHAPE, dt) for dt in ALL_DTYPES]
    + [(op, DECODE_SHAPE, dt) for dt in GPU_DTYPES for op in ("sparse_attention", "decode")]
    + [("decode", DECODE_PAPER_SHAPE, torch.float16), ("sparse_attention", DECODE_PAPER_SHAPE, torch.float16),
       ("sparse_attention", NONCONTIG_SHAPE, torch.float32), ("sparse_attention", GRADCHECK_SHAPE, torch.float64),
       ("sparse_attention", BOUNDARY_SHAPE, torch.float16), ("decode", BOUNDARY_SHAPE, torch.float16),
       ("sparse_attention", EMPTY_SHAPE, torch.float16)])


def _inputs(shape, dtype, seed=0, device="cuda"):
    B, H, T, S, D, _ = shape
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T + S * S, D, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
            for _ in range(4)]


@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", GPU_SHAPES + HEAD_DIM_SHAPES)
def test_cuda_forward_and_backward_against_float64(kind, dtype, shape):
    B, H, T, S, D, ck = shape
    scale = D ** -0.5
    q, k, v, go = _inputs(shape, dtype)
    out, lse = torch.ops.dalle_fast.sparse_attention(q, k, v, kind, T, S, ck, scale)
    dq, dk, dv = torch.ops.dalle_fast._sparse_attention_backward(go, q, k, v, out, lse, kind, T, S, ck, scale)
    x64 = [t.double().requires_grad_() for t in (q, k, v)]
    e_out, e_lse = reference(*x64, kind, T, S, ck, scale)
    e_grads = torch.autograd.grad(e_out, x64, go.double())
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == q.shape[:3]
    assert max_abs_err(lse, e_lse) < (1e-5 if dtype == torch.float32 else 2e-2)
    if dtype == torch.float32:
        assert max_abs_err(out, e_out) < 1e-5
        for name, a, e in zip("qkv", (dq, dk, dv), e_grads):
            assert max_abs_err(a, e) < 1e-4, f"d{name}"
        return
    xd = [t.detach().requires_grad_() for t in (q, k, v)]  # the same math done by PyTorch in dtype
    t_out, _ = reference(*xd, kind, T, S, ck, scale)
    t_grads = torch.autograd.grad(t_out, xd, go)
    assert_within_pytorch_error(out, e_out, t_out, what="out")
    for name, a, e, t in zip("qkv", (dq, dk, dv), e_grads, t_grads):
        assert_within_pytorch_error(a, e, t, what=f"d{name}")


@needs_gpu
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_paper_shape_fp16_and_bf16(kind):
    """T = 256, 32x32 image, D = 64: many full and partial tiles, the transposed grid for columns."""
    for dtype in (torch.float16, torch.bfloat16):
        q, k, v, go = _inputs(PAPER_SHAPE, dtype, seed=3)
        x = [t.detach().requires_grad_() for t in (q, k, v)]
        out = dalle_fast.sparse_attention(*x, kind, 256, 32)
        grads = torch.autograd.grad(out, x, go)
        x64 = [t.double().requires_grad_() for t in (q, k, v)]
        e_out, _ = reference(*x64, kind, 256, 32, 11, 0.125)
        e_grads = torch.autograd.grad(e_out, x64, go.double())
        xd = [t.detach().requires_grad_() for t in (q, k, v)]
        t_out, _ = reference(*xd, kind, 256, 32, 11, 0.125)
        t_grads = torch.autograd.grad(t_out, xd, go)
        assert_within_pytorch_error(out, e_out, t_out, what=f"{dtype} out")
        for name, a, e, t in zip("qkv", grads, e_grads, t_grads):
            assert_within_pytorch_error(a, e, t, what=f"{dtype} d{name}")


@needs_gpu
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_matches_cpu_op(kind, dtype):
    B, H, T, S, D, ck = MATCH_CPU_SHAPE
    q, k, v, go = _inputs(MATCH_CPU_SHAPE, dtype, seed=1)
    outs = {}
    for dev in ("cpu", "cuda"):
        x = [t.to(dev).requires_grad_() for t in (q, k, v)]
        out = dalle_fast.sparse_attention(*x, kind, T, S, conv_kernel=ck)
        outs[dev] = [out] + list(torch.autograd.grad(out, x, go.to(dev)))
    tol = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 6e-2}[dtype]
    for name, a, b in zip(("out", "dq", "dk", "dv"), outs["cuda"], outs["cpu"]):
        assert max_abs_err(a.cpu(), b) < tol * max(1.0, b.abs().max().item()), name


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [DECODE_SHAPE] + HEAD_DIM_SHAPES)
def test_cuda_decode_equals_rows_of_the_full_op(kind, dtype, shape):
    B, H, T, S, D, ck = shape
    N = T + S * S
    q, k, v, _ = _inputs(shape, dtype, seed=2)
    full, _ = torch.ops.dalle_fast.sparse_attention(q, k, v, kind, T, S, ck, 0.125)
    e64, _ = reference(q.double(), k.double(), v.double(), kind, T, S, ck, 0.125)
    # A preallocated cache longer than the sequence, (B, L, heads, D) viewed as (B, heads, L, D):
    # read in place through its strides; garbage past `position` must not be read.
    L = N + 5
    kc = torch.full((B, L, H, D), float("nan"), device="cuda", dtype=dtype).transpose(1, 2)
    vc = torch.full((B, L, H, D), float("nan"), device="cuda", dtype=dtype).transpose(1, 2)
    tol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    for pos in range(N):
        kc[:, :, pos], vc[:, :, pos] = k[:, :, pos], v[:, :, pos]
        out = torch.ops.dalle_fast.sparse_attention_decode(q[:, :, pos:pos + 1], kc, vc, pos, kind, T, S, ck, 0.125)
        assert out.shape == (B, H, 1, D) and out.dtype == dtype
        assert max_abs_err(out, e64[:, :, pos:pos + 1]) <= tol, pos
        assert max_abs_err(out, full[:, :, pos:pos + 1]) <= 2 * tol, pos


@needs_gpu
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_decode_paper_shape(kind):
    _, _, T, S, D, _ = DECODE_PAPER_SHAPE
    N = T + S * S
    q, k, v, _ = _inputs(DECODE_PAPER_SHAPE, torch.float16, seed=4)
    e64, _ = reference(q.double(), k.double(), v.double(), kind, T, S, 11, 0.125)
    t16, _ = reference(q, k, v, kind, T, S, 11, 0.125)
    for pos in (0, T - 1, T, T + S, N - 1):
        out = torch.ops.dalle_fast.sparse_attention_decode(q[:, :, pos:pos + 1], k, v, pos, kind, T, S, 11, 0.125)
        assert_within_pytorch_error(out, e64[:, :, pos:pos + 1], t16[:, :, pos:pos + 1], what=f"position {pos}")


@needs_gpu
def test_cuda_noncontiguous_and_batched_inputs():
    B, H, T, S, D, ck = NONCONTIG_SHAPE
    q, k, v, go = _inputs(NONCONTIG_SHAPE, torch.float32, seed=5)
    nq, nk, nv = (make_noncontiguous(t) for t in (q, k, v))
    assert not nq.is_contiguous()
    for kind in KINDS:
        a, la = torch.ops.dalle_fast.sparse_attention(nq, nk, nv, kind, T, S, ck, 0.2)
        b, lb = torch.ops.dalle_fast.sparse_attention(q, k, v, kind, T, S, ck, 0.2)
        assert torch.equal(a, b) and torch.equal(la, lb)
        ga = torch.ops.dalle_fast._sparse_attention_backward(make_noncontiguous(go), nq, nk, nv, a, la, kind, T, S,
                                                            ck, 0.2)
        gb = torch.ops.dalle_fast._sparse_attention_backward(go, q, k, v, b, lb, kind, T, S, ck, 0.2)
        assert all(torch.equal(x, y) for x, y in zip(ga, gb))


@needs_gpu
def test_cuda_opcheck_and_gradcheck():
    from dalle_fast.ops.sparse_attention import sample_inputs
    for args, kwargs in sample_inputs("cuda", torch.float32, requires_grad=True):
        q, k, v, kind, T, S = args
        scale = q.shape[-1] ** -0.5
        torch.library.opcheck(torch.ops.dalle_fast.sparse_attention, (q, k, v, kind, T, S, kwargs["conv_kernel"], scale))
    for kind in KINDS:
        x = [t.requires_grad_() for t in _inputs(GRADCHECK_SHAPE, torch.float64, seed=6)[:3]]
        assert torch.autograd.gradcheck(lambda a, b, c: dalle_fast.sparse_attention(a, b, c, kind, 3, 3, conv_kernel=3),
                                        x, eps=1e-6, atol=1e-6, rtol=1e-4)


@needs_gpu
def test_cuda_boundary_checks_and_empty_tensors():
    """The kernels raise what the shared boundary says (tests/test_sparse_attention_boundary.py drives
    every case on the CPU); here a few of them on the device, and empty batches."""
    q, k, v, _ = _inputs(BOUNDARY_SHAPE, torch.float16)
    op = torch.ops.dalle_fast.sparse_attention
    with pytest.raises(ValueError, match="text_len \\+ image_size"):
        op(q, k, v, "row", 1, 3, 11, 0.3)
    with pytest.raises(ValueError, match="kind must be one of"):
        op(q, k, v, "diag", 2, 3, 11, 0.3)
    with pytest.raises(ValueError, match="head dim"):
        x = torch.randn(1, 1, 11, 264, device="cuda", dtype=torch.float16)
        op(x, x, x, "row", 2, 3, 11, 0.3)
    with pytest.raises(TypeError, match="one dtype"):
        op(q, k.float(), v, "row", 2, 3, 11, 0.3)
    with pytest.raises(ValueError, match="odd"):
        op(q, k, v, "conv", 2, 3, 4, 0.3)
    with pytest.raises(ValueError, match="past their end"):
        torch.ops.dalle_fast.sparse_attention_decode(q[:, :, :1], k[:, :, :3], v[:, :, :3], 5, "row", 2, 3, 11, 0.3)
    e = _inputs(EMPTY_SHAPE, torch.float16)[0]
    out, lse = op(e, e, e, "row", 2, 3, 11, 0.3)
    assert out.shape == e.shape and lse.shape == (0, 2, 11)
    assert all(g.shape == e.shape for g in torch.ops.dalle_fast._sparse_attention_backward(e, e, e, e, out, lse, "row",
                                                                                           2, 3, 11, 0.3))
