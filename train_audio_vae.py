#!/usr/bin/env python
"""Train an audio VAE whose latents a diffusion model can learn: a 2D KL autoencoder over log-mel spectrograms
(diffusers `AutoencoderKL` shapes, as AudioLDM does; Liu et al. 2023, arXiv:2301.12503) or a 1D one over raw audio
(diffusers `AutoencoderOobleck`, Stable Audio's; Evans et al. 2024, arXiv:2404.10301), with reconstruction,
multi-scale spectral, annealed KL and optional GAN losses, and posterior collapse watched for.

    accelerate launch train_audio_vae.py --train_data_dir ./wavs --output_dir out/audio_vae --config configs/audio_vae_mel.yaml --vocoder out/vocoder

The export in --output_dir is a diffusers folder (EMA weights, safetensors) with `audio_vae.json` (mode, mel
settings, the log-mel normalisation) and `latent_stats.json` beside it, ready for `train_ldm.py --vae out/audio_vae`;
in Python, `common.audio_vae.load_audio_vae("out/audio_vae")`. Export any checkpoint with

    python train_audio_vae.py --export_checkpoint out/audio_vae/checkpoint-20000 --output_dir out/audio_vae-20000
"""

import argparse
import json
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from safetensors.torch import save_file
from tqdm.auto import tqdm

from common.args import (ArgumentParser, add_ema_args, add_mel_args, add_optimizer_args, add_run_args,
                         check_audio_data_args, fraction, mel_config, non_negative_float, non_negative_int,
                         optimizer_kwargs, parse_args_with_config, positive_float, positive_int)
from common.audio import AudioSegments, save_audio, train_and_validation_files, validation_clips
from common.audio_vae import (DEFAULT_PRESET, MODES, PRESETS, AudioVAE, build_vae, compile_friendly_upsampling,
                              fresh_copy, save_audio_vae, vae_class)
from common.checkpoint import (Checkpoint, CheckpointError, commit_checkpoint, load_models, open_resume,
                               refuse_non_finite, restore_ema, restore_training_parts, save_training_parts,
                               start_checkpoint, training_state)
from common.data import CorruptSampleTracker, ResumableBatchSampler, collate, infinite_batches, loader_worker_init
from common.discriminators import build_audio_discriminator, build_image_discriminator
from common.ema import EMA
from common.group_norm import fuse_group_norm_silu, kernels_run_on
from common.losses import GAN_LOSSES, discriminator_loss, feature_matching_loss, generator_loss, kl_loss, kl_per_channel
from common.media import log_audio, log_images, spectrogram_image
from common.metrics import LatentStats, pesq_wb, si_sdr
from common.optim import build_optimizer, build_scheduler, observe_plateau
from common.perf import DryRun, FlopCount, Throughput, peak_bf16_flops
from common.spectral import MelConfig, MultiResolutionSTFTLoss, MultiScaleMelLoss, griffin_lim
from common.training import (COMPILE_MODES, GracefulStop, MetricsAccumulator, MetricsFile, SkipGuard, StopCondition,
                             Watchdog, all_stepped, bf16_if_supported, clip_and_step_all,
                             compile_mode_for_accumulation, fail_fast, freeze, frozen, init_trackers,
                             log_changed_settings, new_run_id, setup_accelerator, tracker_tags, uses_cuda_graphs,
                             write_run_info)
from common.vocoder import load_vocoder, read_vocoder_mel_config

logger = get_logger(__name__)

