"""dalle_fast.diffusion: schedules against closed forms, parameterisations, samplers (the fused
guided_step op in a loop; the op itself is tested in test_diffusion_ops.py) on a Gaussian data
distribution with its exact optimal denoiser, the guided pair, the U-Net's conditioning, bad input."""
import math

import pytest
import torch

from dalle_fast.diffusion import NoiseSchedule, UNet, UNetConfig, sample, slerp


# ---- schedules -------------------------------------------------------------------------------------
def test_cosine_schedule_closed_form():
    T, s = 1000, 0.008
    sch = NoiseSchedule("cosine", T, cosine_s=s)
    f = lambda u: math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 1, 10, 250, 500, 900):  # far from the end, where no beta is clipped at 0.999
        assert sch.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-10)
    assert bool((sch.betas <= 0.999).all()) and bool((sch.betas > 0).all())
    assert bool((sch.alphas_cumprod[1:] < sch.alphas_cumprod[:-1]).all())


def test_linear_schedule_closed_form():
    sch = NoiseSchedule("linear", 100, beta_start=1e-3, beta_end=0.05)
    for t in (0, 7, 99):
        expect = math.prod(1 - (1e-3 + (0.05 - 1e-3) * i / 99) for i in range(t + 1))
        assert sch.alphas_cumprod[t].item() == pytest.approx(expect, rel=1e-10)


