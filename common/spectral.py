"""Spectral parts of the audio scripts: the mel configuration every audio model carries, the log-mel spectrogram
computed on the GPU from a waveform batch, and the spectral losses built on the STFT.

The mel configuration is a contract (DESIGN.md): it is saved with every audio model, and a script that chains two
models (an audio VAE and a vocoder, say) compares them with `MelConfig.mismatches` and refuses a mismatch by name.
"""

import dataclasses
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

LOG_KINDS = ("ln", "log10")


@dataclasses.dataclass(frozen=True)
class MelConfig:
    """How a waveform becomes a log-mel spectrogram. The defaults are HiFi-GAN's (22.05 kHz, 80 bands up to
    8 kHz, hop 256, natural log of the mel magnitude clamped at 1e-5).

    Framing follows HiFi-GAN: the waveform is reflect-padded by (n_fft - hop) / 2 on both sides and framed
    without centring, so T samples (a multiple of the hop) give exactly T / hop frames and a generator that
    upsamples by `hop_length` maps them back to T samples.
    """

    sample_rate: int = 22050
    n_fft: int = 1024
    hop_length: int = 256
    win_length: int = 1024
    n_mels: int = 80
    fmin: float = 0.0
    fmax: float | None = 8000.0
    log: str = "ln"  # "ln" or "log10"
    clamp_min: float = 1e-5

    def __post_init__(self):
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(problems))

    def problems(self):
        """What is wrong with this configuration, as flag-like phrases (empty when valid)."""
        out = []
        if self.sample_rate <= 0:
            out.append(f"sample_rate must be > 0 (got {self.sample_rate})")
        if self.hop_length <= 0 or self.win_length <= 0 or self.n_fft <= 0 or self.n_mels <= 0:
            out.append("n_fft, hop_length, win_length and n_mels must be positive")
        elif self.win_length > self.n_fft:
            out.append(f"win_length {self.win_length} must be <= n_fft {self.n_fft}")
        elif self.hop_length > self.n_fft or (self.n_fft - self.hop_length) % 2:
            out.append(f"n_fft - hop_length must be even and >= 0 (got {self.n_fft} - {self.hop_length})")
        top = self.sample_rate / 2 if self.fmax is None else self.fmax
        if not 0 <= self.fmin < top <= self.sample_rate / 2:
            out.append(f"need 0 <= fmin < fmax <= sample_rate / 2 (got fmin {self.fmin}, fmax {self.fmax}, "
                       f"sample_rate {self.sample_rate})")
        if self.log not in LOG_KINDS:
            out.append(f"log must be one of {', '.join(LOG_KINDS)} (got {self.log!r})")
        if not self.clamp_min > 0:
            out.append(f"clamp_min must be > 0 (got {self.clamp_min})")
        return out

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values):
        """From a saved dict; unknown keys are refused by name (a config from a newer or different tool)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"unknown mel setting(s) {', '.join(unknown)} (known: {', '.join(sorted(fields))})")
        return cls(**values)

    def mismatches(self, other):
        """['hop_length: 256 vs 240', ...] for every field that differs from `other` (a MelConfig or dict)."""
        other = other if isinstance(other, MelConfig) else MelConfig.from_dict(other)
        return [f"{f.name}: {getattr(self, f.name)} vs {getattr(other, f.name)}" for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(other, f.name)]

    def num_frames(self, num_samples):
        return (num_samples - self.hop_length) // self.hop_length + 1


# ---------------------------------------------------------------------------------------------------------------
# Mel filterbank: librosa's default (Slaney's mel scale and area normalisation), computed in float64 once.


def hz_to_mel(freq):
    """Slaney's mel scale (librosa's default, htk=False): linear below 1 kHz, logarithmic above."""
    freq = np.asarray(freq, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return np.where(freq >= min_log_hz, min_log_mel + np.log(np.maximum(freq, 1e-10) / min_log_hz) / logstep,
                    freq / f_sp)


def mel_to_hz(mel):
    mel = np.asarray(mel, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return np.where(mel >= min_log_mel, min_log_hz * np.exp(logstep * (mel - min_log_mel)), f_sp * mel)


def mel_filterbank(sample_rate, n_fft, n_mels, fmin=0.0, fmax=None):
    """(n_mels, n_fft // 2 + 1) triangular filters, equal to `librosa.filters.mel(sr=..., n_fft=..., n_mels=...,
    fmin=..., fmax=...)` (Slaney scale, Slaney normalisation)."""
    fmax = sample_rate / 2 if fmax is None else fmax
    fft_freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    mel_freqs = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    widths = np.diff(mel_freqs)
    ramps = mel_freqs[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_freqs[2:] - mel_freqs[:-2]))[:, None]  # equal area per filter
    return torch.from_numpy(weights).float()


def _stft(x, n_fft, hop, win, window, pad):
    """Complex STFT of (B, T) float32 audio, reflect-padded by `pad` on both sides, not centred."""
    if pad:
        x = F.pad(x.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
    return torch.stft(x, n_fft, hop_length=hop, win_length=win, window=window, center=False, return_complex=True)


class MelSpectrogram(nn.Module):
    """Log-mel spectrogram of a waveform batch, (B, T) or (B, 1, T) -> (B, n_mels, T // hop), always in float32
    (autocast off: the log of small mel energies in bf16 is too coarse for a loss weighted 45).

    The filterbank and window are built once, as buffers that follow the module to its device and are not
    saved in state dicts."""

    def __init__(self, config: MelConfig):
        super().__init__()
        self.config = config
        self.register_buffer("window", torch.hann_window(config.win_length), persistent=False)
        self.register_buffer("filterbank", mel_filterbank(config.sample_rate, config.n_fft, config.n_mels,
                                                          config.fmin, config.fmax), persistent=False)

    def magnitude(self, audio):
        c = self.config
        x = _as_batch(audio)
        spec = _stft(x, c.n_fft, c.hop_length, c.win_length, self.window, (c.n_fft - c.hop_length) // 2)
        return torch.sqrt(spec.real.pow(2) + spec.imag.pow(2) + 1e-9)  # (B, n_fft // 2 + 1, frames)

    def forward(self, audio):
        with torch.autocast(audio.device.type, enabled=False):
            mel = torch.matmul(self.filterbank, self.magnitude(audio))
            mel = mel.clamp(min=self.config.clamp_min)
            return mel.log() if self.config.log == "ln" else mel.log10()


# ---------------------------------------------------------------------------------------------------------------
# Spectral losses. Each takes an estimate x and a reference y, (B, T) or (B, 1, T), and works in float32 with
# autocast off whatever the caller's precision: log magnitudes of quiet bins are too coarse in bf16.

MAGNITUDE_FLOOR = 1e-7  # |STFT| below this is treated as this: sqrt's gradient stays finite on digital silence


def _magnitude(spec):
    """|spec| of a complex STFT, floored at MAGNITUDE_FLOOR (zero gradient below it instead of sqrt's inf * 0)."""
    power = spec.real.square() + spec.imag.square()
    return power.clamp(min=MAGNITUDE_FLOOR**2).sqrt()


def _as_batch(x):
    """(B, T) or (B, 1, T) -> (B, T) in float32 (float64 stays float64, for exact gradient checks)."""
    x = x.reshape(-1, x.size(-1))
    return x if x.dtype == torch.float64 else x.float()


class MultiScaleMelLoss(nn.Module):
    """Multi-scale mel loss of DAC (Kumar et al. 2023, "High-Fidelity Audio Compression with Improved RVQGAN"):
    L1 distance between log10 mel magnitudes at several STFT sizes, summed over the scales.

    For each pair (window length W, n_mels M): Hann window of W samples, n_fft = W, hop W // 4, centred frames
    (reflect padding by W // 2), M Slaney mel bands between `fmin` and `fmax` (None: sample_rate / 2). With
    mel = filterbank @ |STFT|,

        loss = sum over scales of  log_weight * mean |power * log10(max(mel_x, clamp_eps))
                                                      - power * log10(max(mel_y, clamp_eps))|
                                 + mag_weight * mean |mel_x - mel_y|

    The defaults are DAC's recipe (7 scales from 32 to 2048 samples, 5 to 320 bands, power 1, no linear term).
    The small scales use few bands on purpose: at 32 samples a frame spans a few FFT bins, some bands stay empty
    and contribute nothing. forward(x, y): x the estimate, y the reference, (B, T) or (B, 1, T) with
    T > max(window_lengths) // 2 -> scalar tensor (log10 units of mel magnitude, summed over scales), float32.
    """

    def __init__(self, sample_rate, window_lengths=(32, 64, 128, 256, 512, 1024, 2048),
                 n_mels=(5, 10, 20, 40, 80, 160, 320), clamp_eps=1e-5, power=1.0, log_weight=1.0, mag_weight=0.0,
                 fmin=0.0, fmax=None):
        super().__init__()
        if len(window_lengths) != len(n_mels) or not window_lengths:
            raise ValueError(f"window_lengths and n_mels need one entry per scale (got {len(window_lengths)} "
                             f"window_lengths and {len(n_mels)} n_mels)")
        top = sample_rate / 2 if fmax is None else fmax
        if not 0 <= fmin < top <= sample_rate / 2:
            raise ValueError(f"need 0 <= fmin < fmax <= sample_rate / 2 (got fmin {fmin}, fmax {fmax}, "
                             f"sample_rate {sample_rate})")
        if not clamp_eps > 0:
            raise ValueError(f"clamp_eps must be > 0 (got {clamp_eps})")
        self.window_lengths = tuple(int(w) for w in window_lengths)
        self.n_mels = tuple(int(m) for m in n_mels)
        self.clamp_eps, self.power = clamp_eps, power
        self.log_weight, self.mag_weight = log_weight, mag_weight
        for i, (win, mels) in enumerate(zip(self.window_lengths, self.n_mels)):
            self.register_buffer(f"window_{i}", torch.hann_window(win), persistent=False)
            self.register_buffer(f"filterbank_{i}", mel_filterbank(sample_rate, win, mels, fmin, fmax),
                                 persistent=False)  # (mels, win // 2 + 1)

    def forward(self, x, y):
        with torch.autocast(x.device.type, enabled=False):
            xy = torch.cat([_as_batch(x), _as_batch(y)])  # one STFT per scale for both signals, (2B, T)
            loss = xy.new_zeros(())
            for i, win in enumerate(self.window_lengths):
                spec = torch.stft(xy, win, hop_length=win // 4, window=getattr(self, f"window_{i}"), center=True,
                                  pad_mode="reflect", return_complex=True)
                mel_x, mel_y = torch.matmul(getattr(self, f"filterbank_{i}"), _magnitude(spec)).chunk(2)
                # power * log10(mel) is log10(mel ** power), without forming the power
                log_x = self.power * mel_x.clamp(min=self.clamp_eps).log10()
                log_y = self.power * mel_y.clamp(min=self.clamp_eps).log10()
                loss = loss + self.log_weight * F.l1_loss(log_x, log_y)
                if self.mag_weight:
                    loss = loss + self.mag_weight * F.l1_loss(mel_x, mel_y)
            return loss


class MultiResolutionSTFTLoss(nn.Module):
    """Multi-resolution STFT loss of Parallel WaveGAN (Yamamoto et al. 2020, "Parallel WaveGAN: A fast waveform
    generation model based on generative adversarial networks with multi-resolution spectrogram", sec. 2.2).

    For each resolution (n_fft, hop, Hann window of win samples zero-padded to n_fft, centred frames with reflect
    padding), with magnitudes |X| of the estimate and |Y| of the reference floored at 1e-7:

        spectral convergence  sc  = ||  |Y| - |X|  ||_F / || |Y| ||_F     (per example, averaged over the batch)
        log magnitude         mag = mean | ln |Y| - ln |X| |

    each averaged over the resolutions. The defaults are the paper's three resolutions. forward(x, y): x the
    estimate, y the reference, (B, T) or (B, 1, T) with T > max(fft_sizes) // 2 -> (sc, mag), two unitless scalar
    tensors in float32 (sc a ratio, mag in nepers of magnitude); the recipe adds them.
    """

    def __init__(self, fft_sizes=(1024, 2048, 512), hop_sizes=(120, 240, 50), win_lengths=(600, 1200, 240)):
        super().__init__()
        if not len(fft_sizes) == len(hop_sizes) == len(win_lengths) or not fft_sizes:
            raise ValueError(f"fft_sizes, hop_sizes and win_lengths need one entry per resolution (got "
                             f"{len(fft_sizes)}, {len(hop_sizes)} and {len(win_lengths)})")
        for n_fft, hop, win in zip(fft_sizes, hop_sizes, win_lengths):
            if not 0 < win <= n_fft or hop <= 0:
                raise ValueError(f"each resolution needs 0 < win_length <= fft_size and hop_size > 0 "
                                 f"(got fft_size {n_fft}, hop_size {hop}, win_length {win})")
        self.resolutions = tuple((int(n), int(h), int(w)) for n, h, w in zip(fft_sizes, hop_sizes, win_lengths))
        for i, (_, _, win) in enumerate(self.resolutions):
            self.register_buffer(f"window_{i}", torch.hann_window(win), persistent=False)

    def forward(self, x, y):
        with torch.autocast(x.device.type, enabled=False):
            xy = torch.cat([_as_batch(x), _as_batch(y)])  # (2B, T)
            sc, mag = xy.new_zeros(()), xy.new_zeros(())
            for i, (n_fft, hop, win) in enumerate(self.resolutions):
                spec = torch.stft(xy, n_fft, hop_length=hop, win_length=win, window=getattr(self, f"window_{i}"),
                                  center=True, pad_mode="reflect", return_complex=True)
                mag_x, mag_y = _magnitude(spec).chunk(2)  # (B, n_fft // 2 + 1, frames) each
                # per example, then averaged: a batch's loss is the mean of its micro-batches' losses
                sc = sc + (torch.linalg.vector_norm(mag_y - mag_x, dim=(1, 2))
                           / torch.linalg.vector_norm(mag_y, dim=(1, 2)).clamp(min=MAGNITUDE_FLOOR)).mean()
                mag = mag + F.l1_loss(mag_x.log(), mag_y.log())
            n = len(self.resolutions)
            return sc / n, mag / n


def anti_wrapping(phase_difference):
    """f(d) = |d - 2 pi round(d / 2 pi)|: the distance of a phase difference (radians) to the nearest multiple
    of 2 pi, in [0, pi]; so a difference of 2 pi k + d counts as |d| (APNet, Ai & Ling 2023)."""
    return (phase_difference - 2 * math.pi * torch.round(phase_difference / (2 * math.pi))).abs()


def stft_phase_losses(x, y, n_fft, hop_length, win_length):
    """Magnitude and phase losses of a frequency-domain vocoder (APNet, Ai & Ling 2023, "APNet: An All-Frame-Level
    Neural Vocoder Incorporating Direct Prediction of Amplitude and Phase Spectra"), computed here from
    the STFTs of two waveforms.

    x the estimate, y the reference, (B, T) or (B, 1, T) with T >= 2 * hop_length (two frames at least). Both are
    framed as MelSpectrogram frames them (reflect padding by (n_fft - hop_length) // 2, not centred, Hann window
    of `win_length` samples). Returns {"magnitude": ..., "phase": ...}, two float32 scalar tensors:

        magnitude  mean | ln max(|X|, 1e-5) - ln max(|Y|, 1e-5) |                    (nepers)
        phase      L_IP + L_GD + L_IAF                                               (radians, each in [0, pi])
          L_IP   mean f(phi_X - phi_Y)                        instantaneous phase
          L_GD   mean f(dphi_X/dk - dphi_Y/dk)                group delay: differences along frequency
          L_IAF  mean f(dphi_X/dt - dphi_Y/dt)                instantaneous angular frequency: along time

    with f the anti-wrapping function (`anti_wrapping`). Differentiable w.r.t. x; the phase of a bin whose
    magnitude is below 1e-7 is taken as 0 with no gradient (the angle of 0 is undefined), and elsewhere the
    phase gradient grows as 1 / |X|, so clip gradients when training with this loss.
    """
    with torch.autocast(x.device.type, enabled=False):
        xy = torch.cat([_as_batch(x), _as_batch(y)])  # (2B, T)
        window = torch.hann_window(win_length, device=xy.device, dtype=xy.dtype)
        spec = _stft(xy, n_fft, hop_length, win_length, window, (n_fft - hop_length) // 2)
        real, imag = spec.real, spec.imag
        audible = real.square() + imag.square() > MAGNITUDE_FLOOR**2
        # atan2 at (0, 0) has a 0/0 gradient: evaluate it on (1, 0) there and mask the result
        phase = torch.where(audible, torch.atan2(torch.where(audible, imag, 0.0), torch.where(audible, real, 1.0)),
                            0.0)
        log_mag_x, log_mag_y = _magnitude(spec).clamp(min=1e-5).log().chunk(2)
        phase_x, phase_y = phase.chunk(2)  # (B, n_fft // 2 + 1, frames) each
        instantaneous = anti_wrapping(phase_x - phase_y).mean()
        group_delay = anti_wrapping(torch.diff(phase_x, dim=1) - torch.diff(phase_y, dim=1)).mean()
        angular_frequency = anti_wrapping(torch.diff(phase_x, dim=2) - torch.diff(phase_y, dim=2)).mean()
        return {"magnitude": F.l1_loss(log_mag_x, log_mag_y),
                "phase": instantaneous + group_delay + angular_frequency}


# ---------------------------------------------------------------------------------------------------------------
# Listening to a mel without a vocoder


@torch.no_grad()
def griffin_lim(log_mel, config: MelConfig, n_iter=32, momentum=0.99, seed=0):
    """A rough waveform for log-mels (B, n_mels, frames) made with `config`: the magnitude spectrogram from the
    mel by non-negative least squares through the filterbank's pseudo-inverse, then fast Griffin-Lim (Perraudin
    et al. 2013) with `n_iter` iterations from a seeded random phase. (B, (frames - 1) * hop) float32.

    For listening when no vocoder was trained, not for metrics: it sounds phasey and metallic."""
    log_mel = log_mel.float()
    mel = log_mel.exp() if config.log == "ln" else torch.pow(10.0, log_mel)
    basis = mel_filterbank(config.sample_rate, config.n_fft, config.n_mels, config.fmin, config.fmax).to(mel.device)
    magnitude = torch.matmul(torch.linalg.pinv(basis), mel).clamp(min=0)  # (B, n_fft // 2 + 1, frames)
    window = torch.hann_window(config.win_length, device=mel.device)
    stft = dict(n_fft=config.n_fft, hop_length=config.hop_length, win_length=config.win_length, window=window)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    angles = torch.exp(2j * math.pi * torch.rand(magnitude.shape, generator=generator)).to(mel.device)
    length = (magnitude.size(-1) - 1) * config.hop_length
    previous = torch.zeros_like(angles)
    for _ in range(n_iter):
        audio = torch.istft(magnitude * angles, length=length, **stft)
        rebuilt = torch.stft(audio, return_complex=True, **stft)
        angles = rebuilt - momentum / (1 + momentum) * previous
        angles = angles / angles.abs().clamp(min=1e-8)
        previous = rebuilt
    return torch.istft(magnitude * angles, length=length, **stft)
