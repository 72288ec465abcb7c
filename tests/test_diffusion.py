import json
import math

import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                       FlowMatchEulerDiscreteScheduler)
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

from common.diffusion import (OBJECTIVES, NoiseSchedule, add_noise, cfg_drop_mask, check_objective, ddim_step,
                              dpmpp_2m_step, euler_flow_step, flow_alpha_sigma, flow_model_time, flow_snr,
                              input_perturbation, min_snr_weight, offset_noise, predict_epsilon, predict_x0, sample,
                              sample_flow_t, sample_timesteps, sampling_timesteps, training_target)

# (our name, diffusers' beta_schedule, beta_start, beta_end): the values the train script passes for each
SCHEDULE_CASES = [("linear", "linear", 1e-4, 0.02), ("scaled_linear", "scaled_linear", 0.00085, 0.012),
                  ("cosine", "squaredcos_cap_v2", 0.0001, 0.02)]


def ours_and_diffusers(name="scaled_linear", zero_terminal_snr=False):
    _, theirs, start, end = next(c for c in SCHEDULE_CASES if c[0] == name)
    ours = NoiseSchedule(name, 1000, start, end, zero_terminal_snr=zero_terminal_snr)
    kwargs = dict(num_train_timesteps=1000, beta_schedule=theirs, beta_start=start, beta_end=end,
                  rescale_betas_zero_snr=zero_terminal_snr)
    return ours, kwargs


# ------------------------------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("zero_terminal_snr", [False, True])
@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine"])
def test_schedules_match_diffusers(name, zero_terminal_snr):
    ours, kwargs = ours_and_diffusers(name, zero_terminal_snr)
    ref = DDPMScheduler(**kwargs)
    assert ours.betas.dtype == ours.alphas_cumprod.dtype == torch.float64
    assert torch.allclose(ours.alphas_cumprod, ref.alphas_cumprod.double(), atol=1e-6, rtol=0)
    # diffusers rescales for zero terminal SNR in float32, which leaves ~1e-5 of error in the last betas (ratios
    # of tiny cumulative products); its same algorithm run in float64 is the tight reference.
    assert torch.allclose(ours.betas, ref.betas.double(), atol=1e-6 if not zero_terminal_snr else 2e-5, rtol=0)
    if zero_terminal_snr:
        plain = DDPMScheduler(**{**kwargs, "rescale_betas_zero_snr": False}).betas.double()
        assert torch.allclose(ours.betas, rescale_zero_terminal_snr(plain), atol=1e-6, rtol=0)
    t = torch.tensor([0, 500, 999])
    alpha, sigma = ours.alpha_sigma(t)
    assert alpha.dtype == sigma.dtype == ours.snr(t).dtype == torch.float32
    assert torch.allclose(alpha**2 + sigma**2, torch.ones(3))
    if zero_terminal_snr:
        assert ours.alphas_cumprod[-1] == 0 and ref.alphas_cumprod[-1] == 0
        assert alpha[-1] == 0 and sigma[-1] == 1 and ours.snr(t)[-1] == 0
        assert torch.isfinite(ours.snr(torch.arange(1000))).all()
        # Algorithm 1 keeps the first timestep's sqrt(alpha_bar)
        assert ours.alphas_cumprod[0] == pytest.approx(NoiseSchedule(name, 1000, kwargs["beta_start"],
                                                                     kwargs["beta_end"]).alphas_cumprod[0].item())
    else:
        assert ours.snr(t)[-1] > 0


def test_snr_and_config_round_trip():
    ours = NoiseSchedule("linear", 1000, 1e-4, 0.02, zero_terminal_snr=True)
    t = torch.arange(1000)
    ac = ours.alphas_cumprod
    assert torch.allclose(ours.snr(t).double(), ac / (1 - ac), rtol=1e-6)
    rebuilt = NoiseSchedule(**ours.config())
    assert torch.equal(rebuilt.alphas_cumprod, ours.alphas_cumprod)
    assert json.loads(json.dumps(ours.config())) == ours.config()
    with pytest.raises(ValueError, match="unknown noise schedule"):
        NoiseSchedule("sigmoid")


