"""Diffusion maths for the LDM trainer: noise schedules, objectives and their loss weights, regularisers, samplers.

Everything here is a pure function or a small class over tensors, so the training script owns the model, the
optimiser and the accelerator. Notation: x_t = alpha_t * x0 + sigma_t * eps. For the discrete variance-preserving
schedules alpha_t^2 + sigma_t^2 = 1 (DDPM, Ho et al. 2020); for rectified flow (Liu et al. 2022) alpha_t = 1 - t,
sigma_t = t with t in [0, 1]. diffusers' schedulers are the yardstick in tests/test_diffusion.py.
"""

import math

import torch

OBJECTIVES = ("epsilon", "v_prediction", "sample", "flow")  # "flow" = rectified flow / flow matching
SCHEDULES = ("linear", "scaled_linear", "cosine")
SAMPLERS = ("ddim", "dpmpp_2m", "euler")  # euler is for "flow"; ddim and dpmpp_2m for the discrete objectives
SPACINGS = ("trailing", "leading", "linspace")
FLOW_TIME_SCALE = 1000.0  # flow time t in [0, 1] is shown to the denoiser as t * 1000, see flow_model_time


def _check(value, choices, what):
    if value not in choices:
        raise ValueError(f"unknown {what} '{value}' (choose from {', '.join(choices)})")


def _bcast(coef, x):
    """A per-sample coefficient (B,) reshaped to (B, 1, ...) to broadcast over x's trailing dims; scalars pass."""
    if torch.is_tensor(coef) and coef.ndim == 1:
        return coef.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return coef


# ----------------------------------------------------------------------------------------------------- schedules


class NoiseSchedule:
    """Discrete DDPM-style variance-preserving schedule over num_timesteps (1000).

    linear:        betas evenly spaced from beta_start to beta_end (DDPM uses 1e-4 .. 0.02).
    scaled_linear: sqrt(betas) evenly spaced, then squared (Stable Diffusion, 0.00085 .. 0.012).
    cosine:        alpha_bar(u) = cos^2((u + s) / (1 + s) * pi / 2), s = 0.008, betas capped at 0.999 (Nichol &
                   Dhariwal 2021, "Improved DDPM"; diffusers' "squaredcos_cap_v2"); beta_start / beta_end unused.
    zero_terminal_snr: rescale sqrt(alphas_cumprod) so the last timestep is pure noise (SNR 0), Algorithm 1 of Lin
                   et al. 2024 (arXiv:2305.08891). alpha is then 0 at t = T-1, where an epsilon prediction says
                   nothing about x0: train with v_prediction (or sample), see check_objective.
    """

    def __init__(self, name="scaled_linear", num_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                 zero_terminal_snr=False):
        _check(name, SCHEDULES, "noise schedule")
        self.name, self.num_timesteps = name, int(num_timesteps)
        self.beta_start, self.beta_end = float(beta_start), float(beta_end)
        self.zero_terminal_snr = bool(zero_terminal_snr)
        T = self.num_timesteps
        if name == "linear":
            betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        elif name == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
        else:
            s = 0.008
            u = torch.arange(T + 1, dtype=torch.float64) / T
            alpha_bar = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # (T + 1,)
            # The cap keeps the last betas below 1, where alpha_bar(u) -> 0 would make them exactly 1.
            betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
        if zero_terminal_snr:
            betas = _rescale_zero_terminal_snr(betas)
        self.betas = betas  # (T,) float64 cpu
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0)  # (T,) float64 cpu; exactly 0 at T-1 with ZTSNR
        self._tables = {}

    def _table(self, device):
        # Rows alpha, sigma, snr in float32, computed once in float64 and cached per device so that a training step
        # only gathers (no host-to-device copy, no sync).
        key = str(device)
        if key not in self._tables:
            ac = self.alphas_cumprod
            # 1 - ac >= beta_0 > 0, so the SNR is finite everywhere and 0 (not NaN) where ZTSNR sets ac to 0.
            table = torch.stack([ac.sqrt(), (1 - ac).sqrt(), ac / (1 - ac)]).float()  # (3, T)
            self._tables[key] = table.to(device)
        return self._tables[key]

    def alpha_sigma(self, t):
        """(alpha_t, sigma_t), each float32 (B,) on t's device, for long timesteps t (B,)."""
        table = self._table(t.device)
        return table[0][t], table[1][t]

    def snr(self, t):
        """alpha_t^2 / sigma_t^2, float32 (B,); 0 at the last timestep of a zero-terminal-SNR schedule."""
        return self._table(t.device)[2][t]

    def config(self):
        return {"name": self.name, "num_timesteps": self.num_timesteps, "beta_start": self.beta_start,
                "beta_end": self.beta_end, "zero_terminal_snr": self.zero_terminal_snr}


