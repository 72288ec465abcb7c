import math
import warnings

import numpy as np
import pytest
import torch

from common.spectral import (MelConfig, MelSpectrogram, MultiResolutionSTFTLoss, MultiScaleMelLoss, anti_wrapping,
                             mel_filterbank, stft_phase_losses)

SR = 16000


def _librosa():
    librosa = pytest.importorskip("librosa")
    warnings.filterwarnings("ignore", message="Empty filters detected", category=UserWarning)
    return librosa


def _noise(batch=2, length=4096, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((batch, length))).float() * 0.3


# ---------------------------------------------------------------------------------------------------------------
# The mel contract: filterbank, spectrogram, configuration.


@pytest.mark.parametrize("sr, n_fft, n_mels, fmin, fmax", [
    (22050, 1024, 80, 0.0, 8000.0),  # HiFi-GAN
    (44100, 2048, 128, 0.0, None),
    (16000, 512, 40, 55.0, 7600.0),
    (24000, 100, 10, 20.0, 11000.0),  # odd bin count
])
def test_mel_filterbank_matches_librosa(sr, n_fft, n_mels, fmin, fmax):
    librosa = _librosa()
    ours = mel_filterbank(sr, n_fft, n_mels, fmin, fmax).numpy()
    ref = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax)
    assert ours.shape == (n_mels, n_fft // 2 + 1)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-7)


@pytest.mark.parametrize("log", ["ln", "log10"])
def test_mel_spectrogram_matches_librosa_with_hifigan_framing(log):
    librosa = _librosa()
    config = MelConfig(log=log)
    audio = _noise(2, config.hop_length * 12 + 77)  # not a multiple of the hop: the tail is dropped
    ours = MelSpectrogram(config)(audio.unsqueeze(1))

    pad = (config.n_fft - config.hop_length) // 2
    padded = np.pad(audio.double().numpy(), ((0, 0), (pad, pad)), mode="reflect")
    mag = np.abs(librosa.stft(padded, n_fft=config.n_fft, hop_length=config.hop_length, win_length=config.win_length,
                              window="hann", center=False))
    fb = librosa.filters.mel(sr=config.sample_rate, n_fft=config.n_fft, n_mels=config.n_mels, fmin=config.fmin,
                             fmax=config.fmax, dtype=np.float64)
    mel = np.maximum(fb @ mag, config.clamp_min)
    ref = np.log(mel) if log == "ln" else np.log10(mel)

    assert ours.shape == (2, config.n_mels, 12) == ref.shape
    assert ours.dtype == torch.float32 and config.num_frames(audio.size(-1)) == 12
    np.testing.assert_allclose(ours.numpy(), ref, atol=2e-4)


def test_mel_frames_are_samples_over_hop():
    config = MelConfig(sample_rate=24000, n_fft=1024, hop_length=240, win_length=1024, n_mels=100, fmax=None)
    mel = MelSpectrogram(config)
    for length in (240 * 8, 240 * 8 + 239, 240 * 20):
        assert mel(torch.zeros(1, length)).shape[-1] == length // 240 == config.num_frames(length)


@pytest.mark.parametrize("settings, field", [
    (dict(hop_length=255), "hop_length"),  # n_fft - hop odd: no symmetric padding
    (dict(win_length=2048), "win_length"),
    (dict(fmax=12000.0), "fmax"),  # above 22050 / 2
    (dict(fmin=9000.0), "fmin"),  # above fmax
    (dict(log="log2"), "log"),
    (dict(clamp_min=0.0), "clamp_min"),
])
def test_mel_config_refuses_bad_settings_by_name(settings, field):
    with pytest.raises(ValueError, match=field):
        MelConfig(**settings)


def test_mel_config_dict_round_trip_and_mismatches():
    config = MelConfig(sample_rate=24000, hop_length=256, fmax=None)
    assert MelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="n_mel_channels"):
        MelConfig.from_dict({**config.to_dict(), "n_mel_channels": 80})
    other = MelConfig(sample_rate=24000, hop_length=240, n_fft=1020, win_length=1020, fmax=None)
    assert config.mismatches(other) == ["n_fft: 1024 vs 1020", "hop_length: 256 vs 240", "win_length: 1024 vs 1020"]
    assert config.mismatches(other.to_dict()) == config.mismatches(other)
    assert config.mismatches(config) == []


# ---------------------------------------------------------------------------------------------------------------
# Losses: shared behaviour.

MEL_LOSS = MultiScaleMelLoss(SR)
STFT_LOSS = MultiResolutionSTFTLoss()

