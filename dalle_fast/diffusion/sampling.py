"""DDPM and DDIM sampling with classifier-free guidance and Imagen's thresholding.

Every step is one call of the fused op dalle_fast.ops.diffusion.guided_step: guidance
pred = uncond + w (cond - uncond), the x0 estimate, thresholding of x0 (dynamic: s = max(1, the p-th
percentile of |x0| per sample), x0 = clamp(x0, -s, s) / s; static: clamp to [-1, 1]; or none), and the
DDPM posterior or DDIM update to x_{t-1}, its noise drawn in-kernel (Philox, a seed drawn from the
caller's generator, the step index as offset). Respaced steps (fewer than the schedule's T) use the
alpha_bar of the visited steps, so DDPM's posterior is that of the respaced chain.

The conditional and unconditional predictions come from ONE model call on a batch of 2B
(cfg_batch='pair'): the model selects its learned null condition by a mask, so both halves share
every kernel launch and weight read. cfg_batch='two' runs two calls of B (the baseline to measure).
"""
import torch

from ..ops.diffusion import guided_step
from .schedule import NoiseSchedule, check_parameterisation

SAMPLERS = ("ddpm", "ddim")
THRESHOLDS = ("dynamic", "static", "none")


def check_guidance(w):
    if not isinstance(w, (int, float)) or isinstance(w, bool) or not w >= 0:
        raise ValueError(f"guidance weight w must be a number >= 0, got {w!r}")
    return float(w)


def check_percentile(p):
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 < p <= 1:
        raise ValueError(f"percentile must lie in (0, 1], got {p!r}")
    return float(p)


@torch.no_grad()
def sample(model_fn, shape, schedule: NoiseSchedule, steps=50, sampler="ddim", eta=None, guidance=1.0,
           param="eps", threshold="dynamic", percentile=0.995, cfg_batch="pair", generator=None,
           device="cpu", x_T=None, progress=False):
    """Draws a batch of `shape` = (B, ...) by reverse diffusion.

    model_fn(x (N, ...), t (N,) int64, drop (N,) bool) -> prediction (N, ...), where drop marks the
    samples that take the null condition; N = 2B for the guided pair, B otherwise. guidance w:
    w = 1 is the conditional model alone (one pass of B), w = 0 the unconditional one."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if cfg_batch not in ("pair", "two"):
        raise ValueError(f"cfg_batch must be 'pair' or 'two', got {cfg_batch!r}")
    w = check_guidance(guidance)
    check_percentile(percentile)
    check_parameterisation(param)
    if threshold not in THRESHOLDS:
        raise ValueError(f"threshold must be one of {THRESHOLDS}, got {threshold!r}")
    eta = 0.0 if eta is None else float(eta)
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    B = shape[0]
    x = torch.randn(shape, generator=generator, device=device) if x_T is None else x_T.to(device)
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"x_T shape {tuple(x.shape)} does not match shape {tuple(shape)}")
    ts = schedule.sampling_steps(steps).tolist()
    keep_cond = torch.zeros(B, dtype=torch.bool, device=device)
    drop_all = torch.ones(B, dtype=torch.bool, device=device)
    it = ts
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(ts, desc="diffusion", leave=False)
    for i, t in enumerate(it):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        tt = torch.full((B,), t, dtype=torch.long, device=device)
        if w == 1.0:
            cond, uncond = model_fn(x, tt, keep_cond), None
        elif w == 0.0:
            cond, uncond = model_fn(x, tt, drop_all), None
        elif cfg_batch == "pair":
            both = model_fn(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([keep_cond, drop_all]))
            cond, uncond = both[:B], both[B:]
        else:
            cond, uncond = model_fn(x, tt, keep_cond), model_fn(x, tt, drop_all)
        a_t = float(schedule.alphas_cumprod[t])
        a_prev = float(schedule.alphas_cumprod[t_prev]) if t_prev >= 0 else 1.0
        x = guided_step(cond.to(x.dtype), None if uncond is None else uncond.to(x.dtype), x, a_t, a_prev,
                        guidance=w, parameterization=param, sampler=sampler, eta=eta, threshold=threshold,
                        percentile=percentile, generator=generator, offset=i)
    return x
