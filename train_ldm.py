#!/usr/bin/env python
"""Train a latent diffusion model from scratch: a ~45M-parameter denoiser (DiT or UNet) over a frozen VAE,
conditioned on a frozen text encoder, after Rombach et al. 2022 (arXiv:2112.10752) and Peebles & Xie 2023
(arXiv:2212.09748), for images or audio.

    accelerate launch train_ldm.py --train_data_dir ./captioned_images --output_dir out/ldm --config configs/ldm_image.yaml
    python train_ldm.py generate --model out/ldm --prompts prompts.txt --output out/samples

Latents and text embeddings are encoded once into --cache_dir (VAE posterior mean and std, so every step still
draws a fresh latent; both horizontal flips; text hidden states and mask) and read back from memory-mapped
shards, so the GPU spends its time on the denoiser. Objectives: epsilon, v-prediction (default) and sample on a
discrete 1000-step schedule, or rectified flow; Min-SNR-gamma weighting, offset noise, input perturbation and
classifier-free-guidance dropout are one flag each (common/diffusion.py). With `--vae out/audio_vae` (a
train_audio_vae.py export) and captioned audio it trains text-to-audio the same way; `--vocoder` makes the
samples audible.

The export in --output_dir is `model.safetensors` (EMA weights of the denoiser and its learned conditioning) and
`ldm_config.json` (the denoiser, the schedule and objective, the VAE and text encoder it was trained with, and the
sampler defaults), which the `generate` command reads.
"""

import argparse
import copy
import glob
import hashlib
import io
import json
import math
import os
import re
import shutil
import sys
import tarfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from common.args import (ArgumentParser, add_ema_args, add_optimizer_args, add_run_args, fraction, non_negative_float,
                         non_negative_int, optimizer_kwargs, parse_args_with_config, positive_float, positive_int)
from common.checkpoint import (Checkpoint, CheckpointError, commit_checkpoint, load_models, open_resume,
                               refuse_non_finite, restore_ema, restore_training_parts, save_training_parts,
                               start_checkpoint, training_state)
from common.data import (IMAGE_EXTENSIONS, CorruptSample, CorruptSampleTracker, ResumableBatchSampler, find_files,
                         has_any_file, image_to_tensor, infinite_batches, load_image, loader_worker_init,
                         read_metadata, resize_and_crop, split_holdout, to_rgb)
from common.denoisers import DENOISER_PRESETS, build_denoiser, count_parameters, denoiser_config, denoiser_downsampling
from common.diffusion import (OBJECTIVES, SAMPLERS, SCHEDULES, NoiseSchedule, add_noise, cfg_drop_mask,
                              check_objective, flow_alpha_sigma, flow_snr, input_perturbation, min_snr_weight,
                              offset_noise, sample, sample_flow_t, sample_timesteps, training_target)
from common.ema import EMA
from common.media import image_grid, log_audio, log_images, spectrogram_image
from common.optim import build_optimizer, build_scheduler, observe_plateau
from common.perf import DryRun, FlopCount, Throughput, peak_bf16_flops
from common.training import (COMPILE_MODES, GracefulStop, MetricsAccumulator, MetricsFile, SkipGuard, StopCondition,
                             Watchdog, bf16_if_supported, clip_and_step, compile_mode_for_accumulation, fail_fast,
                             freeze, init_trackers, log_changed_settings, new_run_id, setup_accelerator, tracker_tags,
                             write_run_info)

logger = get_logger(__name__)

EXPORT_CONFIG = "ldm_config.json"
CONDITIONINGS = ("text", "class", "none")
DEFAULT_TEXT_ENCODER = "open_clip:ViT-L-14:laion2b_s32b_b82k"
DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"


# ---------------------------------------------------------------------------------------------------------------
# The frozen VAE, as the diffusion model sees it


def weights_fingerprint(module, extra=""):
    """A short hash of a module's tensors (names, shapes and sums) and `extra`: it changes when the weights do,
    so a cache built with other weights is never mistaken for this one's."""
    h = hashlib.sha1(extra.encode())
    with torch.no_grad():
        for name, t in sorted(module.state_dict().items()):
            h.update(f"{name}{tuple(t.shape)}{t.double().sum().item():.10e}{t.double().abs().sum().item():.10e}".encode())
    return h.hexdigest()[:16]


class LatentSpace(nn.Module):
    """A frozen VAE: data -> posterior (mean, std), latents <-> the diffusion model's scaled latents, and back to
    images (B, 3, H, W) in [-1, 1] or audio. The scaling comes from the export's latent_stats.json (or the diffusers
    config's scaling_factor / shift_factor), so the diffusion model sees roughly unit-variance latents."""

    def __init__(self, vae, kind, scale, shift, name, audio=None):
        super().__init__()
        self.vae, self.kind, self.scale, self.shift, self.name, self.audio = vae, kind, scale, shift, name, audio
        self.vae.requires_grad_(False).eval()
        self.key = f"{name}#{weights_fingerprint(vae)}"

    @property
    def latent_channels(self):
        return self.vae.config.latent_channels if self.audio is None else self.audio.latent_channels

    @property
    def one_row(self):
        """A waveform VAE's latents are (C, frames): the denoiser sees them as (C, 1, frames), one row."""
        return self.audio is not None and self.audio.mode == "waveform"

    def factors(self):
        """Input pixels (image), (mel bins, audio samples) (mel audio) or (1, audio samples) (waveform audio) per
        latent element, along (H, W)."""
        if self.kind == "image":
            f = 2 ** (len(self.vae.config.block_out_channels) - 1)
            return f, f
        if self.one_row:
            return 1, self.audio.samples_per_latent_frame
        f = 2 ** (len(self.audio.vae.config.block_out_channels) - 1)
        return f, self.audio.samples_per_latent_frame

    @torch.no_grad()
    def posterior(self, x):
        """Images (B, 3, H, W) in [-1, 1] or audio (B, T) -> posterior mean and std (B, C, h, w), float32."""
        dist = self.vae.encode(x.float()).latent_dist if self.audio is None else self.audio.encode(x.float())
        mean, std = dist.mean.float(), dist.std.float()
        if self.one_row:  # (B, C, frames) -> (B, C, 1, frames)
            mean, std = mean.unsqueeze(2), std.unsqueeze(2)
        return mean, std

    def to_model(self, z):
        return (z - self.shift) * self.scale

    @torch.no_grad()
    def decode(self, latents):
        """Scaled latents -> images in [-1, 1] (B, 3, H, W), log-mel spectrograms (B, n_mels, frames) (mel audio
        VAE) or audio (B, samples) (waveform audio VAE)."""
        z = latents.float() / self.scale + self.shift
        if self.audio is None:
            return self.vae.decode(z).sample.clamp(-1, 1)
        return self.audio.decode(z.squeeze(2) if self.one_row else z)


def load_latent_space(path, subfolder=None, revision=None):
    """`--vae`: a train_audio_vae.py export (has audio_vae.json), a train_image_vae.py export or any diffusers
    AutoencoderKL (a folder or a hub id such as stabilityai/sd-vae-ft-mse). ValueError with a one-line reason."""
    from diffusers import AutoencoderKL

    from common.audio_vae import CONFIG_NAME as AUDIO_VAE_CONFIG, load_audio_vae

    folder = Path(path, subfolder or "")
    if (folder / AUDIO_VAE_CONFIG).is_file():
        audio = load_audio_vae(folder)
        stats = json.loads((folder / "latent_stats.json").read_text())
        return LatentSpace(audio.vae, "audio", stats["scaling_factor"], stats.get("shift_factor") or 0.0,
                           str(path), audio=audio)
    try:
        vae = AutoencoderKL.from_pretrained(path, subfolder=subfolder, revision=revision)
    except Exception as err:  # OSError (missing), ValueError/EnvironmentError (not a diffusers model)
        raise ValueError(f"--vae {path}: not a diffusers AutoencoderKL folder or hub id "
                         f"({' '.join(str(err).split())[:160]})") from None
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor or 0.0
    stats_file = folder / "latent_stats.json"
    if stats_file.is_file():  # measured on the VAE's training data by train_image_vae.py
        stats = json.loads(stats_file.read_text())
        scale, shift = stats["scaling_factor"], stats.get("shift_factor") or 0.0
    return LatentSpace(vae, "image", float(scale), float(shift), str(path))


# ---------------------------------------------------------------------------------------------------------------
# The trained model: a denoiser and the conditioning it learns with it


class LatentDiffusionModel(nn.Module):
    """The denoiser and its conditioning, in one module so DDP and torch.compile see one forward per step.

    text: the frozen encoder's hidden states (B, L, D) and mask (B, L); a dropped condition (classifier-free
    guidance, Ho & Salimans 2022, arXiv:2207.12598) is replaced by the empty prompt's encoding, or by a learned
    embedding initialised from it (--null_condition learned). class: a learned embedding per class plus one null
    class, as one context token. none: one learned token, so the denoiser's signature stays the same.
    """

    def __init__(self, denoiser, conditioning, context_dim, num_classes=0, null_context=None, null_mask=None,
                 learned_null=False):
        super().__init__()
        self.denoiser, self.conditioning, self.num_classes = denoiser, conditioning, num_classes
        if conditioning == "text":
            null_context = null_context.float().reshape(1, *null_context.shape[-2:])  # (1, L, D)
            if learned_null:
                self.null_context = nn.Parameter(null_context.clone())
            else:
                self.register_buffer("null_context", null_context.clone())
            self.register_buffer("null_mask", null_mask.reshape(1, -1).bool().clone())  # (1, L)
        elif conditioning == "class":
            self.class_embedding = nn.Embedding(num_classes + 1, context_dim)  # the last row is the null class
            nn.init.normal_(self.class_embedding.weight, std=0.02)
        else:
            self.token = nn.Parameter(torch.randn(1, 1, context_dim) * 0.02)

    def context(self, cond, drop):
        """(context (B, L, D), mask (B, L)) for a batch's condition, with the rows where `drop` is True replaced by
        the null condition."""
        if self.conditioning == "text":
            context, mask = cond["context"], cond["mask"]
            if drop is not None:
                d = drop.view(-1, 1, 1)
                context = torch.where(d, self.null_context.to(context.dtype), context)
                mask = torch.where(d[..., 0], self.null_mask, mask)
            return context, mask
        if self.conditioning == "class":
            labels = cond["label"]
            if drop is not None:
                labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
            context = self.class_embedding(labels)[:, None]  # (B, 1, D)
        else:
            context = self.token.expand(cond["batch"], -1, -1)
        return context, torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)

    def forward(self, x_t, t, cond, drop=None):
        context, mask = self.context(cond, drop)
        return self.denoiser(x_t, t, context, mask)


# ---------------------------------------------------------------------------------------------------------------
# Arguments


