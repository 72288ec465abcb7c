"""The training scripts under the reliability tests (tests/test_reliability.py), and the contract they keep.

A new script joins every reliability test by adding one `ScriptSpec` to SCRIPTS. It must:

- take the shared flags of `common.args.add_run_args` (batch size, accumulation, steps, checkpointing, resume,
  --allow_model_change, --stall_timeout, --max_consecutive_skips, --max_corrupt_fraction, ...);
- write `checkpoint-<step>/` with `common.checkpoint.CheckpointWriter`: model tensors, `optimizer_<name>.pt`,
  `scheduler_<name>.pt` (stepped once per update of its optimizer) and `training_state.json` (`step`, `epoch`,
  `run_id`, `ema_updates`, `num_processes`, `args`), and log "resumed from <checkpoint> at step <n>";
- log to `metrics.jsonl` through `common.training.MetricsFile`, every optimizer step when --logging_steps 1:
  `loss/total`, `train/skipped_steps`, `train/epoch`, `data/skipped`;
- skip non-finite steps with `common.training.clip_and_step` + `SkipGuard`, stop on SIGTERM with
  `GracefulStop` (checkpoint, exit 0), and beat a `Watchdog` after every step;
- draw data through `common.data.infinite_batches`, replacing corrupt samples and counting them with
  `CorruptSampleTracker`.
"""

import argparse
import dataclasses
from pathlib import Path
from typing import Callable

import torch


@dataclasses.dataclass
class ScriptSpec:
    name: str
    script: str
    make_data: Callable  # (folder) -> data flags; the training set has `train_samples` items
    train_samples: int
    tiny: list  # flags for a fast CPU run (small model and inputs, --logging_steps 1, no trackers)
    gan: Callable  # (start_step) -> flags that start the GAN at that step (with regularisers on), or [] if none
    weights: tuple  # checkpoint tensor files that must match exactly after a resume
    optimizers: tuple  # names of the optimizers (optimizer_<name>.pt, scheduler_<name>.pt)
    corrupt: Callable  # (training data folder) -> {file name: reason it is skipped for}
    bigger_model: list  # flags that change a model's shape (to test refusal on resume)
    accumulation_probe: Callable  # see image_vae_accumulation_probe
    probe_batch: Callable  # () -> a batch of 8 inputs for accumulation_probe
    grad_norm_key: str  # the logged gradient norm of the main model
    data_flag: str = "--train_data_dir"  # the flag naming the training data (a folder)
    export_file: str = "config.json"  # a file of the export in --output_dir, written when the run finishes
    compile_flags: tuple = ()  # flags added to --compile in the compiled-run test (the recipes' compile mode)


# ---------------------------------------------------------------------------------------------------------------
# train_image_vae.py


def image_vae_data(folder):
    from common.demo_data import make_demo_images

    train = make_demo_images(Path(folder) / "train", num_images=40, size=32, seed=0)
    val = make_demo_images(Path(folder) / "val", num_images=4, size=32, seed=1)
    return ["--train_data_dir", train, "--validation_data_dir", val]