def test_timestep_draws():
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(10_000, 1000, "cpu", generator=g)
    assert t.dtype == torch.long and t.shape == (10_000,) and t.min() >= 0 and t.max() == 999
    ft = sample_flow_t(10_000, "cpu", generator=torch.Generator().manual_seed(0), mean=0.5, std=1.0)
    assert ft.dtype == torch.float32 and 0 < ft.min() and ft.max() < 1
    assert ft.median().item() == pytest.approx(1 / (1 + math.exp(-0.5)), abs=0.02)  # sigmoid keeps the median
    assert flow_alpha_sigma(torch.tensor([0.25]))[0].item() == 0.75
    assert flow_snr(torch.tensor([0.25])).item() == pytest.approx(9.0)
    assert flow_model_time(torch.tensor([0.25])).item() == 250.0


# ------------------------------------------------------------------------------------- targets and weights


def test_add_noise_and_velocity_match_diffusers():
    ours, kwargs = ours_and_diffusers("scaled_linear")
    ref = DDPMScheduler(**kwargs)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    alpha, sigma = ours.alpha_sigma(t)
    assert torch.allclose(add_noise(x0, noise, alpha, sigma), ref.add_noise(x0, noise, t), atol=1e-6)
    assert torch.allclose(training_target("v_prediction", x0, noise, alpha, sigma),
                          ref.get_velocity(x0, noise, t), atol=1e-6)
    assert torch.equal(training_target("epsilon", x0, noise, alpha, sigma), noise)
    assert torch.equal(training_target("sample", x0, noise, alpha, sigma), x0)
    assert torch.equal(training_target("flow", x0, noise, alpha, sigma), noise - x0)
    # 3-D latents broadcast the same way
    x3 = torch.randn(4, 4, 16, generator=g)
    assert add_noise(x3, x3, alpha, sigma).shape == (4, 4, 16)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_predictions_invert_the_target(objective):
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 3, 4, 4, generator=g)
    if objective == "flow":
        alpha, sigma = flow_alpha_sigma(torch.tensor([0.01, 0.3, 0.5, 0.9, 1.0]))
    else:
        schedule = NoiseSchedule("scaled_linear", zero_terminal_snr=objective != "epsilon")
        alpha, sigma = schedule.alpha_sigma(torch.tensor([0, 1, 400, 900, 999 if objective != "epsilon" else 998]))
    x_t = add_noise(x0, noise, alpha, sigma)
    target = training_target(objective, x0, noise, alpha, sigma)
    assert torch.allclose(predict_x0(objective, target, x_t, alpha, sigma), x0, atol=1e-4)
    assert torch.allclose(predict_epsilon(objective, target, x_t, alpha, sigma), noise, atol=1e-4)


def paper_weight(objective, alpha, sigma, gamma):
    """Min-SNR written from the paper with alpha and sigma: section 3.4's x0-space weight min(SNR, gamma), times
    (section 4.2) the square of d x0 / d prediction."""
    snr = alpha**2 / sigma**2 if sigma > 0 else math.inf
    w = min(snr, gamma)
    if objective == "sample":
        return w
    if objective == "epsilon":  # x0 = (x_t - sigma eps) / alpha; at alpha = 0 the limit of min(snr, g) / snr is 1
        return w * sigma**2 / alpha**2 if alpha > 0 else 1.0
    if objective == "v_prediction":  # x0 = alpha x_t - sigma v on a VP schedule
        return w * sigma**2
    return w * sigma**2 if sigma > 0 else 0.0  # flow: x0 = x_t - t v, sigma = t


