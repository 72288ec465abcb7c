"""Reconstruction metrics.

Images: PSNR and SSIM on batches in [-1, 1] (converted to [0, 1] before measuring).
Audio: SI-SDR on waveforms, mel cepstral distortion on log-mel spectrograms, and wide-band PESQ (optional package).
"""

import math

import numpy as np
import torch
import torch.nn.functional as F


def psnr(x, y):
    """Peak signal-to-noise ratio in dB per image, (B,), for images in [-1, 1] (peak 1 after rescaling)."""
    x01, y01 = (x.float().clamp(-1, 1) + 1) / 2, (y.float().clamp(-1, 1) + 1) / 2
    mse = (x01 - y01).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp(min=1e-10))


def _gaussian_window(size=11, sigma=1.5, device=None):
    coords = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-coords**2 / (2 * sigma**2))
    return (g / g.sum()).float()


def ssim(x, y, window_size=11, sigma=1.5):
    """Structural similarity (Wang et al. 2004) per image, (B,), averaged over channels and valid positions.

    Gaussian window 11 x 11 with sigma 1.5, K1 = 0.01, K2 = 0.03, data range 1; the same definition as
    scikit-image's `structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`.
    """
    x01, y01 = (x.float().clamp(-1, 1) + 1) / 2, (y.float().clamp(-1, 1) + 1) / 2
    c = x01.size(1)
    g = _gaussian_window(window_size, sigma, x.device)
    kernel_h = g.view(1, 1, 1, -1).repeat(c, 1, 1, 1)
    kernel_v = g.view(1, 1, -1, 1).repeat(c, 1, 1, 1)

    def blur(t):  # separable Gaussian, 'valid' positions only
        return F.conv2d(F.conv2d(t, kernel_h, groups=c), kernel_v, groups=c)

    mu_x, mu_y = blur(x01), blur(y01)
    var_x = blur(x01 * x01) - mu_x**2
    var_y = blur(y01 * y01) - mu_y**2
    cov = blur(x01 * y01) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)


# ---------------------------------------------------------------------------------------------------------------
# Audio: waveforms (B, T) or (B, 1, T), log-mel spectrograms (B, n_mels, frames).


def si_sdr(estimate, reference, eps=1e-8):
    """Scale-invariant signal-to-distortion ratio (Le Roux et al. 2019, "SDR - half-baked or well done?") in dB per
    clip, (B,). Both signals are made zero-mean; the reference is scaled by the least-squares gain
    alpha = <estimate, reference> / ||reference||^2, and

        SI-SDR = 10 log10( ||alpha * reference||^2 / ||estimate - alpha * reference||^2 )

    (`eps` added to both norms), so multiplying the estimate by any non-zero gain leaves it unchanged.
    Computed in float64, returned in float32."""
    est = estimate.detach().reshape(-1, estimate.size(-1)).double()
    ref = reference.detach().reshape(-1, reference.size(-1)).double()
    est = est - est.mean(-1, keepdim=True)
    ref = ref - ref.mean(-1, keepdim=True)
    alpha = (est * ref).sum(-1, keepdim=True) / (ref.square().sum(-1, keepdim=True) + eps)
    target = alpha * ref
    distortion = est - target
    ratio = (target.square().sum(-1) + eps) / (distortion.square().sum(-1) + eps)
    return (10 * torch.log10(ratio)).float()


