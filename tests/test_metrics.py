import numpy as np
import pytest
import torch

from common.metrics import psnr, ssim


def test_psnr_known_value():
    x = torch.zeros(1, 3, 8, 8)
    y = x + 0.2  # in [-1, 1]: an error of 0.1 on [0, 1] -> 20 dB
    assert psnr(y, x).item() == pytest.approx(20.0, abs=1e-4)


def _ssim_reference(a, b):
    """Direct numpy SSIM with an explicit 11x11 Gaussian window over valid positions."""
    coords = np.arange(11) - 5
    g = np.exp(-coords**2 / (2 * 1.5**2))
    g /= g.sum()
    w = np.outer(g, g)
    h, wd = a.shape
    vals = []
    for i in range(h - 10):
        for j in range(wd - 10):
            pa, pb = a[i:i + 11, j:j + 11], b[i:i + 11, j:j + 11]
            ma, mb = (w * pa).sum(), (w * pb).sum()
            va, vb = (w * pa * pa).sum() - ma**2, (w * pb * pb).sum() - mb**2
            cov = (w * pa * pb).sum() - ma * mb
            c1, c2 = 0.01**2, 0.03**2
            vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ssim_matches_reference_and_is_one_on_identical():
    torch.manual_seed(0)
    x = torch.rand(1, 1, 24, 24) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    ours = ssim(y, x).item()
    ref = _ssim_reference(((y[0, 0] + 1) / 2).double().numpy(), ((x[0, 0] + 1) / 2).double().numpy())
    assert ours == pytest.approx(ref, abs=1e-5)
    assert ssim(x.repeat(1, 3, 1, 1), x.repeat(1, 3, 1, 1)).item() == pytest.approx(1.0, abs=1e-6)