@pytest.mark.parametrize("gamma", [1.0, 5.0])
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_min_snr_weights_follow_the_paper(objective, gamma):
    if objective == "flow":
        t = torch.tensor([0.0, 1e-3, 0.1, 0.3, 0.5, 0.7, 0.99, 1.0], dtype=torch.float64)
        alphas, sigmas = (1 - t).tolist(), t.tolist()
        snr = flow_snr(t).float()
    else:
        schedule = NoiseSchedule("scaled_linear", zero_terminal_snr=True)
        t = torch.tensor([0, 1, 50, 200, 400, 600, 900, 998, 999])
        # reference alpha, sigma from diffusers' table, independent of ours
        ac = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                           rescale_betas_zero_snr=True).alphas_cumprod.double()[t]
        alphas, sigmas = ac.sqrt().tolist(), (1 - ac).sqrt().tolist()
        snr = schedule.snr(t)
    weights = min_snr_weight(objective, snr, gamma)
    assert weights.shape == snr.shape and torch.isfinite(weights).all()
    expected = [paper_weight(objective, a, s, gamma) for a, s in zip(alphas, sigmas)]
    assert weights.tolist() == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_min_snr_edges_and_known_values():
    snr = torch.tensor([0.0, 1.0, math.inf])
    got = {o: min_snr_weight(o, snr, 5.0).tolist() for o in OBJECTIVES}
    assert got["epsilon"] == [1.0, 1.0, 0.0]
    assert got["v_prediction"] == [0.0, 0.5, 0.0]
    assert got["sample"] == [0.0, 1.0, 5.0]
    assert got["flow"] == [0.0, 0.25, 0.0]  # t = 1, 1/2, 0
    with pytest.raises(ValueError, match="unknown objective"):
        min_snr_weight("x0", snr, 5.0)


# -------------------------------------------------------------------------------------------- regularisers


@pytest.mark.parametrize("shape", [(3, 4, 8, 8), (3, 4, 32)])
def test_offset_noise_is_one_offset_per_sample_and_channel(shape):
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    out = offset_noise(noise, 0.1, generator=torch.Generator().manual_seed(1))
    assert out.shape == noise.shape
    diff = (out - noise).reshape(shape[0], shape[1], -1)
    assert torch.allclose(diff, diff[..., :1].expand_as(diff), atol=1e-6)  # constant over spatial dims
    offsets = diff[..., 0]
    assert offsets.unique().numel() == shape[0] * shape[1]  # differs between samples and channels
    assert 0 < offsets.abs().max() < 0.5
    assert torch.equal(out, offset_noise(noise, 0.1, generator=torch.Generator().manual_seed(1)))
    assert offset_noise(noise, 0.0) is noise


def test_input_perturbation_variance_and_target():
    noise = torch.randn(1_000_000, generator=torch.Generator().manual_seed(0)).reshape(100, 10, 1000)
    original = noise.clone()
    rho = 0.5
    perturbed = input_perturbation(noise, rho, generator=torch.Generator().manual_seed(1))
    assert perturbed.var().item() == pytest.approx(1 + rho**2, abs=0.01)
    assert torch.equal(noise, original)  # the target's noise is left as it was
    x0 = torch.zeros_like(noise)
    assert torch.equal(training_target("epsilon", x0, noise, 1.0, 0.0), original)
    assert input_perturbation(noise, 0.0) is noise


def test_cfg_drop_mask_rate():
    g = torch.Generator().manual_seed(0)
    mask = cfg_drop_mask(100_000, 0.1, "cpu", generator=g)
    assert mask.dtype == torch.bool and mask.shape == (100_000,)
    assert mask.float().mean().item() == pytest.approx(0.1, abs=0.003)  # 3 standard errors
    assert not cfg_drop_mask(100_000, 0.0, "cpu", generator=g).any()
    assert cfg_drop_mask(100_000, 1.0, "cpu", generator=g).all()


def test_epsilon_with_zero_terminal_snr_is_refused():
    with pytest.raises(ValueError, match="v_prediction"):
        check_objective("epsilon", zero_terminal_snr=True)
    for objective in ("epsilon", "v_prediction", "sample", "flow"):
        check_objective(objective, zero_terminal_snr=False)
    check_objective("v_prediction", zero_terminal_snr=True)
    schedule = NoiseSchedule(zero_terminal_snr=True)
    with pytest.raises(ValueError, match="v_prediction"):
        sample(lambda x, t: x, torch.zeros(1, 4, 2, 2), "epsilon", "ddim", 5, schedule=schedule)
    with pytest.raises(ValueError):
        sample(lambda x, t: x, torch.zeros(1, 4, 2, 2), "v_prediction", "euler", 5)
    with pytest.raises(ValueError):
        sample(lambda x, t: x, torch.zeros(1, 4, 2, 2), "flow", "ddim", 5, schedule=schedule)