def _rescale_zero_terminal_snr(betas):
    """Lin et al. 2024, Algorithm 1: shift sqrt(alpha_bar) so its last value is 0, scale so its first is unchanged."""
    root = torch.cumprod(1 - betas, dim=0).sqrt()  # (T,)
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    alpha_bar = root**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])  # undo the cumulative product
    return 1 - alphas


def check_objective(objective, zero_terminal_snr):
    """Refuse combinations that cannot be sampled: epsilon prediction with a zero-terminal-SNR schedule."""
    _check(objective, OBJECTIVES, "objective")
    if objective == "epsilon" and zero_terminal_snr:
        raise ValueError("epsilon prediction cannot recover x0 at the last timestep of a zero-terminal-SNR schedule "
                         "(alpha is 0 there): use v_prediction (Lin et al. 2024, section 3.2)")


def sample_timesteps(batch, num_timesteps, device, generator=None):
    """Uniform training timesteps in [0, num_timesteps), long (B,)."""
    return torch.randint(0, num_timesteps, (batch,), device=device, generator=generator)


def flow_alpha_sigma(t):
    """Rectified flow's straight path x_t = (1 - t) x0 + t eps (Liu et al. 2022): (alpha, sigma) = (1 - t, t)."""
    return 1 - t, t


def sample_flow_t(batch, device, generator=None, mean=0.0, std=1.0):
    """Logit-normal flow times sigmoid(N(mean, std)), float32 (B,): SD3's choice (Esser et al. 2024,
    arXiv:2403.03206, section 3.1), which spends more training on the middle of the path than uniform t does."""
    return torch.sigmoid(torch.randn(batch, device=device, generator=generator) * std + mean)


def flow_snr(t):
    """alpha^2 / sigma^2 = ((1 - t) / t)^2: inf at t = 0, 0 at t = 1."""
    return ((1 - t) / t) ** 2


def flow_model_time(t):
    """The denoiser's timestep input for flow time t: t * 1000, so the sinusoidal embedding built for discrete
    timesteps in [0, 1000) sees the same range for either kind of model."""
    return t * FLOW_TIME_SCALE


# ------------------------------------------------------------------------------------------ targets and weights


def add_noise(x0, noise, alpha, sigma):
    """x_t = alpha * x0 + sigma * noise, with alpha and sigma (B,) (or scalars) broadcast over x0's trailing dims."""
    return _bcast(alpha, x0) * x0 + _bcast(sigma, x0) * noise


def training_target(objective, x0, noise, alpha, sigma):
    """What the denoiser learns to output.

    epsilon:      the noise (DDPM)
    v_prediction: alpha * noise - sigma * x0 (Salimans & Ho 2022, "Progressive Distillation", section 4)
    sample:       x0
    flow:         noise - x0, the velocity dx_t/dt of the straight path (Liu et al. 2022)
    """
    _check(objective, OBJECTIVES, "objective")
    if objective == "epsilon":
        return noise
    if objective == "v_prediction":
        return _bcast(alpha, x0) * noise - _bcast(sigma, x0) * x0
    if objective == "sample":
        return x0
    return noise - x0


def predict_x0(objective, prediction, x_t, alpha, sigma):
    """x0 implied by a prediction of `objective` at x_t. Epsilon divides by alpha: undefined where alpha is 0."""
    _check(objective, OBJECTIVES, "objective")
    a, s = _bcast(alpha, x_t), _bcast(sigma, x_t)
    if objective == "epsilon":
        return (x_t - s * prediction) / a
    if objective == "v_prediction":
        # alpha x_t - sigma v = (alpha^2 + sigma^2) x0; the division is by 1 on a VP schedule, kept for generality.
        return (a * x_t - s * prediction) / (a * a + s * s)
    if objective == "sample":
        return prediction
    return x_t - s * prediction  # x_t = x0 + t v


