"""Vocoders: log-mel spectrogram (B, n_mels, F) -> waveform (B, 1, F * hop), their export format and a command line.

Three generator families, each built from a plain JSON-able config dict whose "type" names the family:

- `HiFiGANGenerator` (Kong et al. 2020, arXiv:2010.05646): transposed-convolution upsampling, each stage followed
  by a multi-receptive-field fusion (MRF) of dilated residual blocks; LeakyReLU; weight norm.
- `BigVGANGenerator` (Lee et al. 2023, arXiv:2206.04658): the same skeleton with anti-aliased multi-periodicity (AMP)
  blocks: Snake / SnakeBeta activations run at twice the sample rate between Kaiser-windowed sinc low-pass filters.
- `VocosGenerator` (Siuzdak 2023, arXiv:2306.00814): ConvNeXt blocks at the frame rate predict the STFT (log
  magnitude and phase) and an inverse STFT makes the waveform: no upsampling layers at all.

Every generator maps F frames to exactly F * hop samples, the framing of `common.spectral.MelConfig` (HiFi-GAN's:
(n_fft - hop) / 2 of padding on each side, no centring), so a waveform -> mel -> waveform round trip keeps its length.

An exported vocoder is a folder: `generator.safetensors` (the state dict as is, weight-norm parametrisation included,
so a reload reproduces outputs bit for bit) and `config.json` {"format": "vocoder-v1", "generator": {...},
"mel": {...}}. `load_vocoder(folder)` gives a `Vocoder` that turns mels (or, through its own mel, audio) into audio:

    python -m common.vocoder --vocoder out/vocoder --input speech.wav --output resynthesised.wav
    python -m common.vocoder --vocoder out/vocoder --input generated_mel.npy --output generated.wav

Parameter counts at 80 mel bands: hifigan-v1 13.94M, hifigan-v2 0.93M, hifigan-v3 1.46M (Table 1 of the paper:
13.92M / 0.92M / 1.46M), hifigan-5m 4.99M, bigvgan-5m 5.00M, vocos-5m 5.17M; the tiny presets 30k-40k.

Initialisation. HiFi-GAN's and BigVGAN's code draw N(0, 0.01) weights *after* weight norm is applied, which leaves
the parameters untouched (jik876/hifi-gan#145): their published models trained from PyTorch's default
initialisation, and so do these. Applied for real, N(0, 0.01) makes hifigan-5m's initial output depend on its input
by ~1e-5 and puts 85% of its mel bins at the log clamp, where the mel loss has no gradient. Vocos keeps its own
truncated N(0, 0.02), which it does apply.
"""

import copy
import inspect
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import weight_norm

from common.spectral import MelConfig, MelSpectrogram

FORMAT = "vocoder-v1"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "generator.safetensors"
LRELU_SLOPE = 0.1


def _at_least_fp32(x):
    """float32 for half-precision tensors; float64 stays float64 (exact gradient checks run in it)."""
    return x if x.dtype == torch.float64 else x.float()