def _dct_matrix(n, rows, device):
    """The first `rows` rows of the orthonormal DCT-II of size n, (rows, n) float32:
    D[k, m] = sqrt((1 if k == 0 else 2) / n) * cos(pi * k * (2m + 1) / (2n))."""
    k = torch.arange(rows, dtype=torch.float64)[:, None]
    m = torch.arange(n, dtype=torch.float64)[None, :]
    d = torch.cos(math.pi * k * (2 * m + 1) / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d.float().to(device)


def mel_cepstral_distortion(log_mel_estimate, log_mel_reference, n_coeffs=13):
    """Mel cepstral distortion in dB per clip, (B,), between two natural-log mel spectrograms (B, n_mels, frames)
    whose frames are already time-aligned (same framing; no dynamic time warping).

    The mel-cepstrum of a frame is the orthonormal DCT-II of its log-mel vector over the mel axis; of its first
    `n_coeffs` coefficients c_0 .. c_{n_coeffs - 1}, c_0 (overall level) is dropped, and per frame

        MCD = (10 / ln 10) * sqrt(2 * sum_{k=1}^{n_coeffs - 1} (c_k - c'_k)^2)

    averaged over frames. These cepstra come from the log-mel (as for MFCCs), not from the WORLD/SPTK
    mel-cepstral analysis most TTS papers use, so absolute values compare only between runs measured here.
    Log-mels in log10 should be multiplied by ln 10 first."""
    x, y = log_mel_estimate.detach().float(), log_mel_reference.detach().float()
    n_mels = x.size(-2)
    if not 2 <= n_coeffs <= n_mels:
        raise ValueError(f"n_coeffs must be in [2, n_mels = {n_mels}] (got {n_coeffs})")
    # the DCT is linear: the cepstral difference is the DCT of the log-mel difference
    diff = torch.matmul(_dct_matrix(n_mels, n_coeffs, x.device)[1:], x - y)  # (B, n_coeffs - 1, frames)
    per_frame = (10 / math.log(10)) * torch.sqrt(2 * diff.square().sum(-2))
    return per_frame.mean(-1)


def pesq_wb(estimate, reference, sample_rate):
    """Mean wide-band PESQ (ITU-T P.862.2, MOS-LQO, about 1 to 4.6) over a batch of clips (B, T) or (B, 1, T),
    as a float, or None when the optional `pesq` package is not installed.

    Clips are resampled to 16 kHz (soxr, high quality) when `sample_rate` differs. A clip that PESQ refuses
    (silence: no utterance found, or too short) is left out of the mean; None when every clip was left out.
    Runs on the CPU, one clip at a time: keep it for evaluation, not the training step."""
    try:
        from pesq import PesqError, pesq
    except ImportError:
        return None
    est = estimate.detach().reshape(-1, estimate.size(-1)).float().cpu().numpy()
    ref = reference.detach().reshape(-1, reference.size(-1)).float().cpu().numpy()
    if sample_rate != 16000:
        import soxr

        # soxr resamples (frames, channels): the batch travels as channels
        est = soxr.resample(est.T, sample_rate, 16000, quality="HQ").T
        ref = soxr.resample(ref.T, sample_rate, 16000, quality="HQ").T
    scores = []
    for e, r in zip(est, ref):
        try:
            with np.errstate(divide="ignore", invalid="ignore"):  # pesq divides silence by its zero peak
                scores.append(float(pesq(16000, np.ascontiguousarray(r, dtype=np.float32),
                                         np.ascontiguousarray(e, dtype=np.float32), "wb")))
        except PesqError:
            continue  # nothing PESQ can measure in this clip
    return float(np.mean(scores)) if scores else None


# ---------------------------------------------------------------------------------------------------------------
# Latent statistics of a VAE, for latent_stats.json


class LatentStats:
    """Running statistics of VAE latents (B, C, ...), in float64: `add(z)` per batch, then `summary()` gives

        scaling_factor  1 / std of all latent values     shift_factor  their mean
        channel_mean, channel_std                          latent_channels, num_values (per channel)

    so an LDM trains on (z - shift_factor) * scaling_factor, of zero mean and unit variance on this data (the
    role of Stable Diffusion's hand-derived 0.18215)."""

    def __init__(self):
        self.total = self.total_sq = None
        self.count = 0

    def add(self, z):
        z = z.detach().double()
        dims = [d for d in range(z.ndim) if d != 1]
        total, total_sq = z.sum(dim=dims), z.pow(2).sum(dim=dims)
        self.total = total if self.total is None else self.total + total
        self.total_sq = total_sq if self.total_sq is None else self.total_sq + total_sq
        self.count += z.numel() // z.size(1)

    def summary(self):
        if not self.count:
            raise ValueError("no latents were added")
        channel_mean = self.total / self.count
        channel_std = (self.total_sq / self.count - channel_mean**2).clamp(min=0).sqrt()
        mean = float(channel_mean.mean())
        variance = float(self.total_sq.sum()) / (self.count * len(self.total)) - mean**2
        return {"scaling_factor": 1.0 / math.sqrt(max(variance, 1e-24)), "shift_factor": mean,
                "channel_mean": channel_mean.tolist(), "channel_std": channel_std.tolist(),
                "latent_channels": len(self.total), "num_values": self.count}