@pytest.mark.parametrize("param", ["eps", "v", "x0"])
def test_parameterisations_round_trip(param):
    sch = NoiseSchedule("cosine", 1000)
    torch.manual_seed(0)
    x0, noise = torch.randn(5, 3, 4, 4, dtype=torch.float64), torch.randn(5, 3, 4, 4, dtype=torch.float64)
    t = torch.tensor([0, 10, 400, 800, 998])
    x_t = sch.q_sample(x0, t, noise)
    rx0, reps = sch.predict_x0_eps(sch.target(x0, noise, t, param), x_t, t, param)
    torch.testing.assert_close(rx0, x0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(reps, noise, rtol=1e-6, atol=1e-6)


def test_sampling_steps_respacing():
    sch = NoiseSchedule("linear", 1000)
    ts = sch.sampling_steps(50)
    assert ts[0] == 999 and ts[-1] == 0 and len(ts) == 50 and bool((ts[1:] < ts[:-1]).all())


# ---- samplers on a known distribution --------------------------------------------------------------
def _gaussian_denoiser(sch, mu, std):
    """The exact E[eps | x_t] for data x0 ~ N(mu, std^2) per coordinate."""
    def fn(x, t, drop):
        ab = sch.alpha_bar(t).to(x.dtype)[:, None]
        a, s = ab.sqrt(), (1 - ab).sqrt()
        return s * (x - a * mu) / (a * a * std * std + s * s)
    return fn


@pytest.mark.parametrize("sampler,steps", [("ddpm", 100), ("ddim", 50)])
@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_sampler_recovers_gaussian(sampler, steps, kind):
    sch = NoiseSchedule(kind, 1000)
    mu, std = torch.tensor([0.5, -0.3, 0.0, 0.8]), torch.tensor([0.3, 0.5, 0.1, 0.2])
    g = torch.Generator().manual_seed(0)
    x = sample(_gaussian_denoiser(sch, mu, std), (8000, 4), sch, steps=steps, sampler=sampler, threshold="none",
               generator=g)
    torch.testing.assert_close(x.mean(0), mu, atol=0.02, rtol=0)
    torch.testing.assert_close(x.std(0), std, atol=0.03, rtol=0.08)


def test_guided_pair_equals_two_passes_and_w1_is_conditional():
    sch = NoiseSchedule("cosine", 1000)
    mus = {False: torch.tensor([0.5, 0.5]), True: torch.tensor([-0.5, 0.0])}
    std = torch.tensor([0.2, 0.2])
    calls = []

    def fn(x, t, drop):
        calls.append(x.shape[0])
        out = torch.stack([_gaussian_denoiser(sch, mus[bool(d)], std)(x[i:i + 1], t[i:i + 1], None)[0]
                           for i, d in enumerate(drop)])
        return out

    kw = dict(steps=10, sampler="ddim", threshold="none", guidance=2.0)
    a = sample(fn, (4, 2), sch, cfg_batch="pair", generator=torch.Generator().manual_seed(0), **kw)
    assert calls == [8] * 10
    calls.clear()
    b = sample(fn, (4, 2), sch, cfg_batch="two", generator=torch.Generator().manual_seed(0), **kw)
    assert calls == [4] * 20
    torch.testing.assert_close(a, b)
    calls.clear()
    c = sample(fn, (4, 2), sch, steps=10, guidance=1.0, threshold="none", generator=torch.Generator().manual_seed(0))
    assert calls == [4] * 10
    # deterministic DDIM with the exact denoiser of N(mu, 0.2^2) lands near mu for every start
    assert float((c - mus[False]).abs().max()) < 0.8


# ---- U-Net ---------------------------------------------------------------------------------------------
def _tiny_unet(**kw):
    cfg = dict(image_size=16, base=8, mults=(1, 2), res_blocks=(1, 2), attn_levels=(1,), heads=2, cond_dim=6)
    cfg.update(kw)
    torch.manual_seed(0)
    net = UNet(UNetConfig(**cfg))
    for p in net.parameters():  # zero-initialised outputs would make every test below trivially pass
        torch.nn.init.normal_(p, std=0.2)
    return net.eval()


def test_unet_shapes_and_condition_matters():
    net = _tiny_unet()
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([0, 5, 999])
    c1, c2 = torch.randn(3, 4, 6), torch.randn(3, 4, 6)
    y1 = net(x, t, c1)
    assert y1.shape == x.shape
    assert not torch.allclose(y1, net(x, t, c2))
    # masked-out tokens do not matter
    mask = torch.tensor([[1, 1, 0, 0]] * 3, dtype=torch.bool)
    c3 = c1.clone()
    c3[:, 2:] = 100
    torch.testing.assert_close(net(x, t, c1, mask), net(x, t, c3, mask))


def test_unet_null_condition_and_pair_batch():
    net = _tiny_unet()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    c1, c2 = torch.randn(2, 5, 6), torch.randn(2, 5, 6)
    drop = torch.tensor([True, True])
    torch.testing.assert_close(net(x, t, c1, drop=drop), net(x, t, c2, drop=drop))  # null ignores cond
    pair = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([c1, c1]), drop=torch.tensor([0, 0, 1, 1]).bool())
    torch.testing.assert_close(pair[:2], net(x, t, c1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(pair[2:], net(x, t, c1, drop=drop), atol=1e-5, rtol=1e-4)


def test_unet_embedding_tokens_and_super_resolution():
    net = _tiny_unet(cond_dim=8, embed_tokens=3)
    assert net(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), torch.randn(2, 8)).shape == (2, 3, 16, 16)
    sr = _tiny_unet(cond_dim=0, attn_levels=(), low_res_channels=3)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    lo = torch.randn(2, 3, 8, 8)
    y = sr(x, t, low_res=lo, aug_t=torch.tensor([0, 0]))
    assert y.shape == x.shape
    assert not torch.allclose(y, sr(x, t, low_res=lo, aug_t=torch.tensor([100, 100])))  # aug level conditions


def test_min_snr_weight_is_min_snr_in_x0_terms():
    """For every parameterisation, weight * ||target error||^2 is min(SNR, gamma) * ||x0 error||^2."""
    sch = NoiseSchedule("cosine", 1000)
    t = torch.tensor([0, 10, 300, 700, 999])
    snr = sch.snr(t)
    torch.testing.assert_close(snr, sch.alphas_cumprod[t] / (1 - sch.alphas_cumprod[t]))
    x0, noise = torch.randn(5, 3, 4, 4, dtype=torch.float64), torch.randn(5, 3, 4, 4, dtype=torch.float64)
    x_t = sch.q_sample(x0, t, noise)
    dx0 = 1e-3 * torch.randn_like(x0)  # a small error in x0, the prediction that implies it per param
    a, s = sch.alpha_bar(t).sqrt().view(-1, 1, 1, 1), (1 - sch.alpha_bar(t)).sqrt().view(-1, 1, 1, 1)
    for param in ("eps", "v", "x0"):
        target = sch.target(x0, noise, t, param)
        pred = sch.target(x0 + dx0, (x_t - a * (x0 + dx0)) / s, t, param)
        w = sch.min_snr_weight(t, param, 5.0).double()
        lhs = w * (pred - target).pow(2).flatten(1).sum(1)
        rhs = snr.clamp(max=5.0) * dx0.pow(2).flatten(1).sum(1)
        torch.testing.assert_close(lhs, rhs, rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="gamma"):
        sch.min_snr_weight(t, "v", 0.0)


def test_slerp():
    a, b = torch.nn.functional.normalize(torch.randn(2, 16), dim=-1)
    z = slerp(a, b, torch.linspace(0, 1, 5))
    torch.testing.assert_close(z[0], a)
    torch.testing.assert_close(z[-1], b)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(5))
    angles = torch.arccos((z[:-1] * z[1:]).sum(-1).clamp(-1, 1))
    torch.testing.assert_close(angles, angles[:1].expand(4), atol=1e-5, rtol=1e-4)  # constant angular speed


