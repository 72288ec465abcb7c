import math
import sys
import types

import numpy as np
import pytest
import torch

from common.metrics import mel_cepstral_distortion, pesq_wb, psnr, si_sdr, ssim


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


# ---------------------------------------------------------------------------------------------------------------
# Audio


def _orthogonal_noise(reference, snr_db, seed):
    """Zero-mean noise orthogonal to each (zero-mean) reference row, scaled to the given SNR in dB."""
    rng = np.random.default_rng(seed)
    ref = reference - reference.mean(-1, keepdims=True)
    noise = rng.standard_normal(reference.shape)
    noise -= noise.mean(-1, keepdims=True)
    noise -= ((noise * ref).sum(-1, keepdims=True) / (ref * ref).sum(-1, keepdims=True)) * ref
    power = (ref * ref).sum(-1, keepdims=True) / 10 ** (np.asarray(snr_db)[:, None] / 10)
    return noise * np.sqrt(power / (noise * noise).sum(-1, keepdims=True))


def test_si_sdr_known_value_and_scale_invariance():
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((3, 8000)) + 0.5  # an offset: removed before measuring
    snr = [20.0, 5.0, -3.0]
    estimate = reference + _orthogonal_noise(reference, snr, seed=1)
    ref_t, est_t = torch.from_numpy(reference).float(), torch.from_numpy(estimate).float()
    values = si_sdr(est_t, ref_t)
    assert values.shape == (3,) and values.dtype == torch.float32
    assert values.tolist() == pytest.approx(snr, abs=0.1)
    # a gain on the estimate changes nothing; a scaled copy of the reference is perfect
    assert si_sdr(0.25 * est_t, ref_t).tolist() == pytest.approx(values.tolist(), abs=1e-3)
    assert (si_sdr(2 * ref_t, ref_t) > 60).all()
    assert si_sdr(est_t.unsqueeze(1), ref_t.unsqueeze(1)).tolist() == pytest.approx(values.tolist(), abs=1e-4)


def test_mel_cepstral_distortion_against_scipy_dct():
    dct = pytest.importorskip("scipy.fft").dct
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((2, 80, 30)) - 4
    est = ref + 0.3 * rng.standard_normal(ref.shape)
    ours = mel_cepstral_distortion(torch.from_numpy(est), torch.from_numpy(ref), n_coeffs=13)

    c_est, c_ref = (dct(m, type=2, norm="ortho", axis=1)[:, 1:13] for m in (est, ref))
    expected = (10 / math.log(10) * np.sqrt(2 * ((c_est - c_ref) ** 2).sum(1))).mean(-1)
    assert ours.shape == (2,)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-5)
    assert (ours > 0).all()
    ref_t = torch.from_numpy(ref).float()
    assert mel_cepstral_distortion(ref_t, ref_t).tolist() == [0.0, 0.0]
    # c0 is dropped: a level change (the same offset on every band) costs nothing
    assert mel_cepstral_distortion(ref_t + 2.0, ref_t).abs().max().item() < 1e-4
    with pytest.raises(ValueError, match="n_coeffs"):
        mel_cepstral_distortion(ref_t, ref_t, n_coeffs=81)


def test_pesq_wb_is_none_without_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "pesq", None)  # import pesq raises ImportError
    assert pesq_wb(torch.randn(2, 16000), torch.randn(2, 16000), 16000) is None


def test_pesq_wb_resamples_and_skips_refused_clips(monkeypatch):
    calls = []

    class PesqError(RuntimeError):
        pass

    def fake_pesq(fs, ref, deg, mode):
        calls.append((fs, mode, ref.shape, deg.shape, ref.dtype))
        if not np.abs(ref).max() > 0:
            raise PesqError("No utterances detected")
        return 2.0 if len(calls) == 1 else 4.0

    monkeypatch.setitem(sys.modules, "pesq", types.SimpleNamespace(pesq=fake_pesq, PesqError=PesqError))
    reference = torch.randn(3, 1, 8000)  # one second at 8 kHz
    reference[1] = 0.0
    assert pesq_wb(reference + 0.01, reference, 8000) == pytest.approx(3.0)  # the silent clip is left out
    assert calls == [(16000, "wb", (16000,), (16000,), np.float32)] * 3
    assert pesq_wb(torch.zeros(2, 8000), torch.zeros(2, 8000), 8000) is None


def _speech_like(seconds=2.0, sample_rate=16000, seed=0):
    """A voiced, pitch-gliding harmonic tone with a syllable-rate envelope: enough for PESQ's utterance detection."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 20))
    envelope = np.clip(np.sin(2 * np.pi * 2.5 * t), 0, None) ** 0.5
    noise = 0.01 * np.random.default_rng(seed).standard_normal(t.shape)
    return torch.from_numpy(0.2 * envelope * voiced + noise).float()


def test_pesq_wb_real_values():
    pytest.importorskip("pesq")
    clean = _speech_like(sample_rate=22050)
    noisy = clean + 0.05 * torch.from_numpy(np.random.default_rng(1).standard_normal(clean.shape)).float()
    perfect = pesq_wb(clean[None], clean[None], 22050)
    degraded = pesq_wb(noisy[None], clean[None], 22050)
    assert perfect > 4.4 and 1.0 <= degraded < perfect - 1.0
    batch = torch.stack([noisy, torch.zeros_like(clean)])
    assert pesq_wb(batch, torch.stack([clean, torch.zeros_like(clean)]), 22050) == pytest.approx(degraded)


def test_latent_stats_equal_the_statistics_of_all_latents_at_once():
    from common.metrics import LatentStats

    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 3, 5, 6, generator=g) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1) + 0.3
               for _ in range(3)]
    stats = LatentStats()
    for z in batches:
        stats.add(z)
    out = stats.summary()
    every = torch.cat(batches).double()
    assert out["shift_factor"] == pytest.approx(float(every.mean()))
    assert out["scaling_factor"] == pytest.approx(1 / float(every.std(correction=0)))
    per_channel = every.transpose(0, 1).flatten(1)
    assert out["channel_mean"] == pytest.approx(per_channel.mean(1).tolist())
    assert out["channel_std"] == pytest.approx(per_channel.std(1, correction=0).tolist())
    assert out["latent_channels"] == 3 and out["num_values"] == 3 * 4 * 5 * 6
    with pytest.raises(ValueError, match="no latents"):
        LatentStats().summary()