def _conv(in_channels, out_channels, kernel_size, dilation=1, bias=True):
    """Weight-normalised "same" Conv1d (odd kernel)."""
    return weight_norm(nn.Conv1d(in_channels, out_channels, kernel_size, dilation=dilation,
                                 padding=dilation * (kernel_size - 1) // 2, bias=bias))


def _upsample(in_channels, out_channels, rate, kernel_size):
    """Weight-normalised ConvTranspose1d mapping T steps to exactly T * rate (needs kernel - rate even, >= 0)."""
    return weight_norm(nn.ConvTranspose1d(in_channels, out_channels, kernel_size, rate,
                                          padding=(kernel_size - rate) // 2))


class ResBlock(nn.Module):
    """A residual stack of dilated convolutions over (B, C, T), length-preserving.

    HiFi-GAN's ResBlock1 (`two_convs=True`): per dilation d, act -> conv(k, d) -> act -> conv(k, 1), added back.
    ResBlock2 (`two_convs=False`): per dilation, act -> conv(k, d), added back. BigVGAN's AMP blocks are the same
    with `activation` an anti-aliased Snake (one instance, with its own parameters, per convolution).
    """

    def __init__(self, channels, kernel_size, dilations, two_convs, activation):
        super().__init__()
        self.convs1 = nn.ModuleList(_conv(channels, channels, kernel_size, d) for d in dilations)
        self.acts1 = nn.ModuleList(activation(channels) for _ in dilations)
        self.convs2 = nn.ModuleList(_conv(channels, channels, kernel_size) for _ in dilations) if two_convs else None
        self.acts2 = nn.ModuleList(activation(channels) for _ in dilations) if two_convs else None

    def forward(self, x):
        for i, (conv, act) in enumerate(zip(self.convs1, self.acts1)):
            y = conv(act(x))
            if self.convs2 is not None:
                y = self.convs2[i](self.acts2[i](y))
            x = x + y
        return x


def _check_upsampling(upsample_initial_channel, upsample_rates, upsample_kernel_sizes, resblock,
                      resblock_kernel_sizes, resblock_dilation_sizes):
    problems = []
    if len(upsample_rates) == 0 or len(upsample_rates) != len(upsample_kernel_sizes):
        problems.append(f"upsample_rates {list(upsample_rates)} and upsample_kernel_sizes "
                        f"{list(upsample_kernel_sizes)} must be non-empty and of the same length")
    for u, k in zip(upsample_rates, upsample_kernel_sizes):
        if u < 1 or k < u or (k - u) % 2:
            problems.append(f"upsample kernel {k} for rate {u}: need kernel >= rate and kernel - rate even "
                            f"(else the output is not exactly rate times longer)")
    if upsample_initial_channel // 2 ** len(upsample_rates) < 1:
        problems.append(f"upsample_initial_channel {upsample_initial_channel} halves {len(upsample_rates)} times "
                        f"to zero channels")
    if resblock not in (1, 2):
        problems.append(f"resblock must be 1 or 2 (got {resblock!r})")
    if len(resblock_kernel_sizes) == 0 or len(resblock_kernel_sizes) != len(resblock_dilation_sizes):
        problems.append("resblock_kernel_sizes and resblock_dilation_sizes must be non-empty and of the same length")
    if any(k % 2 == 0 for k in resblock_kernel_sizes):
        problems.append(f"resblock_kernel_sizes must be odd (got {list(resblock_kernel_sizes)})")
    if problems:
        raise ValueError("; ".join(problems))


def _build_mrfs(channels, resblock_kernel_sizes, resblock_dilation_sizes, two_convs, activation):
    """One multi-receptive-field fusion per upsampling stage: a ResBlock per (kernel, dilations), outputs averaged."""
    return nn.ModuleList(
        nn.ModuleList(ResBlock(c, k, d, two_convs, activation)
                      for k, d in zip(resblock_kernel_sizes, resblock_dilation_sizes))
        for c in channels)


def _mrf(blocks, x):
    return sum(block(x) for block in blocks) / len(blocks)


# ---------------------------------------------------------------------------------------------------------------
# HiFi-GAN


class HiFiGANGenerator(nn.Module):
    """HiFi-GAN's generator (Kong et al. 2020, §2.1): mel (B, n_mels, F) -> waveform (B, 1, F * hop).

    conv_pre (k7) to `upsample_initial_channel`; per stage: LeakyReLU(0.1), a transposed convolution upsampling by
    its rate and halving the channels, an MRF (ResBlock1 or ResBlock2 per kernel size, averaged); then LeakyReLU,
    conv_post (k7) to one channel and tanh. hop_length is the product of the rates.
    """

    def __init__(self, n_mels=80, upsample_initial_channel=512, upsample_rates=(8, 8, 2, 2),
                 upsample_kernel_sizes=(16, 16, 4, 4), resblock=1, resblock_kernel_sizes=(3, 7, 11),
                 resblock_dilation_sizes=((1, 3, 5), (1, 3, 5), (1, 3, 5))):
        super().__init__()
        _check_upsampling(upsample_initial_channel, upsample_rates, upsample_kernel_sizes, resblock,
                          resblock_kernel_sizes, resblock_dilation_sizes)
        self.n_mels = n_mels
        self.hop_length = math.prod(upsample_rates)
        channels = [upsample_initial_channel // 2 ** i for i in range(len(upsample_rates) + 1)]
        self.conv_pre = _conv(n_mels, channels[0], 7)
        self.ups = nn.ModuleList(_upsample(channels[i], channels[i + 1], u, k)
                                 for i, (u, k) in enumerate(zip(upsample_rates, upsample_kernel_sizes)))
        self.mrfs = _build_mrfs(channels[1:], resblock_kernel_sizes, resblock_dilation_sizes, resblock == 1,
                                lambda c: nn.LeakyReLU(LRELU_SLOPE))
        self.conv_post = _conv(channels[-1], 1, 7)

    def forward(self, mel):
        x = self.conv_pre(mel)  # (B, C0, F)
        for up, blocks in zip(self.ups, self.mrfs):
            x = _mrf(blocks, up(F.leaky_relu(x, LRELU_SLOPE)))  # (B, C0 / 2^i, F * rates so far)
        # The last convolution and tanh run in float32: a bf16 waveform would carry ~-48 dB of rounding noise.
        with torch.autocast(x.device.type, enabled=False):
            return torch.tanh(self.conv_post(F.leaky_relu(_at_least_fp32(x), LRELU_SLOPE)))  # (B, 1, F * hop)


# ---------------------------------------------------------------------------------------------------------------
# BigVGAN: Snake activations, anti-aliased


class Snake(nn.Module):
    """Snake (Liu Ziyin et al. 2020, arXiv:2006.08195): x + sin^2(alpha x) / alpha, one alpha per channel, stored
    as log alpha (BigVGAN's log-scale parametrisation; alpha starts at 1). Input (B, C, T)."""

    def __init__(self, channels):
        super().__init__()
        self.log_alpha = nn.Parameter(torch.zeros(channels))

    def _alpha_beta(self):
        alpha = self.log_alpha.exp()[:, None]
        return alpha, alpha

    def forward(self, x):
        alpha, beta = self._alpha_beta()  # (C, 1)
        return x + torch.sin(x * alpha).pow(2) / (beta + 1e-9)


class SnakeBeta(Snake):
    """BigVGAN's SnakeBeta (§3.1): x + sin^2(alpha x) / beta, frequency and magnitude learnt separately (log scale)."""

    def __init__(self, channels):
        super().__init__(channels)
        self.log_beta = nn.Parameter(torch.zeros(channels))

    def _alpha_beta(self):
        return self.log_alpha.exp()[:, None], self.log_beta.exp()[:, None]


def kaiser_sinc_filter(cutoff, half_width, kernel_size):
    """(kernel_size,) windowed-sinc low-pass filter of unit DC gain. `cutoff` and `half_width` (of the transition
    band) are in cycles per sample; the Kaiser window's beta comes from Kaiser's formula for the attenuation this
    length and transition width reach (the design StyleGAN3 and BigVGAN use). Even `kernel_size`: symmetric about
    a half-sample point."""
    half = kernel_size // 2
    attenuation = 2.285 * (half - 1) * math.pi * 4 * half_width + 7.95  # dB
    if attenuation > 50:
        beta = 0.1102 * (attenuation - 8.7)
    elif attenuation >= 21:
        beta = 0.5842 * (attenuation - 21) ** 0.4 + 0.07886 * (attenuation - 21)
    else:
        beta = 0.0
    t = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size - 1) / 2
    taps = 2 * cutoff * torch.sinc(2 * cutoff * t) * torch.kaiser_window(kernel_size, False, beta, dtype=torch.float64)
    return (taps / taps.sum()).float()


class AntiAliasedActivation(nn.Module):
    """BigVGAN's anti-aliased activation (§3.2): upsample 2x, apply `activation`, low-pass and downsample 2x, so the
    harmonics the periodic activation creates above the original Nyquist are filtered out rather than aliased.

    Both resamplers use one 12-tap Kaiser-windowed sinc with its cutoff at the original Nyquist (0.25 cycles per
    sample at the doubled rate), held as a buffer built once. Edges are padded by replication. Shapes: (B, C, T) ->
    (B, C, 2T) -> (B, C, T).
    """

    def __init__(self, activation, kernel_size=12):
        super().__init__()
        if kernel_size % 2 or kernel_size < 4:
            raise ValueError(f"kernel_size must be even and >= 4 (got {kernel_size})")
        self.activation, self.kernel_size = activation, kernel_size
        self.register_buffer("filter", kaiser_sinc_filter(0.25, 0.3, kernel_size)[None, None], persistent=False)

    def upsample(self, x):
        # Zero-stuffing then low-pass, as one strided transposed convolution (gain 2 restores the amplitude).
        # Sample n lands at 2n + 1/2 on the fine grid; trimming 3p on each side gives exactly 2T samples.
        p, C = self.kernel_size // 2 - 1, x.size(1)
        y = F.conv_transpose1d(F.pad(x, (p, p), mode="replicate"), self.filter.expand(C, 1, -1), stride=2, groups=C)
        return 2 * y[..., 3 * p: y.size(-1) - 3 * p]

    def downsample(self, x):
        # Low-pass then keep every other sample; the padding puts output n back at fine position 2n + 1/2.
        p, C = self.kernel_size // 2 - 1, x.size(1)
        return F.conv1d(F.pad(x, (p, p + 1), mode="replicate"), self.filter.expand(C, 1, -1), stride=2, groups=C)

    def forward(self, x):
        return self.downsample(self.activation(self.upsample(x)))


SNAKES = {"snake": Snake, "snakebeta": SnakeBeta}


class BigVGANGenerator(nn.Module):
    """BigVGAN's generator (Lee et al. 2023, §3): mel (B, n_mels, F) -> waveform (B, 1, F * hop).

    conv_pre (k7); per stage a transposed convolution (no activation before it: the AMP blocks end in one) and an
    MRF of AMP blocks (`resblock` 1: two anti-aliased Snake convolutions per dilation, 2: one); then an anti-aliased
    Snake/SnakeBeta, conv_post (k7) and tanh (BigVGAN-v2's `use_tanh_at_final=False` clamps to [-1, 1] instead).
    """

    def __init__(self, n_mels=80, upsample_initial_channel=512, upsample_rates=(8, 8, 2, 2),
                 upsample_kernel_sizes=(16, 16, 4, 4), resblock=1, resblock_kernel_sizes=(3, 7, 11),
                 resblock_dilation_sizes=((1, 3, 5), (1, 3, 5), (1, 3, 5)), activation="snakebeta",
                 use_tanh_at_final=True, use_bias_at_final=True):
        super().__init__()
        _check_upsampling(upsample_initial_channel, upsample_rates, upsample_kernel_sizes, resblock,
                          resblock_kernel_sizes, resblock_dilation_sizes)
        if activation not in SNAKES:
            raise ValueError(f"activation must be one of {', '.join(SNAKES)} (got {activation!r})")
        self.n_mels, self.use_tanh_at_final = n_mels, use_tanh_at_final
        self.hop_length = math.prod(upsample_rates)
        channels = [upsample_initial_channel // 2 ** i for i in range(len(upsample_rates) + 1)]
        snake = lambda c: AntiAliasedActivation(SNAKES[activation](c))  # noqa: E731
        self.conv_pre = _conv(n_mels, channels[0], 7)
        self.ups = nn.ModuleList(_upsample(channels[i], channels[i + 1], u, k)
                                 for i, (u, k) in enumerate(zip(upsample_rates, upsample_kernel_sizes)))
        self.mrfs = _build_mrfs(channels[1:], resblock_kernel_sizes, resblock_dilation_sizes, resblock == 1, snake)
        self.act_post = snake(channels[-1])
        self.conv_post = _conv(channels[-1], 1, 7, bias=use_bias_at_final)

    def forward(self, mel):
        x = self.conv_pre(mel)  # (B, C0, F)
        for up, blocks in zip(self.ups, self.mrfs):
            x = _mrf(blocks, up(x))
        with torch.autocast(x.device.type, enabled=False):  # the waveform in float32, as in HiFiGANGenerator
            x = self.conv_post(self.act_post(_at_least_fp32(x)))
            return torch.tanh(x) if self.use_tanh_at_final else x.clamp(-1.0, 1.0)


# ---------------------------------------------------------------------------------------------------------------
# Vocos: ConvNeXt at the frame rate, inverse STFT


class InverseSTFT(nn.Module):
    """Magnitude and phase (B, n_fft // 2 + 1, F) -> waveform (B, F * hop), the inverse of the STFT that
    `MelSpectrogram` takes: frames of n_fft samples every hop, Hann window of win_length centred in n_fft, the signal
    padded by (n_fft - hop) / 2 on each side. Windowed overlap-add divided by the summed squared window (the
    least-squares inverse), then the padding trimmed. `torch.istft` has no such "same" mode (its NOLA check fails
    on the untrimmed edges), hence irfft + fold. Always float32, autocast off (under torch.compile the complex
    step falls back to eager kernels: Inductor generates no code for complex tensors)."""

    def __init__(self, n_fft, hop_length, win_length):
        super().__init__()
        if not (0 < hop_length <= n_fft and 0 < win_length <= n_fft) or (n_fft - hop_length) % 2:
            raise ValueError(f"inverse STFT: need 0 < hop_length, win_length <= n_fft and n_fft - hop_length even "
                             f"(got n_fft {n_fft}, hop_length {hop_length}, win_length {win_length})")
        self.n_fft, self.hop_length, self.win_length = n_fft, hop_length, win_length
        left = (n_fft - win_length) // 2
        window = F.pad(torch.hann_window(win_length), (left, n_fft - win_length - left))
        self.register_buffer("window", window, persistent=False)

    def forward(self, magnitude, phase):
        n_fft, hop = self.n_fft, self.hop_length
        frames = magnitude.size(-1)
        length = (frames - 1) * hop + n_fft  # before trimming
        with torch.autocast(magnitude.device.type, enabled=False):
            magnitude, phase = _at_least_fp32(magnitude), _at_least_fp32(phase)
            spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
            chunks = torch.fft.irfft(spec, n=n_fft, dim=1) * self.window[:, None]  # (B, n_fft, F)
            fold = dict(output_size=(1, length), kernel_size=(1, n_fft), stride=(1, hop))
            audio = F.fold(chunks, **fold)[:, 0, 0]  # overlap-add: (B, length)
            envelope = F.fold(self.window.pow(2)[None, :, None].expand(1, n_fft, frames), **fold)[0, 0, 0]
            pad = (n_fft - hop) // 2
            # Inside the trimmed span at least two frames overlap, so the envelope stays well above zero.
            return audio[:, pad: length - pad] / envelope[pad: length - pad].clamp(min=1e-11)  # (B, F * hop)


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block over frames (Liu et al. 2022, as Vocos §3 adapts it to 1-D): depthwise conv k7, LayerNorm,
    pointwise MLP (GELU, 3x wide by default), layer scale, residual. (B, C, F) -> (B, C, F)."""

    def __init__(self, dim, intermediate_dim, layer_scale):
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, intermediate_dim)
        self.pwconv2 = nn.Linear(intermediate_dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), float(layer_scale)))

    def forward(self, x):
        y = self.norm(self.dwconv(x).transpose(1, 2))  # (B, F, C)
        y = self.pwconv2(F.gelu(self.pwconv1(y)))
        return x + (self.gamma * y).transpose(1, 2)


class VocosGenerator(nn.Module):
    """Vocos (Siuzdak 2023): mel (B, n_mels, F) -> waveform (B, 1, F * hop) with no upsampling layers.

    conv embed (k7) -> LayerNorm -> `num_layers` ConvNeXt blocks (layer scale 1 / num_layers) -> LayerNorm -> a
    linear head giving, per frame, log magnitude and phase angle for n_fft // 2 + 1 bins -> `InverseSTFT`. The
    magnitude is exp of the prediction clipped at 1e2 (clipped in the log domain, which gives the same values and
    no inf * 0 gradient); the phase enters as cos / sin of the angle, so it is unconstrained and wraps (§3.2).
    The head and the inverse STFT run in float32.
    """

    def __init__(self, n_mels=80, dim=512, intermediate_dim=1536, num_layers=8, n_fft=1024, hop_length=256,
                 win_length=1024):
        super().__init__()
        self.n_mels, self.hop_length = n_mels, hop_length
        self.istft = InverseSTFT(n_fft, hop_length, win_length)
        self.embed = nn.Conv1d(n_mels, dim, 7, padding=3)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.blocks = nn.ModuleList(ConvNeXtBlock(dim, intermediate_dim, 1 / num_layers) for _ in range(num_layers))
        self.final_norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, n_fft + 2)
        for m in self.modules():  # Vocos's initialisation: truncated N(0, 0.02), zero biases
            if isinstance(m, (nn.Conv1d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, mel):
        x = self.embed(mel)  # (B, dim, F)
        x = self.norm(x.transpose(1, 2)).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        x = self.final_norm(x.transpose(1, 2))  # (B, F, dim)
        with torch.autocast(x.device.type, enabled=False):
            log_mag, angle = self.head(_at_least_fp32(x)).transpose(1, 2).chunk(2, dim=1)  # 2 x (B, n_fft // 2 + 1, F)
            magnitude = log_mag.clamp(max=math.log(1e2)).exp()
            return self.istft(magnitude, angle).unsqueeze(1)  # (B, 1, F * hop)


# ---------------------------------------------------------------------------------------------------------------
# Presets and configs

GENERATOR_TYPES = {"hifigan": HiFiGANGenerator, "bigvgan": BigVGANGenerator, "vocos": VocosGenerator}

_V1 = dict(upsample_rates=[8, 8, 2, 2], upsample_kernel_sizes=[16, 16, 4, 4], resblock=1,
           resblock_kernel_sizes=[3, 7, 11], resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5], [1, 3, 5]])

GENERATOR_PRESETS = {
    # The paper's three (Table 1), at its 80 mel bands and hop 256.
    "hifigan-v1": dict(type="hifigan", n_mels=80, upsample_initial_channel=512, **_V1),
    "hifigan-v2": dict(type="hifigan", n_mels=80, upsample_initial_channel=128, **_V1),
    "hifigan-v3": dict(type="hifigan", n_mels=80, upsample_initial_channel=256, upsample_rates=[8, 8, 4],
                       upsample_kernel_sizes=[16, 16, 8], resblock=2, resblock_kernel_sizes=[3, 5, 7],
                       resblock_dilation_sizes=[[1, 2], [2, 6], [3, 12]]),
    # V1's shape at ~5M parameters (channels scale the count quadratically: 512 * sqrt(5 / 13.94) ~ 307).
    "hifigan-5m": dict(type="hifigan", n_mels=80, upsample_initial_channel=304, **_V1),
    "hifigan-tiny": dict(type="hifigan", n_mels=80, upsample_initial_channel=32, upsample_rates=[8, 8, 2, 2],
                         upsample_kernel_sizes=[16, 16, 4, 4], resblock=1, resblock_kernel_sizes=[3, 5],
                         resblock_dilation_sizes=[[1, 3], [1, 3]]),
    # BigVGAN-base's shape (V1's, 14M at 512 channels) at ~5M; SnakeBeta as in BigVGAN-v2.
    "bigvgan-5m": dict(type="bigvgan", n_mels=80, upsample_initial_channel=304, **_V1, activation="snakebeta",
                       use_tanh_at_final=True, use_bias_at_final=True),
    "bigvgan-tiny": dict(type="bigvgan", n_mels=80, upsample_initial_channel=32, upsample_rates=[8, 8, 2, 2],
                         upsample_kernel_sizes=[16, 16, 4, 4], resblock=1, resblock_kernel_sizes=[3, 5],
                         resblock_dilation_sizes=[[1, 3], [1, 3]], activation="snakebeta", use_tanh_at_final=True,
                         use_bias_at_final=True),
    # Vocos's mel model is 512 wide, 8 deep (13.5M); narrower and deeper here for ~5M.
    "vocos-5m": dict(type="vocos", n_mels=80, dim=256, intermediate_dim=768, num_layers=12, n_fft=1024,
                     hop_length=256, win_length=1024),
    "vocos-tiny": dict(type="vocos", n_mels=80, dim=16, intermediate_dim=48, num_layers=2, n_fft=1024,
                       hop_length=256, win_length=1024),
}


def _config_keys(kind):
    return [name for name in inspect.signature(GENERATOR_TYPES[kind]).parameters]


def generator_config(preset_name, n_mels, **overrides):
    """The preset's config dict with `n_mels` and `overrides` applied (a fresh copy, JSON-able).
    Unknown presets or keys raise ValueError naming the valid ones."""
    if preset_name not in GENERATOR_PRESETS:
        raise ValueError(f"unknown generator preset {preset_name!r} (choose from {', '.join(GENERATOR_PRESETS)})")
    config = copy.deepcopy(GENERATOR_PRESETS[preset_name])
    keys = _config_keys(config["type"])
    unknown = sorted(set(overrides) - set(keys))
    if unknown:
        raise ValueError(f"unknown {config['type']} setting(s) {', '.join(unknown)} (known: {', '.join(keys)})")
    config.update({k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()}, n_mels=n_mels)
    return json.loads(json.dumps(config))  # tuples (nested too) become lists, as after a save and load


def build_generator(config):
    """A generator from its config dict ({"type": "hifigan" | "bigvgan" | "vocos", ...}) or a preset name.
    An unknown type, preset or setting raises ValueError naming the valid ones."""
    if isinstance(config, str):
        config = generator_config(config, GENERATOR_PRESETS.get(config, {}).get("n_mels", 80))
    if not isinstance(config, dict):
        raise ValueError(f"a generator config is a dict or a preset name, not {type(config).__name__}")
    kind = config.get("type")
    if kind not in GENERATOR_TYPES:
        raise ValueError(f"unknown generator type {kind!r} (choose from {', '.join(GENERATOR_TYPES)}; presets: "
                         f"{', '.join(GENERATOR_PRESETS)})")
    settings = {k: v for k, v in config.items() if k != "type"}
    keys = _config_keys(kind)
    unknown = sorted(set(settings) - set(keys))
    if unknown:
        raise ValueError(f"unknown {kind} setting(s) {', '.join(unknown)} (known: {', '.join(keys)})")
    try:
        return GENERATOR_TYPES[kind](**settings)
    except TypeError as err:  # a setting of the wrong kind (a string for a list, say)
        raise ValueError(f"bad {kind} settings: {err}") from None


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------------------------
# Export and loading


def _unwrap(module):
    """The generator itself from a torch.compile wrapper or DistributedDataParallel (their state-dict keys carry
    `_orig_mod.` / `module.` prefixes)."""
    while hasattr(module, "_orig_mod") or isinstance(module, nn.parallel.DistributedDataParallel):
        module = module._orig_mod if hasattr(module, "_orig_mod") else module.module
    return module


def _check_pair(generator, mel_config):
    """What keeps this generator from rendering this mel configuration (empty when nothing)."""
    out = []
    if generator.n_mels != mel_config.n_mels:
        out.append(f"the generator takes {generator.n_mels} mel bands, the mel settings have {mel_config.n_mels}")
    if generator.hop_length != mel_config.hop_length:
        out.append(f"the generator upsamples by {generator.hop_length}, the mel hop_length is "
                   f"{mel_config.hop_length}")
    return out


def save_vocoder(folder, generator, generator_config, mel_config, extra=None):
    """Write `generator.safetensors` (the state dict as is: dtype and weight-norm parametrisation kept) and
    `config.json` {"generator": generator_config, "mel": mel_config.to_dict(), "format": "vocoder-v1", **extra}.
    Refuses (ValueError) a config that does not describe `generator` or that disagrees with the mel settings."""
    from safetensors.torch import save_file

    from common.checkpoint import state_mismatches

    generator = _unwrap(generator)
    reserved = sorted({"generator", "mel", "format"} & set(extra or {}))
    if reserved:
        raise ValueError(f"extra must not set {', '.join(reserved)}")
    with torch.device("meta"):  # the config's architecture, without allocating or initialising it
        described = build_generator(generator_config)
    problems = state_mismatches(described, generator.state_dict()) + _check_pair(described, mel_config)
    if problems:
        raise ValueError(f"cannot export: the generator config does not match the generator: {'; '.join(problems[:5])}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in generator.state_dict().items()}
    save_file(tensors, folder / WEIGHTS_NAME, metadata={"format": FORMAT})
    config = {"generator": generator_config, "mel": mel_config.to_dict(), "format": FORMAT, **(extra or {})}
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")


class Vocoder(nn.Module):
    """A generator with the mel settings it was trained on: `vocoder(mel)` renders log-mels (B, n_mels, F) or
    (n_mels, F) to (B, 1, F * hop) audio at `sample_rate`; `resynthesize(audio)` goes through its own mel.
    `config` is the whole config.json (with any extra keys the trainer stored, such as the step)."""

    def __init__(self, generator, mel_config, config=None):
        super().__init__()
        problems = _check_pair(generator, mel_config)
        if problems:
            raise ValueError("; ".join(problems))
        self.generator, self.mel_config = generator, mel_config
        self.mel = MelSpectrogram(mel_config)
        self.config = config or {}

    @property
    def sample_rate(self):
        return self.mel_config.sample_rate

    @property
    def hop_length(self):
        return self.mel_config.hop_length

    @property
    def n_mels(self):
        return self.mel_config.n_mels

    def forward(self, mel):
        mel = mel[None] if mel.ndim == 2 else mel
        if mel.ndim != 3 or mel.size(1) != self.n_mels:
            raise ValueError(f"expected a mel of shape (B, {self.n_mels}, frames), got {tuple(mel.shape)}")
        return self.generator(mel.float())

    def resynthesize(self, audio):
        """Waveform (T,), (B, T) or (B, 1, T) -> its mel -> waveform (B, 1, T). The audio is zero-padded to whole
        frames (and to at least the mel's reflection padding) and the result trimmed back to T samples."""
        x = audio.reshape(-1, audio.size(-1)).float()
        T, hop = x.size(-1), self.hop_length
        padded = max(T, (self.mel_config.n_fft - hop) // 2 + 1)
        padded = -(-padded // hop) * hop
        x = F.pad(x, (0, padded - T))
        return self(self.mel(x))[..., :T]

    def check_mel_config(self, other, what="the input"):
        """Raise ValueError, one line naming each differing field, unless `other` (a MelConfig or its dict) equals
        this vocoder's mel settings: `hop_length: 240 vs 256` reads `what`'s value vs the vocoder's."""
        other = other if isinstance(other, MelConfig) else MelConfig.from_dict(other)
        differ = other.mismatches(self.mel_config)
        if differ:
            raise ValueError(f"{what} has mel settings the vocoder was not trained on ({what} vs vocoder): "
                             f"{'; '.join(differ)}")


def _read_config(path):
    if not path.is_file():
        raise ValueError(f"{path}: missing (a vocoder folder holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: unreadable JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    if config.get("format") != FORMAT:
        raise ValueError(f"{path}: format {config.get('format')!r}, expected {FORMAT!r} (not a vocoder export?)")
    for key in ("generator", "mel"):
        if not isinstance(config.get(key), dict):
            raise ValueError(f"{path}: '{key}' must be an object of settings (got {config.get(key)!r})")
    return config


def read_vocoder_mel_config(folder):
    """The mel settings a vocoder export was trained on, from its config.json alone (no weights read): for
    checking a chained model before any heavy work. ValueError naming the file and the problem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such folder (a vocoder folder holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    config_path = folder / CONFIG_NAME
    config = _read_config(config_path)
    try:
        return MelConfig.from_dict(config["mel"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{config_path}: mel: {err}") from None


def load_vocoder(folder, device="cpu"):
    """The `Vocoder` exported to `folder` by `save_vocoder`, in eval mode on `device`. A missing or malformed file,
    or tensors that do not fit the config, raise ValueError naming the file and the problem."""
    from safetensors.torch import load_file

    from common.checkpoint import state_mismatches

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such folder (a vocoder folder holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    config = _read_config(config_path)
    try:
        mel_config = MelConfig.from_dict(config["mel"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{config_path}: mel: {err}") from None
    try:
        generator = build_generator(config["generator"])
    except ValueError as err:
        raise ValueError(f"{config_path}: generator: {err}") from None
    problems = _check_pair(generator, mel_config)
    if problems:
        raise ValueError(f"{config_path}: {'; '.join(problems)}")
    if not weights_path.is_file():
        raise ValueError(f"{weights_path}: missing (the generator's weights)")
    try:
        tensors = load_file(weights_path)
    except Exception as err:  # safetensors reports truncation and bad headers with its own exception type
        raise ValueError(f"{weights_path}: unreadable safetensors ({' '.join(str(err).split())[:160]})") from None
    problems = state_mismatches(generator, tensors)
    if problems:
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise ValueError(f"{weights_path}: tensors do not fit the generator in {CONFIG_NAME}: "
                         f"{'; '.join(problems[:3])}{more}")
    generator.load_state_dict(tensors)
    return Vocoder(generator, mel_config, config).to(device).eval()


# ---------------------------------------------------------------------------------------------------------------
# Command line

MEL_SUFFIXES = (".npy", ".safetensors")


def _read_mel(path, n_mels):
    """(n_mels, frames) float32 log-mel from a .npy or a .safetensors holding tensor "mel"; problems as text."""
    if path.suffix.lower() == ".npy":
        try:
            mel = torch.from_numpy(np.asarray(np.load(path, allow_pickle=False), dtype=np.float32))
        except (OSError, ValueError) as err:
            raise ValueError(f"unreadable .npy ({' '.join(str(err).split())[:120]})") from None
    else:
        from safetensors.torch import load_file

        try:
            tensors = load_file(path)
        except Exception as err:
            raise ValueError(f"unreadable safetensors ({' '.join(str(err).split())[:120]})") from None
        if "mel" not in tensors:
            raise ValueError(f"no tensor 'mel' (it holds {', '.join(sorted(tensors)) or 'none'})")
        mel = tensors["mel"].float()
    mel = mel[0] if mel.ndim == 3 and mel.size(0) == 1 else mel
    if mel.ndim != 2 or mel.size(0) != n_mels or mel.size(1) == 0:
        raise ValueError(f"a mel of shape {tuple(mel.shape)}; this vocoder takes ({n_mels}, frames)")
    if not torch.isfinite(mel).all():
        raise ValueError("the mel holds non-finite values")
    return mel


def main(argv=None):
    """Audio (resynthesised through the vocoder's own mel) or a saved log-mel -> a 16-bit WAV."""
    from common.args import ArgumentParser
    from common.audio import AUDIO_EXTENSIONS, load_audio, save_audio
    from common.data import CorruptSample

    p = ArgumentParser(prog="python -m common.vocoder", description=main.__doc__)
    p.add_argument("--vocoder", required=True, help=f"Vocoder folder ({CONFIG_NAME} + {WEIGHTS_NAME}).")
    p.add_argument("--input", required=True,
                   help=f"An audio file ({', '.join(sorted(AUDIO_EXTENSIONS))}; resampled to the vocoder's rate) "
                        "or a log-mel of shape (n_mels, frames): .npy, or .safetensors with tensor 'mel'.")
    p.add_argument("--output", required=True, help="Output .wav (16-bit PCM at the vocoder's sample rate).")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="Where to run the generator (default: cuda when available).")
    a = p.parse_args(argv)
    source, suffix = Path(a.input), Path(a.input).suffix.lower()
    if not source.is_file():
        p.error(f"--input {a.input}: no such file")
    if suffix not in AUDIO_EXTENSIONS and suffix not in MEL_SUFFIXES:
        p.error(f"--input {a.input}: expected an audio file ({', '.join(sorted(AUDIO_EXTENSIONS))}) or a mel "
                f"({', '.join(MEL_SUFFIXES)})")
    if Path(a.output).suffix.lower() != ".wav":
        p.error(f"--output {a.output}: must end in .wav")
    try:
        vocoder = load_vocoder(a.vocoder, a.device)
    except ValueError as err:
        p.error(f"--vocoder {err}")
    try:
        if suffix in MEL_SUFFIXES:
            mel = _read_mel(source, vocoder.n_mels)
            audio = None
        else:
            audio = load_audio(source, vocoder.sample_rate)
    except (ValueError, CorruptSample) as err:
        p.error(f"--input {a.input}: {getattr(err, 'reason', err)}")
    with torch.inference_mode():
        if audio is None:
            wave = vocoder(mel.to(a.device))
        else:
            wave = vocoder.resynthesize(audio.to(a.device))
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    save_audio(a.output, wave[0, 0], vocoder.sample_rate)
    n = wave.size(-1)
    print(f"wrote {a.output}: {n} samples ({n / vocoder.sample_rate:.2f} s at {vocoder.sample_rate} Hz)")


if __name__ == "__main__":
    main(sys.argv[1:])
