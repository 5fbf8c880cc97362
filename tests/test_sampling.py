"""sample_logits: the distribution it draws from, filters, bad logits."""
import math

import pytest
import torch

from dalle_fast.generate import sample_logits


def _chi2_pvalue(counts, probs):
    """Upper tail of Pearson's chi-square (Wilson-Hilferty normal approximation)."""
    n = counts.sum()
    expected = probs * n
    stat = float(((counts - expected) ** 2 / expected).sum())
    k = len(probs) - 1
    z = ((stat / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
    return 0.5 * math.erfc(z / math.sqrt(2))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_draws_follow_softmax(temperature):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 12, generator=g) * 2
    draws = torch.cat([sample_logits(logits.expand(4000, -1), temperature, generator=g) for _ in range(5)])
    counts = torch.bincount(draws, minlength=12).double()
    probs = (logits[0].double() / temperature).softmax(-1)
    assert _chi2_pvalue(counts, probs) > 1e-4


def test_a_wrong_temperature_is_detected():
    # the chi-square check above can fail: samples at temperature 1 do not fit temperature 2's softmax
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 12, generator=g) * 2
    draws = torch.cat([sample_logits(logits.expand(4000, -1), 1.0, generator=g) for _ in range(5)])
    counts = torch.bincount(draws, minlength=12).double()
    assert _chi2_pvalue(counts, (logits[0].double() / 2.0).softmax(-1)) < 1e-6


def test_zero_probability_tokens_are_never_drawn():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 8192, generator=g)
    for _ in range(20):
        draws = sample_logits(logits, top_k=3, generator=g)
        top = logits.topk(3, dim=-1).indices
        assert (top == draws[:, None]).any(-1).all()
    # -inf logits (as the filters leave) and the first and last positions
    masked = torch.full((3, 5), float("-inf"))
    masked[0, 0] = masked[1, 4] = 0.0
    masked[2, 2] = masked[2, 3] = 1.0
    for _ in range(50):
        d = sample_logits(masked, generator=g).tolist()
        assert d[0] == 0 and d[1] == 4 and d[2] in (2, 3)


def test_seeded_draws_repeat():
    logits = torch.randn(8, 100)
    a = sample_logits(logits, generator=torch.Generator().manual_seed(3))
    b = sample_logits(logits, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_logits_without_mass_raise(bad):
    logits = torch.zeros(2, 10)
    logits[1] = bad
    with pytest.raises(ValueError, match="NaN or no finite value"):
        sample_logits(logits)