# The multi-scale mel loss of the waveform mode: FFT sizes 512, 1024 and 2048 (the guidelines), DAC's band counts.
MULTISCALE_WINDOWS, MULTISCALE_MELS = (512, 1024, 2048), (80, 160, 320)


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
                   help="Whole held-out utterances reconstructed at every validation (the first 3 are logged as "
                        "audio and spectrograms).")
    g.add_argument("--validation_max_seconds", type=positive_float, default=8.0,
                   help="Validation utterances longer than this are cut to it.")
    g.add_argument("--segment_length", type=positive_int, default=None,
                   help="Training segment in samples (default: 65536 in mel mode, 256 frames at hop 256; 32768 in "
                        "waveform mode); a multiple of the samples per latent frame.")
    g.add_argument("--min_segment_fraction", type=fraction, default=0.5,
                   help="Files shorter than a segment are zero-padded if they hold at least this fraction of one, "
                        "skipped as too short otherwise.")
    add_mel_args(parser)

    g = parser.add_argument_group("model")
    g.add_argument("--mode", type=str, default="mel", choices=MODES,
                   help="mel: a 2D VAE over log-mel spectrograms (decoded to audio by a vocoder); waveform: a 1D "
                        "VAE over raw audio.")
    g.add_argument("--model", type=str, default=None, choices=sorted(PRESETS),
                   help="Preset (default: mel-f4-5m in mel mode, wave-5m in waveform mode). mel-f4-5m / mel-f8-5m "
                        "downsample time and frequency 4x / 8x; wave-5m gives a latent frame per 256 samples, "
                        "wave-5m-x1024 per 1024; *-tiny for tests.")
    g.add_argument("--latent_channels", type=positive_int, default=8,
                   help="Latent channels: 4 (small diffusion models), 8 (balanced), 16 (rich; a larger LDM).")
    g.add_argument("--vocoder", type=str, default=None,
                   help="A train_vocoder.py export (mel mode): validation reconstructions become audio through it "
                        "(Griffin-Lim without one). Its mel settings must equal this run's.")
    g.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=False,
                   help="NHWC memory format for the mel mode's 2D convolutions.")
    g.add_argument("--fused_group_norm", action=argparse.BooleanOptionalAction, default=False,
                   help="Mel mode: run each resnet block's GroupNorm -> SiLU as fused Triton kernels (two passes "
                        "over the input forward, two backward; common/group_norm.py) on a CUDA GPU; PyTorch's ops "
                        "elsewhere. Same weights and exports. Use it with --compile (1.07x the compiled step, 9%% less "
                        "memory on an H100); eager, the host's dispatch per norm makes it slower.")
    g.add_argument("--compile_mode", type=str, default="reduce-overhead",
                   choices=COMPILE_MODES,
                   help="torch.compile mode with --compile. reduce-overhead replays the VAE's and the "
                        "discriminator's kernels as CUDA graphs: a compiled step left the GPU idle half the time, "
                        "waiting for the host to launch them (README).")

    g = parser.add_argument_group("losses (weights of one mapping, summed)")
    g.add_argument("--rec_loss_weight", type=non_negative_float, default=1.0,
                   help="Reconstruction L1: of the normalised log-mel (mel mode), of the log-mel at these mel "
                        "settings (waveform mode).")
    g.add_argument("--multiscale_mel_weight", type=non_negative_float, default=None,
                   help="Waveform mode: log-mel L1 at FFT sizes 512, 1024 and 2048 (default 1.0; mel mode has no "
                        "waveform to take it from).")
    g.add_argument("--mrstft_weight", type=non_negative_float, default=None,
                   help="Waveform mode: multi-resolution STFT loss (spectral convergence + log magnitude; default "
                        "1.0).")
    g.add_argument("--kl_weight", type=non_negative_float, default=1e-4,
                   help="KL target weight (KL averaged over latent elements): 1e-6 for fidelity, 1e-4 for latents "
                        "a diffusion model learns easily.")
    g.add_argument("--kl_anneal_start", type=non_negative_int, default=5000,
                   help="KL weight is 0 before this optimizer step ...")
    g.add_argument("--kl_anneal_end", type=non_negative_int, default=50000,
                   help="... rises linearly to --kl_weight by this step, and stays there.")
    g.add_argument("--kl_free_bits", type=non_negative_float, default=0.0,
                   help="Free bits: floor (nats) on each latent channel's mean KL (against posterior collapse).")
    g.add_argument("--adv_weight", type=non_negative_float, default=0.1,
                   help="Generator adversarial loss (summed over sub-discriminators); 0 with --fm_weight 0: no GAN.")
    g.add_argument("--fm_weight", type=non_negative_float, default=1.0, help="Discriminator feature matching.")
    g.add_argument("--gan_loss", type=str, default="hinge", choices=GAN_LOSSES, help="GAN objective.")

    g = parser.add_argument_group("discriminator")
    g.add_argument("--disc_start_step", type=non_negative_int, default=10000,
                   help="Optimizer step at which the GAN starts (the guidelines: 10k-50k, after reconstruction "
                        "has settled).")
    g.add_argument("--disc_ndf", type=positive_int, default=64, help="Mel mode: PatchGAN base width.")
    g.add_argument("--disc_layers", type=positive_int, default=3, help="Mel mode: PatchGAN stride-2 stages.")
    g.add_argument("--disc_norm", type=str, default="batch", choices=["batch", "group", "none"],
                   help="Mel mode: PatchGAN normalisation.")
    g.add_argument("--disc_width", type=positive_float, default=0.25,
                   help="Waveform mode: channel scale of the MPD + multi-resolution STFT discriminators (1.0: "
                        "BigVGAN's 14M; 0.25: 1:1 with the default VAE).")

    g = parser.add_argument_group("watching the latents")
    g.add_argument("--active_threshold", type=non_negative_float, default=0.01,
                   help="A latent channel is active when its posterior mean varies across the batch by more than "
                        "this (Burda et al.'s active units).")
    g.add_argument("--collapse_kl_threshold", type=non_negative_float, default=0.01,
                   help="A channel whose mean KL (nats per element) stays under this is collapsing ...")
    g.add_argument("--collapse_patience", type=positive_int, default=2000,
                   help="... and after this many optimizer steps under it the run warns (log and tracker).")

    add_optimizer_args(parser, title="VAE optimizer", lr=1e-4, betas=(0.9, 0.999), weight_decay=0.01,
                       scheduler="cosine", warmup_steps=1000)
    add_optimizer_args(parser, prefix="disc_", title="discriminator optimizer", lr=2e-4, betas=(0.8, 0.99),
                       weight_decay=0.0, scheduler="constant", warmup_steps=0)
    add_ema_args(parser, decay=0.9999, power=0.75)
    add_run_args(parser, batch_size=32, max_train_steps=200000, checkpointing_steps=2000, validation_steps=1000)

    g = parser.add_argument_group("export")
    g.add_argument("--latent_stats_num_segments", type=positive_int, default=512,
                   help="Training segments encoded to measure latent_stats.json.")
    g.add_argument("--mel_norm_num_segments", type=positive_int, default=256,
                   help="Mel mode: training segments whose log-mel mean and std normalise the VAE's input "
                        "(measured once at the start and saved with the model).")
    g.add_argument("--export_checkpoint", type=str, default=None,
                   help="Only export this checkpoint folder (EMA weights + latent_stats.json) to --output_dir.")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parse_args_with_config(parser, argv)
    check_args(parser, args)
    return args


