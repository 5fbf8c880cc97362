"""Whole graphs, no host syncs: the DALLE and dVAE training steps compile with torch.compile(fullgraph=True)
(no graph break), the compiled loss and gradients equal eager's, and bad token ids still raise a clear
error in eager mode. The "aot_eager" backend traces forward and backward through our fake kernels and
autograd registrations exactly as inductor would see them, without spending minutes generating C++."""
import pytest
import torch

from dalle_fast.models.dalle import DALLE, DALLEConfig
from dalle_fast.models.dvae import DiscreteVAE, DVAEConfig


def _dalle_loss(model, text, image):
    return model(text, image, return_loss=True)[0]


def _dvae_loss(model, images):
    return model(images, tau=0.9, beta=0.1, mse_weight=0.5)["loss"]


def _dalle_case():
    torch.manual_seed(0)
    cfg = DALLEConfig.tiny(depth=4, backend="fused")
    m = DALLE(cfg)
    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, cfg.num_text_tokens, (2, cfg.text_len), generator=g)
    text[:, -2:] = 0  # padding
    image = torch.randint(0, cfg.num_image_tokens, (2, cfg.image_len), generator=g)
    return m, (text, image)


def _dvae_case():
    torch.manual_seed(0)
    m = DiscreteVAE(DVAEConfig.tiny(), backend="fused")
    images = torch.rand(2, m.config.input_channels, m.config.image_size, m.config.image_size,
                        generator=torch.Generator().manual_seed(0))
    return m, (images,)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case,loss_fn", [(_dalle_case, _dalle_loss), (_dvae_case, _dvae_loss)],
                         ids=["dalle", "dvae"])
def test_training_step_is_one_graph(case, loss_fn):
    torch._dynamo.reset()
    model, args = case()
    explained = torch._dynamo.explain(loss_fn)(model, *args)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    # the whole step (loss and backward) compiled in one graph matches eager, gradients included (the same
    # torch.manual_seed gives the dVAE's Gumbel kernel the same seed tensor in both)
    torch.manual_seed(123)
    eager = loss_fn(model, *args)
    eager.backward()
    want = _grads(model)
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    torch.manual_seed(123)
    got = compiled(model, *args)
    got.backward()
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-6)
    grads = _grads(model)
    assert set(grads) == set(want) and len(want) == len(list(model.parameters()))
    for n in want:
        torch.testing.assert_close(grads[n], want[n], rtol=1e-4, atol=1e-6, msg=n)


def test_bad_token_ids_raise_clearly_in_eager_mode_and_abort_compiled_steps():
    model, (text, image) = _dalle_case()
    bad = image.clone()
    bad[1, 3] = model.config.num_image_tokens
    with pytest.raises(ValueError, match=r"image tokens must be in \[0, 32\), got \[\d+, 32\]"):
        model(text, bad, return_loss=True)
    with pytest.raises(ValueError, match=r"text ids must be in \[0, 64\), got \[-1, \d+\]"):
        model(torch.where(text == 0, -1, text), image)
    torch._dynamo.reset()
    compiled = torch.compile(_dalle_loss, fullgraph=True, backend="aot_eager")
    compiled(model, text, image)  # good ids: fine
    with pytest.raises(RuntimeError, match="image tokens must be in"):
        compiled(model, text, bad)