LOSSES = {
    "mel": MEL_LOSS,
    "stft_sc": lambda x, y: STFT_LOSS(x, y)[0],
    "stft_mag": lambda x, y: STFT_LOSS(x, y)[1],
    "magnitude": lambda x, y: stft_phase_losses(x, y, 512, 128, 512)["magnitude"],
    "phase": lambda x, y: stft_phase_losses(x, y, 512, 128, 512)["phase"],
}


@pytest.mark.parametrize("name", LOSSES)
def test_loss_zero_on_identical_and_decreasing_towards_reference(name):
    loss = LOSSES[name]
    y = _noise()
    noise = _noise(seed=1)
    assert loss(y, y).item() == pytest.approx(0.0, abs=1e-6)
    far, near = loss(y + noise, y).item(), loss(y + 0.1 * noise, y).item()
    assert far > near > 1e-3


@pytest.mark.parametrize("name", LOSSES)
def test_loss_gradients_reach_estimate_and_shapes_agree(name):
    loss = LOSSES[name]
    y = _noise()
    x = (y + 0.3 * _noise(seed=1)).requires_grad_()
    value = loss(x, y)
    assert value.shape == () and value.dtype == torch.float32
    value.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert loss(x.unsqueeze(1), y.unsqueeze(1)).item() == pytest.approx(value.item(), rel=1e-6)


@pytest.mark.parametrize("name", LOSSES)
def test_loss_gradients_finite_on_digital_silence(name):
    x = torch.zeros(1, 4096, requires_grad=True)
    LOSSES[name](x, _noise(1)).backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", LOSSES)