def check_args(parser, args):
    """Cross-flag checks and mode-dependent defaults, before anything heavy happens."""
    if args.output_dir is None:
        parser.error("--output_dir is required")
    if args.export_checkpoint:
        return
    mel = check_audio_data_args(parser, args)
    waveform = args.mode == "waveform"
    args.model = args.model or DEFAULT_PRESET[args.mode]
    preset = PRESETS[args.model]
    if preset.mode != args.mode:
        parser.error(f"--model {args.model} is a {preset.mode}-mode preset, not for --mode {args.mode} (try "
                     f"{DEFAULT_PRESET[args.mode]})")
    for flag in ("multiscale_mel_weight", "mrstft_weight"):
        if getattr(args, flag) is None:
            setattr(args, flag, 1.0 if waveform else 0.0)
        elif getattr(args, flag) > 0 and not waveform:
            parser.error(f"--{flag} needs --mode waveform (in mel mode the VAE never sees a waveform)")
    if args.fused_group_norm and waveform:
        parser.error("--fused_group_norm needs --mode mel (the waveform VAE has no group norms)")
    if args.segment_length is None:
        args.segment_length = 32768 if waveform else 65536
    per_frame = preset.time_factor * (1 if waveform else mel.hop_length)
    if args.segment_length % per_frame:
        parser.error(f"--segment_length {args.segment_length} is not a multiple of {per_frame} samples (one latent "
                     f"frame of --model {args.model}" + ("" if waveform else f" at --hop_length {mel.hop_length}")
                     + f"; try {max(1, args.segment_length // per_frame) * per_frame})")
    if not waveform and args.n_mels % preset.freq_factor:
        parser.error(f"--n_mels {args.n_mels} is not a multiple of {preset.freq_factor}, --model {args.model}'s "
                     f"frequency downsampling (try {max(1, args.n_mels // preset.freq_factor) * preset.freq_factor})")
    long_windows = waveform and (args.multiscale_mel_weight > 0 or args.mrstft_weight > 0 or gan_enabled(args))
    shortest = 2048 if long_windows else mel.n_fft
    if args.segment_length < shortest:
        parser.error(f"--segment_length {args.segment_length} is too short: "
                     + ("the STFT losses and discriminators use windows of 2048 samples" if long_windows
                        else f"shorter than --n_fft {mel.n_fft}") + f" (give at least {shortest})")
    if gan_enabled(args) and not waveform:
        # Each PatchGAN stage halves the mel and the last two 4x4 convolutions need at least 3 positions.
        smallest, frames = 2 ** (args.disc_layers + 1), args.segment_length // mel.hop_length
        if min(args.n_mels, frames) < smallest:
            parser.error(f"--disc_layers {args.disc_layers} needs mels of at least {smallest} bands and frames "
                         f"(have {args.n_mels} x {frames}); lower --disc_layers")
    if args.kl_anneal_end < args.kl_anneal_start:
        parser.error(f"--kl_anneal_end {args.kl_anneal_end} is before --kl_anneal_start {args.kl_anneal_start}")
    if args.vocoder:
        if waveform:
            parser.error("--vocoder is for --mode mel (a waveform VAE decodes to audio itself)")
        try:
            vocoder_mel = read_vocoder_mel_config(args.vocoder)
        except ValueError as err:
            parser.error(f"--vocoder {err}")
        differ = vocoder_mel.mismatches(mel)
        if differ:
            parser.error(f"--vocoder {args.vocoder} was trained on other mel settings (vocoder vs this run): "
                         f"{'; '.join(differ)}; give this run the vocoder's mel flags or train a matching vocoder")


def gan_enabled(args):
    return args.adv_weight > 0 or args.fm_weight > 0


# ---------------------------------------------------------------------------------------------------------------
# Models


class VAEForTraining(nn.Module):
    """encode -> sample -> decode in one forward, so DDP sees one call per step (and torch.compile one graph).
    With `sample_posterior` False the posterior mean is decoded (a deterministic step, for tests)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        self.sample_posterior = True

    def forward(self, x):
        dist = self.vae.encode(x).latent_dist
        z = dist.sample() if self.sample_posterior else dist.mean
        return self.vae.decode(z).sample, dist.mean, dist.logvar  # (B, 1, ...) x 1, (B, C, ...) x 2


def compile_options(args):
    """Inductor's options for --compile: those of --compile_mode and, in the mel mode, its convolutions laid out
    channels-last inside the compiled graphs. Inductor's own heuristic leaves these small-channel convolutions NCHW,
    and cuDNN then transposes around every bf16 convolution: forcing the layout ran 1.16x faster on an H100
    (README). In float64 the step gives eager's values to 1e-13 either way (tested on the GPU)."""
    import torch._inductor

    options = dict(torch._inductor.list_mode_options(args.compile_mode, dynamic=False))
    if args.mode == "mel":
        options["force_layout_optimization"] = True
    return options


def build_models(args, device, memory_format):
    """The VAE and the discriminator (None without a GAN) on `device`, the G:D parameter ratio logged."""
    vae = build_vae(PRESETS[args.model], args.latent_channels, args.sample_rate)
    if args.fused_group_norm:  # before the optimizer: the same Parameters, other modules
        fused = fuse_group_norm_silu(vae)
        logger.info(f"--fused_group_norm: {fused} GroupNorm -> SiLU pairs fused"
                    + ("" if kernels_run_on(device) else f" (PyTorch's ops on {device.type}: no Triton kernels)"))
    if args.compile:  # the decoder's upsampling with a windowed-sum backward, not a scatter of atomic adds
        compile_friendly_upsampling(vae)
    disc = None
    if gan_enabled(args):
        if args.mode == "mel":  # a mel is an image of one channel
            disc = build_image_discriminator("patchgan", 1, args.disc_ndf, args.disc_layers, args.disc_norm)
        else:  # periods and spectrograms of the waveform: BigVGAN's pair
            disc = build_audio_discriminator("bigvgan", width=args.disc_width)
        disc.to(device, memory_format=memory_format)
    vae.to(device, memory_format=memory_format)
    count = lambda *modules: sum(p.numel() for m in modules for p in m.parameters())  # noqa: E731
    n_enc = count(vae.encoder, *([vae.quant_conv] if hasattr(vae, "quant_conv") else []))
    n_dec = count(vae.decoder, *([vae.post_quant_conv] if hasattr(vae, "post_quant_conv") else []))
    n_disc = count(disc) if disc is not None else 0
    logger.info(f"{args.mode} VAE {args.model}: encoder {n_enc / 1e6:.2f}M, decoder {n_dec / 1e6:.2f}M params, "
                f"{args.latent_channels} latent channels; discriminator {n_disc / 1e6:.2f}M "
                f"(G:D = 1:{n_disc / (n_enc + n_dec):.2f}; the guidelines: 1:1 to 1:2)")
    return vae, disc


