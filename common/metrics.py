"""Reconstruction metrics on image batches in [-1, 1] (converted to [0, 1] before measuring)."""

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
