"""scripts/rerank_auc.py: the within-prompt ranking measure, and that its reranked figures from saved
samples equal quality.evaluate()'s with the same scores."""
import importlib.util
import math
import os

import pytest
import torch

from dalle_fast.data.shapes import Shapes
from dalle_fast.eval.quality import default_prompts, evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("rerank_auc", os.path.join(ROOT, "scripts", "rerank_auc.py"))
rerank_auc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rerank_auc)


def test_pair_auc():
    right = torch.tensor([True, True, False, False])
    assert rerank_auc.pair_auc(torch.tensor([3.0, 2.0, 1.0, 0.0]), right) == 1.0
    assert rerank_auc.pair_auc(torch.tensor([0.0, 1.0, 2.0, 3.0]), right) == 0.0
    # right (3, 1) against wrong (2, 1): 3>2, 3>1, 1<2, a tie 1=1 -> (1 + 1 + 0 + 0.5) / 4
    assert rerank_auc.pair_auc(torch.tensor([3.0, 1.0, 2.0, 1.0]), right) == pytest.approx(2.5 / 4)
    assert rerank_auc.pair_auc(torch.tensor([1.0, 2.0]), torch.tensor([True, True])) is None


def test_saved_samples_rerank_as_evaluate_does(tmp_path):
    prompts = default_prompts()[::6]
    ds = Shapes(400, seed=9)
    n, keep = 6, 2

    def sample(captions, k):  # drawn scenes, right or wrong for the caption: verdicts of both kinds
        return torch.stack([torch.stack([ds[(7 * i + j) % 400][0] for j in range(k)]) for i in range(len(captions))])

    def score(images, captions):
        return images.mean((1, 2, 3)) + torch.linspace(0, 1e-3, len(images))

    plain = evaluate(sample, prompts, n=n, keep=keep)
    path = str(tmp_path / "s.safetensors")
    rerank_auc.save_samples(plain, path)
    images, verdicts, meta = rerank_auc.load_samples(path)
    assert images.shape == (len(prompts), n, 3, 64, 64) and meta["n"] == n
    torch.testing.assert_close(images, plain.images, atol=1 / 255, rtol=0)
    scores = score(images.flatten(0, 1), None).view(len(prompts), n)
    got = rerank_auc.ranking_report(scores, verdicts, meta, keep)
    want = evaluate(sample, prompts, n=n, keep=keep, score=score).summary
    for setting in ("reranked", "unreranked"):
        for group in ("seen", "heldout", "all"):
            for m, v in want[setting][group].items():
                g = got["summary"][setting][group][m]
                assert (g is None and v is None) or math.isclose(g, v), (setting, group, m, g, v)
    assert got["shape_prompts"] > 0 and 0 <= got["shape_auc"] <= 1
    # a ranker that knows the judge's shape verdicts orders every (right, wrong) pair right
    oracle = rerank_auc.ranking_report(torch.nan_to_num(verdicts[..., meta["fields"].index("shape")]), verdicts,
                                       meta, keep)
    assert oracle["shape_auc"] == 1.0