class WaveformLosses(nn.Module):
    """Waveform mode's reconstruction losses, in float32: log-mel L1 at the model's mel settings, the multi-scale
    mel loss at FFT sizes 512/1024/2048 and the multi-resolution STFT loss."""

    def __init__(self, args, mel_fn):
        super().__init__()
        self.mel_fn = mel_fn
        self.multiscale = MultiScaleMelLoss(args.sample_rate, MULTISCALE_WINDOWS, MULTISCALE_MELS) \
            if args.multiscale_mel_weight > 0 else None
        self.mrstft = MultiResolutionSTFTLoss() if args.mrstft_weight > 0 else None

    def forward(self, fake, real):
        fake, real = fake.float(), real.float()
        out = {"rec": F.l1_loss(self.mel_fn(fake), self.mel_fn(real))}
        if self.multiscale is not None:
            out["multiscale_mel"] = self.multiscale(fake, real)
        if self.mrstft is not None:
            sc, mag = self.mrstft(fake, real)
            out["mrstft"] = sc + mag
        return out


@torch.no_grad()
def measure_mel_normalization(dataset, mel_fn, count, device):
    """Mean and standard deviation of the log-mel over (up to) `count` training segments spread over the data:
    the mel mode's input is (log-mel - mean) / std, so about zero mean and unit variance."""
    indices = np.linspace(0, len(dataset) - 1, min(count, len(dataset))).round().astype(int)
    total, total_sq, n = 0.0, 0.0, 0
    for start in range(0, len(indices), 32):
        audio = torch.stack([dataset[(0, int(i))]["audio"] for i in indices[start:start + 32]]).to(device)
        mel = mel_fn(audio).double()
        total, total_sq, n = total + float(mel.sum()), total_sq + float(mel.pow(2).sum()), n + mel.numel()
    mean = total / n
    return mean, max(total_sq / n - mean**2, 1e-12) ** 0.5


# ---------------------------------------------------------------------------------------------------------------
# The training step


def loss_weights(args):
    """The loss mapping: every term's weight in one place (defaults: the guidelines' Audio VAE table). The KL's
    is the annealed weight of the step (`kl_weight_at`)."""
    return {"rec": args.rec_loss_weight, "multiscale_mel": args.multiscale_mel_weight, "mrstft": args.mrstft_weight,
            "adv": args.adv_weight, "fm": args.fm_weight}


def kl_weight_at(step, args):
    """0 before --kl_anneal_start, then linear to --kl_weight at --kl_anneal_end, then --kl_weight."""
    if step < args.kl_anneal_start:
        return 0.0
    if step >= args.kl_anneal_end:
        return args.kl_weight
    return args.kl_weight * (step - args.kl_anneal_start) / (args.kl_anneal_end - args.kl_anneal_start)


def latent_health(mean, logvar, threshold):
    """KL per channel (C,), and how many channels are active: their posterior mean varies across the batch
    (variance over examples, averaged over positions) by more than `threshold`."""
    mean = mean.detach().float()
    per_channel = kl_per_channel(mean, logvar.detach())
    spread = mean.var(dim=0, correction=0).flatten(1).mean(1)  # (C,)
    return per_channel, (spread > threshold).sum().float()


def train_step(x, model, disc, spectral, opt_vae, opt_disc, accelerator, args, step):
    """One micro-batch: the discriminator's loss on real and detached reconstructed inputs, then the VAE's loss
    through the frozen discriminator; both optimizers step at the end of the accumulation window, so k
    micro-batches of b give the update of one batch of k*b. `x` is the VAE's input: a normalised log-mel
    (B, 1, n_mels, frames) or audio (B, 1, T). Returns a flat dict of tensors."""
    weights = loss_weights(args)
    gan_on = disc is not None and step >= args.disc_start_step
    models = (model, disc) if disc is not None else (model,)
    if uses_cuda_graphs(args):  # a new step: the CUDA graphs may reuse the memory of the previous step's outputs
        torch.compiler.cudagraph_mark_step_begin()
    out = {}
    with accelerator.accumulate(*models):
        with accelerator.autocast():
            reconstruction, mean, logvar = model(x)
        if reconstruction.dtype in (torch.float16, torch.bfloat16):
            reconstruction = reconstruction.float()  # losses in float32

        # Discriminator. D's features of the real input are kept for feature matching (D has not changed since).
        if gan_on:
            with accelerator.autocast():
                logits_real, features_real = disc(x)
                logits_fake, _ = disc(reconstruction.detach())
            d_loss = discriminator_loss(logits_real, logits_fake, args.gan_loss)
            accelerator.backward(d_loss)
            out.update({"loss/disc": d_loss.detach(), "disc/logits_real": _mean(logits_real),
                        "disc/logits_fake": _mean(logits_fake),
                        # as probabilities: the guidelines' healthy ranges are 0.7-0.9 (real) and 0.3-0.6 (fake)
                        "disc/real_prob": _mean(logits_real, torch.sigmoid),
                        "disc/fake_prob": _mean(logits_fake, torch.sigmoid)})

        # VAE
        if args.mode == "mel":
            losses = {"rec": F.l1_loss(reconstruction, x)}
        else:
            losses = spectral(reconstruction, x)
        losses["kl"] = kl_loss(mean, logvar, args.kl_free_bits)
        if gan_on:
            d_plain = accelerator.unwrap_model(disc)
            with frozen(d_plain), accelerator.autocast():
                logits_gen, features_gen = d_plain(reconstruction)
                losses["adv"] = generator_loss(logits_gen, args.gan_loss)
                if weights["fm"] > 0:
                    features_real = [[f.detach() for f in maps] for maps in features_real]
                    losses["fm"] = feature_matching_loss(features_real, features_gen)
        kl_weight = kl_weight_at(step, args)
        total = sum((kl_weight if k == "kl" else weights[k]) * v for k, v in losses.items())
        accelerator.backward(total)

        if accelerator.sync_gradients:  # the end of the accumulation window: both optimizers step, one host sync
            updates = {"vae": (opt_vae, model.parameters(), args.max_grad_norm)}
            if gan_on:
                updates["disc"] = (opt_disc, disc.parameters(), args.max_grad_norm)
            # defer: no host sync; a non-finite step is skipped on the GPU (fused AdamW) and counted at the next log
            results = clip_and_step_all(accelerator, list(updates.values()), defer=True)
            for name, (norm, stepped) in zip(updates, results):
                out[f"grad_norm/{name}"], out[f"stepped/{name}"] = norm, stepped

    per_channel, active = latent_health(mean, logvar, args.active_threshold)
    out.update({f"loss/{k}": v.detach() for k, v in losses.items()})
    out.update({f"kl/channel_{c:02d}": v for c, v in enumerate(per_channel)})
    out.update({"loss/total": total.detach(), "weight/kl": torch.tensor(kl_weight), "latent/active_channels": active,
                "latent/mean": mean.detach().float().mean(), "latent/std": mean.detach().float().std(),
                "latent/posterior_std": (0.5 * logvar.detach().float()).exp().mean()})
    return out