# ------------------------------------------------------------------------------------------------ samplers

MEAN = torch.tensor([0.5, -1.0, 0.0, 2.0], dtype=torch.float64)  # per-channel mean and std of the toy data
STD = torch.tensor([0.5, 1.0, 2.0, 0.1], dtype=torch.float64)


def gaussian_x0(x_t, alpha, sigma):
    """E[x0 | x_t] for x0 ~ N(MEAN, STD^2) per channel: the exact denoiser of Gaussian data, linear in x_t."""
    per_channel = (1, -1) + (1,) * (x_t.ndim - 2)
    per_sample = (-1,) + (1,) * (x_t.ndim - 1)
    m, v = MEAN.reshape(per_channel), (STD**2).reshape(per_channel)
    a, s = alpha.reshape(per_sample), sigma.reshape(per_sample)
    return m + a * v / (a * a * v + s * s) * (x_t - a * m)


def discrete_denoiser(objective, alphas_cumprod, seen=None):
    """A fixed model for a discrete schedule: the Gaussian denoiser's answer, written as `objective`."""
    table = alphas_cumprod.double()

    def denoise(x_t, t):
        if seen is not None:
            seen.append(int(t[0]))
        a, s = table[t].sqrt(), (1 - table[t]).sqrt()
        x0 = gaussian_x0(x_t, a, s)
        a, s = a.reshape(-1, *[1] * (x_t.ndim - 1)), s.reshape(-1, *[1] * (x_t.ndim - 1))
        eps = (x_t - a * x0) / s
        return {"epsilon": eps, "sample": x0, "v_prediction": a * eps - s * x0}[objective]

    return denoise


def flow_denoiser(seen=None):
    def denoise(x_t, model_t):
        if seen is not None:
            seen.append(float(model_t[0]))
        t = model_t.double() / 1000
        x0 = gaussian_x0(x_t, 1 - t, t)
        return (x_t - x0) / t.reshape(-1, *[1] * (x_t.ndim - 1))  # v = eps - x0 = (x_t - x0) / t

    return denoise


def run_diffusers(scheduler, denoise, noise, **step_kwargs):
    x = noise.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(denoise(x, t.expand(x.shape[0])), t, x, **step_kwargs).prev_sample
    return x