def predict_epsilon(objective, prediction, x_t, alpha, sigma):
    """Noise implied by a prediction of `objective` at x_t. Sample prediction divides by sigma (> 0 on our grids)."""
    _check(objective, OBJECTIVES, "objective")
    a, s = _bcast(alpha, x_t), _bcast(sigma, x_t)
    if objective == "epsilon":
        return prediction
    if objective == "v_prediction":
        return (s * x_t + a * prediction) / (a * a + s * s)
    if objective == "sample":
        return (x_t - a * prediction) / s
    return x_t + a * prediction  # eps = x_t + (1 - t) v


def min_snr_weight(objective, snr, gamma):
    """Min-SNR-gamma loss weights (B,) for the MSE on `objective` (Hang et al. 2023, arXiv:2303.09556).

    Section 3.4 weights the x0-space loss ||x0_hat - x0||^2 by min(SNR, gamma). Section 4.2: if the x0 error is c
    times the objective's error, the same weighting on the objective's MSE is min(SNR, gamma) * c^2.
      sample:       c = 1                                     -> min(SNR, gamma)
      epsilon:      x0 = (x_t - sigma eps) / alpha, c = sigma / alpha, c^2 = 1 / SNR   -> min(SNR, gamma) / SNR
      v_prediction: x0 = alpha x_t - sigma v, c = sigma, c^2 = 1 / (SNR + 1)           -> min(SNR, gamma) / (SNR + 1)
      flow:         x0 = x_t - t v, c = t; SNR = ((1 - t) / t)^2 gives t = 1 / (1 + sqrt(SNR))
                                                              -> min(SNR, gamma) / (1 + sqrt(SNR))^2
    Edges: epsilon at SNR 0 (a zero-terminal-SNR last step) takes its limit 1; SNR inf (flow t = 0) gives
    gamma / inf = 0 for epsilon, v and flow. v gets weight 0 at SNR 0: the x0 error there carries no weight.
    """
    _check(objective, OBJECTIVES, "objective")
    clipped = snr.clamp(max=gamma)
    if objective == "sample":
        return clipped
    if objective == "epsilon":
        return torch.where(snr > 0, clipped / snr, torch.ones_like(snr))
    if objective == "v_prediction":
        return clipped / (snr + 1)
    return clipped / (1 + snr.sqrt()) ** 2


# ------------------------------------------------------------------------------------------------- regularisers


def offset_noise(noise, strength, generator=None):
    """noise + strength * N(0, 1) drawn once per (sample, channel) and broadcast over all spatial dims, (B, C, ...).

    The shared offset lets the model move a whole channel's mean, which plain zero-mean noise at a schedule's
    last step never asks of it (https://www.crosslabs.org/blog/diffusion-with-offset-noise).
    """
    if strength == 0:
        return noise
    shape = noise.shape[:2] + (1,) * (noise.ndim - 2)  # (B, C, 1, 1) or (B, C, 1)
    return noise + strength * torch.randn(shape, generator=generator, device=noise.device, dtype=noise.dtype)


def input_perturbation(noise, strength, generator=None):
    """Noise for building x_t, perturbed by strength * N(0, I) (Ning et al. 2023, arXiv:2301.11706).

    The training target keeps the original `noise`; the model sees slightly off-schedule inputs, as it will at
    sampling time when its own errors accumulate (the exposure bias the paper targets).
    """
    if strength == 0:
        return noise
    return noise + strength * torch.randn(noise.shape, generator=generator, device=noise.device, dtype=noise.dtype)


def cfg_drop_mask(batch, probability, device, generator=None):
    """(B,) bool, True where the sample's condition is replaced by the null condition, each Bernoulli(probability);
    trains the unconditional model classifier-free guidance needs (Ho & Salimans 2022, arXiv:2207.12598)."""
    return torch.rand(batch, device=device, generator=generator) < probability


