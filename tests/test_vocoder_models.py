"""common.vocoder: generator sizes and shapes, HiFi-GAN's locality, BigVGAN's anti-aliased Snake, Vocos's inverse
STFT, the export format and the command line."""

import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.spectral import MelConfig
from common.vocoder import (GENERATOR_PRESETS, AntiAliasedActivation, InverseSTFT, Snake, SnakeBeta,
                            Vocoder, build_generator, count_parameters, generator_config, kaiser_sinc_filter,
                            load_vocoder, main, save_vocoder)
from tests.helpers import ROOT, env

TINY = ("hifigan-tiny", "bigvgan-tiny", "vocos-tiny")
# A small mel (8 kHz, hop 64) for the export and command-line tests.
SMALL_MEL = MelConfig(sample_rate=8000, n_fft=256, hop_length=64, win_length=256, n_mels=20, fmax=4000.0)


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny models run hundreds of small ops; on a shared 2-core CPU, OpenMP's thread barriers then cost more
    than the arithmetic (BigVGAN-tiny's forward went from 0.2 s to 14 s beside another busy process)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_config(preset):
    """A tiny preset at SMALL_MEL's hop and bands."""
    if preset == "vocos-tiny":
        return generator_config(preset, SMALL_MEL.n_mels, n_fft=256, hop_length=64, win_length=256)
    return generator_config(preset, SMALL_MEL.n_mels, upsample_rates=[8, 8], upsample_kernel_sizes=[16, 16])


def built(config, seed=0):
    torch.manual_seed(seed)
    return build_generator(config).eval()


# ---------------------------------------------------------------------------------------------------------------
# Sizes and shapes


@pytest.mark.parametrize("preset,millions", [("hifigan-v1", 13.94), ("hifigan-v2", 0.92), ("hifigan-v3", 1.46)])
def test_hifigan_parameter_counts_match_the_paper(preset, millions):
    with torch.device("meta"):  # counting needs no memory or initialisation
        n = count_parameters(build_generator(preset))
    assert abs(n / 1e6 - millions) <= 0.01, n


@pytest.mark.parametrize("preset", ["hifigan-5m", "bigvgan-5m", "vocos-5m"])
def test_5m_presets_are_about_5m(preset):
    with torch.device("meta"):
        n = count_parameters(build_generator(preset))
    assert 4.5e6 <= n <= 5.5e6, n


def test_presets_are_json_configs_with_hop_256():
    for name, config in GENERATOR_PRESETS.items():
        assert json.loads(json.dumps(config)) == config
        assert generator_config(name, 80) == config
        with torch.device("meta"):
            g = build_generator(config)
        assert (g.hop_length, g.n_mels) == (256, 80), name
    tiny = sum(p.numel() for p in built("hifigan-tiny").parameters())
    assert 1000 <= tiny <= 50_000


@pytest.mark.parametrize("preset", TINY)
def test_output_is_frames_times_hop(preset):
    g = built(preset)
    with torch.no_grad():
        for frames in (1, 7, 32):
            out = g(torch.randn(2, 80, frames))
            assert out.shape == (2, 1, frames * 256) and out.dtype == torch.float32
            assert torch.isfinite(out).all() and out.abs().max() <= 1
    small = built(small_config(preset))
    assert small.hop_length == 64
    assert small(torch.randn(1, 20, 5)).shape == (1, 1, 320)


@pytest.mark.parametrize("overrides", [
    dict(type="hifigan", resblock=2, resblock_kernel_sizes=[3, 5], resblock_dilation_sizes=[[1, 2], [2, 6]],
         upsample_rates=[4, 4, 3], upsample_kernel_sizes=[8, 8, 7]),
    dict(type="bigvgan", resblock=2, activation="snake", use_tanh_at_final=False, use_bias_at_final=False,
         upsample_rates=[5, 4], upsample_kernel_sizes=[11, 8]),
    dict(type="vocos", n_fft=200, hop_length=40, win_length=160),
])
def test_other_shapes_and_options(overrides):
    kind = overrides.pop("type")
    g = built(generator_config(f"{kind}-tiny", 16, **overrides))
    hop = overrides.get("hop_length") or math.prod(overrides["upsample_rates"])
    assert g.hop_length == hop
    assert g(torch.randn(3, 16, 9)).shape == (3, 1, 9 * hop)


def test_bad_configs_name_what_is_valid():
    with pytest.raises(ValueError, match="unknown generator preset 'hifigan-xl'.*hifigan-5m"):
        generator_config("hifigan-xl", 80)
    with pytest.raises(ValueError, match="unknown generator type 'wavenet'.*hifigan, bigvgan, vocos"):
        build_generator({"type": "wavenet"})
    with pytest.raises(ValueError, match="unknown hifigan setting.*upsample_rate\\b.*known:.*upsample_rates"):
        generator_config("hifigan-tiny", 80, upsample_rate=[8])
    with pytest.raises(ValueError, match="kernel - rate even"):
        build_generator(generator_config("hifigan-tiny", 80, upsample_kernel_sizes=[15, 16, 4, 4]))
    with pytest.raises(ValueError, match="activation must be one of snake, snakebeta"):
        build_generator(generator_config("bigvgan-tiny", 80, activation="relu"))


# ---------------------------------------------------------------------------------------------------------------
# HiFi-GAN: a frame reaches only the samples its receptive field allows


def receptive_span(config, frame):
    """[first, last] output sample that input `frame` can influence, from the layer shapes alone."""
    resblock_reach = max(
        sum(d * (k - 1) // 2 + ((k - 1) // 2 if config["resblock"] == 1 else 0) for d in dilations)
        for k, dilations in zip(config["resblock_kernel_sizes"], config["resblock_dilation_sizes"]))
    lo, hi = frame - 3, frame + 3  # conv_pre, kernel 7
    for u, k in zip(config["upsample_rates"], config["upsample_kernel_sizes"]):
        pad = (k - u) // 2  # transposed conv: input i writes outputs i*u - pad ... i*u - pad + k - 1
        lo, hi = lo * u - pad - resblock_reach, hi * u - pad + k - 1 + resblock_reach
    return lo - 3, hi + 3  # conv_post, kernel 7


def test_hifigan_output_changes_only_within_the_receptive_field():
    config = generator_config("hifigan-tiny", 80)
    g = built(config)
    mel = torch.randn(1, 80, 32)
    bumped = mel.clone()
    bumped[..., 16] += 1.0
    with torch.no_grad():
        diff = (g(bumped) - g(mel))[0, 0].abs()
    lo, hi = receptive_span(config, 16)
    assert 0 < lo and hi < diff.numel() - 1 and hi - lo < diff.numel() / 2  # a local window inside the clip
    changed = torch.nonzero(diff > 0).flatten()
    assert diff.max() > 1e-4
    assert lo <= changed.min() and changed.max() <= hi, (changed.min(), changed.max(), lo, hi)
    assert diff[:lo].max() == 0 and diff[hi + 1:].max() == 0


# ---------------------------------------------------------------------------------------------------------------
# BigVGAN: Snake and the anti-aliased activation


def test_snake_and_snakebeta_known_values():
    x = torch.linspace(-3, 3, 50).expand(1, 2, 50)
    snake = Snake(2)
    alpha = torch.tensor([0.5, 2.0])
    with torch.no_grad():
        snake.log_alpha.copy_(alpha.log())
    expected = x + torch.sin(alpha[:, None] * x) ** 2 / alpha[:, None]
    torch.testing.assert_close(snake(x), expected)
    beta = SnakeBeta(2)
    with torch.no_grad():
        beta.log_alpha.copy_(alpha.log())
        beta.log_beta.fill_(math.log(4.0))
    torch.testing.assert_close(beta(x), x + torch.sin(alpha[:, None] * x) ** 2 / 4.0)
    torch.testing.assert_close(Snake(2)(x), x + torch.sin(x) ** 2)  # alpha starts at 1


def test_lowpass_filter_passes_below_and_stops_above_the_cutoff():
    taps = kaiser_sinc_filter(0.25, 0.3, 12)
    assert taps.shape == (12,) and torch.allclose(taps, taps.flip(0)) and abs(taps.sum() - 1) < 1e-6
    response = torch.fft.rfft(taps.double(), 4096).abs()  # frequency = bin / 4096 cycles per sample
    assert (response[:int(0.1 * 4096)] - 1).abs().max() < 0.01  # passband (the original band's lower 40%)
    assert abs(response[1024] - 0.5) < 0.01  # -6 dB at the cutoff, the original Nyquist
    assert response[int(0.4 * 4096):].max() < 0.003  # stopband: below -50 dB


def test_antialiased_resampling_keeps_a_low_sine():
    aa = AntiAliasedActivation(torch.nn.Identity())
    n = torch.arange(2000.0)
    for freq in (0.01, 0.05):  # cycles per sample at the original rate
        x = torch.sin(2 * math.pi * freq * n).expand(1, 3, -1)
        up = aa.upsample(x)
        assert up.shape == (1, 3, 4000)
        # sample n sits at 2n + 1/2 on the doubled grid
        fine = torch.sin(2 * math.pi * freq * (torch.arange(4000.0) - 0.5) / 2)
        assert (up[0, 0, 200:-200] - fine[200:-200]).abs().max() < 2e-3
        out = aa(x)
        assert out.shape == x.shape
        assert (out - x)[..., 100:-100].abs().max() < 2e-3
        assert abs(out[..., 100:-100].abs().max() - 1) < 2e-3  # amplitude kept


def test_antialiased_snake_aliases_less_than_plain_snake():
    # Snake(2 sin(2 pi 0.21 n)) holds the harmonics 0.42, 0.63, 0.84, ... cycles per sample; above 0.5 they fold back
    # (0.63 -> 0.37, 0.84 -> 0.16) onto frequencies that are no harmonic of the tone.
    n = torch.arange(4096.0)
    x = 2 * torch.sin(2 * math.pi * 0.21 * n)[None, None]
    snake = Snake(1)

    def aliased_fraction(y):
        spec = torch.fft.rfft(y[0, 0, 512:-512] * torch.hann_window(3072)).abs() ** 2
        freqs = torch.fft.rfftfreq(3072)
        harmonic = ((freqs[:, None] - torch.tensor([0.0, 0.21, 0.42])).abs() < 0.01).any(1)
        return spec[~harmonic].sum() / spec.sum()

    with torch.no_grad():
        plain, filtered = aliased_fraction(snake(x)), aliased_fraction(AntiAliasedActivation(snake)(x))
    assert plain > 0.01 and filtered < 0.01 * plain, (plain, filtered)


# ---------------------------------------------------------------------------------------------------------------
# Vocos: the inverse STFT inverts MelSpectrogram's framing


@pytest.mark.parametrize("n_fft,hop,win", [(1024, 256, 1024), (256, 64, 256), (200, 40, 160)])
def test_inverse_stft_reconstructs_a_signal(n_fft, hop, win):
    torch.manual_seed(0)
    frames = 40
    x = torch.randn(2, frames * hop) * 0.3
    istft = InverseSTFT(n_fft, hop, win)
    pad = (n_fft - hop) // 2  # MelConfig's HiFi-GAN framing
    padded = F.pad(x[:, None], (pad, pad), mode="reflect")[:, 0]
    spec = torch.stft(padded, n_fft, hop, win, window=torch.hann_window(win), center=False, return_complex=True)
    assert spec.shape == (2, n_fft // 2 + 1, frames)
    y = istft(spec.abs(), spec.angle())
    assert y.shape == x.shape
    assert (y - x)[:, hop:-hop].abs().max() < 1e-4
    assert (y - x).abs().max() < 1e-3  # the edges too


def test_vocos_magnitude_is_clipped_without_nan_gradients():
    g = built("vocos-tiny")
    with torch.no_grad():
        g.head.bias[:513].fill_(200.0)  # log magnitudes far beyond exp overflow
    mel = torch.randn(1, 80, 4)
    out = g(mel)
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in g.parameters() if p.grad is not None)


# ---------------------------------------------------------------------------------------------------------------
# Export


@pytest.mark.parametrize("preset", TINY)
def test_export_round_trip_is_bit_exact(preset, tmp_path):
    config = small_config(preset)
    g = built(config)
    with torch.no_grad():  # move the weights off their initial values, weight-norm magnitudes included
        for p in g.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_vocoder(tmp_path, g, config, SMALL_MEL, extra={"step": 7})
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved == {"generator": config, "mel": SMALL_MEL.to_dict(), "format": "vocoder-v1", "step": 7}
    vocoder = load_vocoder(tmp_path)
    assert isinstance(vocoder, Vocoder) and not vocoder.training
    assert (vocoder.sample_rate, vocoder.hop_length, vocoder.n_mels) == (8000, 64, 20)
    mel = torch.randn(2, 20, 11)
    with torch.no_grad():
        assert torch.equal(vocoder(mel), g(mel))
        assert vocoder(mel[0]).shape == (1, 1, 11 * 64)
        audio = torch.randn(2, 1000) * 0.1
        assert vocoder.resynthesize(audio).shape == (2, 1, 1000)


def test_export_keeps_the_weight_norm_parametrisation(tmp_path):
    from safetensors.torch import load_file

    config = small_config("hifigan-tiny")
    save_vocoder(tmp_path, built(config), config, SMALL_MEL)
    names = load_file(tmp_path / "generator.safetensors")
    assert "conv_pre.parametrizations.weight.original0" in names  # magnitude g
    assert "conv_pre.parametrizations.weight.original1" in names  # direction v


def test_export_refuses_a_config_that_does_not_describe_the_generator(tmp_path):
    config = small_config("hifigan-tiny")
    g = built(config)
    with pytest.raises(ValueError, match="does not match the generator"):
        save_vocoder(tmp_path, g, {**config, "upsample_initial_channel": 64}, SMALL_MEL)
    with pytest.raises(ValueError, match="upsamples by 64, the mel hop_length is 256"):
        save_vocoder(tmp_path, g, config, MelConfig(n_mels=20))
    with pytest.raises(ValueError, match="extra must not set format"):
        save_vocoder(tmp_path, g, config, SMALL_MEL, extra={"format": "x"})
    assert not (tmp_path / "generator.safetensors").exists()


@pytest.fixture
def exported(tmp_path):
    config = small_config("hifigan-tiny")
    folder = tmp_path / "vocoder"
    save_vocoder(folder, built(config), config, SMALL_MEL)
    return folder


def test_loading_refuses_broken_folders_by_file(exported, tmp_path):
    config_path, weights = exported / "config.json", exported / "generator.safetensors"
    with pytest.raises(ValueError, match="nowhere: no such folder"):
        load_vocoder(tmp_path / "nowhere")

    good = config_path.read_text()
    config_path.write_text(good[:40])
    with pytest.raises(ValueError, match=r"config\.json: unreadable JSON"):
        load_vocoder(exported)
    config_path.write_text(json.dumps({**json.loads(good), "format": "something-else"}))
    with pytest.raises(ValueError, match=r"config\.json: format 'something-else', expected 'vocoder-v1'"):
        load_vocoder(exported)
    config_path.write_text(json.dumps({**json.loads(good), "mel": {**SMALL_MEL.to_dict(), "hop": 1}}))
    with pytest.raises(ValueError, match=r"config\.json: mel: unknown mel setting\(s\) hop"):
        load_vocoder(exported)
    wider = json.loads(good)
    wider["generator"]["upsample_initial_channel"] = 64
    config_path.write_text(json.dumps(wider))
    with pytest.raises(ValueError, match=r"generator\.safetensors: tensors do not fit the generator in config\.json: "
                                         r"conv_pre\.bias: \(32,\) in the checkpoint, \(64,\) in the model; .* and "
                                         r"\d+ more$"):
        load_vocoder(exported)
    config_path.write_text(good)

    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"generator\.safetensors: unreadable safetensors"):
        load_vocoder(exported)
    weights.unlink()
    with pytest.raises(ValueError, match=r"generator\.safetensors: missing"):
        load_vocoder(exported)
    config_path.unlink()
    with pytest.raises(ValueError, match=r"config\.json: missing"):
        load_vocoder(exported)


def test_check_mel_config_names_each_differing_field(exported):
    vocoder = load_vocoder(exported)
    vocoder.check_mel_config(SMALL_MEL)
    vocoder.check_mel_config(SMALL_MEL.to_dict())
    other = MelConfig(**{**SMALL_MEL.to_dict(), "hop_length": 80, "n_mels": 64, "log": "log10"})
    with pytest.raises(ValueError) as err:
        vocoder.check_mel_config(other, what="the audio VAE")
    message = str(err.value)
    assert "\n" not in message and message.startswith("the audio VAE has mel settings")
    for part in ("hop_length: 80 vs 64", "n_mels: 64 vs 20", "log: log10 vs ln"):
        assert part in message
    assert "sample_rate" not in message


# ---------------------------------------------------------------------------------------------------------------
# Command line


def test_cli_resynthesises_a_wav_file(exported, tmp_path):
    import soundfile as sf

    rate, seconds = 16000, 0.5  # at twice the vocoder's rate: resampled on the way in
    t = np.arange(int(rate * seconds)) / rate
    sf.write(tmp_path / "in.wav", (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate)
    out = tmp_path / "out" / "resynth.wav"
    proc = subprocess.run([sys.executable, "-m", "common.vocoder", "--vocoder", str(exported), "--input",
                           str(tmp_path / "in.wav"), "--output", str(out), "--device", "cpu"],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    info = sf.info(str(out))
    assert (info.samplerate, info.frames, info.subtype) == (8000, 4000, "PCM_16")
    assert "wrote" in proc.stdout


@pytest.mark.parametrize("suffix", [".npy", ".safetensors"])
def test_cli_renders_a_saved_mel(exported, tmp_path, suffix):
    import soundfile as sf
    from safetensors.torch import save_file

    mel = torch.randn(20, 13) - 5
    path = tmp_path / f"mel{suffix}"
    if suffix == ".npy":
        np.save(path, mel.numpy())
    else:
        save_file({"mel": mel}, path)
    main(["--vocoder", str(exported), "--input", str(path), "--output", str(tmp_path / "mel.wav"), "--device", "cpu"])
    info = sf.info(str(tmp_path / "mel.wav"))
    assert (info.samplerate, info.frames) == (8000, 13 * 64)
    expected = load_vocoder(exported)(mel)[0, 0].detach().clamp(-1, 1).numpy()
    written, _ = sf.read(str(tmp_path / "mel.wav"), dtype="float32")
    assert np.abs(written - expected).max() <= 1 / 32767 + 1e-6  # 16-bit rounding only


def test_cli_errors_are_one_line_with_exit_code_2(exported, tmp_path, capsys):
    from safetensors.torch import save_file

    np.save(tmp_path / "wrong.npy", np.zeros((80, 10), np.float32))
    save_file({"spec": torch.zeros(20, 3)}, tmp_path / "other.safetensors")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "bad.wav").write_bytes(b"RIFF not really")
    cases = {
        str(tmp_path / "missing.wav"): "no such file",
        str(tmp_path / "wrong.npy"): r"a mel of shape \(80, 10\); this vocoder takes \(20, frames\)",
        str(tmp_path / "other.safetensors"): r"no tensor 'mel' \(it holds spec\)",
        str(tmp_path / "notes.txt"): r"expected an audio file \(.*\) or a mel \(.npy, .safetensors\)",
        str(tmp_path / "bad.wav"): "unreadable audio",
    }
    for source, reason in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            main(["--vocoder", str(exported), "--input", source, "--output", str(tmp_path / "x.wav")])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert err.startswith(f"python -m common.vocoder: error: --input {source}: ")
        assert re.search(reason, err), err
    with pytest.raises(SystemExit):
        main(["--vocoder", str(tmp_path), "--input", str(tmp_path / "wrong.npy"), "--output", "x.wav"])
    assert capsys.readouterr().err == (f"python -m common.vocoder: error: --vocoder {tmp_path / 'config.json'}: "
                                       f"missing (a vocoder folder holds config.json and generator.safetensors)\n")
    assert not (tmp_path / "x.wav").exists()


# ---------------------------------------------------------------------------------------------------------------
# CUDA: torch.compile under bf16 autocast


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("preset", TINY)
def test_compiled_bf16_matches_eager_fp32(preset):
    g = built(preset).cuda().train()
    mel = torch.randn(2, 80, 24, device="cuda")
    reference = g(mel)
    compiled = torch.compile(g)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = compiled(mel)
    assert out.shape == (2, 1, 24 * 256) and out.dtype == torch.float32
    out.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in g.parameters())
    assert (out - reference).abs().max() < 0.05 * reference.abs().max() + 1e-3
