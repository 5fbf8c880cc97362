"""DDPM and DDIM sampling with classifier-free guidance and Imagen's thresholding.

One sampling step (`guided_step`) does: guidance pred = uncond + w (cond - uncond); the x0 estimate;
thresholding of x0 (dynamic: s = max(1, the p-th percentile of |x0| per sample), x0 = clamp(x0, -s, s) / s;
static: clamp to [-1, 1]; or none); eps recomputed from the thresholded x0; then the DDIM update
  x_prev = alpha_prev x0 + sqrt(1 - alpha_bar_prev - c^2) eps + c z,
  c = eta sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_prev),
whose eta = 1 is exactly the DDPM posterior q(x_prev | x_t, x0) (so 'ddpm' is eta = 1).

The conditional and unconditional predictions come from ONE model call on a batch of 2B
(cfg_batch='pair'): the model selects its learned null condition by a mask, so both halves share
every kernel launch and weight read. cfg_batch='two' runs two calls of B (the baseline to measure).
"""
import torch

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


def dynamic_threshold(x0, percentile=0.995):
    """Imagen's dynamic thresholding: s = max(1, quantile(|x0|, percentile) per sample),
    clamp(x0, -s, s) / s. Plain-torch stand-in until the fused op lands."""
    check_percentile(percentile)
    flat = x0.detach().float().abs().flatten(1)
    s = torch.quantile(flat, percentile, dim=1).clamp(min=1.0).view((-1,) + (1,) * (x0.dim() - 1))
    s = s.to(x0.dtype)
    return torch.maximum(torch.minimum(x0, s), -s) / s


def guided_step(cond, uncond, x_t, w, alpha_bar_t, alpha_bar_prev, param="eps", threshold="dynamic",
                percentile=0.995, eta=0.0, noise=None):
    """x_{t-1} (and the thresholded x0) from one step's predictions; alpha_bar_* are Python floats
    (every sample of a batch is at the same step). `uncond` may be None (w is then ignored)."""
    check_parameterisation(param)
    if threshold not in THRESHOLDS:
        raise ValueError(f"threshold must be one of {THRESHOLDS}, got {threshold!r}")
    if cond.shape != x_t.shape or (uncond is not None and uncond.shape != x_t.shape):
        raise ValueError(f"predictions {tuple(cond.shape)} / {None if uncond is None else tuple(uncond.shape)} "
                         f"must match x_t {tuple(x_t.shape)}")
    pred = cond if uncond is None else uncond + check_guidance(w) * (cond - uncond)
    a_t, s_t = alpha_bar_t ** 0.5, (1 - alpha_bar_t) ** 0.5
    if param == "eps":
        x0 = (x_t - s_t * pred) / a_t
    elif param == "v":
        x0 = a_t * x_t - s_t * pred
    else:
        x0 = pred
    if threshold == "dynamic":
        x0 = dynamic_threshold(x0, percentile)
    elif threshold == "static":
        x0 = x0.clamp(-1, 1)
    eps = (x_t - a_t * x0) / s_t
    if alpha_bar_prev >= 1.0:
        return x0, x0
    c = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)) ** 0.5
    x_prev = alpha_bar_prev ** 0.5 * x0 + max(1 - alpha_bar_prev - c * c, 0.0) ** 0.5 * eps
    if c > 0:
        if noise is None:
            raise ValueError("a stochastic step (eta > 0) needs noise")
        x_prev = x_prev + c * noise
    return x_prev, x0


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
    eta = (1.0 if sampler == "ddpm" else 0.0) if eta is None else float(eta)
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
        noise = torch.randn(x.shape, generator=generator, device=device) if eta > 0 and t_prev >= 0 else None
        x, _ = guided_step(cond.float(), None if uncond is None else uncond.float(), x, w, a_t, a_prev,
                           param=param, threshold=threshold, percentile=percentile, eta=eta, noise=noise)
    return x
