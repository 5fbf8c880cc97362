"""dalle_fast.nn.SparseSelfAttention and KVCache: backends agree, cached stepping and prefixes match."""
import pytest
import torch

from dalle_fast.nn import BACKEND_ENV, KVCache, SparseSelfAttention, resolve_backend
from dalle_fast.ops.sparse_attention import KINDS
from dalle_fast.testing import devices, max_abs_err

T, S, DIM, HEADS, DH = 5, 4, 48, 2, 16
N = T + S * S


def make(kind, backend="fused", device="cpu", dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    return SparseSelfAttention(DIM, HEADS, kind, T, S, dim_head=DH, conv_kernel=3, backend=backend, **kw).to(
        device=device, dtype=dtype)


def inputs(B=2, n=N, device="cpu", dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, n, DIM, generator=g).to(device=device, dtype=dtype)


def clone_as(mod, backend):
    other = make(mod.kind, backend, next(mod.parameters()).device)
    other.load_state_dict(mod.state_dict())
    return other


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", KINDS)
def test_fused_and_dense_agree_forward_and_backward(device, kind):
    fused = make(kind, "fused", device)
    dense = clone_as(fused, "dense")
    x = inputs(device=device)
    xf, xd = x.clone().requires_grad_(), x.clone().requires_grad_()
    yf, yd = fused(xf), dense(xd)
    assert yf.shape == (2, N, DIM)
    assert max_abs_err(yf, yd) < 2e-5
    g = torch.randn_like(yf)
    yf.backward(g)
    yd.backward(g)
    assert max_abs_err(xf.grad, xd.grad) < 2e-5
    for (name, pf), pd in zip(fused.named_parameters(), dense.parameters()):
        assert max_abs_err(pf.grad, pd.grad) < 5e-5, name


@pytest.mark.parametrize("kind", ["column"])
def test_flex_backend_agrees(kind):
    """Compiled FlexAttention (forward; it has no CPU backward). One kind: a compile takes ~15 s here."""
    fused = make(kind, "fused")
    flex = clone_as(fused, "flex")
    x = inputs()
    with torch.no_grad():
        assert max_abs_err(flex(x), fused(x)) < 2e-5


def test_flex_trains_through_dense_on_cpu():
    fused = make("conv", "fused")
    flex = clone_as(fused, "flex")
    x = inputs(B=1)
    with pytest.warns(UserWarning, match="no backward on the CPU"):
        y = flex(x)
    y.sum().backward()
    fused(x).sum().backward()
    assert max_abs_err(flex.to_qkv.weight.grad, fused.to_qkv.weight.grad) < 5e-5


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("backend", ["fused", "dense"])
@pytest.mark.parametrize("kind", KINDS)
def test_kv_cache_stepping_equals_full_forward(device, backend, kind):
    mod = make(kind, backend, device)
    x = inputs(device=device)
    with torch.no_grad():
        full = mod(x)
        cache = KVCache(2, HEADS, N, DH, dtype=torch.float32, device=device)
        prefix = mod(x[:, :T], kv_cache=cache)  # prefill the text, then one token at a time
        assert max_abs_err(prefix, full[:, :T]) < 2e-5
        for p in range(T, N):
            y = mod(x[:, p:p + 1], kv_cache=cache, position=p)
            assert y.shape == (2, 1, DIM)
            assert max_abs_err(y, full[:, p:p + 1]) < 2e-5, p


def test_kv_cache_from_position_zero_and_prefill_contents():
    mod = make("column")
    x = inputs(B=1)
    with torch.no_grad():
        full = mod(x)
        stepped = KVCache(1, HEADS, N, DH)
        outs = [mod(x[:, p:p + 1], kv_cache=stepped, position=p) for p in range(N)]
        assert max_abs_err(torch.cat(outs, 1), full) < 2e-5
        prefilled = KVCache(1, HEADS, N, DH)
        mod(x, kv_cache=prefilled)
        assert max_abs_err(prefilled.k, stepped.k) < 1e-6 and max_abs_err(prefilled.v, stepped.v) < 1e-6


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, T - 1, T, T + 3, N])
def test_prefix_forward_equals_first_rows(kind, n):
    mod = make(kind)
    x = inputs()
    with torch.no_grad():
        assert max_abs_err(mod(x[:, :n]), mod(x)[:, :n]) < 2e-5