def _mean(logits, fn=None):
    values = [fn(x) if fn else x for x in (logits if isinstance(logits, list) else [logits])]
    return torch.stack([v.detach().float().mean() for v in values]).mean()


class CollapseWatch:
    """Posterior collapse (the guidelines' pitfall 1): a latent channel whose logged mean KL stays under
    `threshold` nats for `patience` optimizer steps carries (almost) nothing about the input. `update(logs, step)`
    at each logging step returns a warning the first time a channel crosses the patience (again after it
    recovers); the number of collapsed channels is logged as latent/collapsed_channels."""

    REMEDIES = ("lower --kl_weight or lengthen the annealing (--kl_anneal_end)", "--kl_free_bits 0.05-0.25",
                "fewer --latent_channels", "a later --disc_start_step or a smaller --adv_weight")

    def __init__(self, threshold, patience):
        self.threshold, self.patience = threshold, patience
        self.below_since, self.warned = {}, set()

    def update(self, logs, step):
        channels = sorted(int(k.rsplit("_", 1)[1]) for k in logs if k.startswith("kl/channel_"))
        for c in channels:
            if logs[f"kl/channel_{c:02d}"] < self.threshold:
                self.below_since.setdefault(c, step)
            else:
                self.below_since.pop(c, None)
                self.warned.discard(c)
        collapsed = [c for c, since in self.below_since.items() if step - since >= self.patience]
        logs["latent/collapsed_channels"] = len(collapsed)
        new = sorted(set(collapsed) - self.warned)
        self.warned.update(new)
        if not new:
            return None
        return (f"POSTERIOR COLLAPSE at step {step}: latent channel(s) {', '.join(map(str, sorted(collapsed)))} of "
                f"{len(channels)} have had KL under {self.threshold:g} nats for {self.patience}+ steps (KL weight now "
                f"{logs.get('weight/kl', float('nan')):.3g}); the decoder is ignoring them. Remedies: "
                + "; ".join(self.REMEDIES))

    def state_dict(self):
        return {"below_since": {str(c): s for c, s in self.below_since.items()}, "warned": sorted(self.warned)}

    def load_state_dict(self, state):
        state = state or {}
        self.below_since = {int(c): s for c, s in state.get("below_since", {}).items()}
        self.warned = set(state.get("warned", []))


def alert(accelerator, title, text):
    """A loud warning: the log, and a wandb alert when wandb is tracking (other trackers get the metric only)."""
    logger.warning(text)
    if accelerator.is_main_process:
        for tracker in accelerator.trackers:
            if tracker.name == "wandb":
                try:
                    tracker.run.alert(title=title, text=text[:1000])
                except Exception as err:  # an offline run has no alert service: the log line stands
                    logger.info(f"wandb alert not sent ({err})")


# ---------------------------------------------------------------------------------------------------------------
# Validation and export


@torch.no_grad()
def validate(features, clips, vocoder, args, step, accelerator):
    """Reconstruct the held-out utterances whole (posterior mean, evaluation weights): mel L1 in log-mel units,
    the mean KL, and in waveform mode multi-resolution STFT distance, SI-SDR and (with `pesq`) PESQ; in mel mode
    with a vocoder the same measures of the vocoded reconstruction, beside the vocoder's own resynthesis of the
    original mel (the ceiling the VAE is measured against). Logs original vs reconstructed spectrograms and the
    first three as audio (through the vocoder, or Griffin-Lim when there is none, marked as such), and keeps
    every input and reconstruction in samples/last_validation.safetensors (an export reproduces these exactly)."""
    device = features.mel.filterbank.device
    mrstft = MultiResolutionSTFTLoss().to(device)
    totals, rows, kept = {}, [], {}
    folder = Path(args.output_dir) / "samples" / f"step-{step:07d}"
    folder.mkdir(parents=True, exist_ok=True)

    def add(key, value):
        if value is not None:
            totals.setdefault(key, []).append(float(value))

    listen = "vocoder" if vocoder is not None or args.mode == "waveform" else "griffinlim"
    for n, (path, audio) in enumerate(clips):
        real = audio.to(device)[None]  # (1, T)
        dist = features.encode(real)
        out = features.decode(dist.mean)  # log-mel (1, n_mels, F) or audio (1, T)
        real_mel = features.mel(real)
        add("kl", kl_loss(dist.mean, dist.logvar))
        kept[f"audio_{n}"], kept[f"reconstruction_{n}"] = audio.contiguous(), out[0].cpu().contiguous()
        if args.mode == "waveform":
            wave, mel = out, features.mel(out)
        else:
            mel = out
            wave = vocoder(mel)[:, 0] if vocoder is not None else None
        add("mel_l1", F.l1_loss(mel, real_mel))
        if wave is not None:
            prefix = "" if args.mode == "waveform" else "vocoded_"
            sc, mag = mrstft(wave, real[:, :wave.size(-1)])
            add(f"{prefix}mrstft", sc + mag)
            add(f"{prefix}si_sdr", si_sdr(wave, real[:, :wave.size(-1)]))
            add(f"{prefix}pesq", pesq_wb(wave.cpu(), real[:, :wave.size(-1)].cpu(), args.sample_rate))
            if vocoder is not None:  # the vocoder alone, on the original mel: what the VAE cannot beat
                sc, mag = mrstft(vocoder(real_mel)[:, 0], real)
                add("vocoder_only_mrstft", sc + mag)
        if n < 3:
            if wave is None:
                wave = griffin_lim(mel, features.mel_config)
            name = f"{n}_reconstruction" + ("_griffinlim" if listen == "griffinlim" else "")
            save_audio(folder / f"{name}.wav", wave[0], args.sample_rate)
            save_audio(folder / f"{n}_real.wav", real[0], args.sample_rate)
            log_audio(accelerator, f"val/audio_{n}" + ("_griffinlim" if listen == "griffinlim" else ""), wave[0],
                      args.sample_rate, step)
            rows.append((real_mel[0], mel[0]))
    image = spectrogram_image([m for pair in rows for m in pair], columns=2)
    image.save(folder / "spectrograms.png")
    log_images(accelerator, "val/spectrograms", image, step)
    save_file(kept, Path(args.output_dir) / "samples" / "last_validation.safetensors",
              metadata={"step": str(step), "files": json.dumps([p for p, _ in clips])})
    return {f"val/{k}": float(np.mean(v)) for k, v in totals.items()}