# ----------------------------------------------------------------------------------------------------- samplers


def sampling_timesteps(schedule_or_none, num_steps, spacing="trailing", shift=1.0):
    """The grid a sampler walks, high noise first.

    Discrete schedule: num_steps long timesteps, the values diffusers' DDIMScheduler.set_timesteps gives for
    timestep_spacing "trailing" (starts at T-1, Lin et al. 2024 Table 2), "leading" (with steps_offset=0) or
    "linspace". Each step goes to the next listed timestep, the last one to alpha = 1 (x0). (For some n, e.g. 61,
    numpy's arange makes diffusers' "trailing" list one longer, ending in an invalid -1; ours stops at n values.)
    None (flow): num_steps + 1 float64 times from 1 to 0, evenly spaced, then shifted as in SD3 (Esser et al. 2024,
    eq. 23): t' = shift t / (1 + (shift - 1) t); shift > 1 spends more steps at high noise.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    if schedule_or_none is None:
        t = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
        return shift * t / (1 + (shift - 1) * t)
    _check(spacing, SPACINGS, "timestep spacing")
    T = schedule_or_none.num_timesteps
    if num_steps > T:
        raise ValueError(f"num_steps {num_steps} exceeds the schedule's {T} timesteps")
    # Grid points that fall on a half (937.5) round either way depending on the last bit of the float64 step, so
    # the steps are formed the way numpy's arange / linspace form them, which is what diffusers' values come from.
    i = torch.arange(num_steps, dtype=torch.float64)
    if spacing == "trailing":
        step = (T - T / num_steps) - T  # arange's step is the difference of its first two values
        t = (T + i * step).round() - 1
    elif spacing == "leading":
        t = (i * (T // num_steps)).flip(0)
    else:
        t = (i * ((T - 1) / max(num_steps - 1, 1))).round().flip(0)
    return t.long()


def ddim_step(x_t, x0_pred, eps_pred, alpha_t, sigma_t, alpha_prev, sigma_prev, eta=0.0, noise=None):
    """One DDIM update from t to the less noisy `prev` (Song et al. 2021, eq. 12).

    x_prev = alpha_prev x0 + sqrt(sigma_prev^2 - s^2) eps + s z, with s = eta sigma_prev / sigma_t
    sqrt(1 - alpha_t^2 / alpha_prev^2) (eq. 16): eta 0 is deterministic DDIM, eta 1 DDPM-like. Coefficients are
    Python floats (one timestep for the whole batch). eps_pred None: derived from x_t and x0_pred.
    """
    if eps_pred is None:
        eps_pred = (x_t - alpha_t * x0_pred) / sigma_t
    std = eta * sigma_prev / sigma_t * math.sqrt(max(0.0, 1 - alpha_t**2 / alpha_prev**2)) if eta > 0 else 0.0
    x_prev = alpha_prev * x0_pred + math.sqrt(max(0.0, sigma_prev**2 - std**2)) * eps_pred
    if std > 0:
        x_prev = x_prev + std * noise
    return x_prev


def _half_log_snr(alpha, sigma):
    # lambda = log(alpha / sigma), with the ends of the grid (alpha 0 under ZTSNR, sigma 0 at x0) as -inf / +inf.
    if alpha == 0:
        return -math.inf
    if sigma == 0:
        return math.inf
    return math.log(alpha) - math.log(sigma)


def dpmpp_2m_step(x, x0_pred, alpha_t, sigma_t, alpha_next, sigma_next, x0_last=None, h_last=None):
    """One DPM-Solver++(2M) update of the data prediction (Lu et al. 2022, arXiv:2211.01095, Algorithm 2).

    With h = lambda_next - lambda_t (lambda = log(alpha / sigma)):
      x_next = (sigma_next / sigma_t) x + alpha_next (1 - e^-h) D,   D = x0 + (x0 - x0_last) / (2 r), r = h_last / h
    where h_last is the previous step's h and x0_last its data prediction; without them (first step) D = x0, the
    first-order update (DDIM). Returns (x_next, h) so the caller can pass h as the next step's h_last.
    Infinite h at the grid's ends is exact: e^-h = 0, and an infinite h_last makes the correction vanish.
    """
    h = _half_log_snr(alpha_next, sigma_next) - _half_log_snr(alpha_t, sigma_t)
    decay = math.exp(-h)  # = (alpha_t sigma_next) / (sigma_t alpha_next), 0 when either end is infinite
    d = x0_pred
    if x0_last is not None:
        d = x0_pred + (h / h_last) * 0.5 * (x0_pred - x0_last)  # midpoint variant; h / h_last = 1 / r
    return (sigma_next / sigma_t) * x + alpha_next * (1 - decay) * d, h


def euler_flow_step(x, v, t, t_next):
    """Euler step of the flow ODE dx/dt = v from t to t_next (< t)."""
    return x + (t_next - t) * v


@torch.no_grad()
def sample(denoise, noise, objective, sampler, num_steps, schedule=None, spacing="trailing", generator=None,
           eta=0.0, flow_shift=1.0):
    """Integrate from `noise` to x0 (same shape as noise, 3-D (B, C, T) or 4-D (B, C, H, W) latents).

    denoise(x_t, t) returns the model's prediction for `objective`; t is a (B,) tensor: long timesteps for a
    discrete schedule, float32 model time t * 1000 for flow. Classifier-free guidance belongs inside `denoise`.
    Predictions are cast to noise's dtype, so under bf16 autocast the integration itself stays in float32.
    ddim (eta > 0 draws fresh noise from `generator`) and dpmpp_2m need `schedule` and a discrete objective;
    euler needs objective "flow". The last discrete step lands on alpha = 1, sigma = 0 (diffusers' DDIM with
    set_alpha_to_one=True; DPM-Solver++ with final_sigmas_type="zero"), so the result is the final x0 prediction.
    DPM-Solver++ runs first order on its first step (no history) and on its last (h is infinite there; diffusers
    does the same for final_sigmas_type="zero").
    """
    _check(sampler, SAMPLERS, "sampler")
    _check(objective, OBJECTIVES, "objective")
    batch, device = noise.shape[0], noise.device
    x = noise
    if sampler == "euler":
        if objective != "flow":
            raise ValueError(f"the euler sampler integrates the flow objective, not '{objective}'")
        grid = sampling_timesteps(None, num_steps, shift=flow_shift).tolist()
        for t, t_next in zip(grid[:-1], grid[1:]):
            model_t = torch.full((batch,), flow_model_time(t), device=device, dtype=torch.float32)
            x = euler_flow_step(x, denoise(x, model_t).to(x.dtype), t, t_next)
        return x

    if objective == "flow" or schedule is None:
        raise ValueError(f"sampler '{sampler}' needs a discrete schedule and objective, got '{objective}'")
    check_objective(objective, schedule.zero_terminal_snr)
    timesteps = sampling_timesteps(schedule, num_steps, spacing).tolist()
    ac = schedule.alphas_cumprod.tolist()  # float64 on the host: coefficients as Python floats, no device syncs
    x0_last = h_last = None
    for i, t in enumerate(timesteps):
        alpha, sigma = math.sqrt(ac[t]), math.sqrt(1 - ac[t])
        if i + 1 < len(timesteps):
            alpha_next, sigma_next = math.sqrt(ac[timesteps[i + 1]]), math.sqrt(1 - ac[timesteps[i + 1]])
        else:
            alpha_next, sigma_next = 1.0, 0.0
        prediction = denoise(x, torch.full((batch,), t, device=device, dtype=torch.long)).to(x.dtype)
        x0 = predict_x0(objective, prediction, x, alpha, sigma)
        if sampler == "ddim":
            eps = predict_epsilon(objective, prediction, x, alpha, sigma)
            z = None
            if eta > 0 and i + 1 < len(timesteps):
                z = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype)
            x = ddim_step(x, x0, eps, alpha, sigma, alpha_next, sigma_next, eta=eta, noise=z)
        else:
            last = i + 1 == len(timesteps)
            x, h = dpmpp_2m_step(x, x0, alpha, sigma, alpha_next, sigma_next,
                                 None if last else x0_last, None if last else h_last)
            x0_last, h_last = x0, h
    return x
