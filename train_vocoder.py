#!/usr/bin/env python
"""Train a GAN vocoder (log-mel spectrogram -> waveform): a HiFi-GAN, BigVGAN or Vocos generator against
HiFi-GAN, BigVGAN or DAC discriminators, with the losses of one weight mapping (Kong et al. 2020, arXiv:2010.05646;
Lee et al. 2023, arXiv:2206.04658; Siuzdak 2023, arXiv:2306.00814; Kumar et al. 2023, arXiv:2306.06546).

    accelerate launch train_vocoder.py --train_data_dir ./wavs --output_dir out/vocoder --config configs/vocoder_hifigan.yaml

The export in --output_dir (`generator.safetensors` + `config.json` holding the generator and mel configuration)
turns a mel spectrogram into audio:

    python -m common.vocoder --vocoder out/vocoder --input speech.wav --output resynthesised.wav

or, in Python, `common.vocoder.load_vocoder("out/vocoder")(mel)`. Export any checkpoint with

    python train_vocoder.py --export_checkpoint out/vocoder/checkpoint-20000 --output_dir out/vocoder-20000
"""

import argparse
import copy
import json
import math
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from safetensors.torch import save_file
from tqdm.auto import tqdm

from common.args import (ArgumentParser, add_ema_args, add_mel_args, add_optimizer_args, add_run_args,
                         check_audio_data_args, fraction, mel_config, non_negative_float, non_negative_int,
                         optimizer_kwargs, parse_args_with_config, positive_float, positive_int)
from common.audio import AudioSegments, save_audio, train_and_validation_files, validation_clips
from common.checkpoint import (Checkpoint, CheckpointError, commit_checkpoint, load_models, open_resume,
                               refuse_non_finite, restore_ema, restore_training_parts, save_training_parts,
                               start_checkpoint, training_state)
from common.data import CorruptSampleTracker, ResumableBatchSampler, collate, infinite_batches, loader_worker_init
from common.discriminators import AUDIO_DISCRIMINATORS, build_audio_discriminator
from common.ema import EMA
from common.losses import GAN_LOSSES, discriminator_loss, feature_matching_loss, generator_loss
from common.media import log_audio, log_images, spectrogram_image
from common.metrics import mel_cepstral_distortion, pesq_wb, si_sdr
from common.optim import build_optimizer, build_scheduler, observe_plateau
from common.perf import DryRun, FlopCount, Throughput, peak_bf16_flops
from common.spectral import (MelConfig, MelSpectrogram, MultiResolutionSTFTLoss, MultiScaleMelLoss,
                             stft_phase_losses)
from common.training import (COMPILE_MODES, GracefulStop, MetricsAccumulator, MetricsFile, SkipGuard, StopCondition,
                             Watchdog, all_stepped, clip_and_step_all, compile_mode_for_accumulation, fail_fast,
                             freeze, frozen, init_trackers, log_changed_settings, new_run_id, setup_accelerator,
                             tracker_tags, uses_cuda_graphs, write_run_info)
from common.vocoder import GENERATOR_PRESETS, build_generator, generator_config, save_vocoder

logger = get_logger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# Arguments