def build_parser():
    parser = ArgumentParser(description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = parser.add_argument_group("data")
    g.add_argument("--train_data_dir", type=str, default=None,
                   help="Folder of images or audio, searched recursively: captions from metadata.jsonl (imagefolder / "
                        "audiofolder layout, --caption_column) or from --captions_file.")
    g.add_argument("--captions_file", type=str, default=None,
                   help="A TSV of 'filename<TAB>caption' lines, file names relative to --train_data_dir.")
    g.add_argument("--dataset_name", type=str, default=None,
                   help="A Hugging Face image dataset (hub id or local path) instead of --train_data_dir.")
    g.add_argument("--dataset_config_name", type=str, default=None, help="Config of --dataset_name.")
    g.add_argument("--train_shards", type=str, nargs="+", default=None,
                   help="WebDataset tar shards (local paths, globs or brace ranges such as 'data/{000..099}.tar'): "
                        "samples are files sharing a key, an image (jpg/png/webp) and a caption (txt, or json with "
                        "--caption_column).")
    g.add_argument("--image_column", type=str, default="image", help="Image column of --dataset_name.")
    g.add_argument("--caption_column", type=str, default="text",
                   help="Caption field of metadata.jsonl, of --dataset_name, or of a shard's json.")
    g.add_argument("--label_column", type=str, default="label",
                   help="--conditioning class: the class field of metadata.jsonl / --dataset_name; without one, a "
                        "file's parent folder names its class.")
    g.add_argument("--prompt_prefix", type=str, default="",
                   help="Text put before every caption (and validation prompt), e.g. 'an emoji of '.")
    g.add_argument("--resolution", type=positive_int, default=256,
                   help="Image side (centre crop after resizing the shorter side); a multiple of the VAE's "
                        "downsampling factor times the denoiser's patch size.")
    g.add_argument("--random_flip", action=argparse.BooleanOptionalAction, default=True,
                   help="Random horizontal flips (the cache holds both flips of every image).")
    g.add_argument("--audio_seconds", type=positive_float, default=5.0,
                   help="Audio mode: the length of every training clip (the start of each file, zero-padded).")
    g.add_argument("--num_holdout", type=non_negative_int, default=32,
                   help="Training items held out for the validation loss at fixed timesteps.")
    g.add_argument("--cache_dir", type=str, default=None,
                   help="Encode the dataset once (VAE posterior mean and std, text hidden states and mask) into "
                        "memory-mapped shards here, reused by later runs with the same VAE, text encoder, resolution "
                        "and dtype. Without it every step encodes its batch.")
    g.add_argument("--cache_dtype", type=str, default="float16", choices=["float16", "float32"],
                   help="Storage type of the cached latents and text states.")
    g.add_argument("--cache_batch_size", type=positive_int, default=64, help="Batch size while building the cache.")

    g = parser.add_argument_group("models")
    g.add_argument("--model", type=str, default="dit-45m", choices=sorted(DENOISER_PRESETS),
                   help="Denoiser preset: dit-45m (default), dit-s, dit-b, unet-45m (diffusers UNet2DConditionModel); "
                        "dit-tiny / unet-tiny for tests.")
    g.add_argument("--vae", type=str, default=DEFAULT_VAE,
                   help="The frozen VAE: a diffusers AutoencoderKL hub id or folder, an export of train_image_vae.py, "
                        "or an export of train_audio_vae.py (mel or waveform mode; a waveform VAE's one-row "
                        "latents take a DiT only).")
    g.add_argument("--vae_subfolder", type=str, default=None, help="e.g. 'vae' inside a pipeline repo.")
    g.add_argument("--revision", type=str, default=None, help="Revision of a hub VAE.")
    g.add_argument("--conditioning", type=str, default="text", choices=CONDITIONINGS,
                   help="text (captions through --text_encoder), class (labels, --label_column) or none.")
    g.add_argument("--text_encoder", type=str, default=DEFAULT_TEXT_ENCODER,
                   help="Frozen text encoder: open_clip:MODEL:PRETRAINED, hf-clip:NAME_OR_PATH (transformers CLIP) "
                        "or hf:NAME_OR_PATH (any Hugging Face text encoder).")
    g.add_argument("--text_max_length", type=positive_int, default=None,
                   help="Tokens per caption (truncated and padded, the mask kept); default the encoder's (77 for CLIP).")
    g.add_argument("--text_layer", type=str, default="last", choices=["last", "penultimate"],
                   help="Hidden states of the text encoder's last or second-to-last layer (SD 2.x).")
    g.add_argument("--null_condition", type=str, default="empty", choices=["empty", "learned"],
                   help="Text mode: the condition of dropped captions and of CFG's unconditional branch: the empty "
                        "prompt's encoding, or a learned embedding initialised from it.")
    g.add_argument("--class_embed_dim", type=positive_int, default=768,
                   help="Context width of the class / unconditional embeddings.")
    g.add_argument("--vocoder", type=str, default=None,
                   help="Audio mode: a train_vocoder.py export that makes the mel samples audible (Griffin-Lim "
                        "without one, marked as such).")
    g.add_argument("--gradient_checkpointing", action="store_true",
                   help="Recompute the denoiser's blocks in the backward pass: less memory, ~30%% more compute.")
    g.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=False,
                   help="NHWC memory format for the UNet preset.")
    g.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                   help="UNet preset: xformers attention (optional package). PyTorch's SDPA already runs flash / "
                        "memory-efficient kernels, so this is rarely faster.")
    g.add_argument("--compile_mode", type=str, default="reduce-overhead",
                   choices=COMPILE_MODES,
                   help="torch.compile mode with --compile. reduce-overhead replays the step's kernels as CUDA graphs: "
                        "the 45M DiT's step is launch-bound, and on an H100 this mode trained 1.6x faster than "
                        "'default' (README).")
    g.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes' 8-bit AdamW (same as --optimizer adamw8bit).")

    g = parser.add_argument_group("diffusion")
    g.add_argument("--prediction_type", type=str, default="v_prediction", choices=OBJECTIVES,
                   help="What the denoiser predicts: epsilon, v_prediction (Salimans & Ho 2022), sample (x0), or flow "
                        "(rectified flow velocity, logit-normal times as in SD3).")
    g.add_argument("--noise_schedule", type=str, default="scaled_linear", choices=SCHEDULES,
                   help="Discrete schedule over 1000 timesteps (not used by flow).")
    g.add_argument("--beta_start", type=positive_float, default=None,
                   help="First beta (default 0.00085 for scaled_linear, 1e-4 for linear).")
    g.add_argument("--beta_end", type=positive_float, default=None,
                   help="Last beta (default 0.012 for scaled_linear, 0.02 for linear).")
    g.add_argument("--zero_terminal_snr", action="store_true",
                   help="Rescale the schedule so the last timestep is pure noise (Lin et al. 2024); needs "
                        "v_prediction or sample.")
    g.add_argument("--snr_gamma", type=non_negative_float, default=5.0,
                   help="Min-SNR-gamma loss weighting (Hang et al. 2023), in the form of the chosen objective; 0 "
                        "disables.")
    g.add_argument("--noise_offset", type=non_negative_float, default=0.0,
                   help="Offset noise strength (0.05-0.2 helps very dark or bright images).")
    g.add_argument("--input_perturbation", type=non_negative_float, default=0.0,
                   help="Input perturbation strength (0.05-0.15; a regulariser for small datasets).")
    g.add_argument("--conditioning_dropout", type=fraction, default=0.1,
                   help="Fraction of samples trained with the null condition (classifier-free guidance).")
    g.add_argument("--flow_logit_mean", type=float, default=0.0, help="flow: mean of the logit-normal times.")
    g.add_argument("--flow_logit_std", type=positive_float, default=1.0, help="flow: std of the logit-normal times.")

    g = parser.add_argument_group("sampling and validation")
    g.add_argument("--sampler", type=str, default=None, choices=SAMPLERS,
                   help="Default dpmpp_2m (DPM-Solver++ 2M), euler for flow.")
    g.add_argument("--num_inference_steps", type=positive_int, default=25, help="Sampling steps.")
    g.add_argument("--guidance_scale", type=non_negative_float, default=7.5,
                   help="Classifier-free guidance scale (1 disables guidance).")
    g.add_argument("--validation_prompts", type=str, nargs="+", default=None,
                   help="Prompts sampled at every validation (default: the first held-out captions).")
    g.add_argument("--validation_prompts_file", type=str, default=None, help="Validation prompts, one per line.")
    g.add_argument("--num_validation_prompts", type=positive_int, default=8,
                   help="Held-out captions (or classes) sampled when no prompts are given.")
    g.add_argument("--num_validation_seeds", type=positive_int, default=2,
                   help="Samples per validation prompt, from seeds validation_seed, validation_seed+1, ...")
    g.add_argument("--validation_seed", type=int, default=0, help="First seed of the validation samples.")
    g.add_argument("--reference_dir", type=str, default=None,
                   help="Images to compare samples with: FID and Inception Score of --num_metric_samples samples at "
                        "every validation (and CLIP score with --clip_score_model). Reference statistics are cached.")
    g.add_argument("--num_metric_samples", type=positive_int, default=256,
                   help="Samples for FID / IS / CLIP score, conditioned on training and held-out captions in turn.")
    g.add_argument("--inception_weights", type=str, default="imagenet", choices=["imagenet", "random"],
                   help="FID / IS network: torchvision's ImageNet Inception-v3 (downloaded once); 'random' only for "
                        "tests. Figures compare runs of this script, not papers (which use the TF Inception graph).")
    g.add_argument("--clip_score_model", type=str, default=None,
                   help="open_clip MODEL:PRETRAINED (e.g. ViT-L-14:laion2b_s32b_b82k) or CONFIG.json:WEIGHTS for "
                        "the CLIP score of samples against their captions (text mode).")
    g.add_argument("--holdout_timesteps", type=int, nargs="+", default=[100, 300, 500, 700, 900],
                   help="Timesteps (of 1000) of the held-out validation loss.")

    add_optimizer_args(parser, title="denoiser optimizer", lr=1e-4, betas=(0.9, 0.999), weight_decay=0.01,
                       scheduler="cosine", warmup_steps=5000)
    add_ema_args(parser, decay=0.9999, power=0.75)
    add_run_args(parser, batch_size=64, max_train_steps=200000, checkpointing_steps=2000, validation_steps=2000)

    g = parser.add_argument_group("export")
    g.add_argument("--export_checkpoint", type=str, default=None,
                   help="Only export this checkpoint folder (EMA weights + ldm_config.json) to --output_dir.")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parse_args_with_config(parser, argv)
    check_args(parser, args)
    return args


