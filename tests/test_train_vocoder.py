"""train_vocoder.py end to end, as users run it: tiny generators and discriminators, generated audio at 8 kHz, a
few dozen CPU steps. (Resume exactness, NaN skipping, corrupt files, SIGTERM, compile: tests/test_reliability.py.)"""

import json

import pytest
import torch
from safetensors.torch import load_file

import train_vocoder as script
from common.checkpoint import Checkpoint
from common.training import read_metrics
from common.vocoder import load_vocoder
from helpers import run
from scripts import VOCODER_TINY_MEL, vocoder_data, vocoder_parts

TINY = ["--model", "hifigan-tiny", *VOCODER_TINY_MEL, "--disc_width", "0.0625", "--train_batch_size", "4",
        "--report_to", "none", "--dataloader_num_workers", "0", "--num_validation_files", "2",
        "--learning_rate", "2e-3", "--disc_learning_rate", "1e-3", "--logging_steps", "1"]


@pytest.fixture(scope="module")
def audio(tmp_path_factory):
    return vocoder_data(tmp_path_factory.mktemp("audio"))


def test_help_documents_every_flag():
    parser = script.build_parser()
    undocumented = [a.option_strings for a in parser._actions if a.dest != "help" and not a.help]
    assert not undocumented
    assert run("train_vocoder.py", "--help").stdout.count("--") > 60