@torch.no_grad()
def measure_latent_stats(features, dataset, num_segments, batch_size, device, seed=0):
    """Statistics of sampled latents z ~ q(z|x) of (up to) `num_segments` training segments spread evenly over
    the data (see common.metrics.LatentStats), with the latent geometry an LDM needs."""
    count = min(num_segments, len(dataset))
    indices = np.linspace(0, len(dataset) - 1, count).round().astype(int)
    generator = torch.Generator(device=device).manual_seed(seed)
    stats = LatentStats()
    for start in range(0, count, batch_size):
        audio = torch.stack([dataset[(0, int(i))]["audio"] for i in indices[start:start + batch_size]]).to(device)
        z = features.encode(audio).sample(generator=generator)
        stats.add(z)
    summary = stats.summary()
    frames_per_second = features.sample_rate / features.samples_per_latent_frame
    return {**summary, "mode": features.mode, "latent_shape_per_segment": list(z.shape[1:]),
            "segment_samples": dataset.segment_length, "samples_per_latent_frame": features.samples_per_latent_frame,
            "latent_frames_per_second": frames_per_second, "num_segments": count, "sampled_posterior": True,
            "usage": "latents = (vae.encode(audio).sample() - shift_factor) * scaling_factor"}


def export(features, dataset, args, output_dir, device, extra=None):
    """Save the VAE in `features` (holding the weights to export) with audio_vae.json and latent_stats.json."""
    features = features.to(device).eval()
    stats = measure_latent_stats(features, dataset, args.latent_stats_num_segments, args.train_batch_size, device,
                                 args.seed)
    save_audio_vae(output_dir, features.vae, features.mode, features.mel_config, features.mel_mean,
                   features.mel_std, stats, extra={"preset": args.model, **(extra or {})})
    return stats