def check_args(parser, args):
    """Cross-flag checks that need no model, before anything heavy happens."""
    if args.output_dir is None:
        parser.error("--output_dir is required")
    if args.export_checkpoint:
        return
    sources = [f for f in ("train_data_dir", "dataset_name", "train_shards") if getattr(args, f)]
    if len(sources) != 1:
        parser.error("give exactly one of --train_data_dir (a folder), --dataset_name or --train_shards")
    if args.train_data_dir:
        if not os.path.isdir(args.train_data_dir):
            parser.error(f"--train_data_dir {args.train_data_dir}: no such folder")
        from common.audio import AUDIO_EXTENSIONS

        if not has_any_file(args.train_data_dir, IMAGE_EXTENSIONS | AUDIO_EXTENSIONS):
            parser.error(f"--train_data_dir {args.train_data_dir}: contains no images or audio")
    if args.captions_file and not os.path.isfile(args.captions_file):
        parser.error(f"--captions_file {args.captions_file}: no such file")
    if args.captions_file and not args.train_data_dir:
        parser.error("--captions_file names files of --train_data_dir; give that folder too")
    if args.validation_prompts_file and not os.path.isfile(args.validation_prompts_file):
        parser.error(f"--validation_prompts_file {args.validation_prompts_file}: no such file")
    if args.train_shards and not expand_shards(args.train_shards):
        parser.error(f"--train_shards {' '.join(args.train_shards)}: no such tar files")
    try:
        check_objective(args.prediction_type, args.zero_terminal_snr)
    except ValueError as err:
        parser.error(f"--prediction_type {args.prediction_type}: {err}")
    if args.sampler is None:
        args.sampler = "euler" if args.prediction_type == "flow" else "dpmpp_2m"
    if (args.sampler == "euler") != (args.prediction_type == "flow"):
        parser.error(f"--sampler {args.sampler} does not fit --prediction_type {args.prediction_type} (euler is for "
                     f"flow; ddim and dpmpp_2m for the discrete objectives)")
    if any(not 0 <= t < 1000 for t in args.holdout_timesteps):
        parser.error(f"--holdout_timesteps {args.holdout_timesteps}: each must be in [0, 1000)")
    if args.reference_dir and not has_any_file(args.reference_dir, IMAGE_EXTENSIONS):
        parser.error(f"--reference_dir {args.reference_dir}: no such folder, or it holds no images")
    if args.clip_score_model and args.conditioning != "text":
        parser.error("--clip_score_model needs --conditioning text (it scores samples against their captions)")
    if args.vocoder and not os.path.isdir(args.vocoder):
        parser.error(f"--vocoder {args.vocoder}: no such folder")
    if args.use_8bit_adam:
        args.optimizer = "adamw8bit"
    if args.enable_xformers_memory_efficient_attention and not args.model.startswith("unet"):
        parser.error("--enable_xformers_memory_efficient_attention is for the UNet presets; the DiT uses PyTorch's "
                     "SDPA (flash attention where available)")
    if args.conditioning == "text" and not args.text_encoder.startswith(("open_clip:", "hf-clip:", "hf:")):
        parser.error(f"--text_encoder {args.text_encoder}: expected open_clip:MODEL:PRETRAINED, hf-clip:NAME_OR_PATH "
                     f"or hf:NAME_OR_PATH")


# ---------------------------------------------------------------------------------------------------------------
# Data: captioned (or labelled) images or audio from folders, a Hugging Face dataset or WebDataset shards


def expand_shards(patterns):
    """Local tar shards named by paths, globs or WebDataset brace ranges ('{000..099}'), sorted, de-duplicated."""
    paths = []
    for pattern in patterns:
        for expanded in _expand_braces(pattern):
            paths.extend(sorted(glob.glob(expanded)) if glob.has_magic(expanded) else
                         [expanded] if os.path.isfile(expanded) else [])
    return list(dict.fromkeys(paths))


def _expand_braces(pattern):
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return [pattern]
    lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
    return [e for n in range(lo, hi + 1)
            for e in _expand_braces(pattern[:m.start()] + str(n).zfill(width) + pattern[m.end():])]


class Items:
    """What a data source holds: per item a way to read it, where it came from, a caption and a class label."""

    def __init__(self, readers, wheres, captions, labels=None, class_names=None):
        self.readers, self.wheres, self.captions = readers, wheres, captions
        self.labels, self.class_names = labels, class_names

    def __len__(self):
        return len(self.readers)

    def subset(self, indices):
        pick = lambda values: [values[i] for i in indices] if values is not None else None  # noqa: E731
        return Items(pick(self.readers), pick(self.wheres), pick(self.captions), pick(self.labels), self.class_names)


class _HFReader:
    def __init__(self, dataset, column, i):
        self.dataset, self.column, self.i = dataset, column, i

    def __call__(self):
        img = self.dataset[self.i][self.column]
        if not hasattr(img, "mode"):
            raise CorruptSample(f"dataset[{self.i}]", f"not an image ({type(img).__name__})")
        return to_rgb(img)


class _TarReader:
    """One member of a tar shard, read by seeking to its offset (no unpacking, random access)."""

    def __init__(self, path, offset, size):
        self.path, self.offset, self.size = path, offset, size

    def __call__(self):
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) < self.size:
            raise CorruptSample(f"{self.path}@{self.offset}", "truncated")
        return data


def _class_labels(names):
    classes = sorted(set(names))
    index = {c: i for i, c in enumerate(classes)}
    return [index[n] for n in names], classes


def folder_items(args):
    """Items of --train_data_dir: captions from --captions_file or metadata.jsonl, labels from metadata or the
    parent folder's name. Returns (items, kind) with kind 'image' or 'audio' (whichever the folder holds)."""
    from common.audio import AUDIO_EXTENSIONS

    images, audio = find_files(args.train_data_dir, IMAGE_EXTENSIONS), find_files(args.train_data_dir, AUDIO_EXTENSIONS)
    kind, paths = ("image", images) if len(images) >= len(audio) else ("audio", audio)
    try:
        metadata = read_metadata(args.train_data_dir)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    captions = {}
    if args.captions_file:
        for n, line in enumerate(Path(args.captions_file).read_text().splitlines(), 1):
            if line.strip():
                name, sep, caption = line.partition("\t")
                if not sep:
                    raise SystemExit(f"--captions_file {args.captions_file}:{n}: expected 'filename<TAB>caption'")
                captions[str((Path(args.train_data_dir) / name).resolve())] = caption.strip()
    texts, names = [], []
    for p in paths:
        record = metadata.get(str(Path(p).resolve()), {})
        texts.append(captions.get(str(Path(p).resolve()), str(record.get(args.caption_column, ""))))
        names.append(str(record.get(args.label_column, Path(p).parent.name)))
    labels, classes = _class_labels(names) if args.conditioning == "class" else (None, None)
    return Items([str(p) for p in paths], [str(p) for p in paths], texts, labels, classes), kind


def hf_items(args):
    import datasets

    ds = datasets.load_dataset(args.dataset_name, args.dataset_config_name, split="train")
    wanted = [args.image_column] + ([args.caption_column] if args.conditioning == "text" else []) + (
        [args.label_column] if args.conditioning == "class" else [])
    for column in wanted:
        if column not in ds.column_names:
            raise SystemExit(f"--dataset_name {args.dataset_name}: no column '{column}' (columns: "
                             f"{', '.join(ds.column_names)}); set --image_column / --caption_column / --label_column")
    captions = [str(c) for c in ds[args.caption_column]] if args.conditioning == "text" else [""] * len(ds)
    labels, classes = None, None
    if args.conditioning == "class":
        raw = ds[args.label_column]
        feature = ds.features[args.label_column]
        names = [feature.int2str(v) if hasattr(feature, "int2str") else str(v) for v in raw]
        labels, classes = _class_labels(names)
    return Items([_HFReader(ds, args.image_column, i) for i in range(len(ds))],
                 [f"dataset[{i}]" for i in range(len(ds))], captions, labels, classes)


def shard_items(args):
    """Items of WebDataset tar shards: members grouped by key (the name up to its first dot); each key with an
    image becomes an item, its caption from a .txt (or --caption_column of a .json) member."""
    image_ext = {e.lstrip(".") for e in IMAGE_EXTENSIONS}
    readers, wheres, texts, names = [], [], [], []
    for shard in expand_shards(args.train_shards):
        groups = {}
        try:
            with tarfile.open(shard) as tar:
                for m in tar.getmembers():
                    if m.isfile():
                        key, _, ext = m.name.partition(".")
                        groups.setdefault(key, {})[ext.lower()] = m
        except (tarfile.TarError, OSError) as err:
            logger.warning(f"skipped unreadable shard {shard}: {err}")
            continue
        with open(shard, "rb") as f:
            for key, members in groups.items():
                image = next((members[e] for e in members if e in image_ext), None)
                if image is None:
                    continue
                caption, label = "", key.rsplit("/", 1)[0]
                for ext in ("txt", "caption", "json", "cls"):
                    if ext in members:
                        f.seek(members[ext].offset_data)
                        raw = f.read(members[ext].size).decode("utf-8", "replace")
                        if ext == "json":
                            record = json.loads(raw)
                            caption = str(record.get(args.caption_column, caption))
                            label = str(record.get(args.label_column, label))
                        elif ext == "cls":
                            label = raw.strip()
                        else:
                            caption = raw.strip()
                readers.append(_TarReader(shard, image.offset_data, image.size))
                wheres.append(f"{shard}:{image.name}")
                texts.append(caption)
                names.append(label)
    labels, classes = _class_labels(names) if args.conditioning == "class" else (None, None)
    return Items(readers, wheres, texts, labels, classes)


def data_items(args):
    """(training items, held-out items, kind): --num_holdout items are kept out of training for the validation
    loss and the default validation prompts."""
    if args.train_data_dir:
        items, kind = folder_items(args)
    else:
        items, kind = (hf_items(args) if args.dataset_name else shard_items(args)), "image"
    if args.conditioning == "class" and len(items.class_names) < 2:
        raise SystemExit(f"--conditioning class needs at least two classes; found {items.class_names} (set "
                         f"--label_column, or put each class in its own folder)")
    train_idx, holdout_idx = split_holdout(list(range(len(items))), args.num_holdout, args.seed)
    if len(train_idx) == 0:
        raise SystemExit(f"no training items left after holding out --num_holdout {args.num_holdout} of {len(items)}")
    return items.subset(train_idx), items.subset(holdout_idx), kind


def read_item(reader, kind, resolution, flip, sample_rate, num_samples):
    """One item's data: an image (3, H, W) in [-1, 1] (centre crop, flipped if `flip`) or the first `num_samples` of
    a clip (zero-padded). Raises CorruptSample for unreadable data."""
    if kind == "audio":
        from common.audio import load_audio

        wave = load_audio(reader, sample_rate)[:num_samples]
        return F.pad(wave, (0, num_samples - len(wave)))
    if callable(reader):
        raw = reader()
        if isinstance(raw, bytes):
            from PIL import Image, UnidentifiedImageError

            try:
                with Image.open(io.BytesIO(raw)) as img:
                    img.load()
                    raw = to_rgb(img)
            except UnidentifiedImageError:
                raise CorruptSample("", "not an image") from None
            except (OSError, SyntaxError, ValueError) as err:
                raise CorruptSample("", "truncated" if "truncated" in str(err).lower() else "unreadable") from None
        img = raw
    else:
        img = load_image(reader)
    img = resize_and_crop(img, resolution)
    if flip:
        img = img.transpose(0)  # PIL.Image.FLIP_LEFT_RIGHT
    return image_to_tensor(img)