def image_corruptions(folder):
    folder = Path(folder)
    png = (folder / "00000.png").read_bytes()
    (folder / "empty.png").write_bytes(b"")
    (folder / "header_only.png").write_bytes(png[:16])
    (folder / "cut.png").write_bytes(png[: len(png) // 2])
    (folder / "words.png").write_text("a text file under an image's extension")
    from PIL import Image

    Image.open(folder / "00001.png").convert("RGB").save(folder / "photo.jpg", quality=90)
    jpeg = (folder / "photo.jpg").read_bytes()
    (folder / "photo.jpg").unlink()
    (folder / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    return {"empty.png": "empty file", "header_only.png": "truncated", "cut.png": "truncated",
            "words.png": "not an image", "cut.jpg": "truncated"}


def image_vae_accumulation_probe(micro_batches, accumulation, max_grad_norm):
    """One optimizer step of train_image_vae's `train_step`, in float64, over `micro_batches` with
    --gradient_accumulation_steps `accumulation`, GAN and R1 on, posterior mean instead of a sample (so the
    noise cannot differ between batchings). Returns (weights after the step, discriminator weights after each
    micro-batch, how many times each discriminator parameter received a gradient, the logged metrics)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    import train_image_vae as script
    from common.discriminators import build_image_discriminator
    from common.losses import LPIPS
    from common.optim import build_optimizer

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    args = script.build_parser().parse_args([
        "--output_dir", "/tmp/unused", "--train_data_dir", ".", "--model", "kl-f8-tiny", "--resolution", "32",
        "--disc_norm", "group", "--disc_ndf", "8", "--disc_start_step", "0", "--r1_interval", "1",
        "--lpips_backbone", "random", "--lpips_weight", "0.5", "--kl_weight", "0.1", "--fm_weight", "0.5",
        "--max_grad_norm", str(max_grad_norm), "--gradient_accumulation_steps", str(accumulation)])
    torch.manual_seed(0)
    vae = script.build_vae(script.VAE_PRESETS["kl-f8-tiny"]).double()
    disc = build_image_discriminator("patchgan", 3, 8, 3, "group").double()
    lpips = LPIPS(pretrained_backbone=False).double()

    class Deterministic(script.VAEForTraining):
        def forward(self, images):
            posterior = self.vae.encode(images).latent_dist
            return self.vae.decode(posterior.mean).sample, posterior.mean, posterior.logvar

    opt_vae = build_optimizer("adamw", vae.parameters(), lr=1e-3)
    opt_disc = build_optimizer("adamw", disc.parameters(), lr=1e-3, betas=(0.8, 0.99))
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    model, disc_p, opt_vae, opt_disc = accelerator.prepare(Deterministic(vae), disc, opt_vae, opt_disc)
    grad_count = {name: 0 for name, _ in disc.named_parameters()}
    for name, p in disc.named_parameters():
        p.register_post_accumulate_grad_hook(lambda _, name=name: grad_count.__setitem__(name, grad_count[name] + 1))
    disc_history, metrics = [{k: v.detach().clone() for k, v in disc.state_dict().items()}], []
    for batch in micro_batches:
        metrics.append(script.train_step(batch.double(), model, disc_p, lpips, opt_vae, opt_disc, accelerator,
                                         args, 0))
        disc_history.append({k: v.detach().clone() for k, v in disc.state_dict().items()})
    weights = {f"vae.{k}": v.detach().clone() for k, v in vae.state_dict().items()}
    weights.update({f"disc.{k}": v for k, v in disc_history[-1].items()})
    return weights, disc_history, grad_count, metrics


IMAGE_VAE = ScriptSpec(
    name="image_vae",
    script="train_image_vae.py",
    make_data=image_vae_data,
    train_samples=40,
    tiny=["--model", "kl-f8-tiny", "--resolution", "32", "--disc_ndf", "8", "--lpips_weight", "0",
          "--report_to", "none", "--num_validation_images", "4", "--latent_stats_num_images", "8",
          "--mixed_precision", "no", "--learning_rate", "1e-3", "--lr_warmup_steps", "2", "--logging_steps", "1",
          "--dataloader_num_workers", "0", "--stall_timeout", "300"],
    gan=lambda start: ["--disc_start_step", str(start), "--r1_interval", "3"],
    weights=("vae", "discriminator", "ema"),
    optimizers=("vae", "disc"),
    corrupt=image_corruptions,
    bigger_model=["--disc_ndf", "16"],
    accumulation_probe=image_vae_accumulation_probe,
    probe_batch=lambda: torch.rand(8, 3, 32, 32) * 2 - 1,
    grad_norm_key="grad_norm/vae",
)


# ---------------------------------------------------------------------------------------------------------------
# train_rvq.py

RVQ_CODEBOOKS, RVQ_VOCAB = 3, 16


def make_codes(folder, num_files, frames, seed, codec="test-codec"):
    from common.demo_data import make_demo_codes

    return make_demo_codes(folder, num_files, frames, seed, RVQ_CODEBOOKS, RVQ_VOCAB, codec)


def rvq_data(folder):
    # 10 files of 41 frames: 4 windows each of ctx 16 every 8 frames, 40 in all.
    train = make_codes(Path(folder) / "train", 10, 41, seed=0)
    val = make_codes(Path(folder) / "val", 2, 41, seed=1)
    return ["--data", train, "--validation_data", val]


def rvq_corruptions(folder):
    from safetensors.torch import save_file

    folder = Path(folder)
    good = (folder / "clip000.codes.safetensors").read_bytes()
    (folder / "empty.codes.safetensors").write_bytes(b"")
    (folder / "cut.codes.safetensors").write_bytes(good[: len(good) - 40])
    (folder / "words.codes.safetensors").write_text("a text file under a code file's extension")
    make_codes(folder / "tmp", 1, 41, seed=5)
    from safetensors import safe_open

    with safe_open(str(folder / "tmp" / "clip000.codes.safetensors"), framework="pt") as f:
        meta, codes = f.metadata(), f.get_tensor("codes")
    save_file({"codes": codes + RVQ_VOCAB}, folder / "outside.codes.safetensors", metadata=meta)
    save_file({"codes": codes}, folder / "liar.codes.safetensors", metadata={**meta, "num_frames": "99"})
    import shutil

    shutil.rmtree(folder / "tmp")
    return {"empty.codes.safetensors": "empty file", "cut.codes.safetensors": "truncated",
            "words.codes.safetensors": "not a code file", "outside.codes.safetensors": "codes outside the vocabulary",
            "liar.codes.safetensors": "header disagrees with data"}


def rvq_accumulation_probe(micro_batches, accumulation, max_grad_norm):
    """One optimizer step of train_rvq's `train_step` + `guarded_step` in float64, without dropout."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    import train_rvq as script
    from common.optim import build_optimizer

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    args = script.build_parser().parse_args([
        "--output_dir", "/tmp/unused", "--data", ".", "--model", "tiny", "--dropout", "0", "--ctx", "16",
        "--max_grad_norm", str(max_grad_norm), "--gradient_accumulation_steps", str(accumulation),
        "--outlier_factor", "0"])
    torch.manual_seed(0)
    cfg = script.RVQConfig(num_codebooks=RVQ_CODEBOOKS, codebook_size=RVQ_VOCAB, dropout=0.0, **script.PRESETS["tiny"])
    model = script.build_model(cfg).double()
    optimizer = build_optimizer("adamw", model.parameters(), lr=1e-3)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    weights = torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64)
    outlier, window_loss, metrics = script.OutlierGuard(0, 0), torch.zeros((), dtype=torch.float64), []
    for batch in micro_batches:
        out = script.train_step(batch, prepared, accelerator, args, weights, cfg.pad_id)
        window_loss = window_loss + out["loss/total"] / accumulation
        if accelerator.sync_gradients:
            out["grad_norm/model"], _, stepped = script.guarded_step(accelerator, prepared, optimizer, window_loss,
                                                                     outlier, args)
            assert stepped
        metrics.append(out)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, [], {}, metrics


def rvq_probe_batch():
    g = torch.Generator().manual_seed(0)
    window = torch.randint(RVQ_VOCAB, (8, RVQ_CODEBOOKS - 1 + 17, RVQ_CODEBOOKS), generator=g)
    window[0, :2] = -1  # a window at a file's start: the delay pattern pads it
    return window


RVQ = ScriptSpec(
    name="rvq",
    script="train_rvq.py",
    make_data=rvq_data,
    train_samples=40,
    tiny=["--model", "tiny", "--ctx", "16", "--step", "8", "--report_to", "none", "--mixed_precision", "no",
          "--learning_rate", "3e-3", "--lr_warmup_steps", "2", "--logging_steps", "1", "--dataloader_num_workers", "0",
          "--stall_timeout", "300", "--eval_audio_every", "0"],
    gan=lambda start: [],
    weights=("model", "ema"),
    optimizers=("model",),
    corrupt=rvq_corruptions,
    bigger_model=["--ignore_arch", "--d_model", "48"],
    accumulation_probe=rvq_accumulation_probe,
    probe_batch=rvq_probe_batch,
    grad_norm_key="grad_norm/model",
    data_flag="--data",
    compile_flags=("--compile_mode", "max-autotune-no-cudagraphs"),
)



# ---------------------------------------------------------------------------------------------------------------
# train_vocoder.py

VOCODER_TINY_MEL = ["--sample_rate", "8000", "--n_fft", "512", "--win_length", "512", "--hop_length", "256",
                    "--n_mels", "24", "--fmax", "4000", "--segment_length", "2048"]


def vocoder_data(folder):
    from common.demo_data import make_demo_audio

    train = make_demo_audio(Path(folder) / "train", num_files=40, seconds=(0.3, 0.6), sample_rate=8000, seed=0)
    val = make_demo_audio(Path(folder) / "val", num_files=2, seconds=0.5, sample_rate=8000, seed=1)
    return ["--train_data_dir", train, "--validation_data_dir", val]


def audio_corruptions(folder):
    import numpy as np
    import soundfile as sf

    folder = Path(folder)
    wav = (folder / "clip000.wav").read_bytes()
    (folder / "empty.wav").write_bytes(b"")
    (folder / "header_only.wav").write_bytes(wav[:44])
    (folder / "words.wav").write_text("a text file under an audio file's extension")
    sf.write(str(folder / "silent.flac"), np.zeros(8000, dtype=np.float32), 8000)
    sf.write(str(folder / "short.wav"), np.full(200, 0.3, dtype=np.float32), 8000)
    return {"empty.wav": "empty file", "header_only.wav": "no samples", "words.wav": "unreadable audio",
            "silent.flac": "silent", "short.wav": "too short"}


def vocoder_parts(script, args, dtype=torch.float32, device="cpu"):
    """train_vocoder's step pieces for `args` (hifigan-tiny, the HiFi-GAN discriminators at 1/16 width): generator,
    discriminator, mel, spectral losses and their AdamW optimizers, seeded, in `dtype` on `device`."""
    from common.discriminators import build_audio_discriminator
    from common.optim import build_optimizer
    from common.spectral import MelSpectrogram
    from common.vocoder import build_generator, generator_config

    torch.manual_seed(0)
    mel = script.mel_config(args)
    generator = build_generator(generator_config("hifigan-tiny", mel.n_mels)).to(device, dtype)
    disc = build_audio_discriminator("hifigan", width=0.0625).to(device, dtype)
    mel_fn = MelSpectrogram(mel).to(device, dtype)
    spectral = script.SpectralLosses(args, mel).to(device, dtype)
    opt_g = build_optimizer("adamw", generator.parameters(), lr=1e-3, betas=(0.8, 0.99))
    opt_d = build_optimizer("adamw", disc.parameters(), lr=1e-3, betas=(0.8, 0.99))
    return generator, disc, mel_fn, spectral, opt_g, opt_d


def vocoder_accumulation_probe(micro_batches, accumulation, max_grad_norm):
    """One optimizer step of train_vocoder's `train_step` in float64 over `micro_batches`, with the GAN on from
    the first step (HiFi-GAN discriminators, feature matching, multi-resolution STFT, magnitude and phase losses)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    import train_vocoder as script

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    args = script.build_parser().parse_args([
        "--output_dir", "/tmp/unused", "--train_data_dir", ".", "--model", "hifigan-tiny", *VOCODER_TINY_MEL,
        "--disc_width", "0.0625", "--mrstft_weight", "1", "--stft_mag_weight", "1", "--phase_weight", "0.1",
        "--max_grad_norm", str(max_grad_norm), "--gradient_accumulation_steps", str(accumulation)])
    generator, disc, mel_fn, spectral, opt_g, opt_d = vocoder_parts(script, args, torch.float64)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    generator_p, disc_p, opt_g, opt_d = accelerator.prepare(generator, disc, opt_g, opt_d)
    grad_count = {name: 0 for name, _ in disc.named_parameters()}
    for name, p in disc.named_parameters():
        p.register_post_accumulate_grad_hook(lambda _, name=name: grad_count.__setitem__(name, grad_count[name] + 1))
    disc_history, metrics = [{k: v.detach().clone() for k, v in disc.state_dict().items()}], []
    for batch in micro_batches:
        metrics.append(script.train_step(batch.double(), generator_p, disc_p, mel_fn, spectral, opt_g, opt_d,
                                         accelerator, args, 0))
        disc_history.append({k: v.detach().clone() for k, v in disc.state_dict().items()})
    weights = {f"generator.{k}": v.detach().clone() for k, v in generator.state_dict().items()}
    weights.update({f"disc.{k}": v for k, v in disc_history[-1].items()})
    return weights, disc_history, grad_count, metrics


def vocoder_probe_batch():
    g = torch.Generator().manual_seed(0)
    t = torch.arange(2048) / 8000
    f0 = 100 + 300 * torch.rand(8, 1, generator=g)
    return 0.4 * torch.sin(2 * torch.pi * f0 * t) + 0.02 * torch.randn(8, 2048, generator=g)


VOCODER = ScriptSpec(
    name="vocoder",
    script="train_vocoder.py",
    make_data=vocoder_data,
    train_samples=40,
    tiny=["--model", "hifigan-tiny", *VOCODER_TINY_MEL, "--disc_width", "0.0625", "--report_to", "none",
          "--num_validation_files", "2", "--mixed_precision", "no", "--learning_rate", "1e-3",
          "--disc_learning_rate", "1e-3", "--lr_warmup_steps", "2", "--logging_steps", "1",
          "--dataloader_num_workers", "0", "--stall_timeout", "300"],
    gan=lambda start: ["--disc_start_step", str(start)],
    weights=("generator", "discriminator", "ema"),
    optimizers=("generator", "disc"),
    corrupt=audio_corruptions,
    bigger_model=["--disc_width", "0.125"],
    accumulation_probe=vocoder_accumulation_probe,
    probe_batch=vocoder_probe_batch,
    grad_norm_key="grad_norm/generator",
)


# ---------------------------------------------------------------------------------------------------------------
# train_audio_vae.py (mel mode; the waveform mode is covered end to end in tests/test_train_audio_vae.py)

AUDIO_VAE_TINY_MEL = ["--sample_rate", "8000", "--n_fft", "512", "--win_length", "512", "--hop_length", "128",
                      "--n_mels", "24", "--fmax", "4000", "--segment_length", "2048"]


def audio_vae_accumulation_probe(micro_batches, accumulation, max_grad_norm):
    """One optimizer step of train_audio_vae's `train_step` in float64 over `micro_batches` of audio, mel mode,
    GAN (group-normed PatchGAN), feature matching and KL on, posterior mean instead of a sample."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    import train_audio_vae as script
    from common.audio_vae import PRESETS, AudioVAE, build_vae
    from common.discriminators import build_image_discriminator
    from common.optim import build_optimizer

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    args = script.build_parser().parse_args([
        "--output_dir", "/tmp/unused", "--train_data_dir", ".", "--model", "mel-tiny",
        *AUDIO_VAE_TINY_MEL, "--disc_layers", "2", "--disc_ndf", "8", "--disc_norm", "group", "--disc_start_step",
        "0", "--kl_anneal_start", "0", "--kl_anneal_end", "0", "--kl_weight", "0.1", "--fm_weight", "0.5",
        "--max_grad_norm", str(max_grad_norm), "--gradient_accumulation_steps", str(accumulation)])
    args.multiscale_mel_weight = args.mrstft_weight = 0.0  # what check_args sets for the mel mode
    torch.manual_seed(0)
    vae = build_vae(PRESETS["mel-tiny"], 8, 8000).double()
    disc = build_image_discriminator("patchgan", 1, 8, 2, "group").double()
    features = AudioVAE(None, "mel", script.mel_config(args), -4.0, 2.0).double()
    model = script.VAEForTraining(vae)
    model.sample_posterior = False
    opt_vae = build_optimizer("adamw", vae.parameters(), lr=1e-3)
    opt_disc = build_optimizer("adamw", disc.parameters(), lr=1e-3, betas=(0.8, 0.99))
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    model, disc_p, opt_vae, opt_disc = accelerator.prepare(model, disc, opt_vae, opt_disc)
    grad_count = {name: 0 for name, _ in disc.named_parameters()}
    for name, p in disc.named_parameters():
        p.register_post_accumulate_grad_hook(lambda _, name=name: grad_count.__setitem__(name, grad_count[name] + 1))
    disc_history, metrics = [{k: v.detach().clone() for k, v in disc.state_dict().items()}], []
    for batch in micro_batches:
        x = features.to_input(batch.double())
        metrics.append(script.train_step(x, model, disc_p, None, opt_vae, opt_disc, accelerator, args, 0))
        disc_history.append({k: v.detach().clone() for k, v in disc.state_dict().items()})
    weights = {f"vae.{k}": v.detach().clone() for k, v in vae.state_dict().items()}
    weights.update({f"disc.{k}": v for k, v in disc_history[-1].items()})
    return weights, disc_history, grad_count, metrics


AUDIO_VAE = ScriptSpec(
    name="audio_vae",
    script="train_audio_vae.py",
    make_data=vocoder_data,
    train_samples=40,
    tiny=["--model", "mel-tiny", *AUDIO_VAE_TINY_MEL, "--disc_layers", "2", "--disc_ndf", "8", "--report_to", "none",
          "--num_validation_files", "2", "--mixed_precision", "no", "--learning_rate", "1e-3", "--lr_warmup_steps",
          "2", "--logging_steps", "1", "--dataloader_num_workers", "0", "--stall_timeout", "300",
          "--kl_anneal_start", "2", "--kl_anneal_end", "10", "--latent_stats_num_segments", "8",
          "--mel_norm_num_segments", "16"],
    gan=lambda start: ["--disc_start_step", str(start)],
    weights=("vae", "discriminator", "ema"),
    optimizers=("vae", "disc"),
    corrupt=audio_corruptions,
    bigger_model=["--disc_ndf", "16"],
    accumulation_probe=audio_vae_accumulation_probe,
    probe_batch=vocoder_probe_batch,
    grad_norm_key="grad_norm/vae",
)


# ---------------------------------------------------------------------------------------------------------------
# train_ldm.py


def ldm_data(folder):
    """40 captioned 16-pixel images, a tiny VAE (downsampling 2) and a tiny BERT text encoder."""
    from common.demo_data import make_demo_images, make_demo_text_encoder, make_demo_vae

    folder = Path(folder)
    images = make_demo_images(folder / "train", num_images=40, size=16, seed=0)
    return ["--train_data_dir", images, "--vae", make_demo_vae(folder / "vae"),
            "--text_encoder", f"hf:{make_demo_text_encoder(folder / 'text', 32, 1)}"]


def ldm_accumulation_probe(micro_batches, accumulation, max_grad_norm):
    """One optimizer step of train_ldm's `train_step` in float64, class-conditioned, without CFG dropout. The step's
    random draws (latent sample, noise, timesteps) are made functions of each sample, so micro-batches and the whole
    batch draw the same numbers."""
    from unittest import mock

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    import train_ldm as script
    from common.diffusion import NoiseSchedule
    from common.optim import build_optimizer

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    args = script.build_parser().parse_args([
        "--output_dir", "/tmp/unused", "--train_data_dir", ".", "--conditioning", "class", "--conditioning_dropout", "0",
        "--max_grad_norm", str(max_grad_norm), "--gradient_accumulation_steps", str(accumulation)])
    torch.manual_seed(0)
    config = {"denoiser": script.denoiser_config("dit-tiny", 4, 16), "conditioning": "class", "class_names": ["a", "b"],
              "null_condition": "empty", "text_encoder": None}
    model = script.build_model(config).double()
    with torch.no_grad():  # leave adaLN-Zero's zero start, so every weight gets a gradient
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    space = argparse.Namespace(to_model=lambda z: z)
    optimizer = build_optimizer("adamw", model.parameters(), lr=1e-3)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    schedule = NoiseSchedule("scaled_linear", 1000)

    def like(x):  # deterministic per sample: a function of the sample itself
        return torch.sin(13.0 * x + 1.0)

    def timesteps(batch, num_timesteps, device, generator=None):
        return (_probe_keys * 997 % num_timesteps).long()

    metrics = []
    for batch in micro_batches:
        _probe_keys = (batch.abs().sum((1, 2, 3)) * 1000).round().long()
        cond = {"mean": batch.double(), "std": torch.zeros_like(batch, dtype=torch.float64),
                "label": _probe_keys % 2}
        with mock.patch("torch.randn_like", like), mock.patch.object(script, "sample_timesteps", timesteps):
            metrics.append(script.train_step(cond, prepared, optimizer, schedule, space, accelerator, args))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, [], {}, metrics


LDM = ScriptSpec(
    name="ldm",
    script="train_ldm.py",
    make_data=ldm_data,
    train_samples=40,
    tiny=["--model", "dit-tiny", "--resolution", "16", "--report_to", "none", "--mixed_precision", "no",
          "--learning_rate", "1e-3", "--lr_warmup_steps", "2", "--logging_steps", "1", "--dataloader_num_workers", "0",
          "--stall_timeout", "300", "--num_holdout", "0", "--num_inference_steps", "2", "--num_validation_prompts", "2",
          "--num_validation_seeds", "1", "--text_max_length", "16"],
    gan=lambda start: [],
    weights=("model", "ema"),
    optimizers=("model",),
    corrupt=image_corruptions,
    bigger_model=["--model", "dit-s"],
    accumulation_probe=ldm_accumulation_probe,
    probe_batch=lambda: torch.randn(8, 4, 8, 8),
    grad_norm_key="grad_norm/model",
    export_file="ldm_config.json",
)


SCRIPTS = [IMAGE_VAE, RVQ, VOCODER, AUDIO_VAE, LDM]