def test_loss_runs_in_float32_under_bf16_autocast(name):
    y = _noise()
    x = y + 0.3 * _noise(seed=1)
    reference = LOSSES[name](x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = LOSSES[name](x, y)
    assert inside.dtype == torch.float32
    assert inside.item() == pytest.approx(reference.item(), rel=1e-6)


def test_loss_buffers_are_not_saved():
    assert MEL_LOSS.state_dict() == {} and STFT_LOSS.state_dict() == {}
    assert len(list(MEL_LOSS.buffers())) == 2 * 7


def test_loss_settings_are_validated():
    with pytest.raises(ValueError, match="n_mels"):
        MultiScaleMelLoss(SR, window_lengths=(64, 128), n_mels=(10,))
    with pytest.raises(ValueError, match="fmax"):
        MultiScaleMelLoss(SR, fmax=9000.0)
    with pytest.raises(ValueError, match="win_length"):
        MultiResolutionSTFTLoss(fft_sizes=(512,), hop_sizes=(128,), win_lengths=(1024,))


# ---------------------------------------------------------------------------------------------------------------
# Losses: known values, computed independently with librosa's STFT and filterbank.


def test_multi_scale_mel_loss_known_value():
    librosa = _librosa()
    windows, mels, eps, power, mag_weight = (64, 512), (10, 40), 1e-5, 2.0, 0.5
    y = _noise()
    x = y + 0.2 * _noise(seed=1)
    ours = MultiScaleMelLoss(SR, windows, mels, clamp_eps=eps, power=power, mag_weight=mag_weight)(x, y).item()

    expected = 0.0
    for win, n_mels in zip(windows, mels):
        fb = librosa.filters.mel(sr=SR, n_fft=win, n_mels=n_mels, dtype=np.float64)
        mel_x, mel_y = (fb @ np.abs(librosa.stft(s.double().numpy(), n_fft=win, hop_length=win // 4, window="hann",
                                                 center=True, pad_mode="reflect")) for s in (x, y))
        log_x, log_y = (np.log10(np.maximum(m, eps) ** power) for m in (mel_x, mel_y))
        expected += np.abs(log_x - log_y).mean() + mag_weight * np.abs(mel_x - mel_y).mean()
    assert ours == pytest.approx(expected, rel=1e-4)


def test_multi_resolution_stft_loss_known_value():
    librosa = _librosa()
    y = _noise()
    x = y + 0.2 * _noise(seed=1)
    sc, mag = STFT_LOSS(x, y)

    sc_ref, mag_ref = 0.0, 0.0
    for n_fft, hop, win in ((1024, 120, 600), (2048, 240, 1200), (512, 50, 240)):
        mag_x, mag_y = (np.maximum(np.abs(librosa.stft(s.double().numpy(), n_fft=n_fft, hop_length=hop,
                                                       win_length=win, window="hann", center=True,
                                                       pad_mode="reflect")), 1e-7) for s in (x, y))
        sc_ref += np.linalg.norm(mag_y - mag_x) / np.linalg.norm(mag_y) / 3
        mag_ref += np.abs(np.log(mag_x) - np.log(mag_y)).mean() / 3
    assert sc.item() == pytest.approx(sc_ref, rel=1e-4)
    assert mag.item() == pytest.approx(mag_ref, rel=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Phase losses.


def test_anti_wrapping_maps_whole_turns_away():
    d = torch.linspace(-3.1, 3.1, 25, dtype=torch.float64)
    for k in range(-3, 4):
        torch.testing.assert_close(anti_wrapping(d + 2 * math.pi * k), d.abs(), atol=1e-9, rtol=0)


def test_phase_losses_known_values():
    librosa = _librosa()
    n_fft, hop, win = 512, 128, 400
    y = _noise()
    x = y + 0.3 * _noise(seed=1)
    ours = stft_phase_losses(x, y, n_fft, hop, win)

    def spec(s):
        padded = np.pad(s.double().numpy(), ((0, 0), ((n_fft - hop) // 2,) * 2), mode="reflect")
        return librosa.stft(padded, n_fft=n_fft, hop_length=hop, win_length=win, window="hann", center=False)

    def wrap(d):
        return np.abs(d - 2 * np.pi * np.round(d / (2 * np.pi)))

    sx, sy = spec(x), spec(y)
    px, py = np.angle(sx), np.angle(sy)
    phase = (wrap(px - py).mean() + wrap(np.diff(px, axis=1) - np.diff(py, axis=1)).mean()
             + wrap(np.diff(px, axis=2) - np.diff(py, axis=2)).mean())
    magnitude = np.abs(np.log(np.maximum(np.abs(sx), 1e-5)) - np.log(np.maximum(np.abs(sy), 1e-5))).mean()
    assert ours["magnitude"].item() == pytest.approx(magnitude, rel=1e-4)
    assert ours["phase"].item() == pytest.approx(phase, rel=1e-4)


def test_phase_losses_see_polarity_and_time_shift():
    y = _noise()
    # polarity flip: every phase moves by pi, its differences along time and frequency by whole turns
    flipped = stft_phase_losses(-y, y, 512, 128, 512)
    assert flipped["magnitude"].item() == pytest.approx(0.0, abs=1e-6)
    assert flipped["phase"].item() == pytest.approx(math.pi, abs=1e-3)
    # a 37-sample delay leaves the magnitudes nearly alone but scrambles the phase of noise
    shifted = stft_phase_losses(torch.roll(y, 37, dims=-1), y, 512, 128, 512)
    assert shifted["phase"].item() > 1.0
    assert shifted["phase"].item() > 5 * stft_phase_losses(y + 0.1 * _noise(seed=1), y, 512, 128, 512)["phase"]


# ---------------------------------------------------------------------------------------------------------------
# CUDA: bf16 autocast and torch.compile (run where a GPU is present).


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_losses_compile_and_autocast_on_cuda():
    device = torch.device("cuda")
    y = _noise(4, 16384).to(device)
    x = (y + 0.1 * _noise(4, 16384, seed=1).to(device)).requires_grad_()
    mel, stft = MultiScaleMelLoss(24000).to(device), MultiResolutionSTFTLoss().to(device)

    def total(x, y):
        sc, mag = stft(x, y)
        phase = stft_phase_losses(x, y, 1024, 256, 1024)
        return mel(x, y) + sc + mag + phase["magnitude"] + phase["phase"]

    eager = total(x, y)
    compiled = torch.compile(total, fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = compiled(x.bfloat16(), y.bfloat16())
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(eager.item(), rel=0.05)  # bf16 inputs: rounded waveform
    out.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    torch.testing.assert_close(compiled(x, y), eager, rtol=1e-4, atol=1e-5)


def test_griffin_lim_turns_a_mel_back_into_audio_with_its_spectrum():
    from common.spectral import griffin_lim

    config = MelConfig(sample_rate=8000, n_fft=512, win_length=512, hop_length=128, n_mels=40, fmax=4000)
    t = torch.arange(8000) / 8000
    tone = (0.5 * torch.sin(2 * torch.pi * 440 * t))[None]
    mel = MelSpectrogram(config)(tone)
    audio = griffin_lim(mel, config)
    assert audio.shape == (1, (mel.size(-1) - 1) * 128)
    error = (MelSpectrogram(config)(audio) - mel[..., :-1]).abs().mean()
    noise = (MelSpectrogram(config)(0.3 * torch.randn_like(audio)) - mel[..., :-1]).abs().mean()
    assert error < 0.2 * noise  # the tone's energy where the mel has it (framing differs: not a metric)
    assert torch.equal(audio, griffin_lim(mel, config))  # seeded