def export_from_checkpoint(args):
    """`--export_checkpoint PATH`: the EMA (or, without EMA, the trained) weights of a checkpoint, exported."""
    try:
        ckpt = Checkpoint(args.export_checkpoint)
    except CheckpointError as err:
        raise SystemExit(f"--export_checkpoint: {err}") from None
    saved = ckpt.json("training_state")["args"]
    for key in ("train_data_dir", "validation_data_dir", "seed", "num_validation_files", "latent_stats_num_segments",
                "train_batch_size", "segment_length", "min_segment_fraction", "sample_rate", "model"):
        setattr(args, key, saved[key])
    config = ckpt.json("model_config")
    vae = vae_class(config["mode"]).from_config(config["vae"])
    vae.load_state_dict(ckpt.tensors("ema" if ckpt.has("ema") else "vae"))
    norm = config["mel_normalization"]
    features = AudioVAE(vae, config["mode"], MelConfig.from_dict(config["mel"]), norm["mean"], norm["std"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    train_files, _ = train_and_validation_files(args.train_data_dir, args.validation_data_dir,
                                                args.num_validation_files, args.seed)
    dataset = AudioSegments(train_files, args.sample_rate, args.segment_length, seed=args.seed,
                            min_fraction=args.min_segment_fraction)
    stats = export(features, dataset, args, args.output_dir, device, extra={"step": ckpt.step})
    print(f"exported {ckpt.path} (step {ckpt.step}) to {args.output_dir}: scaling_factor {stats['scaling_factor']:.5f}")


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(accelerator, args, step, state, models, optimizers, schedulers, ema, model_config, guard, corrupt):
    """Everything a resumed run needs, written atomically (see common/checkpoint.py): the VAE and discriminator
    weights, the model configuration (diffusers config, mode, mel settings and normalisation), and the training
    parts every script saves."""
    refuse_non_finite(step, models)
    writer = start_checkpoint(accelerator, args.output_dir, step)
    save_training_parts(writer, accelerator, optimizers, schedulers, ema, per_process={"corrupt": corrupt})
    if accelerator.is_main_process:
        writer.add_tensors("vae", models["vae"].state_dict())
        if models["disc"] is not None:
            writer.add_tensors("discriminator", models["disc"].state_dict())
        writer.add_json("model_config", model_config)
        writer.add_json("training_state", training_state(accelerator, args, step, state, ema, guard))
    commit_checkpoint(writer, accelerator, args.checkpoints_total_limit)


def load_checkpoint(ckpt, accelerator, args, models, optimizers, schedulers, ema, model_config, guard, corrupt):
    """Restore a checkpoint into freshly built objects; returns the saved training state.

    Other mel settings or another mode are always refused (the model would see other inputs). A model whose
    architecture differs is refused unless --allow_model_change: then its tensors that still fit are loaded, the
    rest start fresh, and its optimizer state (and the EMA) start afresh.
    """
    state = ckpt.json("training_state")
    saved = ckpt.json("model_config")
    mel_changes = MelConfig.from_dict(saved["mel"]).mismatches(model_config["mel"])
    if saved["mode"] != model_config["mode"]:
        mel_changes.insert(0, f"mode: {saved['mode']} vs {model_config['mode']}")
    if mel_changes:
        raise SystemExit(f"--resume_from_checkpoint {ckpt.path}: the input settings differ from the checkpoint's "
                         f"({'; '.join(mel_changes)}); use the checkpoint's settings or start a new run")
    config_changes = [f"config {k}: {_jsonable(saved['vae'].get(k))} vs {_jsonable(model_config['vae'].get(k))}"
                      for k in sorted(set(saved["vae"]) | set(model_config["vae"])) if not k.startswith("_")
                      and _jsonable(saved["vae"].get(k)) != _jsonable(model_config["vae"].get(k))]
    changed = load_models(ckpt, models, args.allow_model_change, files={"disc": "discriminator"},
                          config_changes={"vae": config_changes})
    restore_training_parts(ckpt, accelerator, state, optimizers, schedulers, guard, per_process={"corrupt": corrupt},
                           changed=changed)
    restore_ema(ckpt, ema, models["vae"], state, changed="vae" in changed)
    log_changed_settings(state["args"], args, SCHEDULE_FLAGS, state.get("num_processes"), accelerator.num_processes)
    return state


def _jsonable(v):
    return json.loads(json.dumps(v)) if v is not None else None


# What --dry_run suggests when the recipe would not fit the GPU, most effective first.
DRY_RUN_HINTS = ("a smaller --train_batch_size with a larger --gradient_accumulation_steps (the same effective batch)",
                 "a shorter --segment_length", "--mixed_precision bf16",
                 "a narrower discriminator (--disc_ndf / --disc_width)")


# Settings whose change on resume alters the run's course; each is stated in the log when it differs.
SCHEDULE_FLAGS = ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "num_train_epochs",
                  "learning_rate", "lr_scheduler", "lr_warmup_steps", "optimizer", "disc_learning_rate",
                  "disc_optimizer", "disc_start_step", "mixed_precision", "seed", "segment_length", "kl_weight",
                  "kl_anneal_start", "kl_anneal_end", "kl_free_bits", "adv_weight", "fm_weight", "rec_loss_weight",
                  "multiscale_mel_weight", "mrstft_weight", "freeze")


# ---------------------------------------------------------------------------------------------------------------


def main(args):
    if args.export_checkpoint:
        return export_from_checkpoint(args)
    # bf16 for the mel mode's 2D VAE; fp32 (TF32) for waveforms, where bf16 cost GAN vocoders audible quality.
    accelerator = setup_accelerator(args, args.mixed_precision or (bf16_if_supported() if args.mode == "mel" else "no"))
    stop, watchdog = GracefulStop(), Watchdog(args.stall_timeout)
    ckpt = open_resume(accelerator, args.resume_from_checkpoint, args.output_dir)
    set_seed(args.seed)  # identical initial weights on every process
    device = accelerator.device
    memory_format = torch.channels_last if args.channels_last and args.mode == "mel" else torch.contiguous_format
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
    per_frame = PRESETS[args.model].time_factor * (1 if args.mode == "waveform" else args.hop_length)
    clips = validation_clips(val_files, args.sample_rate, args.num_validation_files, args.validation_max_seconds,
                             per_frame, max(args.n_fft, 2048 if args.mode == "waveform" else 0), logger.warning)
    steps_per_epoch = max(1, sampler.batches_per_epoch // args.gradient_accumulation_steps)
    max_steps = args.num_train_epochs * steps_per_epoch if args.num_train_epochs else args.max_train_steps
    logger.info(f"{len(train_set)} training files, {len(clips)} validation utterances; {steps_per_epoch} optimizer "
                f"steps per epoch, {max_steps} in all")

    # Models. The mel mode's input normalisation is measured once and then travels with the model.
    vae, disc = build_models(args, device, memory_format)
    features = AudioVAE(fresh_copy(vae).eval().requires_grad_(False), args.mode, mel).to(device)  # eval copy
    if args.mode == "mel":
        if ckpt is not None:
            norm = ckpt.json("model_config")["mel_normalization"]
            features.mel_mean, features.mel_std = norm["mean"], norm["std"]
        else:
            features.mel_mean, features.mel_std = measure_mel_normalization(train_set, features.mel,
                                                                            args.mel_norm_num_segments, device)
        logger.info(f"log-mel normalisation: mean {features.mel_mean:.3f}, std {features.mel_std:.3f}")
    model_config = {"vae": _jsonable(dict(vae.config)), "mode": args.mode, "mel": mel.to_dict(),
                    "mel_normalization": {"mean": features.mel_mean, "std": features.mel_std}}
    spectral = WaveformLosses(args, features.mel).to(device) if args.mode == "waveform" else None
    vocoder = load_vocoder(args.vocoder, device) if args.vocoder else None
    ema = EMA(vae, args.ema_decay, args.ema_power, every=args.ema_update_every) if args.use_ema else None

    # Optimizers
    opt_cfg, disc_cfg = optimizer_kwargs(args), optimizer_kwargs(args, "disc_")
    opt_vae = build_optimizer(params=freeze(vae, args.freeze), **opt_cfg["optimizer"])
    opt_disc = build_optimizer(params=disc.parameters(), **disc_cfg["optimizer"]) if disc is not None else None
    model = VAEForTraining(vae)
    if args.compile:  # in place: state-dict keys keep their names; one static graph per shape
        args.compile_mode = compile_mode_for_accumulation(args.compile_mode, args.gradient_accumulation_steps)
        model.compile(dynamic=False, options=compile_options(args))
        if disc is not None:
            disc.compile(dynamic=False, options=compile_options(args))
    model, opt_vae = accelerator.prepare(model, opt_vae)
    optimizers = {"vae": opt_vae}
    if disc is not None:
        disc, opt_disc = accelerator.prepare(disc, opt_disc)
        optimizers["disc"] = opt_disc
    # Schedules are stepped by hand once per optimizer step, so they are the same function of the step on any
    # number of GPUs.
    schedulers = {name: build_scheduler(opt, total_steps=max_steps, **cfg["scheduler"])
                  for (name, opt), cfg in zip(optimizers.items(), (opt_cfg, disc_cfg))}
    guard, corrupt = SkipGuard(args.max_consecutive_skips), CorruptSampleTracker(args.max_corrupt_fraction)
    collapse = CollapseWatch(args.collapse_kl_threshold, args.collapse_patience)
    set_seed(args.seed, device_specific=True)  # per-process noise from here on

    state = {"epoch": 0, "samples_in_epoch": 0, "run_id": new_run_id()}
    plain = {"vae": vae, "disc": accelerator.unwrap_model(disc) if disc is not None else None}
    if ckpt is not None:
        state = load_checkpoint(ckpt, accelerator, args, plain, optimizers, schedulers, ema, model_config, guard,
                                corrupt)
        collapse.load_state_dict(state.get("collapse"))
        logger.info(f"resumed from {ckpt.path} at step {ckpt.step}")
    global_step = ckpt.step if ckpt is not None else 0
    stop_when = StopCondition(args.stop_when, args.stop_when_logs)
    stop_when.load_state_dict(state.get("stop_when"))
    if stop_when.met:  # this run already ended on the same --stop_when: nothing left to train
        max_steps = global_step
    samples_per_step = args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes

    def inputs(batch):
        audio = batch["audio"].to(device, non_blocking=True)
        return features.to_input(audio).contiguous(memory_format=memory_format)

    if args.dry_run:  # pre-flight: a few real steps with the GAN on, a report, nothing written
        batches, first = infinite_batches(loader, sampler, state["epoch"], 0), max(global_step, args.disc_start_step)

        def one_step(i):
            for _ in range(args.gradient_accumulation_steps):
                train_step(inputs(next(batches)[2]), model, disc, spectral, opt_vae, opt_disc, accelerator, args,
                           first + i)
            watchdog.beat()

        dry = DryRun(args.dry_run_steps, samples_per_step, max_steps - global_step, DRY_RUN_HINTS, unit="segments")
        accelerator.print("\n".join(dry.run(one_step)))
        return
    init_trackers(accelerator, args.tracker_project_name or "train_audio_vae", vars(args), state["run_id"],
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
        x = inputs(batch)
        gan_on = disc is not None and global_step >= args.disc_start_step
        count = throughput.peak_flops and gan_on not in flops
        with FlopCount() if count else nullcontext() as counter:
            metrics = train_step(x, model, disc, spectral, opt_vae, opt_disc, accelerator, args, global_step)
        if count:
            flops[gan_on] = counter.total * args.gradient_accumulation_steps
        stepped = {name: metrics.pop(f"stepped/{name}") for name in optimizers if f"stepped/{name}" in metrics}
        accumulated.add(metrics)  # every micro-batch's losses count towards the logged means
        if not accelerator.sync_gradients:
            continue

        # One optimizer step done. A schedule advances with its own optimizer (D's starts with the GAN).
        guard.update(all_stepped(stepped.values()), global_step + 1)
        for name, ok in stepped.items():
            if ok is not False:  # a device flag (deferred step): the schedule moves on, as for a skipped step
                schedulers[name].step()
        if ema is not None:
            ema.update(vae, applied=stepped["vae"])
        global_step += 1
        state["epoch"], state["samples_in_epoch"] = epoch, (b + 1) * sampler.global_batch
        throughput.add(samples_per_step, flops.get(gan_on))
        progress.update(1)
        watchdog.beat()
        stopping = stop.requested(accelerator)  # SIGTERM: checkpoint this step and exit 0

        if global_step % args.logging_steps == 0 or global_step == max_steps:
            logs = accumulated.pop(accelerator)  # sync point
            guard.flush()
            logs.update(throughput.measure())
            logs.update({f"lr/{k}": s.get_last_lr()[0] for k, s in schedulers.items()})
            logs.update({**corrupt.metrics(), "train/skipped_steps": guard.total, "train/epoch": epoch})
            if ema is not None:
                logs["train/ema_decay"] = ema.decay()
            warning = collapse.update(logs, global_step)
            if warning:
                logs["alert/posterior_collapse"] = logs["latent/collapsed_channels"]
                alert(accelerator, "posterior collapse", warning)
            accelerator.log(logs, step=global_step)
            metrics_file.write(global_step, logs)
            progress.set_postfix(loss=f"{logs['loss/total']:.4f}", seg_s=f"{logs['perf/samples_per_s']:.1f}")
            for sched in schedulers.values():
                observe_plateau(sched, logs)  # --lr_scheduler plateau learns from the logged means
            if stop_when.update(logs):
                max_steps = global_step  # --stop_when held: this step is the last (validated, checkpointed, exported)
        if (global_step % args.validation_steps == 0 or global_step == max_steps) and not stopping:
            if accelerator.is_main_process:
                (ema.copy_to(features.vae) if ema is not None else features.vae.load_state_dict(vae.state_dict()))
                val = validate(features, clips, vocoder, args, global_step, accelerator)
                accelerator.log(val, step=global_step)
                metrics_file.write(global_step, val)
                logger.info(f"step {global_step}: " + ", ".join(f"{k} {v:.4f}" for k, v in val.items()))
            accelerator.wait_for_everyone()
            watchdog.beat()
            if stop_when.update(val if accelerator.is_main_process else {}, accelerator, main_only=True):
                max_steps = global_step  # --stop_when held on a validation metric: this step is the last
        if global_step % args.checkpointing_steps == 0 or global_step == max_steps or stopping:
            guard.flush()  # a run stopped by too many skipped steps stops here, before writing
            save_checkpoint(accelerator, args, global_step, {**state, "stop_when": stop_when.state_dict(),
                                                             "collapse": collapse.state_dict()},
                            plain, optimizers, schedulers, ema, model_config, guard, corrupt)
            watchdog.beat()
        if stopping:
            logger.info(f"stopped at step {global_step} on request; continue with --resume_from_checkpoint latest")
            break

    # Export: the EMA weights as a diffusers folder with audio_vae.json and latent_stats.json
    progress.close()
    if accelerator.is_main_process and global_step == max_steps:
        (ema.copy_to(features.vae) if ema is not None else features.vae.load_state_dict(vae.state_dict()))
        stats = export(features, train_set, args, args.output_dir, device, extra={"step": global_step})
        logger.info(f"exported to {args.output_dir} (scaling_factor {stats['scaling_factor']:.5f}); corrupt "
                    f"samples skipped: {corrupt.summary()}")
    accelerator.end_training()


if __name__ == "__main__":
    with fail_fast():
        main(parse_args())