class RawDataset(torch.utils.data.Dataset):
    """Items read and augmented on the fly (no cache). Indexed by (epoch, index); the flip is drawn from
    (seed, epoch, index), so a resumed run and any number of workers see the same data. A corrupt item is replaced
    by the next readable one and reported in 'skipped'."""

    def __init__(self, items, kind, resolution, random_flip, seed, sample_rate=None, num_samples=None, max_retries=16):
        self.items, self.kind, self.resolution, self.random_flip, self.seed = items, kind, resolution, random_flip, seed
        self.sample_rate, self.num_samples, self.max_retries = sample_rate, num_samples, max_retries
        # max_retries 0: a corrupt item comes back as {"x": None, "skipped": [...]} (the cache leaves it out)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        flip = self.random_flip and self.kind == "image" and np.random.default_rng([self.seed, epoch, index]).random() < 0.5
        skipped = []
        for attempt in range(max(1, self.max_retries)):
            i = (index + attempt) % len(self.items)
            try:
                x = read_item(self.items.readers[i], self.kind, self.resolution, flip, self.sample_rate, self.num_samples)
            except CorruptSample as bad:
                skipped.append((self.items.wheres[i], bad.reason))
                continue
            label = self.items.labels[i] if self.items.labels is not None else 0
            return {"x": x, "caption": self.items.captions[i], "label": label, "index": i, "skipped": skipped}
        if self.max_retries == 0:
            return {"x": None, "skipped": skipped}
        raise RuntimeError(f"{self.max_retries} unreadable items in a row from index {index}: "
                           + "; ".join(f"{w}: {r}" for w, r in skipped))


def collate_raw(items):
    """Stack a batch; items that came back corrupt (max_retries 0) are left out and their reasons kept."""
    skipped = [s for it in items for s in it["skipped"]]
    items = [it for it in items if it["x"] is not None]
    if not items:
        return {"x": None, "index": [], "skipped": skipped}
    return {"x": torch.stack([it["x"] for it in items]), "caption": [it["caption"] for it in items],
            "label": torch.tensor([it["label"] for it in items]), "index": [it["index"] for it in items],
            "skipped": skipped}


# ---------------------------------------------------------------------------------------------------------------
# Encoding, and the latent / text-embedding cache


@torch.no_grad()
def encode_batch(batch, latent_space, text_encoder, args, device, both_flips=False):
    """A raw batch -> what the denoiser trains on: VAE posterior 'mean' and 'std' (B, C, h, w) float32 (with
    `both_flips`, (B, 2, C, h, w): the item and its mirror image), the text 'context' (B, L, D) and 'mask' (B, L)
    or the class 'label' (B,)."""
    x = batch["x"].to(device, non_blocking=True)
    if both_flips:
        mean, std = latent_space.posterior(torch.cat([x, x.flip(-1)]))
        mean, std = (torch.stack(t.chunk(2), 1) for t in (mean, std))
    else:
        mean, std = latent_space.posterior(x)
    out = {"mean": mean, "std": std, "label": batch["label"].to(device)}
    if text_encoder is not None:
        captions = [args.prompt_prefix + c for c in batch["caption"]]
        out["context"], out["mask"] = text_encoder.encode(captions, device)
    return out


CACHE_FORMAT = "train_ldm-cache-1"
CACHE_SHARD_SIZE = 4096
CACHE_FIELDS = ("mean", "std", "context", "mask", "label")


def cache_key(args, latent_space, text_encoder, items, kind):
    """What a cache was built from. A cache is reused only when all of it matches."""
    data = hashlib.sha1("\n".join(f"{w}\t{c}" for w, c in zip(items.wheres, items.captions)).encode()).hexdigest()
    return {"vae": latent_space.key, "text_encoder": text_encoder.key if text_encoder is not None else None,
            "text_max_length": text_encoder.max_length if text_encoder is not None else None,
            "conditioning": args.conditioning, "kind": kind,
            "resolution": args.resolution if kind == "image" else None,
            "audio_seconds": args.audio_seconds if kind == "audio" else None,
            "flips": 2 if kind == "image" and args.random_flip else 1, "dtype": args.cache_dtype,
            "prompt_prefix": args.prompt_prefix, "classes": items.class_names, "data": f"{len(items)} items {data[:16]}"}


def check_cache(folder, key):
    """The cache's metadata if `folder` holds a cache built with `key` (None if it holds none); SystemExit naming
    the differing fields otherwise."""
    meta_file = Path(folder) / "cache.json"
    if not meta_file.is_file():
        if Path(folder).is_dir() and any(not p.name.endswith(".tmp") for p in Path(folder).iterdir()):
            raise SystemExit(f"--cache_dir {folder}: not empty and holds no cache.json; give an empty or new folder")
        return None
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != CACHE_FORMAT:
        raise SystemExit(f"--cache_dir {folder}: format {meta.get('format')!r}, expected {CACHE_FORMAT!r}")
    differ = [f"{k} ({meta['key'].get(k)!r} in the cache, {key[k]!r} now)" for k in key if meta["key"].get(k) != key[k]]
    if differ:
        raise SystemExit(f"--cache_dir {folder} was built for another setup: {'; '.join(differ)}; give a new "
                         f"--cache_dir (or delete this one to rebuild it)")
    return meta


def write_cache_meta(folder, meta):
    """cache.json, replaced atomically: other processes read it while the main process builds."""
    tmp = Path(folder) / "cache.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, Path(folder) / "cache.json")


def wait_for_cache(folder, key, poll_seconds=5.0):
    """The other processes' side of `build_cache`: poll until the main process has completed the cache. No
    collective waits here, since a large build takes longer than any collective's timeout; if the main process
    dies, the launcher stops the others."""
    while True:
        meta = check_cache(folder, key) if (Path(folder) / "cache.json").is_file() else None
        if meta is not None and meta["complete"]:
            return meta
        time.sleep(poll_seconds)


