"""GPU tests valid by construction: the parameters of every test that runs sparse attention on
CUDA, and of every selftest row, go through the CUDA boundary (the _check_sparse_attention* ops with
device_type "cuda", on meta tensors) on the CPU. A GPU test, a selftest row or a bundled model
configuration that the CUDA kernels would reject fails here, on a machine without a GPU.
"""
import importlib
import json
import os

import pytest
import torch

import dalle_fast
from dalle_fast.ops import sparse_attention as sa

KINDS = dalle_fast.ops.sparse_attention.KINDS  # the one definition
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _test_module(name):
    """A sibling test module (tests/ is on sys.path under pytest's default import mode)."""
    return importlib.import_module(name)


def _meta(shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


def _check(op, B, H, T, S, D, ck, dtype, kind):
    N = T + S * S
    q = _meta((B, H, N, D), dtype)
    if op == "decode":
        for pos in {0, N - 1}:
            sa.check_decode_arguments("cuda", q[:, :, :1], q, q, pos, kind, T, S, ck)
        return
    sa.check_arguments("cuda", q, q, q, kind, T, S, ck)
    lse = _meta((B, H, N), torch.float64 if dtype == torch.float64 else torch.float32)
    torch.ops.dalle_fast._check_sparse_attention_backward(q, q, q, q, q, lse, kind, T, S, ck, D ** -0.5, "cuda")


def cuda_test_cases():
    """(source, op, (B, heads, T, S, D, conv_kernel), dtype) of every sparse attention call the GPU
    tests make; each runs for every mask kind."""
    out = []
    for op, shape, dtype in _test_module("test_sparse_attention_cuda").CUDA_CASES:
        out.append(("test_sparse_attention_cuda", op, shape, dtype))
    for op, (T, S, B, H, D, ck), dtype in _test_module("test_sparse_attention").CUDA_CASES:
        out.append(("test_sparse_attention", op, (B, H, T, S, D, ck), dtype))
    am = _test_module("test_attention_module")  # SparseSelfAttention on devices(), fp32, batch 2
    for op in ("sparse_attention", "decode"):
        out.append(("test_attention_module", op, (2, am.HEADS, am.T, am.S, am.DH, 3), torch.float32))
    return out


@pytest.mark.parametrize("source,op,shape,dtype", cuda_test_cases(), ids=lambda x: str(x))
@pytest.mark.parametrize("kind", KINDS)
def test_every_cuda_test_is_accepted_by_the_cuda_boundary(source, op, shape, dtype, kind):
    _check(op, *shape, dtype, kind)


def test_cuda_tests_cover_every_head_dim_tile():
    """Each head-dim tile of the CUDA kernels (and each dim of issue 9) has GPU test rows."""
    dims = {shape[4] for _, _, shape, _ in cuda_test_cases()}
    assert {16, 40, 48, 80, 96, 128, 160, 256} <= dims
    for tile in sa.CUDA_HEAD_DIM_TILES:
        assert any(tile // 2 < D <= tile for D in dims), tile
    assert any(D % 8 for D in dims), "no head dim that the host pads"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_selftest_cuda_rows_are_accepted_by_the_cuda_boundary(dtype):
    cases = sa.selftest_cases("meta", dtype, head_dim_sweep=True)
    assert {q.shape[-1] for (q, *_), _ in cases} >= set(sa.SELFTEST_HEAD_DIMS)
    for (q, k, v, kind, T, S), kw in cases:
        B, H, _, D = q.shape
        _check("sparse_attention", B, H, T, S, D, kw["conv_kernel"], dtype, kind)
        _check("decode", B, H, T, S, D, kw["conv_kernel"], dtype, kind)


def _dalle_configs():
    from dalle_fast.models.dalle import DALLEConfig
    with open(os.path.join(ROOT, "dalle_fast", "assets", "dalle", "config.json")) as f:
        bundled = DALLEConfig(**json.load(f)["config"])
    return {"bundled model": bundled, "DALLEConfig.tiny()": DALLEConfig.tiny(),
            "test_decode_step's CUDA model": DALLEConfig.tiny(depth=4, text_len=5, image_size=4)}


@pytest.mark.parametrize("name", list(_dalle_configs()))
def test_models_the_gpu_tests_run_are_accepted_by_the_cuda_boundary(name):
    """The bundled model (dim_head 48) and the tiny configs the CUDA tests sample: every layer's
    attention call in every dtype a user would pick."""
    cfg = _dalle_configs()[name]
    kinds = cfg.attention_kinds or sa.attention_schedule(cfg.depth)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for kind in set(kinds):
            for op in ("sparse_attention", "decode"):
                _check(op, 2, cfg.heads, cfg.text_len, cfg.image_size, cfg.dim_head, cfg.conv_kernel, dtype, kind)


def test_the_collection_can_fail():
    """A configuration the CUDA kernels reject (head dim 264, fine on the CPU) fails the same helper."""
    with pytest.raises(ValueError, match="on cuda, got 264"):
        _check("sparse_attention", 1, 2, 2, 3, 264, 11, torch.float16, "row")
    q = _meta((1, 2, 11, 264), torch.float16)
    sa.check_arguments("cpu", q, q, q, "row", 2, 3)
