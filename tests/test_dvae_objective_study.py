"""The diagnostics of scripts/dvae_objective_study.py: the per-code mean vs median reconstruction and
the per-step encoder / decoder diagnostics (the README's dVAE study rests on them)."""
import os
import sys
import types

import pytest
import torch

from dalle_fast.models.dvae import DiscreteVAE, DVAEConfig

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import dvae_objective_study as study  # noqa: E402


def _fake_model(encode):
    """Only what code_mean_vs_median reads: image_size, config.downsample and encode."""
    return types.SimpleNamespace(image_size=32, config=types.SimpleNamespace(downsample=8), encode=encode)


def test_code_mean_vs_median_separates_what_codes_carry():
    torch.set_num_threads(1)
    # one code for every patch: both decoders draw one average patch; the median (black: objects are
    # a minority of every pixel) keeps no object pixel, the mean is closer than black
    one = study.code_mean_vs_median(_fake_model(lambda x: torch.zeros(x.shape[0], 4, 4, dtype=torch.long)), n=64)
    assert one["codes_used"] == 1 and one["codes_used_by_object_patches"] == 1
    assert one["median_keeps_object_pixels"] == 0.0
    assert one["code_mean_psnr"] > one["code_median_psnr"]

    # a code per distinct patch content (here: the patch's own bytes hashed): exact reconstructions
    def exact(x):
        p = torch.nn.functional.unfold(x, 8, stride=8).transpose(1, 2)            # (B, 16, 192)
        keys = [hash(row.numpy().tobytes()) for row in p.reshape(-1, p.shape[-1])]
        ids = {k: i for i, k in enumerate(dict.fromkeys(keys))}
        return torch.tensor([ids[k] for k in keys]).reshape(x.shape[0], 4, 4)
    ex = study.code_mean_vs_median(_fake_model(exact), n=64)
    assert ex["median_keeps_object_pixels"] == 1.0
    assert 1 < ex["codes_used_by_object_patches"] < ex["codes_used"]    # the all-black patches share a code
    assert ex["code_mean_psnr"] > 100 and ex["code_median_psnr"] > 100


def test_step_diagnostics_rows():
    torch.manual_seed(0)
    m = DiscreteVAE(DVAEConfig.tiny())
    x = torch.zeros(2, 3, 32, 32)
    x[:, 0, 4:12, 4:12] = 1.0                                                     # a red square on black
    out = m(x, tau=1.0, beta=2.0)
    d = study.StepDiagnostics()
    d(3, m, out, x, {"tau": 1.0, "beta": 2.0})                                  # not a diagnostic step
    d(0, m, out, x, {"tau": 1.0, "beta": 2.0})
    assert len(d.rows) == 1
    r = d.rows[0]
    assert r["step"] == 0 and r["grad_recon"] > 0 and r["grad_kl"] > 0
    obj_patches = torch.zeros(2, 4, 4, dtype=torch.bool)
    obj_patches[:, 0:2, 0:2] = True                                              # the square touches 2x2 patches
    assert r["codes_object_patches"] == out["tokens"][obj_patches].unique().numel()
    assert r["codes_background_patches"] == out["tokens"][~obj_patches].unique().numel()
    assert 0 < r["entropy"] <= torch.log(torch.tensor(64.0)).item() + 1e-5
    stats = out["stats"].detach()
    obj = (x.amax(1, keepdim=True) > 0.5).expand_as(x)                          # every channel of an object pixel
    assert r["ln_b_object"] == pytest.approx(stats[:, 3:][obj].mean().item(), rel=1e-5)
    assert r["ln_b_background"] == pytest.approx(stats[:, 3:][~obj].mean().item(), rel=1e-5)
    out["loss"].backward()                                                       # the graph is still usable
    assert all(p.grad is not None for p in m.parameters())