def build_cache(folder, key, items, kind, latent_space, text_encoder, args, device):
    """Encode every training item into shards of CACHE_SHARD_SIZE items (numpy .npy files, memory-mapped when read).

    Each shard is written to a temporary folder and renamed when complete, and cache.json says complete only after
    the last one, so an interrupted build resumes at its first missing shard. Corrupt items are left out and listed.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = check_cache(folder, key) or {"format": CACHE_FORMAT, "key": key, "complete": False, "shards": [],
                                        "skipped": []}
    if meta["complete"]:
        logger.info(f"using the cache in {folder}: {meta['num_items']} items")
        return meta
    write_cache_meta(folder, meta)
    dtype = np.float16 if args.cache_dtype == "float16" else np.float32
    dataset = RawDataset(items, kind, args.resolution, False, args.seed, *audio_lengths(latent_space, args),
                         max_retries=0)
    num_shards = -(-len(items) // CACHE_SHARD_SIZE)
    progress = tqdm(total=len(items), desc="encoding the cache")
    for s in range(num_shards):
        name, lo, hi = f"shard_{s:05d}", s * CACHE_SHARD_SIZE, min(len(items), (s + 1) * CACHE_SHARD_SIZE)
        if (folder / name).is_dir():
            progress.update(hi - lo)
            continue
        columns, kept = {k: [] for k in CACHE_FIELDS}, []
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(dataset, [(0, i) for i in range(lo, hi)]), batch_size=args.cache_batch_size,
            num_workers=args.dataloader_num_workers, collate_fn=collate_raw, worker_init_fn=loader_worker_init,
            generator=torch.Generator().manual_seed(args.seed))
        for batch in loader:
            meta["skipped"].extend([list(s) for s in batch["skipped"]])
            progress.update(len(batch["index"]) + len(batch["skipped"]))
            if batch["x"] is None:
                continue
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.mixed_precision == "bf16"):
                encoded = encode_batch(batch, latent_space, text_encoder, args, device, both_flips=key["flips"] == 2)
            if key["flips"] == 1:
                encoded["mean"], encoded["std"] = encoded["mean"][:, None], encoded["std"][:, None]
            for k in CACHE_FIELDS:
                if k in encoded:
                    columns[k].append(encoded[k].cpu())
            kept.extend(batch["index"])
        tmp = folder / f"{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for k, parts in columns.items():
            if parts:
                array = torch.cat(parts).numpy()
                np.save(tmp / f"{k}.npy", array.astype(dtype) if array.dtype.kind == "f" else array)
        np.save(tmp / "index.npy", np.asarray(kept, dtype=np.int64))
        os.replace(tmp, folder / name)
        write_cache_meta(folder, meta)  # keeps the corrupt items found so far
    progress.close()
    meta["shards"] = [{"name": f"shard_{s:05d}", "num_items": len(np.load(folder / f"shard_{s:05d}" / "index.npy",
                                                                             mmap_mode="r"))} for s in range(num_shards)]
    meta["num_items"], meta["complete"] = sum(s["num_items"] for s in meta["shards"]), True
    write_cache_meta(folder, meta)
    for where, reason in meta["skipped"]:
        logger.warning(f"left out of the cache, corrupt: {where}: {reason}")
    logger.info(f"built the cache in {folder}: {meta['num_items']} items, {len(meta['skipped'])} corrupt left out")
    return meta


class CachedDataset(torch.utils.data.Dataset):
    """The cache's items, read from memory-mapped shards a whole batch at a time (`__getitems__`: one fancy-indexed
    read per field and shard, not one per item). Indexed by (epoch, index); with two flips cached, the flip of an
    item is drawn from (seed, epoch, index), as RawDataset does."""

    def __init__(self, folder, meta, seed):
        self.folder, self.seed, self.flips = Path(folder), seed, meta["key"]["flips"]
        self.shards = [s["name"] for s in meta["shards"]]
        self.offsets = np.cumsum([0] + [s["num_items"] for s in meta["shards"]])
        self.fields = [k for k in CACHE_FIELDS if (self.folder / self.shards[0] / f"{k}.npy").exists()]
        self._arrays = None  # opened lazily, in each loader worker

    def __len__(self):
        return int(self.offsets[-1])

    def _open(self):
        if self._arrays is None:
            self._arrays = [{k: np.load(self.folder / s / f"{k}.npy", mmap_mode="r") for k in self.fields}
                            for s in self.shards]
        return self._arrays

    def __getitems__(self, keys):
        arrays = self._open()
        epochs = np.asarray([e for e, _ in keys])
        index = np.asarray([i for _, i in keys])
        shard = np.searchsorted(self.offsets, index, side="right") - 1
        flip = np.zeros(len(keys), dtype=np.int64)
        if self.flips == 2:
            flip = np.asarray([np.random.default_rng([self.seed, int(e), int(i)]).random() < 0.5
                               for e, i in zip(epochs, index)], dtype=np.int64)
        out = {k: [None] * len(keys) for k in self.fields}
        for s in np.unique(shard):
            rows = np.nonzero(shard == s)[0]
            local = index[rows] - self.offsets[s]
            for k in self.fields:
                values = arrays[s][k][local] if k not in ("mean", "std") else arrays[s][k][local, flip[rows]]
                for r, v in zip(rows, values):
                    out[k][r] = v
        batch = {k: torch.from_numpy(np.stack(v)) for k, v in out.items()}
        batch.update({"index": index.tolist(), "skipped": []})
        return batch

    def __getitem__(self, key):
        return self.__getitems__([key if isinstance(key, tuple) else (0, key)])


def audio_lengths(latent_space, args):
    """(sample_rate, clip length in samples) in audio mode: --audio_seconds rounded up to whole latent frames of a
    multiple the denoiser can patchify; (None, None) for images."""
    if latent_space.kind != "audio":
        return None, None
    per_frame = latent_space.audio.samples_per_latent_frame
    frames = math.ceil(args.audio_seconds * latent_space.audio.sample_rate / per_frame)
    multiple = args.latent_multiple[1]
    frames = -(-frames // multiple) * multiple
    return latent_space.audio.sample_rate, frames * per_frame


# ---------------------------------------------------------------------------------------------------------------
# The training step


def condition_of(batch, conditioning):
    """The part of a device batch the model is conditioned on."""
    if conditioning == "text":
        return {"context": batch["context"], "mask": batch["mask"].bool()}
    if conditioning == "class":
        return {"label": batch["label"]}
    return {"batch": batch["mean"].size(0)}


def noisy_latents(x0, noise, schedule, args, generator=None, t=None):
    """x_t and what the model is given as time, plus the SNR of each sample: discrete timesteps (B,) long drawn
    uniformly, or for flow logit-normal times in (0, 1) (SD3, arXiv:2403.03206) passed to the model as t * 1000."""
    B, device = x0.size(0), x0.device
    if args.prediction_type == "flow":
        t = sample_flow_t(B, device, generator, args.flow_logit_mean, args.flow_logit_std) if t is None else t
        alpha, sigma = flow_alpha_sigma(t)
        model_t, snr = t * 1000, flow_snr(t)
    else:
        t = sample_timesteps(B, schedule.num_timesteps, device, generator) if t is None else t
        alpha, sigma = schedule.alpha_sigma(t)
        model_t, snr = t, schedule.snr(t)
    return alpha, sigma, model_t, snr


def train_step(batch, model, optimizer, schedule, latent_space, accelerator, args):
    """One micro-batch: draw latents from the cached posterior, noise them at random times, and regress the chosen
    objective's target, weighted by Min-SNR-gamma. The optimizer steps at the end of the accumulation window.
    Returns a flat dict of tensors."""
    mean, std = batch["mean"].float(), batch["std"].float()  # (B, C, h, w), the VAE posterior
    x0 = latent_space.to_model(mean + std * torch.randn_like(mean))  # a fresh latent sample every step
    noise = torch.randn_like(x0)
    if args.noise_offset > 0:  # crosslabs.org/blog/diffusion-with-offset-noise
        noise = offset_noise(noise, args.noise_offset)
    alpha, sigma, model_t, snr = noisy_latents(x0, noise, schedule, args)
    # Input perturbation (Ning et al. 2023, arXiv:2301.11706): x_t is built from perturbed noise, the target keeps
    # the original noise.
    x_t = add_noise(x0, input_perturbation(noise, args.input_perturbation) if args.input_perturbation > 0 else noise,
                    alpha, sigma)
    target = training_target(args.prediction_type, x0, noise, alpha, sigma)
    drop = None
    if args.conditioning != "none" and args.conditioning_dropout > 0:  # classifier-free guidance training
        drop = cfg_drop_mask(x0.size(0), args.conditioning_dropout, x0.device)
    cond = condition_of(batch, args.conditioning)
    with accelerator.accumulate(model), accelerator.autocast():
        prediction = model(x_t, model_t, cond, drop)
        per_sample = (prediction.float() - target).pow(2).flatten(1).mean(1)  # (B,)
        weight = min_snr_weight(args.prediction_type, snr, args.snr_gamma) if args.snr_gamma > 0 else None
        loss = (per_sample * weight).mean() if weight is not None else per_sample.mean()
        accelerator.backward(loss)
        out = {}
        if accelerator.sync_gradients:
            # defer: no host sync per step; a non-finite step is skipped on the GPU (fused AdamW) and counted later
            out["grad_norm/model"], out["stepped/model"] = clip_and_step(
                accelerator, optimizer, model.parameters(), args.max_grad_norm, defer=True)
    out.update({"loss/total": loss.detach(), "loss/mse": per_sample.mean().detach(),
                "latent/std": x0.detach().std()})
    return out


# ---------------------------------------------------------------------------------------------------------------
# Sampling and validation


def guided_denoiser(model, cond, guidance_scale, conditioning):
    """denoise(x_t, t) for the samplers, with classifier-free guidance (Ho & Salimans 2022): one batched forward
    of the conditional and the null-conditioned halves, then uncond + scale * (cond - uncond)."""
    if conditioning == "none" or guidance_scale == 1.0:
        return lambda x, t: model(x, t, cond).float()

    def doubled(v):
        return torch.cat([v, v]) if torch.is_tensor(v) else v * 2

    cond2 = {k: doubled(v) for k, v in cond.items()}

    def denoise(x, t):
        B = x.size(0)
        drop = torch.arange(2 * B, device=x.device) >= B  # the second half gets the null condition
        out = model(torch.cat([x, x]), torch.cat([t, t]), cond2, drop).float()
        c, u = out.chunk(2)
        return u + guidance_scale * (c - u)

    return denoise


def initial_noise(seeds, latent_shape, device):
    """Sampling noise (B, *latent_shape), one seeded CPU generator per sample: the same picture for the same seed
    on any device, batch size or run."""
    return torch.stack([torch.randn(latent_shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(device)


@torch.no_grad()
def generate_latents(model, cond, seeds, latent_shape, schedule, args, device, guidance_scale=None, steps=None,
                     sampler=None):
    """Sample scaled latents for a batch of conditions (one per seed) with the configured sampler."""
    noise = initial_noise(seeds, latent_shape, device)
    denoise = guided_denoiser(model, cond, args.guidance_scale if guidance_scale is None else guidance_scale,
                              args.conditioning)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.mixed_precision == "bf16"):
        return sample(denoise, noise, args.prediction_type, sampler or args.sampler, steps or args.num_inference_steps,
                      schedule=None if args.prediction_type == "flow" else schedule)


def take(cond, index):
    return {k: (v[index] if torch.is_tensor(v) else len(index)) for k, v in cond.items()}


@torch.no_grad()
def holdout_loss(model, holdout, schedule, latent_space, args):
    """The unweighted objective MSE on held-out items at fixed timesteps, fixed noise and the posterior mean: a
    validation loss that moves only when the model does. {'val/loss_tNNN': ..., 'val/loss': mean}."""
    x0 = latent_space.to_model(holdout["mean"])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(args.seed)).to(x0.device)
    cond = condition_of(holdout, args.conditioning)
    out = {}
    for step in args.holdout_timesteps:
        if args.prediction_type == "flow":
            t = torch.full((x0.size(0),), step / 1000, device=x0.device)
        else:
            t = torch.full((x0.size(0),), step, dtype=torch.long, device=x0.device)
        alpha, sigma, model_t, _ = noisy_latents(x0, noise, schedule, args, t=t)
        x_t = add_noise(x0, noise, alpha, sigma)
        target = training_target(args.prediction_type, x0, noise, alpha, sigma)
        with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=args.mixed_precision == "bf16"):
            prediction = model(x_t, model_t, cond).float()
        out[f"val/loss_t{step:03d}"] = F.mse_loss(prediction, target).item()
    out["val/loss"] = float(np.mean(list(out.values())))
    return out


def write_samples(decoded, latent_space, vocoder, labels, folder, prefix, accelerator, step):
    """Save (and log) decoded samples: an image grid (one row per seed), or per clip a wav and a spectrogram
    (through the vocoder, or Griffin-Lim when there is none: marked '_griffinlim')."""
    folder.mkdir(parents=True, exist_ok=True)
    if latent_space.kind == "image":
        seeds = len(decoded) // len(labels)
        grid = image_grid([decoded[s * len(labels):(s + 1) * len(labels)] for s in range(seeds)])
        grid.save(folder / f"{prefix}.png")
        if accelerator is not None:
            log_images(accelerator, "val/samples", grid, step)
        return
    from common.audio import save_audio
    from common.spectral import griffin_lim

    audio = latent_space.audio
    # decoded: log-mels (B, n_mels, frames), or audio (B, samples) from a waveform VAE, shown by its log-mel
    mels = audio.mel.to(decoded.device)(decoded) if audio.mode == "waveform" else decoded
    picture = spectrogram_image(list(mels))
    picture.save(folder / f"{prefix}_mel.png")
    if accelerator is not None:
        log_images(accelerator, "val/spectrograms", picture, step)
    for n, mel in enumerate(decoded):
        if audio.mode == "waveform":
            wave, mark = mel.reshape(-1), ""
        elif vocoder is not None:
            wave, mark = vocoder(mel[None].to(next(vocoder.parameters()).device))[0, 0].cpu(), ""
        else:
            wave, mark = griffin_lim(mel[None], audio.mel_config)[0], "_griffinlim"
        save_audio(folder / f"{prefix}_{n:02d}{mark}.wav", wave.cpu(), audio.sample_rate)
        if accelerator is not None and n < 4:
            log_audio(accelerator, f"val/audio_{n}{mark}", wave, audio.sample_rate, step)


class SampleMetrics:
    """FID and Inception Score of generated images against --reference_dir (common/image_metrics.py), and the CLIP
    score of each sample against its caption with an open_clip model."""

    def __init__(self, args, device):
        from common.image_metrics import InceptionFeatures, ReferenceStats

        self.inception = InceptionFeatures("DEFAULT" if args.inception_weights == "imagenet" else None).to(device)
        self.reference = ReferenceStats(Path(args.output_dir) / "fid_reference").get(
            args.reference_dir, self.inception, resolution=args.resolution, device=device)
        self.clip = self.tokenizer = None
        if args.clip_score_model:
            import open_clip

            name, _, pretrained = args.clip_score_model.partition(":")
            if name.endswith(".json"):  # a config file of one's own, as common/text_encoders.py accepts
                open_clip.add_model_config(name)
                name = Path(name).stem
            self.clip = open_clip.create_model(name, pretrained=pretrained or None).to(device).eval()
            self.tokenizer = open_clip.get_tokenizer(name)
            cfg = open_clip.get_model_preprocess_cfg(self.clip)
            self.clip_size, self.clip_mean, self.clip_std = cfg["size"], cfg["mean"], cfg["std"]

    @torch.no_grad()
    def __call__(self, images, captions):
        """images (N, 3, H, W) in [-1, 1] on the metric device; captions: N strings (or None)."""
        from common.image_metrics import clip_score, feature_stats, frechet_distance, inception_score

        features, logits = zip(*(self.inception(x) for x in images.split(64)))
        features, logits = torch.cat(features), torch.cat(logits)
        out = {"val/fid": frechet_distance(*feature_stats(features.cpu()), *self.reference),
               "val/inception_score": inception_score(logits.cpu())[0]}
        if self.clip is not None:
            x = F.interpolate((images + 1) / 2, size=tuple(self.clip_size), mode="bicubic", align_corners=False)
            mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (self.clip_mean, self.clip_std))
            image_features = self.clip.encode_image((x.clamp(0, 1) - mean) / std)
            text_features = self.clip.encode_text(self.tokenizer(list(captions)).to(x.device))
            out["val/clip_score"] = clip_score(image_features.float(), text_features.float()).mean().item()
        return out


@torch.no_grad()
def metric_samples(model, val, schedule, latent_space, args):
    """--num_metric_samples decoded samples (seeds 100000 + i), for SampleMetrics."""
    images, n, device = [], args.num_metric_samples, val["device"]
    for lo in range(0, n, 64):
        index = torch.arange(lo, min(n, lo + 64), device=device)
        cond = take(val["metric_cond"], index % val["metric_count"])
        latents = generate_latents(model, cond, (100000 + index).tolist(), val["latent_shape"], schedule, args, device)
        images.append(latent_space.decode(latents).float())
    return torch.cat(images)


@torch.no_grad()
def validate(model, val, holdout, schedule, latent_space, vocoder, args, step, accelerator, sample_metrics=None):
    """Held-out loss at fixed timesteps, then samples of the fixed validation conditions and seeds from the
    evaluation (EMA) weights, saved to samples/ and logged. The last one's latents and decoded samples are kept in
    samples/last_validation.safetensors (the export reproduces them)."""
    metrics = holdout_loss(model, holdout, schedule, latent_space, args) if holdout is not None else {}
    n = val["count"]
    seeds = [args.validation_seed + s for s in range(args.num_validation_seeds) for _ in range(n)]
    index = [i for _ in range(args.num_validation_seeds) for i in range(n)]
    cond = take(val["cond"], torch.tensor(index, device=val["device"]))
    latents = generate_latents(model, cond, seeds, val["latent_shape"], schedule, args, val["device"])
    decoded = latent_space.decode(latents).float().cpu()
    folder = Path(args.output_dir) / "samples"
    write_samples(decoded, latent_space, vocoder, val["labels"], folder, f"step_{step:07d}", accelerator, step)
    save_file({"latents": latents.float().cpu().contiguous(), "decoded": decoded.contiguous()},
              folder / "last_validation.safetensors", metadata={"step": str(step), "labels": json.dumps(val["labels"])})
    metrics["val/latent_std"] = latents.float().std().item()
    if sample_metrics is not None:
        captions = [val["metric_captions"][i % val["metric_count"]] for i in range(args.num_metric_samples)]
        metrics.update(sample_metrics(metric_samples(model, val, schedule, latent_space, args), captions))
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# Export, checkpoints and the generate command

EXPORT_FORMAT = "train_ldm-1"


def export_config(args, model_config, latent_space, text_info, latent_shape, class_names, schedule):
    """Everything `generate` needs besides the weights: the denoiser, what it was trained on and how to sample."""
    return {
        "format": EXPORT_FORMAT, "denoiser": model_config, "kind": latent_space.kind,
        "conditioning": args.conditioning, "class_names": class_names, "class_embed_dim": args.class_embed_dim,
        "null_condition": args.null_condition, "text_encoder": text_info, "prompt_prefix": args.prompt_prefix,
        "vae": {"path": args.vae, "subfolder": args.vae_subfolder, "revision": args.revision, "key": latent_space.key,
                "scaling_factor": latent_space.scale, "shift_factor": latent_space.shift},
        "vocoder": args.vocoder, "latent_shape": list(latent_shape),
        "resolution": args.resolution if latent_space.kind == "image" else None,
        "prediction_type": args.prediction_type, "schedule": schedule.config() if schedule is not None else None,
        "sampler": {"name": args.sampler, "num_inference_steps": args.num_inference_steps,
                    "guidance_scale": args.guidance_scale, "mixed_precision": args.mixed_precision},
    }


def build_model(config, null_context=None, null_mask=None):
    """The LatentDiffusionModel of an export's (or checkpoint's) config; the text null condition is a placeholder
    of the right shape until the weights are loaded."""
    denoiser = build_denoiser(config["denoiser"])
    context_dim = config["denoiser"]["context_dim"]
    if config["conditioning"] == "text" and null_context is None:
        length = config["text_encoder"]["max_length"]
        null_context, null_mask = torch.zeros(1, length, context_dim), torch.ones(1, length, dtype=torch.bool)
    return LatentDiffusionModel(denoiser, config["conditioning"], context_dim, len(config["class_names"] or []),
                                null_context, null_mask, learned_null=config["null_condition"] == "learned")


def export(model_eval, config, output_dir):
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in model_eval.state_dict().items()},
              output_dir / "model.safetensors")
    (output_dir / EXPORT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def read_export(folder):
    """(config, state dict) of an export; SystemExit naming the file when it is not one."""
    folder = Path(folder)
    config_file, weights_file = folder / EXPORT_CONFIG, folder / "model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise SystemExit(f"--model {folder}: not a train_ldm.py export (needs {EXPORT_CONFIG} and model.safetensors)")
    config = json.loads(config_file.read_text())
    if config.get("format") != EXPORT_FORMAT:
        raise SystemExit(f"{config_file}: format {config.get('format')!r}, expected {EXPORT_FORMAT!r}")
    return config, load_file(weights_file)


def save_checkpoint(accelerator, args, step, state, model, optimizer, scheduler, ema, config, guard, corrupt):
    """Everything a resumed run needs, written atomically (common/checkpoint.py): the model's weights and config
    and the training parts every script saves."""
    refuse_non_finite(step, {"model": model})
    writer = start_checkpoint(accelerator, args.output_dir, step)
    save_training_parts(writer, accelerator, {"model": optimizer}, {"model": scheduler}, ema,
                        per_process={"corrupt": corrupt})
    if accelerator.is_main_process:
        writer.add_tensors("model", model.state_dict())
        writer.add_json("model_config", config)
        writer.add_json("training_state", training_state(accelerator, args, step, state, ema, guard))
    commit_checkpoint(writer, accelerator, args.checkpoints_total_limit)


def load_checkpoint(ckpt, accelerator, args, model, optimizer, scheduler, ema, config, guard, corrupt):
    """Restore a checkpoint into freshly built objects; returns the saved training state. A denoiser of another
    architecture is refused (or, with --allow_model_change, loaded where its tensors still fit)."""
    state = ckpt.json("training_state")
    saved = ckpt.json("model_config")
    changes = [f"config {k}" for k in sorted(set(saved["denoiser"]) | set(config["denoiser"]))
               if saved["denoiser"].get(k) != config["denoiser"].get(k)]
    changed = load_models(ckpt, {"model": model}, args.allow_model_change, config_changes={"model": changes})
    restore_training_parts(ckpt, accelerator, state, {"model": optimizer}, {"model": scheduler}, guard,
                           per_process={"corrupt": corrupt}, changed=changed)
    restore_ema(ckpt, ema, model, state, changed="model" in changed)
    log_changed_settings(state["args"], args, SCHEDULE_FLAGS, state.get("num_processes"), accelerator.num_processes)
    return state


# Settings whose change on resume alters the run's course; each is stated in the log when it differs.
SCHEDULE_FLAGS = ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "num_train_epochs",
                  "learning_rate", "lr_scheduler", "lr_warmup_steps", "optimizer", "mixed_precision", "seed",
                  "prediction_type", "noise_schedule", "snr_gamma", "noise_offset", "input_perturbation",
                  "conditioning_dropout", "cache_dir", "freeze")

# What --dry_run suggests when the recipe would not fit the GPU, most effective first.
DRY_RUN_HINTS = ("a smaller --train_batch_size with a larger --gradient_accumulation_steps (the same effective batch)",
                 "--cache_dir (no VAE or text encoder on the GPU while training)", "--gradient_checkpointing",
                 "--mixed_precision bf16", "a smaller --model preset")


def export_from_checkpoint(args):
    """`--export_checkpoint PATH`: the EMA (or, without EMA, the trained) weights of a checkpoint, exported."""
    try:
        ckpt = Checkpoint(args.export_checkpoint)
    except CheckpointError as err:
        raise SystemExit(f"--export_checkpoint: {err}") from None
    config = ckpt.json("model_config")
    model = build_model(config)
    model.load_state_dict(ckpt.tensors("model"))
    if ckpt.has("ema"):
        ema_tensors = ckpt.tensors("ema")
        model.load_state_dict({**model.state_dict(), **{k: v for k, v in ema_tensors.items() if k in model.state_dict()}})
    export(model, config, args.output_dir)
    print(f"exported {ckpt.path} (step {ckpt.step}) to {args.output_dir}")


def generate_main(argv=None):
    """Sample from an export: one image (or clip) per prompt and seed, written to --output."""
    p = ArgumentParser(prog="train_ldm.py generate", description=generate_main.__doc__)
    p.add_argument("--model", required=True, help="A train_ldm.py export folder (ldm_config.json, model.safetensors).")
    p.add_argument("--prompts", type=str, default=None,
                   help="A text file of prompts, one per line (text models); class models take class names.")
    p.add_argument("--prompt", type=str, nargs="+", default=None, help="Prompts (or class names) on the command line.")
    p.add_argument("--output", required=True, help="Folder for the samples (and grid.png).")
    p.add_argument("--num_images_per_prompt", type=positive_int, default=1, help="Seeds seed, seed+1, ... per prompt.")
    p.add_argument("--seed", type=int, default=0, help="First seed.")
    p.add_argument("--guidance_scale", type=non_negative_float, default=None, help="Default: the export's.")
    p.add_argument("--num_inference_steps", type=positive_int, default=None, help="Default: the export's.")
    p.add_argument("--sampler", type=str, default=None, choices=SAMPLERS, help="Default: the export's.")
    p.add_argument("--vae", type=str, default=None, help="Override the VAE path recorded in the export (moved files).")
    p.add_argument("--text_encoder", type=str, default=None, help="Override the text encoder spec of the export.")
    p.add_argument("--vocoder", type=str, default=None, help="Audio: override the export's vocoder.")
    p.add_argument("--batch_size", type=positive_int, default=16, help="Samples per forward pass.")
    p.add_argument("--mixed_precision", type=str, default=None, choices=["no", "bf16"],
                   help="Autocast while sampling; default: as the run's validation samples were drawn.")
    a = p.parse_args(argv)
    config, weights = read_export(a.model)
    prompts = list(a.prompt or [])
    if a.prompts:
        if not os.path.isfile(a.prompts):
            p.error(f"--prompts {a.prompts}: no such file")
        prompts += [line.strip() for line in Path(a.prompts).read_text().splitlines() if line.strip()]
    if config["conditioning"] == "none":
        prompts = prompts or [""]
    elif not prompts:
        p.error("give --prompts FILE or --prompt ...")
    if config["conditioning"] == "class":
        unknown = [q for q in prompts if q not in config["class_names"]]
        if unknown:
            p.error(f"--prompt: unknown classes {unknown}; this model knows {config['class_names']}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        latent_space = load_latent_space(a.vae or config["vae"]["path"], None if a.vae else config["vae"]["subfolder"],
                                         config["vae"].get("revision")).to(device)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    if latent_space.key != config["vae"]["key"]:
        logger.warning(f"the VAE's weights differ from the ones this model was trained with ({config['vae']['key']})")
    model = build_model(config)
    model.load_state_dict(weights)
    model.to(device).eval()
    vocoder = None
    if latent_space.kind == "audio" and latent_space.audio.mode == "mel" and (a.vocoder or config.get("vocoder")):
        from common.vocoder import load_vocoder

        vocoder = load_vocoder(a.vocoder or config["vocoder"], device)
    args = argparse.Namespace(
        conditioning=config["conditioning"], prediction_type=config["prediction_type"],
        guidance_scale=config["sampler"]["guidance_scale"] if a.guidance_scale is None else a.guidance_scale,
        num_inference_steps=a.num_inference_steps or config["sampler"]["num_inference_steps"],
        sampler=a.sampler or config["sampler"]["name"],
        mixed_precision=a.mixed_precision or config["sampler"].get("mixed_precision", "no"))
    schedule = NoiseSchedule(**config["schedule"]) if config["schedule"] else None
    cond = conditions_for(prompts, config, a.text_encoder, device)
    seeds = [a.seed + s for s in range(a.num_images_per_prompt) for _ in prompts]
    index = [i for _ in range(a.num_images_per_prompt) for i in range(len(prompts))]
    latents = []
    for lo in range(0, len(seeds), a.batch_size):
        part = torch.tensor(index[lo:lo + a.batch_size], device=device)
        latents.append(generate_latents(model, take(cond, part), seeds[lo:lo + a.batch_size], config["latent_shape"],
                                        schedule, args, device))
    latents = torch.cat(latents)
    decoded = latent_space.decode(latents).float().cpu()
    out = Path(a.output)
    write_samples(decoded, latent_space, vocoder, prompts, out, "grid", None, 0)
    if latent_space.kind == "image":
        from common.media import to_uint8_images
        from PIL import Image

        for n, img in enumerate(to_uint8_images(decoded)):
            Image.fromarray(img).save(out / f"{n:04d}.png")  # seed-major: all prompts of one seed, then the next
    save_file({"latents": latents.float().cpu().contiguous(), "decoded": decoded.contiguous()},
              out / "samples.safetensors")
    print(f"wrote {len(seeds)} samples of {len(prompts)} prompts to {out}")
    return 0


def conditions_for(prompts, config, text_encoder_override, device):
    """The model's condition for a list of prompts (text), class names (class) or just a count (none)."""
    if config["conditioning"] == "text":
        from common.text_encoders import build_text_encoder

        info = config["text_encoder"]
        encoder = build_text_encoder(text_encoder_override or info["spec"], info["max_length"], info["layer"]).to(device)
        if encoder.key != info["key"]:
            logger.warning(f"the text encoder differs from the one this model was trained with ({info['key']})")
        context, mask = encoder.encode([config["prompt_prefix"] + q for q in prompts], device)
        return {"context": context.float(), "mask": mask.bool()}
    if config["conditioning"] == "class":
        return {"label": torch.tensor([config["class_names"].index(q) for q in prompts], device=device)}
    return {"batch": len(prompts)}