def initial_noise(shape=(2, 4, 8, 8), seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
def test_sampling_timesteps_match_ddim_for_every_step_count(spacing):
    ours = NoiseSchedule()
    ref = DDIMScheduler(timestep_spacing=spacing, steps_offset=0)
    for n in range(1, 1001):
        ref.set_timesteps(n)
        # For some n (e.g. 61) numpy's arange makes diffusers' trailing list one longer, ending in an invalid -1.
        assert torch.equal(sampling_timesteps(ours, n, spacing), ref.timesteps[:n]), n
        if len(ref.timesteps) > n:
            assert spacing == "trailing" and ref.timesteps[-1] == -1


@pytest.mark.parametrize("objective,spacing,name,zero_terminal_snr,num_steps", [
    ("epsilon", "trailing", "scaled_linear", False, 10),
    ("epsilon", "leading", "linear", False, 20),
    ("v_prediction", "trailing", "scaled_linear", False, 10),
    ("v_prediction", "leading", "cosine", False, 25),
    ("sample", "trailing", "scaled_linear", False, 10),
    ("v_prediction", "trailing", "scaled_linear", True, 10),
    ("sample", "trailing", "linear", True, 20),
])
def test_ddim_matches_diffusers(objective, spacing, name, zero_terminal_snr, num_steps):
    # num_steps divides 1000: diffusers' DDIM steps from t to t - 1000 // num_steps, which is then our next timestep
    ours, kwargs = ours_and_diffusers(name, zero_terminal_snr)
    ref = DDIMScheduler(**kwargs, prediction_type=objective, timestep_spacing=spacing, steps_offset=0,
                        set_alpha_to_one=True, clip_sample=False)
    ref.set_timesteps(num_steps)
    noise = initial_noise()
    seen_ours, seen_ref = [], []
    got = sample(discrete_denoiser(objective, ref.alphas_cumprod, seen_ours), noise, objective, "ddim", num_steps,
                 schedule=ours, spacing=spacing)
    want = run_diffusers(ref, discrete_denoiser(objective, ref.alphas_cumprod, seen_ref), noise)
    assert seen_ours == seen_ref == ref.timesteps.tolist()
    assert got.shape == noise.shape and torch.isfinite(got).all()
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def test_ddim_with_eta_matches_diffusers():
    ours, kwargs = ours_and_diffusers("scaled_linear")
    ref = DDIMScheduler(**kwargs, prediction_type="v_prediction", timestep_spacing="trailing", clip_sample=False)
    ref.set_timesteps(10)
    noise = initial_noise()
    denoise = discrete_denoiser("v_prediction", ref.alphas_cumprod)
    got = sample(denoise, noise, "v_prediction", "ddim", 10, schedule=ours, eta=0.7,
                 generator=torch.Generator().manual_seed(3))
    want = run_diffusers(ref, denoise, noise, eta=0.7, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    deterministic = sample(denoise, noise, "v_prediction", "ddim", 10, schedule=ours)
    assert not torch.allclose(got, deterministic, atol=1e-3)  # eta really added noise


def dpm_reference(objective, kwargs, timesteps):
    ref = DPMSolverMultistepScheduler(**kwargs, prediction_type=objective, algorithm_type="dpmsolver++",
                                      solver_order=2, solver_type="midpoint", lower_order_final=True,
                                      final_sigmas_type="zero")
    ref.set_timesteps(timesteps=timesteps.tolist())
    return ref


@pytest.mark.parametrize("objective,spacing,name,num_steps", [
    ("epsilon", "trailing", "scaled_linear", 10),
    ("epsilon", "linspace", "linear", 7),
    ("v_prediction", "trailing", "scaled_linear", 20),  # >= 15 steps: diffusers still ends first order
    ("v_prediction", "leading", "cosine", 12),
    ("sample", "trailing", "scaled_linear", 10),
])
def test_dpmpp_2m_matches_diffusers(objective, spacing, name, num_steps):
    ours, kwargs = ours_and_diffusers(name)
    timesteps = sampling_timesteps(ours, num_steps, spacing)
    ref = dpm_reference(objective, kwargs, timesteps)
    noise = initial_noise()
    seen_ours, seen_ref = [], []
    got = sample(discrete_denoiser(objective, ref.alphas_cumprod, seen_ours), noise, objective, "dpmpp_2m",
                 num_steps, schedule=ours, spacing=spacing)
    want = run_diffusers(ref, discrete_denoiser(objective, ref.alphas_cumprod, seen_ref), noise)
    assert seen_ours == seen_ref == timesteps.tolist()
    assert torch.allclose(got, want, atol=2e-5, rtol=1e-5)
    first_order = sample(discrete_denoiser(objective, ref.alphas_cumprod), noise, objective, "ddim", num_steps,
                         schedule=ours, spacing=spacing)
    assert not torch.allclose(got, first_order, atol=1e-4)  # the second-order correction is in use


def test_dpmpp_2m_with_zero_terminal_snr():
    ours, kwargs = ours_and_diffusers("scaled_linear", zero_terminal_snr=True)
    timesteps = sampling_timesteps(ours, 10, "trailing")
    ref = dpm_reference("v_prediction", kwargs, timesteps)
    table = DDPMScheduler(**kwargs).alphas_cumprod  # alpha exactly 0 at t = 999 for the model in both runs
    denoise = discrete_denoiser("v_prediction", table)
    noise = initial_noise()
    want = run_diffusers(ref, denoise, noise)
    exact = sample(denoise, noise, "v_prediction", "dpmpp_2m", 10, schedule=ours)
    assert torch.isfinite(exact).all()
    # diffusers lifts alpha_bar at the last timestep from 0 to 2^-24 so its log-SNR stays finite; with the same
    # table our solver agrees with it, and with the true 0 it stays close.
    assert ref.alphas_cumprod[-1] == 2**-24
    ours.alphas_cumprod = ours.alphas_cumprod.clone()
    ours.alphas_cumprod[-1] = 2**-24
    lifted = sample(denoise, noise, "v_prediction", "dpmpp_2m", 10, schedule=ours)
    assert torch.allclose(lifted, want, atol=2e-5, rtol=1e-5)
    assert torch.allclose(exact, want, atol=0.02)


@pytest.mark.parametrize("shift,num_steps", [(1.0, 10), (3.0, 8)])
def test_flow_euler_matches_diffusers(shift, num_steps):
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    ref.set_timesteps(sigmas=np.linspace(1.0, 0.0, num_steps + 1)[:-1])
    grid = sampling_timesteps(None, num_steps, shift=shift)
    assert torch.allclose(grid.float(), ref.sigmas, atol=1e-6)
    noise = initial_noise()
    seen_ours, seen_ref = [], []
    got = sample(flow_denoiser(seen_ours), noise, "flow", "euler", num_steps, flow_shift=shift)
    want = run_diffusers(ref, flow_denoiser(seen_ref), noise)
    assert seen_ours == pytest.approx(seen_ref, abs=1e-3)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def test_single_steps():
    x, x0, eps = initial_noise(seed=1), initial_noise(seed=2), initial_noise(seed=3)
    # landing on alpha 1, sigma 0 returns the data prediction, from any sampler
    assert torch.allclose(ddim_step(x, x0, eps, 0.3, math.sqrt(0.91), 1.0, 0.0), x0)
    assert torch.allclose(dpmpp_2m_step(x, x0, 0.3, math.sqrt(0.91), 1.0, 0.0)[0], x0)
    # first-order DPM-Solver++ is DDIM (Lu et al. 2022, section 4.1)
    a, s, a2, s2 = 0.3, math.sqrt(0.91), 0.6, 0.8
    eps_from_x0 = (x - a * x0) / s
    assert torch.allclose(dpmpp_2m_step(x, x0, a, s, a2, s2)[0], ddim_step(x, x0, eps_from_x0, a, s, a2, s2))
    # Euler is exact for a constant velocity
    v = initial_noise(seed=4)
    assert torch.allclose(euler_flow_step(euler_flow_step(x, v, 1.0, 0.6), v, 0.6, 0.0), x - v)


@pytest.mark.parametrize("objective,sampler,steps", [("v_prediction", "dpmpp_2m", 25), ("v_prediction", "ddim", 50),
                                                     ("flow", "euler", 50)])
def test_samplers_reach_the_data_distribution_on_3d_latents(objective, sampler, steps):
    schedule = NoiseSchedule("scaled_linear", zero_terminal_snr=True)
    noise = initial_noise((256, 4, 64))  # (B, C, T)
    if objective == "flow":
        denoise = flow_denoiser()
    else:
        denoise = discrete_denoiser(objective, schedule.alphas_cumprod)
    x = sample(denoise, noise, objective, sampler, steps, schedule=schedule)
    assert x.shape == noise.shape
    per_channel = x.transpose(0, 1).reshape(4, -1)
    assert torch.allclose(per_channel.mean(1), MEAN, atol=0.03)
    # Spreads within 10%: few steps shrink them (the last step returns E[x0 | x_t]), most for the narrow 4th
    # channel (std 0.1, below the last sampled sigma), which is left out.
    assert torch.allclose(per_channel.std(1)[:3], STD[:3], rtol=0.1)


@pytest.mark.parametrize("objective,sampler", [("sample", "ddim"), ("sample", "dpmpp_2m"), ("flow", "euler")])
def test_low_precision_predictions_keep_the_latents_float32(objective, sampler):
    noise = torch.randn(2, 4, 16)
    x = sample(lambda x, t: (0.5 * x).bfloat16(), noise, objective, sampler, 4, schedule=NoiseSchedule())
    assert x.dtype == torch.float32 and torch.isfinite(x).all()