def build_parser():
    parser = ArgumentParser(description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = parser.add_argument_group("data")
    g.add_argument("--train_data_dir", type=str, default=None,
                   help="Folder of audio files (wav, flac, ogg, mp3, ...; searched recursively), any sample rate: "
                        "resampled to --sample_rate.")
    g.add_argument("--validation_data_dir", type=str, default=None,
                   help="Held-out audio for validation; by default --num_validation_files are held out of the "
                        "training files.")
    g.add_argument("--num_validation_files", type=positive_int, default=8,
                   help="Whole held-out utterances resynthesised at every validation (the first 3 are logged as "
                        "audio and spectrograms).")
    g.add_argument("--validation_max_seconds", type=positive_float, default=8.0,
                   help="Validation utterances longer than this are cut to it.")
    g.add_argument("--segment_length", type=positive_int, default=8192,
                   help="Training segment in samples (a multiple of --hop_length). 8192-32768: longer segments with "
                        "smaller batches give the discriminators more context.")
    g.add_argument("--min_segment_fraction", type=fraction, default=0.5,
                   help="Files shorter than a segment are zero-padded if they hold at least this fraction of one, "
                        "skipped as too short otherwise.")

    add_mel_args(parser)  # the generator upsamples by exactly --hop_length

    g = parser.add_argument_group("model")
    g.add_argument("--model", type=str, default="hifigan-5m", choices=sorted(GENERATOR_PRESETS),
                   help="Generator preset: hifigan-5m (default), hifigan-v1/v2/v3 (the paper's shapes), bigvgan-5m "
                        "(Snake activations, anti-aliased), vocos-5m (ConvNeXt + inverse STFT); *-tiny for tests.")
    g.add_argument("--discriminator", type=str, default="hifigan", choices=AUDIO_DISCRIMINATORS,
                   help="hifigan: MPD + MSD; bigvgan: MPD + multi-resolution STFT; dac: MPD + MSD + multi-band "
                        "complex STFT.")
    g.add_argument("--disc_width", type=positive_float, default=1.0,
                   help="Scale every discriminator channel count (1.0: the papers' sizes); sets the G:D ratio, "
                        "reported at start-up (the guidelines: 1:2 to 1:3).")
    g.add_argument("--disc_precision", type=str, default=None, choices=["fp32", "bf16"],
                   help="Run the discriminators under bf16 autocast while the generator and mel losses follow "
                        "--mixed_precision (default: same as --mixed_precision).")
    g.add_argument("--compile_mode", type=str, default="reduce-overhead",
                   choices=COMPILE_MODES,
                   help="torch.compile mode with --compile. reduce-overhead replays each compiled model's kernels "
                        "as CUDA graphs: the step launches thousands of small kernels, and on an H100 the V1 setup "
                        "trained 1.7 to 2.1x faster than eager this way (README).")

    g = parser.add_argument_group("losses (weights of one mapping, summed)")
    g.add_argument("--mel_loss", type=str, default="hifigan", choices=["hifigan", "multiscale"],
                   help="hifigan: L1 of the log-mel at the input resolution over the full band; multiscale: DAC's "
                        "log-mel L1 at 7 window lengths (32-2048).")
    g.add_argument("--mel_loss_weight", type=non_negative_float, default=45.0, help="Mel spectrogram L1.")
    g.add_argument("--adv_weight", type=non_negative_float, default=1.0,
                   help="Generator adversarial loss (summed over sub-discriminators).")
    g.add_argument("--fm_weight", type=non_negative_float, default=2.0,
                   help="Feature matching: L1 of discriminator feature maps, summed over layers and "
                        "sub-discriminators (HiFi-GAN's and DAC's convention).")
    g.add_argument("--mrstft_weight", type=non_negative_float, default=0.0,
                   help="Multi-resolution STFT loss (spectral convergence + log magnitude), Parallel WaveGAN's.")
    g.add_argument("--stft_mag_weight", type=non_negative_float, default=0.0,
                   help="Log-magnitude L1 at the mel's STFT resolution (frequency-domain vocoders: 1.0).")
    g.add_argument("--phase_weight", type=non_negative_float, default=0.0,
                   help="Anti-wrapping phase losses (instantaneous phase, group delay, instantaneous frequency) at "
                        "the mel's STFT resolution (frequency-domain vocoders: 0.1-1.0).")
    g.add_argument("--gan_loss", type=str, default="hinge", choices=GAN_LOSSES,
                   help="GAN objective: hinge (default), lsgan (HiFi-GAN's).")
    g.add_argument("--disc_start_step", type=non_negative_int, default=0,
                   help="Optimizer step at which the discriminators and adversarial losses start (0: jointly from "
                        "the start; a warm-up on the mel loss alone before that).")

    add_optimizer_args(parser, title="generator optimizer", lr=2e-4, betas=(0.8, 0.99), weight_decay=0.0,
                       scheduler="exponential", warmup_steps=0)
    add_optimizer_args(parser, prefix="disc_", title="discriminator optimizer", lr=2e-4, betas=(0.8, 0.99),
                       weight_decay=0.0, scheduler="exponential", warmup_steps=0)
    # HiFi-GAN decays the learning rates by 0.999 once per epoch: the decay interval defaults to one epoch.
    parser.set_defaults(lr_decay_every=None, disc_lr_decay_every=None)
    parser.add_argument("--disc_max_grad_norm", type=non_negative_float, default=None,
                        help="Clip the discriminator's gradients to this norm (default: --max_grad_norm).")
    add_ema_args(parser, decay=0.999, power=0.75)
    parser.add_argument("--validation_weights", type=str, default="ema", choices=["ema", "raw"],
                        help="Validate and export the EMA generator (the trained one without --use_ema) or the trained one.")
    add_run_args(parser, batch_size=16, max_train_steps=500000, checkpointing_steps=5000, validation_steps=2000)
    parser.set_defaults(max_grad_norm=0.0)

    g = parser.add_argument_group("export")
    g.add_argument("--export_checkpoint", type=str, default=None,
                   help="Only export this checkpoint folder's generator (EMA or raw, per --validation_weights) to "
                        "--output_dir.")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parse_args_with_config(parser, argv)
    check_args(parser, args)
    return args


def check_args(parser, args):
    """Cross-flag checks, before anything heavy happens."""
    if args.output_dir is None:
        parser.error("--output_dir is required")
    if args.export_checkpoint:
        return
    mel = check_audio_data_args(parser, args)
    if args.segment_length % args.hop_length:
        parser.error(f"--segment_length {args.segment_length} is not a multiple of --hop_length {args.hop_length} "
                     f"(try {max(1, args.segment_length // args.hop_length) * args.hop_length})")
    if args.segment_length < args.n_fft:
        parser.error(f"--segment_length {args.segment_length} is shorter than --n_fft {args.n_fft}")
    upsampling = _upsampling(args.model, mel)
    if upsampling != args.hop_length:
        parser.error(f"--model {args.model} upsamples by {upsampling} but --hop_length is {args.hop_length}: give "
                     f"--hop_length {upsampling} or a preset whose upsampling matches")
    # The STFT-based discriminators and losses use windows of up to 2048 samples, reflect-padded into the segment.
    uses_long_windows = [flag for flag, on in (("--discriminator bigvgan", args.discriminator == "bigvgan"),
                                               ("--discriminator dac", args.discriminator == "dac"),
                                               ("--mel_loss multiscale", args.mel_loss == "multiscale"),
                                               ("--mrstft_weight", args.mrstft_weight > 0)) if on]
    if uses_long_windows and args.segment_length < 2048:
        parser.error(f"--segment_length {args.segment_length} is too short for {uses_long_windows[0]} (STFT windows "
                     f"of 2048 samples; give at least {-(-2048 // args.hop_length) * args.hop_length})")


def _generator_overrides(args, mel):
    """Frequency-domain generators take their inverse STFT from the mel configuration."""
    kind = GENERATOR_PRESETS[args.model]["type"]
    if kind == "vocos":
        return {"n_fft": mel.n_fft, "hop_length": mel.hop_length, "win_length": mel.win_length}
    return {}


def _upsampling(model, mel):
    cfg = generator_config(model, mel.n_mels)
    if cfg["type"] == "vocos":
        return mel.hop_length
    return int(np.prod(cfg["upsample_rates"]))


# ---------------------------------------------------------------------------------------------------------------
# Models


def build_models(args, mel, device):
    """The generator, the discriminators (None when both GAN weights are 0) and their configs, on `device`."""
    g_config = generator_config(args.model, mel.n_mels, **_generator_overrides(args, mel))
    generator = build_generator(g_config).to(device)
    disc = None
    if args.adv_weight > 0 or args.fm_weight > 0:
        disc = build_audio_discriminator(args.discriminator, width=args.disc_width).to(device)
    n_g = sum(p.numel() for p in generator.parameters())
    n_d = sum(p.numel() for p in disc.parameters()) if disc is not None else 0
    logger.info(f"generator {args.model}: {n_g / 1e6:.2f}M params; discriminator {args.discriminator} "
                f"(width {args.disc_width:g}): {n_d / 1e6:.2f}M params; G:D = 1:{n_d / n_g:.2f}")
    return generator, disc, g_config


class SpectralLosses(torch.nn.Module):
    """The generator's reconstruction losses, each computed in float32 from the waveforms: the mel L1 (HiFi-GAN's
    single resolution over the full band, or DAC's multi-scale), and the optional multi-resolution STFT,
    magnitude and phase losses."""

    def __init__(self, args, mel):
        super().__init__()
        self.args, self.mel = args, mel
        if args.mel_loss == "hifigan":
            # HiFi-GAN's loss mel: the input's framing, but up to Nyquist (its `fmax_for_loss: null`).
            self.loss_mel = MelSpectrogram(MelConfig(**{**mel.to_dict(), "fmax": None}))
        else:
            self.loss_mel = MultiScaleMelLoss(mel.sample_rate)
        self.mrstft = MultiResolutionSTFTLoss() if args.mrstft_weight > 0 else None

    def forward(self, fake, real, real_loss_mel=None):
        args, mel = self.args, self.mel
        out = {}
        if args.mel_loss == "hifigan":
            out["mel"] = F.l1_loss(self.loss_mel(fake), real_loss_mel if real_loss_mel is not None
                                   else self.loss_mel(real))
        else:
            out["mel"] = self.loss_mel(fake, real)
        if self.mrstft is not None:
            sc, mag = self.mrstft(fake, real)
            out["mrstft"] = sc + mag
        if args.stft_mag_weight > 0 or args.phase_weight > 0:
            spec = stft_phase_losses(fake, real, mel.n_fft, mel.hop_length, mel.win_length)
            out["stft_mag"], out["phase"] = spec["magnitude"], spec["phase"]
        return out


def compile_models(generator, spectral, disc, mode="default"):
    """`torch.compile` in place (state-dict keys keep their names). Training shapes are fixed (one batch size and
    segment length; the discriminators see 2B then B), so each shape gets its own static graph rather than the
    slower dynamic-shape graph a second shape would otherwise trigger. Validation runs an uncompiled copy."""
    generator.compile(dynamic=False, mode=mode)
    spectral.compile(dynamic=False, mode=mode)
    if disc is not None:
        disc.compile(dynamic=False, mode=mode)


# ---------------------------------------------------------------------------------------------------------------
# The training step


def loss_weights(args):
    """The loss mapping: every term's weight in one place (defaults: the guidelines' HiFi-GAN table)."""
    return {"mel": args.mel_loss_weight, "adv": args.adv_weight, "fm": args.fm_weight, "mrstft": args.mrstft_weight,
            "stft_mag": args.stft_mag_weight, "phase": args.phase_weight}


def disc_autocast(args, device):
    if args.disc_precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if args.disc_precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    return nullcontext()  # follows --mixed_precision


def train_step(audio, generator, disc, mel_fn, spectral, opt_g, opt_d, accelerator, args, step):
    """One micro-batch: mel on the device, the generator's waveform, the discriminators' loss on real and
    (detached) generated audio in one batch, then the generator's losses through the frozen discriminators.
    Both optimizers step at the end of the accumulation window, so k micro-batches of b give the update of one
    batch of k*b. D's feature maps of the real audio are reused for feature matching (D has not changed in
    between), saving the forward pass HiFi-GAN spends recomputing them. Returns a flat dict of tensors."""
    weights = loss_weights(args)
    gan_on = disc is not None and step >= args.disc_start_step
    models = (generator, disc) if disc is not None else (generator,)
    real = audio.unsqueeze(1)  # (B, 1, T)
    graphs = uses_cuda_graphs(args)
    if graphs:  # a new step: the CUDA graphs may reuse the memory of the previous step's outputs
        torch.compiler.cudagraph_mark_step_begin()
    out = {}
    with accelerator.accumulate(*models):
        with torch.no_grad():
            mel = mel_fn(audio)  # (B, n_mels, T / hop), float32
            real_loss_mel = spectral.loss_mel(real) if args.mel_loss == "hifigan" else None
        with accelerator.autocast():
            fake = generator(mel)
        fake = fake.float() if fake.dtype in (torch.float16, torch.bfloat16) else fake

        # Discriminators: real and generated audio in one batch
        if gan_on:
            batch = real.size(0)
            with accelerator.autocast(), disc_autocast(args, real.device):
                logits, features = disc(torch.cat([real, fake.detach()]))
            logits_real = [x[:batch] for x in logits]
            logits_fake = [x[batch:] for x in logits]
            features_real = [[f[:batch].detach() for f in maps] for maps in features]
            d_loss = discriminator_loss(logits_real, logits_fake, args.gan_loss)
            accelerator.backward(d_loss)
            out.update({"loss/disc": d_loss.detach(), "disc/logits_real": _mean(logits_real),
                        "disc/logits_fake": _mean(logits_fake)})

        # Generator
        losses = spectral(fake, real, real_loss_mel)
        if gan_on:
            d_plain = accelerator.unwrap_model(disc)
            with frozen(d_plain), accelerator.autocast(), disc_autocast(args, real.device):
                logits_gen, features_gen = d_plain(fake)
                losses["adv"] = generator_loss(logits_gen, args.gan_loss)
                losses["fm"] = feature_matching_loss(features_real, features_gen, reduction="sum")
        total = sum(weights[k] * v for k, v in losses.items())
        accelerator.backward(total)

        if accelerator.sync_gradients:  # the end of the accumulation window: both optimizers step, one host sync
            updates = {"generator": (opt_g, generator.parameters(), args.max_grad_norm)}
            if gan_on:
                d_clip = args.max_grad_norm if args.disc_max_grad_norm is None else args.disc_max_grad_norm
                updates["disc"] = (opt_d, disc.parameters(), d_clip)
            # defer: no host sync; a non-finite step is skipped on the GPU (fused AdamW) and counted at the next log
            results = clip_and_step_all(accelerator, list(updates.values()), defer=True)
            for name, (norm, stepped) in zip(updates, results):
                out[f"grad_norm/{name}"], out[f"stepped/{name}"] = norm, stepped

    out.update({f"loss/{k}": v.detach() for k, v in losses.items()})
    out["loss/total"] = total.detach()
    if graphs:  # own copies: a graph's outputs are overwritten when it replays in the next step
        out = {k: v.clone() for k, v in out.items()}
    return out


def _mean(logits):
    return torch.stack([x.detach().float().mean() for x in logits]).mean()


# ---------------------------------------------------------------------------------------------------------------
# Validation and export


@torch.no_grad()
def validate(gen_eval, clips, mel_fn, spectral, args, step, accelerator):
    """Resynthesise the held-out utterances whole (one at a time, at their own lengths) with the evaluation
    generator: mel L1 (the loss mel), multi-resolution STFT distance, SI-SDR, mel cepstral distortion and, with
    the `pesq` package, wide-band PESQ. Saves and logs the first three as audio and real-vs-generated
    spectrograms, and keeps every input mel and output in samples/last_validation.safetensors (an export
    reproduces these exactly)."""
    device = mel_fn.filterbank.device
    mrstft = spectral.mrstft or MultiResolutionSTFTLoss().to(device)
    rows, kept, totals = [], {}, {"mel_l1": [], "mrstft": [], "si_sdr": [], "mcd": [], "pesq": []}
    folder = Path(args.output_dir) / "samples" / f"step-{step:07d}"
    folder.mkdir(parents=True, exist_ok=True)
    for n, (path, audio) in enumerate(clips):
        real = audio.to(device)[None]  # (1, T)
        mel = mel_fn(real)
        fake = gen_eval(mel).float()[:, 0]  # (1, T)
        loss_mel = spectral.loss_mel if args.mel_loss == "hifigan" else MelSpectrogram(mel_fn.config).to(device)
        totals["mel_l1"].append(F.l1_loss(loss_mel(fake), loss_mel(real)).item())
        sc, mag = mrstft(fake, real)
        totals["mrstft"].append((sc + mag).item())
        totals["si_sdr"].append(si_sdr(fake, real).item())
        to_ln = 1.0 if args.mel_log == "ln" else math.log(10)  # MCD is defined on natural-log mels
        totals["mcd"].append(mel_cepstral_distortion(mel_fn(fake) * to_ln, mel * to_ln).item())
        score = pesq_wb(fake.cpu(), real.cpu(), args.sample_rate)
        if score is not None:
            totals["pesq"].append(score)
        kept[f"mel_{n}"], kept[f"audio_{n}"] = mel[0].cpu().contiguous(), fake[0].cpu().contiguous()
        if n < 3:
            save_audio(folder / f"{n}_generated.wav", fake[0], args.sample_rate)
            save_audio(folder / f"{n}_real.wav", real[0], args.sample_rate)
            log_audio(accelerator, f"val/audio_{n}", fake[0], args.sample_rate, step)
            rows.append((mel[0], mel_fn(fake)[0]))
    image = spectrogram_image([m for pair in rows for m in pair], columns=2)
    image.save(folder / "spectrograms.png")
    log_images(accelerator, "val/spectrograms", image, step)
    save_file(kept, Path(args.output_dir) / "samples" / "last_validation.safetensors",
              metadata={"step": str(step), "files": json.dumps([p for p, _ in clips])})
    return {f"val/{k}": float(np.mean(v)) for k, v in totals.items() if v}


def export_weights(args, ema, generator, gen_eval):
    """Load the weights to validate and export into `gen_eval`: the EMA's or the trained generator's."""
    if args.validation_weights == "ema" and ema is not None:
        ema.copy_to(gen_eval)
    else:
        gen_eval.load_state_dict(generator.state_dict())
    return gen_eval


def export_from_checkpoint(args):
    """`--export_checkpoint PATH`: the checkpoint's EMA (or trained, per --validation_weights) generator."""
    try:
        ckpt = Checkpoint(args.export_checkpoint)
    except CheckpointError as err:
        raise SystemExit(f"--export_checkpoint: {err}") from None
    configs = ckpt.json("model_config")
    generator = build_generator(configs["generator"])
    name = "ema" if args.validation_weights == "ema" and ckpt.has("ema") else "generator"
    generator.load_state_dict(ckpt.tensors(name))
    save_vocoder(args.output_dir, generator, configs["generator"], MelConfig.from_dict(configs["mel"]),
                 extra={"step": ckpt.step, "weights": name})
    print(f"exported the {name} generator of {ckpt.path} (step {ckpt.step}) to {args.output_dir}")


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(accelerator, args, step, state, models, optimizers, schedulers, ema, model_config, guard, corrupt):
    """Everything a resumed run needs, written atomically (see common/checkpoint.py): the generator and
    discriminator weights, the generator and mel configuration, and the training parts every script saves."""
    refuse_non_finite(step, models)
    writer = start_checkpoint(accelerator, args.output_dir, step)
    save_training_parts(writer, accelerator, optimizers, schedulers, ema, per_process={"corrupt": corrupt})
    if accelerator.is_main_process:
        writer.add_tensors("generator", models["generator"].state_dict())
        if models["disc"] is not None:
            writer.add_tensors("discriminator", models["disc"].state_dict())
        writer.add_json("model_config", model_config)
        writer.add_json("training_state", training_state(accelerator, args, step, state, ema, guard))
    commit_checkpoint(writer, accelerator, args.checkpoints_total_limit)


def load_checkpoint(ckpt, accelerator, args, models, optimizers, schedulers, ema, model_config, guard, corrupt):
    """Restore a checkpoint into freshly built objects; returns the saved training state.

    A changed mel configuration is always refused (the model would be trained on different inputs). A model
    whose architecture differs is refused unless --allow_model_change: then its tensors that still fit are
    loaded, the rest start fresh, and its optimizer state (and the EMA) start afresh.
    """
    state = ckpt.json("training_state")
    saved = ckpt.json("model_config")
    mel_changes = MelConfig.from_dict(saved["mel"]).mismatches(model_config["mel"])
    if mel_changes:
        raise SystemExit(f"--resume_from_checkpoint {ckpt.path}: the mel settings differ from the checkpoint's "
                         f"({'; '.join(mel_changes)}); use the checkpoint's settings or start a new run")
    config_changes = [f"config {k}: {saved['generator'].get(k)} vs {model_config['generator'].get(k)}"
                      for k in sorted(set(saved["generator"]) | set(model_config["generator"]))
                      if saved["generator"].get(k) != model_config["generator"].get(k)]
    changed = load_models(ckpt, models, args.allow_model_change, files={"disc": "discriminator"},
                          config_changes={"generator": config_changes})
    restore_training_parts(ckpt, accelerator, state, optimizers, schedulers, guard, per_process={"corrupt": corrupt},
                           changed=changed)
    restore_ema(ckpt, ema, models["generator"], state, changed="generator" in changed)
    log_changed_settings(state["args"], args, SCHEDULE_FLAGS, state.get("num_processes"), accelerator.num_processes)
    return state


# What --dry_run suggests when the recipe would not fit the GPU, most effective first.
DRY_RUN_HINTS = ("a smaller --train_batch_size with a larger --gradient_accumulation_steps (the same effective batch)",
                 "a shorter --segment_length", "--disc_width below 1 (narrower discriminators)")


# Settings whose change on resume alters the run's course; each is stated in the log when it differs.
SCHEDULE_FLAGS = ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "num_train_epochs",
                  "learning_rate", "lr_scheduler", "optimizer", "disc_learning_rate", "disc_optimizer",
                  "disc_start_step", "mixed_precision", "disc_precision", "seed", "segment_length", "mel_loss",
                  "mel_loss_weight", "adv_weight", "fm_weight", "discriminator", "freeze")