# ---------------------------------------------------------------------------------------------------------------


def setup_models(args, items, kind, device):
    """The frozen VAE and text encoder, the denoiser's config and the latent shape; every mismatch between the data,
    the VAE and the denoiser stops here with a one-line message."""
    try:
        latent_space = load_latent_space(args.vae, args.vae_subfolder, args.revision)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    if latent_space.kind != kind:
        raise SystemExit(f"--vae {args.vae} is an {latent_space.kind} VAE but the training data holds {kind}")
    latent_space.to(device)
    text_encoder, text_info = None, None
    if args.conditioning == "text":
        from common.text_encoders import build_text_encoder

        try:
            text_encoder = build_text_encoder(args.text_encoder, args.text_max_length, args.text_layer)
        except ValueError as err:
            raise SystemExit(f"--text_encoder {err}") from None
        text_encoder.to(device)
        text_info = {"spec": args.text_encoder, "key": text_encoder.key, "max_length": text_encoder.max_length,
                     "layer": args.text_layer, "hidden_size": text_encoder.hidden_size}
    context_dim = text_encoder.hidden_size if text_encoder is not None else args.class_embed_dim
    config = denoiser_config(args.model, latent_space.latent_channels, context_dim)
    if latent_space.one_row:  # waveform latents (C, 1, frames): a DiT patches along time only
        if config["family"] != "dit":
            raise SystemExit(f"--model {args.model}: a waveform audio VAE's latents are one row, which a UNet cannot "
                             f"downsample; use a DiT preset ({', '.join(p for p in DENOISER_PRESETS if 'dit' in p)})")
        config["patch_size"] = [1, denoiser_downsampling(config)[1]]
    args.latent_multiple = m_h, m_w = denoiser_downsampling(config)
    f_h, f_w = latent_space.factors()
    if kind == "image":
        if args.resolution % (f_h * m_h) or args.resolution % (f_w * m_w):
            good = max(1, args.resolution // (f_h * m_h)) * f_h * m_h
            raise SystemExit(f"--resolution {args.resolution} is not a multiple of the VAE's downsampling factor {f_h} "
                             f"times {args.model}'s patch/downsampling size {m_h} (try {good})")
        latent_shape = (latent_space.latent_channels, args.resolution // f_h, args.resolution // f_w)
    else:
        _, num_samples = audio_lengths(latent_space, args)
        rows = 1 if latent_space.one_row else latent_space.audio.mel_config.n_mels // f_h
        if rows % m_h:
            raise SystemExit(f"--vae {args.vae}: its {rows} latent mel rows are not a multiple of {args.model}'s "
                             f"patch/downsampling size {m_h}")
        latent_shape = (latent_space.latent_channels, rows, num_samples // f_w)
    if args.vocoder:
        from common.vocoder import read_vocoder_mel_config

        if kind != "audio" or latent_space.audio.mode != "mel":
            raise SystemExit("--vocoder is for a mel-mode audio VAE")
        differ = read_vocoder_mel_config(args.vocoder).mismatches(latent_space.audio.mel_config)
        if differ:
            raise SystemExit(f"--vocoder {args.vocoder} and --vae {args.vae} have other mel settings: {'; '.join(differ)}")
    return latent_space, text_encoder, text_info, config, tuple(latent_shape)


def validation_conditions(args, holdout_items, train_items, text_encoder, class_names, device):
    """The fixed conditions sampled at every validation: (cond, labels for the grid). Without prompts given, the
    first held-out captions (or, with nothing held out, the first training captions)."""
    if args.conditioning == "class":
        labels = list(class_names[:args.num_validation_prompts])
        return {"label": torch.arange(len(labels), device=device)}, labels
    if args.conditioning == "none":
        n = args.num_validation_prompts
        return {"batch": n}, [""] * n
    prompts = list(args.validation_prompts or [])
    if args.validation_prompts_file:
        prompts += [line.strip() for line in Path(args.validation_prompts_file).read_text().splitlines() if line.strip()]
    prompts = prompts or (holdout_items.captions or train_items.captions)[:args.num_validation_prompts]
    context, mask = text_encoder.encode([args.prompt_prefix + q for q in prompts], device)
    return {"context": context.float(), "mask": mask.bool()}, prompts


def main(args):
    if args.export_checkpoint:
        return export_from_checkpoint(args)
    accelerator = setup_accelerator(args, args.mixed_precision or bf16_if_supported())
    args.mixed_precision = accelerator.mixed_precision
    stop, watchdog = GracefulStop(), Watchdog(args.stall_timeout)
    ckpt = open_resume(accelerator, args.resume_from_checkpoint, args.output_dir)
    set_seed(args.seed)  # identical initial weights on every process
    device = accelerator.device

    # Data and the frozen encoders
    train_items, holdout_items, kind = data_items(args)
    latent_space, text_encoder, text_info, model_config, latent_shape = setup_models(args, train_items, kind, device)
    sample_rate, num_samples = audio_lengths(latent_space, args)
    null_context = null_mask = None
    if text_encoder is not None:
        null_context, null_mask = text_encoder.encode([""], device)  # CFG's unconditional branch: the empty prompt
    if args.cache_dir:
        key = cache_key(args, latent_space, text_encoder, train_items, kind)
        if accelerator.is_main_process:  # the main process builds; the others wait until it is complete
            meta = build_cache(args.cache_dir, key, train_items, kind, latent_space, text_encoder, args, device)
        else:
            meta = wait_for_cache(args.cache_dir, key)
        train_set, collate_fn = CachedDataset(args.cache_dir, meta, args.seed), (lambda batch: batch)
    else:
        train_set = RawDataset(train_items, kind, args.resolution, args.random_flip, args.seed, sample_rate, num_samples)
        collate_fn = collate_raw
    try:
        sampler = ResumableBatchSampler(len(train_set), args.train_batch_size, accelerator.num_processes,
                                        accelerator.process_index, args.seed)
    except ValueError as err:
        raise SystemExit(f"--train_batch_size {args.train_batch_size}: {err}") from None
    loader = torch.utils.data.DataLoader(
        train_set, batch_sampler=sampler, collate_fn=collate_fn, num_workers=args.dataloader_num_workers,
        pin_memory=device.type == "cuda", persistent_workers=args.dataloader_num_workers > 0,
        worker_init_fn=loader_worker_init, generator=torch.Generator().manual_seed(args.seed))
    holdout = None
    if len(holdout_items):
        raw = collate_raw([RawDataset(holdout_items, kind, args.resolution, False, args.seed, sample_rate,
                                      num_samples)[(0, i)] for i in range(len(holdout_items))])
        holdout = encode_batch(raw, latent_space, text_encoder, args, device)
    val_cond, val_labels = validation_conditions(args, holdout_items, train_items, text_encoder,
                                                 train_items.class_names, device)
    val = {"cond": val_cond, "labels": val_labels, "count": len(val_labels), "latent_shape": latent_shape,
           "device": device}
    sample_metrics = None
    if args.reference_dir and accelerator.is_main_process:
        if kind != "image":
            raise SystemExit("--reference_dir (FID / IS / CLIP score) is for images")
        captions = (holdout_items.captions + train_items.captions)[:args.num_metric_samples]
        if args.conditioning == "text":
            context, mask = text_encoder.encode([args.prompt_prefix + c for c in captions], device)
            val["metric_cond"] = {"context": context.float(), "mask": mask.bool()}
        elif args.conditioning == "class":
            val["metric_cond"] = {"label": torch.arange(args.num_metric_samples, device=device)
                                  % len(train_items.class_names)}
        else:
            val["metric_cond"] = {"batch": 1}
        val["metric_count"] = len(next(iter(val["metric_cond"].values()))) if args.conditioning != "none" else 1
        val["metric_captions"] = captions if args.conditioning == "text" else [None] * args.num_metric_samples
        sample_metrics = SampleMetrics(args, device)
    if args.cache_dir:  # training reads the cache: the encoders leave the GPU (the VAE returns to decode samples)
        text_encoder = None
        latent_space.cpu()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    vocoder = None
    if args.vocoder:
        from common.vocoder import load_vocoder

        vocoder = load_vocoder(args.vocoder, device)
    steps_per_epoch = max(1, sampler.batches_per_epoch // args.gradient_accumulation_steps)
    max_steps = args.num_train_epochs * steps_per_epoch if args.num_train_epochs else args.max_train_steps
    logger.info(f"{len(train_set)} training and {len(holdout_items)} held-out items ({kind}); latents "
                f"{'x'.join(map(str, latent_shape))}; {steps_per_epoch} optimizer steps per epoch, {max_steps} in all")

    # Models. Seeded here, after the cache (whose loader draws from the global RNG only when it is built), so the
    # initial weights are the same whether or not this run built the cache, and on every process.
    set_seed(args.seed)
    model = build_model({"denoiser": model_config, "conditioning": args.conditioning,
                         "class_names": train_items.class_names, "null_condition": args.null_condition,
                         "text_encoder": text_info}, null_context, null_mask)
    model.denoiser.gradient_checkpointing = args.gradient_checkpointing
    if args.enable_xformers_memory_efficient_attention:
        model.denoiser.unet.enable_xformers_memory_efficient_attention()
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model.to(device, memory_format=memory_format)
    schedule = None if args.prediction_type == "flow" else NoiseSchedule(
        args.noise_schedule, 1000, *default_betas(args), zero_terminal_snr=args.zero_terminal_snr)
    config = export_config(args, model_config, latent_space, text_info, latent_shape, train_items.class_names, schedule)
    logger.info(f"denoiser {args.model}: {count_parameters(model.denoiser) / 1e6:.2f}M parameters")
    ema = EMA(model, args.ema_decay, args.ema_power, every=args.ema_update_every) if args.use_ema else None
    model_eval = copy.deepcopy(model).eval().requires_grad_(False)  # validation copy; training weights stay put

    # Optimizer
    opt_cfg = optimizer_kwargs(args)
    optimizer = build_optimizer(params=freeze(model, args.freeze), **opt_cfg["optimizer"])
    train_model = model
    if args.compile:
        args.compile_mode = compile_mode_for_accumulation(args.compile_mode, args.gradient_accumulation_steps)
        train_model.compile(mode=args.compile_mode)  # in place: state-dict keys keep their names
    train_model, optimizer = accelerator.prepare(train_model, optimizer)
    # Stepped by hand once per optimizer step, so the learning rate is the same function of the step on any number
    # of GPUs.
    scheduler = build_scheduler(optimizer, total_steps=max_steps, **opt_cfg["scheduler"])
    guard, corrupt = SkipGuard(args.max_consecutive_skips), CorruptSampleTracker(args.max_corrupt_fraction)
    set_seed(args.seed, device_specific=True)  # per-process noise from here on

    state = {"epoch": 0, "samples_in_epoch": 0, "run_id": new_run_id()}
    if ckpt is not None:
        state = load_checkpoint(ckpt, accelerator, args, model, optimizer, scheduler, ema, config, guard, corrupt)
        logger.info(f"resumed from {ckpt.path} at step {ckpt.step}")
    global_step = ckpt.step if ckpt is not None else 0
    stop_when = StopCondition(args.stop_when, args.stop_when_logs)
    stop_when.load_state_dict(state.get("stop_when"))
    if stop_when.met:  # this run already ended on the same --stop_when: nothing left to train
        max_steps = global_step
    samples_per_step = args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    encoders = None if args.cache_dir else (latent_space, text_encoder)

    def device_batch(batch):
        if encoders is not None:  # no cache: encode this batch now
            with accelerator.autocast():
                return encode_batch(batch, *encoders, args, device)
        return {k: v.to(device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}

    if args.dry_run:  # pre-flight: a few real steps at the configured shapes, a report, nothing written
        batches = infinite_batches(loader, sampler, state["epoch"], 0)

        def one_step(i):
            for _ in range(args.gradient_accumulation_steps):
                train_step(device_batch(next(batches)[2]), train_model, optimizer, schedule, latent_space,
                           accelerator, args)
            watchdog.beat()

        dry = DryRun(args.dry_run_steps, samples_per_step, max_steps - global_step, DRY_RUN_HINTS,
                     unit="images" if kind == "image" else "clips")
        accelerator.print("\n".join(dry.run(one_step)))
        return
    init_trackers(accelerator, args.tracker_project_name or "train_ldm", vars(args), state["run_id"], args.output_dir,
                  args.tracker_run_name, args.tracker_group, args.tracker_tags or tracker_tags(args, __file__))
    write_run_info(args.output_dir, args, accelerator, __file__)
    metrics_file = MetricsFile(Path(args.output_dir, "metrics.jsonl"), resume_step=global_step if ckpt else None,
                               enabled=accelerator.is_main_process)

    # Train
    batches = infinite_batches(loader, sampler, state["epoch"], state["samples_in_epoch"] // sampler.global_batch)
    throughput, accumulated, flops = Throughput(peak_bf16_flops()), MetricsAccumulator(), None
    progress = tqdm(total=max_steps, initial=global_step, desc="steps", disable=not accelerator.is_local_main_process)
    watchdog.beat()
    while global_step < max_steps:
        epoch, b, batch = next(batches)
        corrupt.update(batch["skipped"], len(batch["index"]))
        inputs = device_batch(batch)
        count = throughput.peak_flops and flops is None
        with FlopCount() if count else nullcontext() as counter:
            metrics = train_step(inputs, train_model, optimizer, schedule, latent_space, accelerator, args)
        if count:
            flops = counter.total * args.gradient_accumulation_steps
        stepped = metrics.pop("stepped/model", None)
        accumulated.add(metrics)  # every micro-batch's losses count towards the logged means
        if not accelerator.sync_gradients:
            continue

        # One optimizer step done. `stepped` is a bool, or a device flag (see clip_and_step) that the guard reads at
        # the next log: a step skipped on the GPU leaves the weights and the EMA as they were, and the learning-rate
        # schedule moves on.
        guard.update(stepped, global_step + 1)
        if stepped is not False:
            scheduler.step()
            if ema is not None:
                ema.update(model, applied=stepped)
        global_step += 1
        state["epoch"], state["samples_in_epoch"] = epoch, (b + 1) * sampler.global_batch
        throughput.add(samples_per_step, flops)
        progress.update(1)
        watchdog.beat()
        stopping = stop.requested(accelerator)  # SIGTERM: checkpoint this step and exit 0

        if global_step % args.logging_steps == 0 or global_step == max_steps:
            logs = accumulated.pop(accelerator)  # sync point
            guard.flush()
            logs.update(throughput.measure())
            logs.update({"lr/model": scheduler.get_last_lr()[0], **corrupt.metrics(),
                         "train/skipped_steps": guard.total, "train/epoch": epoch})
            if ema is not None:
                logs["train/ema_decay"] = ema.decay()
            accelerator.log(logs, step=global_step)
            metrics_file.write(global_step, logs)
            progress.set_postfix(loss=f"{logs['loss/total']:.4f}", per_s=f"{logs['perf/samples_per_s']:.1f}")
            observe_plateau(scheduler, logs)  # --lr_scheduler plateau learns from the logged means
            if stop_when.update(logs):
                max_steps = global_step  # --stop_when held: this step is the last (validated, checkpointed, exported)
        if (global_step % args.validation_steps == 0 or global_step == max_steps) and not stopping:
            if accelerator.is_main_process:
                (ema.copy_to(model_eval) if ema is not None else model_eval.load_state_dict(model.state_dict()))
                latent_space.to(device)
                val_metrics = validate(model_eval, val, holdout, schedule, latent_space, vocoder, args, global_step,
                                       accelerator, sample_metrics)
                if args.cache_dir:
                    latent_space.cpu()
                accelerator.log(val_metrics, step=global_step)
                metrics_file.write(global_step, val_metrics)
                logger.info(f"step {global_step}: " + ", ".join(f"{k} {v:.4f}" for k, v in val_metrics.items()))
            accelerator.wait_for_everyone()
            watchdog.beat()
            if stop_when.update(val_metrics if accelerator.is_main_process else {}, accelerator, main_only=True):
                max_steps = global_step  # --stop_when held on a validation metric: this step is the last
        if global_step % args.checkpointing_steps == 0 or global_step == max_steps or stopping:
            guard.flush()  # a run stopped by too many skipped steps stops here, before writing
            save_checkpoint(accelerator, args, global_step, {**state, "stop_when": stop_when.state_dict()}, model,
                            optimizer, scheduler, ema, config, guard, corrupt)
            watchdog.beat()
        if stopping:
            logger.info(f"stopped at step {global_step} on request; continue with --resume_from_checkpoint latest")
            break

    # Export: the EMA weights and what they were trained with
    progress.close()
    if accelerator.is_main_process and global_step == max_steps:
        (ema.copy_to(model_eval) if ema is not None else model_eval.load_state_dict(model.state_dict()))
        export(model_eval, config, args.output_dir)
        logger.info(f"exported to {args.output_dir}; corrupt samples skipped: {corrupt.summary()}")
    accelerator.end_training()


def default_betas(args):
    """(beta_start, beta_end): the flags, or each schedule's usual values (DDPM's for linear, SD's for scaled_linear)."""
    start, end = (1e-4, 0.02) if args.noise_schedule == "linear" else (0.00085, 0.012)
    return (args.beta_start or start, args.beta_end or end)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "generate":
        sys.exit(generate_main(sys.argv[2:]))
    with fail_fast():
        main(parse_args())