@pytest.mark.parametrize("args, message", [
    (["--train_data_dir", "/nonexistent"], "--train_data_dir /nonexistent: no such folder"),
    (["--train_data_dir", "{empty}"], "contains no audio"),
    (["--model", "hifigan-huge"], "invalid choice: 'hifigan-huge'"),
    (["--discriminator", "melgan"], "invalid choice: 'melgan'"),
    (["--segment_length", "2000"], "--segment_length 2000 is not a multiple of --hop_length 256 (try 1792)"),
    (["--segment_length", "256"], "--segment_length 256 is shorter than --n_fft 512"),
    (["--hop_length", "128", "--n_fft", "512"], "--model hifigan-tiny upsamples by 256 but --hop_length is 128"),
    (["--win_length", "1024"], "mel settings: win_length 1024 must be <= n_fft 512"),
    (["--fmax", "6000"], "mel settings: need 0 <= fmin < fmax <= sample_rate / 2"),
    (["--segment_length", "1536", "--discriminator", "dac"],
     "--segment_length 1536 is too short for --discriminator dac (STFT windows of 2048 samples; give at least 2048)"),
    (["--learning_rate", "0"], "--learning_rate: must be > 0"),
    (["--config", "{bad_config}"], "unreadable YAML"),
    ([], "--train_data_dir is required"),
])
def test_bad_input_stops_with_one_line_before_any_model(tmp_path, audio, capsys, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.yaml").write_text("model: [hifigan")
    fill = {"{empty}": str(tmp_path / "empty"), "{bad_config}": str(tmp_path / "bad.yaml")}
    args = [fill.get(a, a) for a in args]
    base = ["--output_dir", str(tmp_path / "out"), "--model", "hifigan-tiny", *VOCODER_TINY_MEL]
    if "--train_data_dir" not in args and args != []:
        base += ["--train_data_dir", str(audio[1])]
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(base + args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_every_config_parses(audio, tmp_path):
    for config in ("vocoder_hifigan", "vocoder_bigvgan", "vocoder_vocos", "vocoder_dac"):
        args = script.parse_args(["--config", f"configs/{config}.yaml", "--train_data_dir", str(audio[1]),
                                  "--output_dir", str(tmp_path)])
        assert args.sample_rate == 22050 and args.hop_length == 256 and args.mixed_precision == "no"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, audio):
    """One 30-step run through `accelerate launch`: mel loss alone for 10 steps, then the GAN."""
    out = tmp_path_factory.mktemp("run")
    run("train_vocoder.py", *audio, "--output_dir", out, *TINY, "--max_train_steps", "30", "--disc_start_step", "10",
        "--validation_steps", "15", "--checkpointing_steps", "15", launcher="accelerate")
    return out


def test_training_learns_and_logs(trained):
    metrics = read_metrics(trained / "metrics.jsonl")
    mel = [m["loss/mel"] for m in metrics if "loss/mel" in m]
    assert len(mel) == 30
    assert sum(mel[-5:]) / 5 < 0.8 * sum(mel[:3]) / 3, mel
    gan = [m for m in metrics if "loss/disc" in m]
    assert gan and gan[0]["step"] == 11  # the 11th optimizer step is step index 10, the GAN's start
    for key in ("loss/adv", "loss/fm", "grad_norm/disc", "grad_norm/generator", "disc/logits_real", "lr/generator",
                "lr/disc", "perf/samples_per_s", "train/ema_decay"):
        assert key in gan[-1], key
    vals = [m for m in metrics if "val/mel_l1" in m]
    assert [m["step"] for m in vals] == [15, 30]
    for key in ("val/mrstft", "val/si_sdr", "val/mcd"):
        assert key in vals[-1], key
    assert vals[-1]["val/mel_l1"] < vals[0]["val/mel_l1"]
    samples = trained / "samples" / "step-0000030"
    assert (samples / "spectrograms.png").exists() and (samples / "0_generated.wav").exists()
    info = json.loads((trained / "run.json").read_text())  # what the run was, for comparing runs later
    assert info["script"] == "train_vocoder.py" and info["args"]["max_train_steps"] == 30
    assert info["packages"]["torch"] and info["devices"] == ["cpu"] and "--disc_start_step" in info["command"]


def test_runs_compare_from_their_files(trained, tmp_path, capsys):
    from common.compare import main

    main([str(trained), "--metrics", "loss/mel", "val/mel_l1", "--plot", str(tmp_path / "cmp.png")])
    out = capsys.readouterr().out
    best = min(m["loss/mel"] for m in read_metrics(trained / "metrics.jsonl") if "loss/mel" in m)
    assert f"{best:.5g}" in out and (tmp_path / "cmp.png").stat().st_size > 1000


def test_export_reproduces_the_last_validation_bit_for_bit(trained):
    vocoder = load_vocoder(trained)
    config = json.loads((trained / "config.json").read_text())
    assert config["mel"]["n_mels"] == 24 and config["mel"]["sample_rate"] == 8000 and config["step"] == 30
    kept = load_file(trained / "samples" / "last_validation.safetensors")
    with torch.no_grad():
        for n in range(2):
            assert torch.equal(vocoder(kept[f"mel_{n}"][None])[0, 0], kept[f"audio_{n}"])
            # The mel it was given is the export's own mel of the held-out audio.
    # The export holds the EMA weights of the last step.
    ema = Checkpoint(trained / "checkpoint-30").tensors("ema")
    exported = load_file(trained / "generator.safetensors")
    assert exported.keys() == ema.keys() and all(torch.equal(exported[k], ema[k]) for k in ema)


def test_export_from_a_checkpoint_and_resynthesis_command(trained, audio, tmp_path):
    run("train_vocoder.py", "--export_checkpoint", trained / "checkpoint-15", "--output_dir", tmp_path / "e")
    ema = Checkpoint(trained / "checkpoint-15").tensors("ema")
    exported = load_file(tmp_path / "e" / "generator.safetensors")
    assert all(torch.equal(exported[k], ema[k]) for k in ema)
    wav = next(audio[3].glob("*.wav"))
    run("common/vocoder.py", "--vocoder", tmp_path / "e", "--input", wav, "--output", tmp_path / "out.wav")
    import soundfile as sf

    data, rate = sf.read(str(tmp_path / "out.wav"))
    assert rate == 8000 and len(data) > 0


def test_resume_with_other_mel_settings_is_refused(trained, audio, tmp_path):
    import shutil

    shutil.copytree(trained / "checkpoint-15", tmp_path / "checkpoint-15")
    args = [a if a != "24" else "32" for a in TINY]  # --n_mels 32
    refused = run("train_vocoder.py", *audio, "--output_dir", tmp_path, *args, "--max_train_steps", "16",
                  "--resume_from_checkpoint", "latest", check=False)
    assert refused.returncode != 0
    assert "the mel settings differ from the checkpoint's (n_mels: 24 vs 32)" in refused.stderr


@pytest.mark.parametrize("flags", [
    ["--model", "bigvgan-tiny", "--discriminator", "bigvgan", "--mrstft_weight", "1"],
    ["--model", "vocos-tiny", "--discriminator", "dac", "--mel_loss", "multiscale", "--stft_mag_weight", "1",
     "--phase_weight", "0.5", "--optimizer", "muon", "--no-use_ema", "--validation_weights", "raw"],
], ids=["bigvgan", "vocos-dac-muon"])
def test_other_generators_and_discriminators_train_and_export(flags, audio, tmp_path):
    run("train_vocoder.py", *audio, "--output_dir", tmp_path, *TINY, *flags, "--max_train_steps", "4",
        "--validation_steps", "4", "--checkpointing_steps", "4")
    logs = [m for m in read_metrics(tmp_path / "metrics.jsonl") if "loss/total" in m]
    assert len(logs) == 4 and all(torch.isfinite(torch.tensor(m["loss/total"])) for m in logs)
    if "--phase_weight" in flags:
        assert logs[-1]["loss/phase"] > 0 and logs[-1]["loss/stft_mag"] > 0
    kept = load_file(tmp_path / "samples" / "last_validation.safetensors")
    with torch.no_grad():
        assert torch.equal(load_vocoder(tmp_path)(kept["mel_0"][None])[0, 0], kept["audio_0"])


def _train_steps_on_gpu(steps, compile_mode=None):
    """The script's `train_step` on the GPU in float32 without TF32, GAN on: the logged tensors of every step (kept
    as returned), their values read right after the step, and the generator's weights at the end."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    torch._dynamo.reset()
    flags = ["--compile", "--compile_mode", compile_mode] if compile_mode else []
    args = script.build_parser().parse_args(["--output_dir", "/tmp/unused", "--train_data_dir", ".", *TINY, *flags])
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        generator, disc, mel_fn, spectral, opt_g, opt_d = vocoder_parts(script, args, device="cuda")
        if args.compile:
            script.compile_models(generator, spectral, disc, args.compile_mode)
        accelerator = Accelerator()
        generator_p, disc_p, opt_g, opt_d = accelerator.prepare(generator, disc, opt_g, opt_d)
        g = torch.Generator().manual_seed(1)
        kept, read = [], []
        for step in range(steps):
            audio = (0.3 * torch.randn(4, 2048, generator=g)).cuda()
            out = script.train_step(audio, generator_p, disc_p, mel_fn, spectral, opt_g, opt_d, accelerator, args,
                                    step)
            kept.append(out)
            read.append({k: float(v) for k, v in out.items() if v.dtype.is_floating_point})
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    weights = {k: v.detach().clone() for k, v in generator.state_dict().items()}
    return kept, read, weights


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_steps_train_like_eager_and_keep_their_logs():
    """--compile --compile_mode reduce-overhead replays each model's kernels as CUDA graphs. Over six steps it gives
    eager's losses and weights (to float32 rounding), and a step's logged tensors keep their values after later
    steps replay the graphs (the loop averages them over a logging window)."""
    _, eager, eager_weights = _train_steps_on_gpu(6)
    kept, graphs, graph_weights = _train_steps_on_gpu(6, "reduce-overhead")
    for step, (a, b) in enumerate(zip(eager, graphs)):
        for key in ("loss/total", "loss/mel", "loss/disc", "loss/fm"):
            assert b[key] == pytest.approx(a[key], rel=2e-3, abs=1e-4), (step, key)
    for step, (out, values) in enumerate(zip(kept, graphs)):
        assert {k: float(v) for k, v in out.items() if v.dtype.is_floating_point} == values, step
    for name, w in eager_weights.items():
        torch.testing.assert_close(graph_weights[name], w, rtol=0, atol=3e-3, msg=name)
