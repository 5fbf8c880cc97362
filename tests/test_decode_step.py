"""transformer_decode_step (csrc/decode_step.cpp): the one-op cached sampling step against DALLE's
module path (its reference), on every mask kind, batch sizes, dtypes and bad input."""
import pytest
import torch
from hypothesis import given, strategies as st

from dalle_fast.generate import sample_tokens
from dalle_fast.models.dalle import DALLE, DALLEConfig, DecodeCaches
from dalle_fast.ops.decode_step import param_names, transformer_decode_step
from dalle_fast.testing import cuda_available, low_precision_tolerance, max_abs_err


def model(seed=0, **kw):
    torch.manual_seed(seed)
    return DALLE(DALLEConfig.tiny(**kw)).eval()


def run_steps(m, text, image, steps, fused):
    """Logits of `steps` cached steps after the prefill, and the caches they leave."""
    with torch.no_grad():
        caches = m.new_kv_caches(text.shape[0])
        out = [m.prefill(text, caches)]
        for j in range(steps):
            out.append(m.decode_step(image[:, j], j, caches, fused=fused))
    return torch.stack(out, 1), caches


def inputs(cfg, batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1, cfg.num_text_tokens, (batch, cfg.text_len), generator=g)
    text[:, cfg.text_len // 2:] = 0  # padding tokens too
    image = torch.randint(0, cfg.num_image_tokens, (batch, cfg.image_len), generator=g)
    return text, image


@given(kinds=st.lists(st.sampled_from(["row", "column", "conv", "full"]), min_size=1, max_size=3),
       text_len=st.integers(1, 6), image_size=st.integers(1, 5), batch=st.integers(1, 3),
       heads=st.integers(1, 3), dim_head=st.sampled_from([8, 16, 24]), conv_kernel=st.sampled_from([1, 3, 5]),
       seed=st.integers(0, 2 ** 16))
def test_fused_step_matches_module_path_float64(kinds, text_len, image_size, batch, heads, dim_head, conv_kernel,
                                                  seed):
    m = model(seed, depth=len(kinds), attention_kinds=kinds, text_len=text_len, image_size=image_size, heads=heads,
              dim_head=dim_head, conv_kernel=conv_kernel).double()
    text, image = inputs(m.config, batch, seed)
    steps = m.config.image_len - 1
    ref, ref_caches = run_steps(m, text, image, steps, fused=False)
    got, got_caches = run_steps(m, text, image, steps, fused=True)
    assert got.dtype == torch.float64 and got.shape == ref.shape
    assert max_abs_err(got, ref) < 1e-12
    for a, b in zip(got_caches, ref_caches):
        assert max_abs_err(a.k, b.k) < 1e-12 and max_abs_err(a.v, b.v) < 1e-12
    # and both equal the uncached forward: the step is right, not merely consistent
    full = m(text, image)[1]
    assert max_abs_err(got, full[:, :steps + 1]) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch", [1, 4])
def test_fused_step_low_precision(dtype, batch):
    """Within twice the module path's own error in that dtype, both measured against float64."""
    m = model(3, depth=4, text_len=5, image_size=4, dim=48, heads=3, dim_head=16)
    text, image = inputs(m.config, batch)
    ref64, _ = run_steps(_as(m, torch.float64), text, image, 10, fused=False)
    mod, _ = run_steps(_as(m, dtype), text, image, 10, fused=False)
    got, _ = run_steps(_as(m, dtype), text, image, 10, fused=True)
    assert got.dtype == torch.float32  # fp32 logits, as the module path
    if dtype == torch.float32:
        assert max_abs_err(got, mod) < 1e-5
    assert max_abs_err(got, ref64) <= low_precision_tolerance(ref64, mod)


def _as(m, dtype):
    c = DALLE(m.config)
    c.load_state_dict(m.state_dict())
    return c.to(dtype).eval()


def test_decode_step_takes_the_fused_op_by_default_where_it_computes_the_same():
    m = model(depth=2)
    text, image = inputs(m.config, 1)
    calls = []

    def spy(*args, **kw):
        calls.append(1)
        return transformer_decode_step(*args, **kw)

    import dalle_fast.ops.decode_step as mod
    orig, mod.transformer_decode_step = mod.transformer_decode_step, spy
    try:
        with torch.no_grad():
            caches = m.new_kv_caches(1)
            assert isinstance(caches, DecodeCaches)
            m.prefill(text, caches)
            m.decode_step(image[:, 0], 0, caches)
            assert len(calls) == 1
            # the dense baseline, a training-mode model with dropout, and hooks keep the module path
            for variant in (model(depth=2, backend="dense"), model(depth=2, dropout=0.1).train()):
                c = variant.new_kv_caches(1)
                variant.prefill(text, c)
                variant.decode_step(image[:, 0], 0, c)
            hooked = model(depth=2)
            seen = []
            hooked.layers[0].mlp.register_forward_hook(lambda *a: seen.append(1))
            c = hooked.new_kv_caches(1)
            hooked.prefill(text, c)
            hooked.decode_step(image[:, 0], 0, c)
            assert seen and len(calls) == 1
        # with gradients on, the module path (the op is inference only)
        c = m.new_kv_caches(1)
        m.decode_step(image[:, 0], 0, c)
        assert len(calls) == 1
    finally:
        mod.transformer_decode_step = orig


def test_sampled_tokens_are_identical_with_and_without_the_fused_step():
    m = model(5, depth=3, text_len=6, image_size=4)
    text, _ = inputs(m.config, 2)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a = sample_tokens(m, text, generator=g1)
    orig = DALLE._can_fuse_step
    DALLE._can_fuse_step = lambda self: False
    try:
        b = sample_tokens(m, text, generator=g2)
    finally:
        DALLE._can_fuse_step = orig
    c = sample_tokens(m, text, generator=torch.Generator().manual_seed(7), use_cache=False)
    assert torch.equal(a, b) and torch.equal(a, c)


def _op_args(m, batch=2, index=3):
    cfg = m.config
    caches = m.new_kv_caches(batch)
    tokens = torch.randint(0, cfg.num_image_tokens, (batch,))
    return [tokens, index, m.decode_params(), [c.k for c in caches], [c.v for c in caches], cfg.kinds(),
            cfg.text_len, cfg.image_size, cfg.conv_kernel, cfg.heads, 1e-5, cfg.dim_head ** -0.5]


def test_opcheck():
    m = model(depth=2).requires_grad_(False)
    torch.library.opcheck(torch.ops.dalle_fast.transformer_decode_step.default, _op_args(m),
                          test_utils=("test_schema", "test_faketensor"))


def test_bad_input_names_the_problem():
    m = model(depth=2)
    with torch.no_grad():
        a = _op_args(m)
        with pytest.raises(ValueError, match="parameters for 2 layers"):
            transformer_decode_step(*(a[:2] + [a[2][:-1]] + a[3:]))
        with pytest.raises(ValueError, match="one k and one v cache per layer"):
            transformer_decode_step(*(a[:3] + [a[3][:1]] + a[4:]))
        with pytest.raises(ValueError, match="index must be in"):
            transformer_decode_step(*([a[0], m.config.image_len] + a[2:]))
        with pytest.raises(TypeError, match="integer ids"):
            transformer_decode_step(*([a[0].float()] + a[1:]))
        with pytest.raises(ValueError, match="caches must be"):
            transformer_decode_step(*(a[:3] + [[k[:1] for k in a[3]], a[4]] + a[5:]))
        with pytest.raises(ValueError, match="kind must be"):
            transformer_decode_step(*(a[:5] + [["row", "diagonal"]] + a[6:]))
        with pytest.raises(ValueError, match="decode_step: index"):
            m.decode_step(a[0], -1, m.new_kv_caches(2))
    with pytest.raises(RuntimeError, match="inference only"):
        transformer_decode_step(*_op_args(m))


def test_param_names_are_the_models_state_dict_keys_in_the_ops_order():
    m = model(depth=3)
    names = param_names(3)
    assert len(names) == 3 + 11 * 3 + 4 and len(set(names)) == len(names)
    assert names[:3] == ("image_emb.weight", "image_row.weight", "image_col.weight")
    assert names[3] == "layers.0.attn.norm.weight" and names[-1] == "to_image_logits.bias"
    sd = dict(m.named_parameters())
    assert all(p is sd[n] for n, p in zip(names, m.decode_params()))
    # the per-layer block repeats with the layer index and nothing else
    assert [n.replace("layers.0.", "") for n in names[3:14]] == [n.replace("layers.2.", "") for n in names[25:36]]
    with pytest.raises(ValueError, match="depth must be >= 1"):
        torch.ops.dalle_fast._build_decode_step_param_names(0)


def _corrupt(m, a, what):
    """The op's arguments `a` with one thing wrong, in the LAST layer where it is per layer: every layer
    before it would have been written if the op checked as it went."""
    a = list(a)
    p, last = list(a[2]), len(m.layers) - 1
    a[2] = p
    at = {n: i for i, n in enumerate(param_names(len(m.layers)))}
    lp = lambda field: at[f"layers.{last}.{field}"]  # noqa: E731
    if what == "negative text_len":  # position = text_len + index < 0 would count from the cache's end
        a[6] = -a[6] - 1
    elif what == "index past the image":
        a[1] = m.config.image_len
    elif what == "negative index":
        a[1] = -1
    elif what == "bad kind in the last layer":
        a[5] = a[5][:-1] + ["diagonal"]
    elif what == "one kind too many":
        a[5] = a[5] + ["row"]
    elif what == "a parameter missing":
        a[2] = p[:-1]
    elif what == "fc2 bias of the wrong size":
        p[lp("mlp.fc2.bias")] = p[lp("mlp.fc2.bias")][:-1]
    elif what == "norm in another dtype":
        p[lp("mlp.norm.weight")] = p[lp("mlp.norm.weight")].double()
    elif what == "fc2 in another dtype than fc1":
        p[lp("mlp.fc2.weight")] = p[lp("mlp.fc2.weight")].double()
    elif what == "qkv of the wrong width":
        p[lp("attn.attn.to_qkv.weight")] = p[lp("attn.attn.to_qkv.weight")][:-3]
    elif what == "integer parameter":
        p[lp("attn.attn.to_out.bias")] = p[lp("attn.attn.to_out.bias")].long()
    elif what == "head bias of the wrong size":
        p[-1] = p[-1][:-1]
    elif what == "parameter on another device":
        p[lp("mlp.fc1.bias")] = p[lp("mlp.fc1.bias")].to("meta")
    elif what == "short cache in the last layer":
        a[3] = a[3][:-1] + [a[3][-1][:, :, :m.config.text_len]]
    elif what == "k and v caches of different dtypes":
        a[4] = a[4][:-1] + [a[4][-1].double()]
    elif what == "cache with the wrong heads":
        a[3] = a[3][:-1] + [a[3][-1][:, :1]]
    elif what == "integer caches":
        a[3] = a[3][:-1] + [a[3][-1].long()]
        a[4] = a[4][:-1] + [a[4][-1].long()]
    elif what == "token past the vocabulary":
        a[0] = a[0].clone()
        a[0][-1] = m.config.num_image_tokens
    elif what == "negative token":
        a[0] = a[0].clone()
        a[0][0] = -1
    elif what == "2-D tokens":
        a[0] = a[0][:, None]
    elif what == "heads of 0":
        a[9] = 0
    elif what == "image_size of another model":
        a[7] = a[7] + 1
    elif what == "even conv kernel":
        a[8] = 2
    elif what == "NaN scale":
        a[11] = float("nan")
    elif what == "negative eps":
        a[10] = -1.0
    else:
        raise AssertionError(what)
    return a


BAD = {  # what is wrong -> what the error says
    "negative text_len": "text_len must be >= 0",
    "index past the image": "index must be in",
    "negative index": "index must be in",
    "bad kind in the last layer": "kind must be one of 'full', 'row', 'column', 'conv', got 'diagonal'",
    "one kind too many": "parameters for 5 layers",
    "a parameter missing": "parameters for 4 layers",
    "fc2 bias of the wrong size": r"params\[\d+\] \(layers.3.mlp.fc2.bias\) must have shape \[32\]",
    "norm in another dtype": r"layers.3.mlp.norm.weight\) must be Float",
    "fc2 in another dtype than fc1": r"layers.3.mlp.fc2.weight\) must be Float",
    "qkv of the wrong width": r"layers.3.attn.attn.to_qkv.weight\) must have shape",
    "integer parameter": r"layers.3.attn.attn.to_out.bias\) must be floating",
    "head bias of the wrong size": r"to_image_logits.bias\) must have shape",
    "parameter on another device": r"layers.3.mlp.fc1.bias\) is on meta",
    "short cache in the last layer": "layer 3's caches must be",
    "k and v caches of different dtypes": "layer 3's caches must share one floating dtype",
    "cache with the wrong heads": "layer 3's caches must be",
    "integer caches": "layer 3's caches must share one floating dtype",
    "token past the vocabulary": r"tokens must be in \[0, 32\)",
    "negative token": r"tokens must be in \[0, 32\)",
    "2-D tokens": r"tokens must be \(B,\)",
    "heads of 0": "heads must be >= 1",
    "image_size of another model": r"image_row.weight\) must have shape",
    "even conv kernel": "conv_kernel must be odd",
    "NaN scale": "scale must be finite",
    "negative eps": "eps must be finite and >= 0",
}


@pytest.mark.parametrize("what", sorted(BAD))
def test_every_bad_argument_raises_before_any_cache_is_written(what):
    m = model(depth=4, attention_kinds=["row", "column", "full", "conv"])
    with torch.no_grad():
        a = _op_args(m, batch=2, index=3)
        for c in a[3] + a[4]:
            c.normal_()  # a write of the step's k/v anywhere would change them
        before = [c.clone() for c in a[3] + a[4]]
        bad = _corrupt(m, a, what)
        with pytest.raises((ValueError, TypeError)) as e:
            transformer_decode_step(*bad)
        assert e.match(BAD[what])
        assert all(torch.equal(c, b) for c, b in zip(a[3] + a[4], before)), f"{what}: a cache was written"
        # and the good call still runs and writes at text_len + index
        transformer_decode_step(*a)
        pos = m.config.text_len + 3
        assert all(not torch.equal(c[:, :, pos], b[:, :, pos]) for c, b in zip(a[3] + a[4], before))


def test_selftest_rows_pass():
    from dalle_fast.selftest import decode_step_rows
    rows = decode_step_rows("cpu")
    assert len(rows) == 3 and all(err <= tol for _, _, _, err, tol in rows), rows


@pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device and the CUDA kernels")
def test_fused_step_on_cuda():
    from dalle_fast.selftest import decode_step_rows
    rows = decode_step_rows("cuda")
    assert all(err <= tol for _, _, _, err, tol in rows), rows
    m = model(2, depth=4, text_len=5, image_size=4).cuda()
    text, _ = inputs(m.config, 3)
    text = text.cuda()
    a = sample_tokens(m, text, generator=torch.Generator("cuda").manual_seed(0))
    b = sample_tokens(m, text, generator=torch.Generator("cuda").manual_seed(0), use_cache=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_paper_mixed_precision_sampling(dtype):
    """cast_resblocks_: 16-bit branch matrices and KV caches, fp32 residual stream, gains, embeddings and
    heads; the fused step matches the module path, both within twice the all-16-bit model's error."""
    m = model(4, depth=4, text_len=5, image_size=4, dim=48, heads=3, dim_head=16)
    text, image = inputs(m.config, 2)
    ref64, _ = run_steps(_as(m, torch.float64), text, image, 10, fused=False)
    mixed = _as(m, torch.float32).cast_resblocks_(dtype)
    assert mixed.layers[0].mlp.fc1.weight.dtype == dtype and mixed.layers[0].attn.attn.to_qkv.weight.dtype == dtype
    assert mixed.layers[0].mlp.norm.weight.dtype == torch.float32
    assert mixed.to_image_logits.weight.dtype == mixed.image_emb.weight.dtype == torch.float32
    assert mixed.new_kv_caches(1)[0].k.dtype == dtype
    mod, _ = run_steps(mixed, text, image, 10, fused=False)
    got, _ = run_steps(mixed, text, image, 10, fused=True)
    assert got.dtype == torch.float32
    assert max_abs_err(got, mod) <= 0.25 * max_abs_err(mod, ref64) + 1e-6
    all16, _ = run_steps(_as(m, dtype), text, image, 10, fused=False)
    assert max_abs_err(got, ref64) <= low_precision_tolerance(ref64, all16)
    # and the full forward (training path, prefill) runs mixed too
    with torch.no_grad():
        full = mixed(text, image)[1]
    assert max_abs_err(full[:, :11], ref64) <= low_precision_tolerance(ref64, all16)


@pytest.mark.parametrize("dim,heads,dim_head,batch", [(40, 3, 12, 1), (24, 1, 8, 3), (72, 2, 20, 5), (64, 4, 16, 70)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_step_odd_widths(dim, heads, dim_head, batch, dtype):
    """Widths that are no multiple of the kernels' vectors (16 floats, 32 bf16) or row blocks (8), and a
    batch past the small-batch GEMV (70 rows go to at::linear): the fused step equals the module path."""
    m = model(6, depth=2, text_len=3, image_size=3, dim=dim, heads=heads, dim_head=dim_head, num_image_tokens=37)
    text, image = inputs(m.config, batch)
    ref64, _ = run_steps(_as(m, torch.float64), text, image, 6, fused=False)
    net = _as(m, torch.float32) if dtype == torch.float32 else _as(m, torch.float32).cast_resblocks_(dtype)
    mod, _ = run_steps(net, text, image, 6, fused=False)
    got, _ = run_steps(net, text, image, 6, fused=True)
    if dtype == torch.float32:
        assert max_abs_err(got, mod) < 1e-5
    else:
        assert max_abs_err(got, ref64) <= 2 * max_abs_err(mod, ref64) + 1e-6