# ---- bad input -------------------------------------------------------------------------------------
def test_bad_input_raises_clear_errors():
    sch = NoiseSchedule("cosine", 100)
    fn = lambda x, t, d: torch.zeros_like(x)  # noqa: E731
    with pytest.raises(ValueError, match="guidance weight w"):
        sample(fn, (2, 3), sch, steps=2, guidance=-1.0)
    with pytest.raises(ValueError, match="percentile"):
        sample(fn, (2, 3), sch, steps=2, percentile=0.0)
    with pytest.raises(ValueError, match="threshold"):
        sample(fn, (2, 3), sch, steps=2, threshold="soft")
    with pytest.raises(ValueError, match="sampler"):
        sample(fn, (2, 3), sch, steps=2, sampler="euler")
    with pytest.raises(ValueError, match="steps"):
        sample(fn, (2, 3), sch, steps=101)
    with pytest.raises(ValueError, match="x_T shape"):
        sample(fn, (2, 3), sch, steps=2, x_T=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="shape"):  # a model output of the wrong shape
        sample(lambda x, t, d: torch.zeros(x.shape[0], 4), (2, 3), sch, steps=2)
    with pytest.raises(ValueError, match="schedule kind"):
        NoiseSchedule("quadratic")
    with pytest.raises(ValueError, match="t must lie"):
        sch.q_sample(torch.zeros(2, 3), torch.tensor([0, 100]), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="noise shape"):
        sch.q_sample(torch.zeros(2, 3), torch.tensor([0, 1]), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="parameterisation"):
        sch.target(torch.zeros(1), torch.zeros(1), torch.tensor([0]), "score")
    net = _tiny_unet()
    with pytest.raises(ValueError, match="cond must be tokens"):
        net(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), torch.randn(2, 4, 7))
    with pytest.raises(ValueError, match="cond has batch"):
        net(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), torch.randn(3, 4, 6))
    with pytest.raises(ValueError, match="x must be"):
        net(torch.randn(2, 4, 16, 16), torch.tensor([1, 2]), torch.randn(2, 4, 6))
    with pytest.raises(ValueError, match="cond_mask shape"):
        net(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), torch.randn(2, 4, 6), torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="mults"):
        UNetConfig(mults=(1, 2), res_blocks=(1,))