def test_bf16_module_close_to_fp32():
    mod = make("row")
    x = inputs()
    with torch.no_grad():
        y32 = mod(x)
        y16 = mod.to(torch.bfloat16)(x.bfloat16())
    assert y16.dtype == torch.bfloat16 and max_abs_err(y16, y32) < 5e-2


def test_torch_compile_fused_module():
    mod = make("row")
    x = inputs().requires_grad_()
    compiled = torch.compile(mod, fullgraph=True)
    y = compiled(x)
    assert max_abs_err(y, mod(x)) < 1e-5
    (gx,) = torch.autograd.grad(y.sum(), x)
    (gx_eager,) = torch.autograd.grad(mod(x).sum(), x)
    assert max_abs_err(gx, gx_eager) < 1e-5


def test_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        SparseSelfAttention(DIM, HEADS, "diag", T, S)
    with pytest.raises(ValueError, match="backend"):
        SparseSelfAttention(DIM, HEADS, "row", T, S, backend="triton")
    mod = make("row")
    with pytest.raises(ValueError, match="sequence length"):
        mod(inputs(n=N + 1))
    with pytest.raises(ValueError, match=r"\(B, n, 48\)"):
        mod(torch.randn(2, N, DIM + 1))
    with pytest.raises(ValueError, match="kv_cache"):
        mod(inputs(n=1), position=3)
    cache = KVCache(2, HEADS, N, DH)
    with pytest.raises(ValueError, match="one token"):
        mod(inputs(n=2), kv_cache=cache, position=3)
    with pytest.raises(ValueError, match="position"):
        mod(inputs(n=1), kv_cache=cache, position=N)


def test_dropout_only_in_training():
    mod = make("row", dropout=0.5)
    x = inputs()
    mod.eval()
    with torch.no_grad():
        assert torch.equal(mod(x), mod(x))
    mod.train()
    with torch.no_grad():
        assert not torch.equal(mod(x), mod(x))


def test_attention_backend_environment_switch(monkeypatch):
    """DALLE_FAST_ATTENTION_BACKEND replaces the fused backend (by default or from a saved config) at
    construction; explicit flex/dense stay; a bad value is a clear error."""
    import dalle_fast.nn.attention as attention_mod
    from dalle_fast.models.dalle import DALLE, DALLEConfig
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert make("row").backend == "fused" and resolve_backend("dense") == "dense"
    fused = DALLE(DALLEConfig.tiny(depth=2)).eval()
    assert fused.attention_backend() == "fused" and fused._can_fuse_step() is False  # grads on
    monkeypatch.setenv(BACKEND_ENV, "dense")
    assert make("row").backend == "dense" and make("row", backend="flex").backend == "flex"
    m = DALLE(DALLEConfig.tiny(depth=2)).eval()  # the config says fused, as the bundled model's does
    m.load_state_dict(fused.state_dict())
    assert m.config.backend == "fused" and m.attention_backend() == "dense"
    assert all(layer.attn.attn.backend == "dense" for layer in m.layers)

    def no_kernel(*a, **k):
        raise AssertionError("the fused kernel ran although the environment routed attention elsewhere")

    monkeypatch.setattr(attention_mod, "sparse_attention", no_kernel)
    monkeypatch.setattr(attention_mod, "sparse_attention_decode", no_kernel)
    cfg = m.config
    g = torch.Generator().manual_seed(0)
    text = torch.randint(1, cfg.num_text_tokens, (2, cfg.text_len), generator=g)
    image = torch.randint(0, cfg.num_image_tokens, (2, cfg.image_len), generator=g)
    with torch.no_grad():
        got = m(text, image)[1]
        caches = m.new_kv_caches(2)
        step = [m.prefill(text, caches), m.decode_step(image[:, 0], 0, caches)]  # not the fused one-op step
        monkeypatch.undo()
        want = fused(text, image)[1]
    assert max_abs_err(got, want) < 1e-5 and max_abs_err(torch.stack(step, 1), want[:, :2]) < 1e-5
    for value in ("flex", "fused", ""):
        monkeypatch.setenv(BACKEND_ENV, value)
        assert make("conv").backend == (value or "fused")
    monkeypatch.setenv(BACKEND_ENV, "triton")
    with pytest.raises(ValueError, match="DALLE_FAST_ATTENTION_BACKEND must be one of fused, flex, dense"):
        make("row")
    with pytest.raises(ValueError, match="DALLE_FAST_ATTENTION_BACKEND"):
        DALLE(DALLEConfig.tiny(depth=1))
