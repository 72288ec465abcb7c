"""train_audio_vae.py end to end, as users run it: tiny mel and waveform VAEs on generated audio at 8 kHz, a few
dozen CPU steps. (Resume exactness, NaN skipping, corrupt files, SIGTERM, compile: tests/test_reliability.py.)"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import train_audio_vae as script
from common.audio_vae import load_audio_vae, read_audio_vae_config
from common.checkpoint import Checkpoint
from common.spectral import MelConfig
from common.training import read_metrics
from common.vocoder import build_generator, generator_config, save_vocoder
from helpers import run
from scripts import AUDIO_VAE_TINY_MEL, vocoder_data

TINY = ["--model", "mel-tiny", *AUDIO_VAE_TINY_MEL, "--disc_layers", "2", "--disc_ndf", "8", "--train_batch_size", "4",
        "--report_to", "none", "--dataloader_num_workers", "0", "--num_validation_files", "2", "--logging_steps", "1",
        "--latent_stats_num_segments", "8", "--mel_norm_num_segments", "16", "--lr_warmup_steps", "2"]
WAVE = ["--mode", "waveform", "--model", "wave-tiny", *AUDIO_VAE_TINY_MEL, "--disc_width", "0.0625",
        "--train_batch_size", "4", "--report_to", "none", "--dataloader_num_workers", "0", "--num_validation_files",
        "2", "--logging_steps", "1", "--latent_stats_num_segments", "8", "--lr_warmup_steps", "2"]
TINY_MEL = MelConfig(sample_rate=8000, n_fft=512, win_length=512, hop_length=128, n_mels=24, fmax=4000.0)


@pytest.fixture(scope="module")
def audio(tmp_path_factory):
    return vocoder_data(tmp_path_factory.mktemp("audio"))


def make_vocoder(folder, mel=TINY_MEL):
    """An (untrained) vocoder export for `mel`: what --vocoder reads."""
    config = generator_config("hifigan-tiny", mel.n_mels, upsample_rates=(8, 4, 4), upsample_kernel_sizes=(16, 8, 8))
    torch.manual_seed(0)
    save_vocoder(folder, build_generator(config), config, mel)
    return folder


def test_help_documents_every_flag():
    parser = script.build_parser()
    undocumented = [a.option_strings for a in parser._actions if a.dest != "help" and not a.help]
    assert not undocumented
    assert run("train_audio_vae.py", "--help").stdout.count("--") > 60


@pytest.mark.parametrize("args, message", [
    (["--train_data_dir", "/nonexistent"], "--train_data_dir /nonexistent: no such folder"),
    (["--train_data_dir", "{empty}"], "contains no audio"),
    (["--model", "wave-tiny"], "--model wave-tiny is a waveform-mode preset, not for --mode mel (try mel-f4-5m)"),
    (["--mode", "waveform", "--model", "mel-tiny"], "--model mel-tiny is a mel-mode preset"),
    (["--segment_length", "2000"], "--segment_length 2000 is not a multiple of 512 samples (one latent frame of "
                                   "--model mel-tiny at --hop_length 128; try 1536)"),
    (["--n_mels", "30"], "--n_mels 30 is not a multiple of 4, --model mel-tiny's frequency downsampling (try 28)"),
    (["--multiscale_mel_weight", "1"], "--multiscale_mel_weight needs --mode waveform"),
    (["--mode", "waveform", "--model", "wave-tiny", "--segment_length", "1024"],
     "--segment_length 1024 is too short: the STFT losses and discriminators use windows of 2048 samples"),
    (["--kl_anneal_start", "10", "--kl_anneal_end", "5"], "--kl_anneal_end 5 is before --kl_anneal_start 10"),
    (["--disc_layers", "4"], "--disc_layers 4 needs mels of at least 32 bands and frames (have 24 x 16)"),
    (["--vocoder", "{vocoder_22k}"], "--vocoder {vocoder_22k} was trained on other mel settings (vocoder vs this "
                                     "run): sample_rate: 22050 vs 8000; n_fft: 1024 vs 512; hop_length: 256 vs 128"),
    (["--vocoder", "/nonexistent"], "--vocoder /nonexistent: no such folder"),
    (["--vocoder", "{vocoder}", "--mode", "waveform", "--model", "wave-tiny"], "--vocoder is for --mode mel"),
    (["--mode", "waveform", "--model", "wave-tiny", "--fused_group_norm"], "--fused_group_norm needs --mode mel"),
    (["--win_length", "1024"], "mel settings: win_length 1024 must be <= n_fft 512"),
    (["--kl_weight", "-1"], "--kl_weight: must be >= 0"),
    ([], "--train_data_dir is required"),
])
def test_bad_input_stops_with_one_line_before_any_model(tmp_path, audio, capsys, args, message):
    (tmp_path / "empty").mkdir()
    fill = {"{empty}": str(tmp_path / "empty"), "{vocoder}": str(make_vocoder(tmp_path / "voc")),
            "{vocoder_22k}": str(tmp_path / "voc22")}
    if "{vocoder_22k}" in args:
        config = generator_config("hifigan-tiny", 24)
        save_vocoder(tmp_path / "voc22", build_generator(config), config,
                     MelConfig(n_mels=24, win_length=1024, n_fft=1024, hop_length=256))
    args = [fill.get(a, a) for a in args]
    message = message.replace("{vocoder_22k}", fill["{vocoder_22k}"])
    base = ["--output_dir", str(tmp_path / "out"), "--model", "mel-tiny", *AUDIO_VAE_TINY_MEL]
    if "--train_data_dir" not in args and args != []:
        base += ["--train_data_dir", str(audio[1])]
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(base + args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_every_config_parses(audio, tmp_path):
    for config, mode in (("audio_vae_mel", "mel"), ("audio_vae_waveform", "waveform")):
        args = script.parse_args(["--config", f"configs/{config}.yaml", "--train_data_dir", str(audio[1]),
                                  "--output_dir", str(tmp_path)])
        assert args.mode == mode and args.sample_rate == 22050 and args.hop_length == 256
        assert args.kl_anneal_start == 5000 and args.kl_anneal_end == 50000 and args.train_batch_size == 32


def test_kl_weight_follows_the_annealing_schedule():
    args = script.build_parser().parse_args(["--kl_weight", "1e-4", "--kl_anneal_start", "5000",
                                             "--kl_anneal_end", "50000"])
    assert [script.kl_weight_at(s, args) for s in (0, 4999, 5000)] == [0.0, 0.0, 0.0]
    assert script.kl_weight_at(27500, args) == pytest.approx(5e-5)
    assert script.kl_weight_at(50000, args) == script.kl_weight_at(10**6, args) == 1e-4


def test_collapse_watch_warns_once_per_episode_and_resumes():
    watch = script.CollapseWatch(threshold=0.01, patience=100)
    logs = lambda *kl: {f"kl/channel_{c:02d}": v for c, v in enumerate(kl)}  # noqa: E731
    assert watch.update(logs(0.5, 0.001), 100) is None  # channel 1 starts collapsing
    saved = json.loads(json.dumps(watch.state_dict()))
    assert watch.update(logs(0.5, 0.001), 150) is None
    first = logs(0.5, 0.001)
    warning = watch.update(first, 200)
    assert "POSTERIOR COLLAPSE at step 200: latent channel(s) 1 of 2" in warning and "--kl_free_bits" in warning
    assert first["latent/collapsed_channels"] == 1
    assert watch.update(logs(0.5, 0.001), 300) is None  # said once
    assert watch.update(logs(0.5, 0.2), 400) is None  # recovered ...
    assert watch.update(logs(0.5, 0.001), 500) is None
    assert "channel(s) 1 of 2" in watch.update(logs(0.5, 0.001), 600)  # ... and collapsed again: said again
    resumed = script.CollapseWatch(threshold=0.01, patience=100)
    resumed.load_state_dict(saved)
    assert "at step 200" in resumed.update(logs(0.5, 0.001), 200)


@pytest.fixture(scope="module")
def trained_mel(tmp_path_factory, audio):
    """One 40-step mel-mode run through `accelerate launch`, with a vocoder: KL annealed over steps 5-25, the
    GAN from step 20."""
    out = tmp_path_factory.mktemp("mel")
    vocoder = make_vocoder(tmp_path_factory.mktemp("vocoder") / "voc")
    run("train_audio_vae.py", *audio, "--output_dir", out, *TINY, "--max_train_steps", "40", "--learning_rate", "3e-3",
        "--kl_weight", "1e-3", "--kl_anneal_start", "5", "--kl_anneal_end", "25", "--disc_start_step", "20",
        "--validation_steps", "20", "--checkpointing_steps", "20", "--vocoder", vocoder, launcher="accelerate")
    return out


def test_mel_mode_learns_anneals_and_logs(trained_mel):
    metrics = read_metrics(trained_mel / "metrics.jsonl")
    train = [m for m in metrics if "loss/rec" in m]
    assert [m["step"] for m in train] == list(range(1, 41))
    rec = [m["loss/rec"] for m in train]
    assert sum(rec[-5:]) / 5 < 0.8 * sum(rec[:3]) / 3, rec
    # The KL weight of each step, step by step: 0 through step index 5, linear to 1e-3 at index 25, then flat.
    expected = [0.0 if s < 5 else 1e-3 * min(1.0, (s - 5) / 20) for s in range(40)]
    assert [m["weight/kl"] for m in train] == pytest.approx(expected, rel=1e-6, abs=1e-12)
    gan = [m for m in train if "loss/disc" in m]
    assert gan[0]["step"] == 21
    for key in ("loss/adv", "loss/fm", "disc/real_prob", "disc/fake_prob", "grad_norm/disc", "lr/disc", "loss/kl",
                "kl/channel_00", "kl/channel_07", "latent/active_channels", "latent/collapsed_channels",
                "latent/mean", "latent/std", "perf/samples_per_s", "train/ema_decay"):
        assert key in gan[-1], key
    assert 0 <= gan[-1]["latent/active_channels"] <= 8
    vals = [m for m in metrics if "val/mel_l1" in m]
    assert [m["step"] for m in vals] == [20, 40]
    for key in ("val/kl", "val/vocoded_mrstft", "val/vocoded_si_sdr", "val/vocoder_only_mrstft"):
        assert key in vals[-1], key
    samples = trained_mel / "samples" / "step-0000040"
    assert (samples / "spectrograms.png").exists() and (samples / "0_reconstruction.wav").exists()
    info = json.loads((trained_mel / "run.json").read_text())
    assert info["script"] == "train_audio_vae.py" and info["args"]["mode"] == "mel"


def test_mel_export_reproduces_the_last_validation_and_has_latent_stats(trained_mel):
    vae = load_audio_vae(trained_mel)
    assert vae.mode == "mel" and vae.mel_config == TINY_MEL and vae.config["step"] == 40
    kept = load_file(trained_mel / "samples" / "last_validation.safetensors")
    with torch.no_grad():
        for n in range(2):
            audio = kept[f"audio_{n}"][None]
            assert torch.equal(vae.decode(vae.encode(audio).mean)[0], kept[f"reconstruction_{n}"])
    ema = Checkpoint(trained_mel / "checkpoint-40").tensors("ema")
    exported = load_file(trained_mel / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(exported[k], ema[k]) for k in ema)
    stats = json.loads((trained_mel / "latent_stats.json").read_text())
    assert stats["latent_channels"] == 8 and len(stats["channel_mean"]) == len(stats["channel_std"]) == 8
    assert stats["latent_shape_per_segment"] == [8, 6, 4]  # 24 mel bands / 4, 2048 samples / 128 / 4
    assert stats["samples_per_latent_frame"] == 512 and stats["latent_frames_per_second"] == 8000 / 512
    # (z - shift) * scale of the training segments has unit variance, by construction
    assert 0.1 < stats["scaling_factor"] < 10 and all(s > 0 for s in stats["channel_std"])


def test_export_from_a_checkpoint(trained_mel, tmp_path):
    run("train_audio_vae.py", "--export_checkpoint", trained_mel / "checkpoint-20", "--output_dir", tmp_path / "e")
    ema = Checkpoint(trained_mel / "checkpoint-20").tensors("ema")
    exported = load_file(tmp_path / "e" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(exported[k], ema[k]) for k in ema)
    assert read_audio_vae_config(tmp_path / "e")["step"] == 20
    assert json.loads((tmp_path / "e" / "latent_stats.json").read_text())["latent_channels"] == 8


def test_resume_with_other_mel_settings_is_refused(trained_mel, audio, tmp_path):
    shutil.copytree(trained_mel / "checkpoint-20", tmp_path / "checkpoint-20")
    args = [a if a != "4000" else "3000" for a in TINY]  # --fmax 3000
    refused = run("train_audio_vae.py", *audio, "--output_dir", tmp_path, *args, "--max_train_steps", "21",
                  "--resume_from_checkpoint", "latest", check=False)
    assert refused.returncode != 0
    assert "the input settings differ from the checkpoint's (fmax: 4000.0 vs 3000.0)" in refused.stderr


def test_a_broken_export_is_refused_by_name(trained_mel, tmp_path):
    shutil.copytree(trained_mel, tmp_path / "e", ignore=shutil.ignore_patterns("checkpoint-*", "samples"))
    config = json.loads((tmp_path / "e" / "audio_vae.json").read_text())
    (tmp_path / "e" / "audio_vae.json").write_text(json.dumps({**config, "mode": "spectrogram"}))
    with pytest.raises(ValueError, match="audio_vae.json: mode 'spectrogram', expected one of mel, waveform"):
        load_audio_vae(tmp_path / "e")
    (tmp_path / "e" / "audio_vae.json").unlink()
    with pytest.raises(ValueError, match="audio_vae.json: missing"):
        load_audio_vae(tmp_path / "e")


def test_waveform_mode_learns_and_its_export_reproduces_the_validation(audio, tmp_path):
    run("train_audio_vae.py", *audio, "--output_dir", tmp_path, *WAVE, "--max_train_steps", "24", "--learning_rate",
        "3e-3", "--kl_anneal_start", "0", "--kl_anneal_end", "0", "--kl_weight", "1e-4", "--disc_start_step", "20",
        "--validation_steps", "24", "--checkpointing_steps", "24")
    train = [m for m in read_metrics(tmp_path / "metrics.jsonl") if "loss/rec" in m]
    rec = [m["loss/rec"] for m in train]
    assert sum(rec[-5:]) / 5 < 0.85 * sum(rec[:3]) / 3, rec
    assert {"loss/multiscale_mel", "loss/mrstft", "loss/adv", "loss/fm"} <= set(train[-1])
    val = [m for m in read_metrics(tmp_path / "metrics.jsonl") if "val/mel_l1" in m][-1]
    assert {"val/mrstft", "val/si_sdr"} <= set(val)
    vae = load_audio_vae(tmp_path)
    assert vae.mode == "waveform" and vae.samples_per_latent_frame == 256
    kept = load_file(tmp_path / "samples" / "last_validation.safetensors")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the run had: 1D convolutions split over threads round differently
    try:
        with torch.no_grad():
            audio0 = kept["audio_0"][None]
            assert torch.equal(vae.decode(vae.encode(audio0).mean)[0], kept["reconstruction_0"])
    finally:
        torch.set_num_threads(threads)
    stats = json.loads((tmp_path / "latent_stats.json").read_text())
    assert stats["mode"] == "waveform" and stats["latent_shape_per_segment"] == [8, 8]
    assert (tmp_path / "samples" / "step-0000024" / "0_reconstruction.wav").exists()


def test_posterior_collapse_is_detected_and_griffin_lim_marks_the_audio(audio, tmp_path):
    """A KL weight of 1 from the first step squeezes the posterior onto the prior: every channel collapses, and
    the run says so loudly, in the log and in the logged metrics."""
    done = run("train_audio_vae.py", *audio, "--output_dir", tmp_path, *TINY, "--max_train_steps", "12",
               "--learning_rate", "3e-3", "--kl_weight", "1.0", "--kl_anneal_start", "0", "--kl_anneal_end", "0",
               "--adv_weight", "0", "--fm_weight", "0", "--collapse_kl_threshold", "0.05", "--collapse_patience", "4",
               "--validation_steps", "12", "--checkpointing_steps", "12")
    assert "POSTERIOR COLLAPSE" in done.stderr and "Remedies:" in done.stderr
    logs = [m for m in read_metrics(tmp_path / "metrics.jsonl") if "latent/collapsed_channels" in m]
    assert logs[-1]["latent/collapsed_channels"] >= 1
    assert any("alert/posterior_collapse" in m for m in logs)
    folder = tmp_path / "samples" / "step-0000012"
    assert (folder / "0_reconstruction_griffinlim.wav").exists() and not (folder / "0_reconstruction.wav").exists()


def _train_steps_on_gpu(steps, compile_mode=None):
    """The script's `train_step` on the GPU in float64, mel mode, GAN on from the first step with the default
    batch-normed PatchGAN, compiled as the script compiles (`compile_options`): the logged tensors of every step (kept
    as returned), their values read right after the step, and the VAE's and discriminator's weights (running
    statistics included) at the end."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from common.optim import build_optimizer

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    torch._dynamo.reset()
    flags = ["--compile", "--compile_mode", compile_mode] if compile_mode else []
    args = script.build_parser().parse_args(["--output_dir", "/tmp/unused", "--train_data_dir", ".", *TINY,
                                             "--disc_start_step", "0", "--kl_anneal_start", "0", *flags])
    args.multiscale_mel_weight = args.mrstft_weight = 0.0  # what check_args sets for the mel mode
    saved = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True  # the same conv algorithms
    try:
        accelerator = Accelerator()  # before build_models, which logs through Accelerate
        torch.manual_seed(0)
        vae, disc = script.build_models(args, torch.device("cuda"), torch.contiguous_format)
        vae.double(), disc.double()
        model = script.VAEForTraining(vae)
        model.sample_posterior = False
        opt_vae = build_optimizer("adamw", vae.parameters(), lr=1e-3)
        opt_disc = build_optimizer("adamw", disc.parameters(), lr=1e-3, betas=(0.8, 0.99))
        if args.compile:
            model.compile(dynamic=False, options=script.compile_options(args))
            disc.compile(dynamic=False, options=script.compile_options(args))
        model_p, disc_p, opt_vae, opt_disc = accelerator.prepare(model, disc, opt_vae, opt_disc)
        g = torch.Generator().manual_seed(1)
        kept, read = [], []
        for step in range(steps):
            x = torch.randn(4, 1, 24, 16, generator=g, dtype=torch.float64).cuda()
            out = script.train_step(x, model_p, disc_p, None, opt_vae, opt_disc, accelerator, args, step)
            kept.append(out)
            read.append({k: float(v) for k, v in out.items() if v.dtype.is_floating_point})
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved
    weights = {f"vae.{k}": v.detach().clone() for k, v in vae.state_dict().items()}
    weights.update({f"disc.{k}": v.detach().clone() for k, v in disc.state_dict().items()})
    return kept, read, weights


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_steps_train_like_eager_and_keep_their_logs():
    """--compile (reduce-overhead: CUDA graphs, convolutions laid out channels-last inside the graphs) with the
    discriminator run three times a step (real, detached reconstruction, reconstruction for the VAE's losses) and
    its batch norms updating their statistics: eager's losses and weights, and a step's logged tensors keep their
    values after later steps replay the graphs.

    In float64: in float32 the GAN amplifies rounding from step to step (eager float32 itself is 2% off eager
    float64 in the adversarial loss by the third step), which would hide an error of that size; in float64 a
    correct compiled step agrees with eager to about 1e-13."""
    _, eager, eager_weights = _train_steps_on_gpu(3)
    kept, graphs, graph_weights = _train_steps_on_gpu(3, "reduce-overhead")
    for step, (a, b) in enumerate(zip(eager, graphs)):
        for key in ("loss/total", "loss/rec", "loss/kl", "loss/disc", "loss/adv", "loss/fm"):
            assert b[key] == pytest.approx(a[key], rel=1e-9, abs=1e-12), (step, key)
    for step, (out, values) in enumerate(zip(kept, graphs)):
        assert {k: float(v) for k, v in out.items() if v.dtype.is_floating_point} == values, step
    for name, w in eager_weights.items():
        if w.is_floating_point():
            torch.testing.assert_close(graph_weights[name], w, rtol=1e-9, atol=1e-11, msg=name)
        else:
            assert torch.equal(graph_weights[name], w), name  # BatchNorm's num_batches_tracked: 3 passes a step