# ---------------------------------------------------------------------------------------------------------------


def main(args):
    if args.export_checkpoint:
        return export_from_checkpoint(args)
    # fp32 (with TF32) by default: bf16 trained faster but worse on every metric, with audible artifacts, in the
    # vocoder notes the defaults come from (seed 002); --mixed_precision bf16 remains available.
    accelerator = setup_accelerator(args, args.mixed_precision or "no")
    torch.backends.cudnn.benchmark_limit = 0  # autotuning tries every algorithm, not 10: 5% more steps/s (README)
    stop, watchdog = GracefulStop(), Watchdog(args.stall_timeout)
    ckpt = open_resume(accelerator, args.resume_from_checkpoint, args.output_dir)
    set_seed(args.seed)  # identical initial weights on every process
    device = accelerator.device
    mel = mel_config(args)

    # Data: random segments of the training files; whole held-out utterances for validation
    train_files, val_files = train_and_validation_files(args.train_data_dir, args.validation_data_dir,
                                                        args.num_validation_files, args.seed)
    train_set = AudioSegments(train_files, args.sample_rate, args.segment_length, seed=args.seed,
                              min_fraction=args.min_segment_fraction)
    try:
        sampler = ResumableBatchSampler(len(train_set), args.train_batch_size, accelerator.num_processes,
                                        accelerator.process_index, args.seed)
    except ValueError as err:
        raise SystemExit(f"--train_batch_size {args.train_batch_size}: {err}") from None
    loader = torch.utils.data.DataLoader(
        train_set, batch_sampler=sampler, collate_fn=collate, num_workers=args.dataloader_num_workers,
        pin_memory=device.type == "cuda", persistent_workers=args.dataloader_num_workers > 0,
        prefetch_factor=4 if args.dataloader_num_workers > 0 else None,
        worker_init_fn=loader_worker_init,
        generator=torch.Generator().manual_seed(args.seed))
    clips = validation_clips(val_files, args.sample_rate, args.num_validation_files, args.validation_max_seconds,
                             args.hop_length, args.n_fft, logger.warning)
    steps_per_epoch = max(1, sampler.batches_per_epoch // args.gradient_accumulation_steps)
    max_steps = args.num_train_epochs * steps_per_epoch if args.num_train_epochs else args.max_train_steps
    for prefix in ("", "disc_"):  # the per-epoch decay of HiFi-GAN unless an interval was given
        if getattr(args, f"{prefix}lr_decay_every") is None:
            setattr(args, f"{prefix}lr_decay_every", steps_per_epoch)
    logger.info(f"{len(train_set)} training files, {len(clips)} validation utterances; {steps_per_epoch} optimizer "
                f"steps per epoch, {max_steps} in all")

    # Models
    generator, disc, g_config = build_models(args, mel, device)
    model_config = {"generator": g_config, "mel": mel.to_dict()}
    mel_fn = MelSpectrogram(mel).to(device)
    spectral = SpectralLosses(args, mel).to(device)
    ema = EMA(generator, args.ema_decay, args.ema_power, every=args.ema_update_every) if args.use_ema else None
    gen_eval = copy.deepcopy(generator).eval().requires_grad_(False)  # validation copy

    # Optimizers
    opt_cfg, disc_cfg = optimizer_kwargs(args), optimizer_kwargs(args, "disc_")
    opt_g = build_optimizer(params=freeze(generator, args.freeze), **opt_cfg["optimizer"])
    opt_d = build_optimizer(params=disc.parameters(), **disc_cfg["optimizer"]) if disc is not None else None
    if args.compile:
        args.compile_mode = compile_mode_for_accumulation(args.compile_mode, args.gradient_accumulation_steps)
        compile_models(generator, spectral, disc, args.compile_mode)
    generator_p, opt_g = accelerator.prepare(generator, opt_g)
    optimizers = {"generator": opt_g}
    disc_p = None
    if disc is not None:
        disc_p, opt_d = accelerator.prepare(disc, opt_d)
        optimizers["disc"] = opt_d
    # Schedules are stepped by hand once per optimizer step, so they are the same function of the step on any
    # number of GPUs.
    schedulers = {name: build_scheduler(opt, total_steps=max_steps, **cfg["scheduler"])
                  for (name, opt), cfg in zip(optimizers.items(), (opt_cfg, disc_cfg))}
    guard, corrupt = SkipGuard(args.max_consecutive_skips), CorruptSampleTracker(args.max_corrupt_fraction)
    set_seed(args.seed, device_specific=True)

    state = {"epoch": 0, "samples_in_epoch": 0, "run_id": new_run_id()}
    plain = {"generator": generator, "disc": disc}
    if ckpt is not None:
        state = load_checkpoint(ckpt, accelerator, args, plain, optimizers, schedulers, ema, model_config, guard,
                                corrupt)
        logger.info(f"resumed from {ckpt.path} at step {ckpt.step}")
    global_step = ckpt.step if ckpt is not None else 0
    stop_when = StopCondition(args.stop_when, args.stop_when_logs)
    stop_when.load_state_dict(state.get("stop_when"))
    if stop_when.met:  # this run already ended on the same --stop_when: nothing left to train
        max_steps = global_step
    samples_per_step = args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    if args.dry_run:  # pre-flight: a few real steps with the discriminators on, a report, nothing written
        batches, first = infinite_batches(loader, sampler, state["epoch"], 0), max(global_step, args.disc_start_step)

        def one_step(i):
            for _ in range(args.gradient_accumulation_steps):
                audio = next(batches)[2]["audio"].to(device, non_blocking=True)
                train_step(audio, generator_p, disc_p, mel_fn, spectral, opt_g, opt_d, accelerator, args, first + i)
            watchdog.beat()

        dry = DryRun(args.dry_run_steps, samples_per_step, max_steps - global_step, DRY_RUN_HINTS, unit="segments")
        accelerator.print("\n".join(dry.run(one_step)))
        return
    init_trackers(accelerator, args.tracker_project_name or "train_vocoder", vars(args), state["run_id"],
                  args.output_dir, args.tracker_run_name, args.tracker_group,
                  args.tracker_tags or tracker_tags(args, __file__))
    write_run_info(args.output_dir, args, accelerator, __file__)
    metrics_file = MetricsFile(Path(args.output_dir, "metrics.jsonl"), resume_step=global_step if ckpt else None,
                               enabled=accelerator.is_main_process)

    # Train
    batch_in_epoch = state["samples_in_epoch"] // sampler.global_batch
    batches = infinite_batches(loader, sampler, state["epoch"], batch_in_epoch)
    throughput, accumulated, flops = Throughput(peak_bf16_flops()), MetricsAccumulator(), {}
    progress = tqdm(total=max_steps, initial=global_step, desc="steps", disable=not accelerator.is_local_main_process)
    watchdog.beat()
    while global_step < max_steps:
        epoch, b, batch = next(batches)
        corrupt.update(batch["skipped"], len(batch["index"]))
        audio = batch["audio"].to(device, non_blocking=True)
        gan_on = disc is not None and global_step >= args.disc_start_step
        count = throughput.peak_flops and gan_on not in flops
        with FlopCount() if count else nullcontext() as counter:
            metrics = train_step(audio, generator_p, disc_p, mel_fn, spectral, opt_g, opt_d, accelerator, args,
                                 global_step)
        if count:
            flops[gan_on] = counter.total * args.gradient_accumulation_steps
        stepped = {name: metrics.pop(f"stepped/{name}") for name in optimizers if f"stepped/{name}" in metrics}
        accumulated.add(metrics)
        if not accelerator.sync_gradients:
            continue

        # One optimizer step done. A schedule advances with its own optimizer (D's starts with the GAN).
        guard.update(all_stepped(stepped.values()), global_step + 1)
        for name, ok in stepped.items():
            if ok is not False:  # a device flag (deferred step): the schedule moves on, as for a skipped step
                schedulers[name].step()
        if ema is not None:
            ema.update(generator, applied=stepped["generator"])
        global_step += 1
        state["epoch"], state["samples_in_epoch"] = epoch, (b + 1) * sampler.global_batch
        throughput.add(samples_per_step, flops.get(gan_on))
        progress.update(1)
        watchdog.beat()
        stopping = stop.requested(accelerator)

        if global_step % args.logging_steps == 0 or global_step == max_steps:
            logs = accumulated.pop(accelerator)  # sync point
            guard.flush()
            logs.update(throughput.measure())
            logs.update({f"lr/{k}": s.get_last_lr()[0] for k, s in schedulers.items()})
            logs.update({**corrupt.metrics(), "train/skipped_steps": guard.total, "train/epoch": epoch})
            if ema is not None:
                logs["train/ema_decay"] = ema.decay()
            accelerator.log(logs, step=global_step)
            metrics_file.write(global_step, logs)
            progress.set_postfix(mel=f"{logs['loss/mel']:.4f}", seg_s=f"{logs['perf/samples_per_s']:.1f}")
            for sched in schedulers.values():
                observe_plateau(sched, logs)  # --lr_scheduler plateau learns from the logged means
            if stop_when.update(logs):
                max_steps = global_step  # --stop_when held: this step is the last (validated, checkpointed, exported)
        if (global_step % args.validation_steps == 0 or global_step == max_steps) and not stopping:
            if accelerator.is_main_process:
                export_weights(args, ema, generator, gen_eval)
                val = validate(gen_eval, clips, mel_fn, spectral, args, global_step, accelerator)
                accelerator.log(val, step=global_step)
                metrics_file.write(global_step, val)
                logger.info(f"step {global_step}: " + ", ".join(f"{k} {v:.4f}" for k, v in val.items()))
            accelerator.wait_for_everyone()
            watchdog.beat()
            if stop_when.update(val if accelerator.is_main_process else {}, accelerator, main_only=True):
                max_steps = global_step  # --stop_when held on a validation metric: this step is the last
        if global_step % args.checkpointing_steps == 0 or global_step == max_steps or stopping:
            guard.flush()  # a run stopped by too many skipped steps stops here, before writing
            save_checkpoint(accelerator, args, global_step, {**state, "stop_when": stop_when.state_dict()}, plain,
                            optimizers, schedulers, ema, model_config, guard, corrupt)
            watchdog.beat()
        if stopping:
            logger.info(f"stopped at step {global_step} on request; continue with --resume_from_checkpoint latest")
            break

    # Export: the generator last validated (EMA by default) with its mel configuration
    progress.close()
    if accelerator.is_main_process and global_step == max_steps:
        export_weights(args, ema, generator, gen_eval)
        save_vocoder(args.output_dir, gen_eval, g_config, mel,
                     extra={"step": global_step, "weights": args.validation_weights if ema is not None else "raw"})
        logger.info(f"exported to {args.output_dir}; corrupt samples skipped: {corrupt.summary()}")
    accelerator.end_training()


if __name__ == "__main__":
    with fail_fast():
        main(parse_args())
