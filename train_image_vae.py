#!/usr/bin/env python
"""Train a Stable-Diffusion-style image VAE: a KL-regularised autoencoder (8x downsampling, 4 latent channels)
with L1 + LPIPS + KL + PatchGAN losses, after Rombach et al. 2022 (arXiv:2112.10752, appendix G) and the taming
`LPIPSWithDiscriminator` recipe.

    accelerate launch train_image_vae.py --train_data_dir ./images --output_dir out/vae --resolution 256

The export in --output_dir is a diffusers `AutoencoderKL` folder (EMA weights, safetensors) with a
`latent_stats.json` beside it (scaling factor, shift and per-channel statistics measured on the training data),
which train_ldm.py reads. Export any checkpoint with

    python train_image_vae.py --export_checkpoint out/vae/checkpoint-20000 --output_dir out/vae-20000
"""

import argparse
import copy
import dataclasses
import json
import os
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from common.args import (ArgumentParser, add_ema_args, add_optimizer_args, add_run_args, non_negative_float,
                         non_negative_int, optimizer_kwargs, parse_args_with_config, positive_int)
from common.checkpoint import (Checkpoint, CheckpointError, commit_checkpoint, load_models, open_resume,
                               refuse_non_finite, restore_ema, restore_training_parts, save_training_parts,
                               start_checkpoint, training_state)
from common.data import (IMAGE_EXTENSIONS, CorruptSampleTracker, FileImages, HFImages, ImageDataset,
                         ResumableBatchSampler, collate, find_files, has_any_file, infinite_batches, loader_worker_init,
                         split_holdout)
from common.discriminators import IMAGE_DISCRIMINATORS, build_image_discriminator
from common.ema import EMA
from common.group_norm import fuse_group_norm_silu, kernels_run_on
from common.losses import (GAN_LOSSES, LPIPS, adaptive_gan_weight, discriminator_loss, feature_matching_loss,
                           generator_loss, kl_loss, r1_penalty)
from common.media import image_grid, log_images
from common.metrics import LatentStats, psnr, ssim
from common.optim import build_optimizer, build_scheduler, observe_plateau
from common.perf import DryRun, FlopCount, Throughput, peak_bf16_flops
from common.training import (GracefulStop, MetricsAccumulator, MetricsFile, SkipGuard, StopCondition, Watchdog,
                             all_stepped, bf16_if_supported, clip_and_step, fail_fast, freeze, frozen, init_trackers,
                             log_changed_settings, new_run_id, setup_accelerator, tracker_tags, write_run_info)
from diffusers import AutoencoderKL  # after common, which quiets a bitsandbytes import warning (common/__init__.py)

logger = get_logger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# Model presets


@dataclasses.dataclass(frozen=True)
class VAEPreset:
    block_out_channels: tuple
    layers_per_block: int
    norm_num_groups: int = 32
    latent_channels: int = 4

    @property
    def downsampling_factor(self):
        return 2 ** (len(self.block_out_channels) - 1)


VAE_PRESETS = {
    "kl-f8-tiny": VAEPreset((16, 32, 32, 32), 1, norm_num_groups=8),  # tests: 0.2M decoder
    "kl-f8-small": VAEPreset((32, 64, 64, 64), 1),  # CPU demo: 0.8M decoder
    "kl-f8-5m": VAEPreset((64, 128, 128, 160), 2),  # default: 5.0M decoder, 3.5M encoder
    "kl-f8-sd": VAEPreset((128, 256, 512, 512), 2),  # Stable Diffusion 1.x/2.x: 49.5M decoder, 34.2M encoder
}


def build_vae(preset):
    n = len(preset.block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=preset.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=preset.block_out_channels, layers_per_block=preset.layers_per_block,
        norm_num_groups=preset.norm_num_groups, sample_size=256)


class VAEForTraining(nn.Module):
    """encode -> sample -> decode in one forward, so DDP sees one call per step (and torch.compile one graph)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, images):
        posterior = self.vae.encode(images).latent_dist
        reconstruction = self.vae.decode(posterior.sample()).sample
        return reconstruction, posterior.mean, posterior.logvar  # (B, 3, H, W), (B, C, H/f, W/f) x 2


def build_models(args, device, memory_format):
    """The VAE (a preset, or a pretrained diffusers AutoencoderKL), the discriminator (None without a GAN) and
    LPIPS (None when its weight is 0), on `device`."""
    if args.pretrained_vae_model_name_or_path:
        vae = AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path,
                                            subfolder=args.pretrained_vae_subfolder, revision=args.revision)
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        if args.resolution % factor:
            raise SystemExit(f"--resolution {args.resolution} is not a multiple of the pretrained VAE's "
                             f"downsampling factor {factor}")
    else:
        vae = build_vae(VAE_PRESETS[args.model])
    if args.fused_group_norm:  # before the optimizer: the same Parameters, other modules
        fused = fuse_group_norm_silu(vae)
        logger.info(f"--fused_group_norm: {fused} GroupNorm -> SiLU pairs fused"
                    + ("" if kernels_run_on(device) else f" (PyTorch's ops on {device.type}: no Triton kernels)"))
    disc = None
    if args.adv_weight > 0 or args.fm_weight > 0:
        disc = build_image_discriminator(args.discriminator, 3, args.disc_ndf, args.disc_layers, args.disc_norm)
        disc.to(device, memory_format=memory_format)
    lpips = None
    if args.lpips_weight > 0:
        lpips = LPIPS(pretrained_backbone=args.lpips_backbone == "imagenet").to(device, memory_format=memory_format)
    vae.to(device, memory_format=memory_format)
    count = lambda *modules: sum(p.numel() for m in modules for p in m.parameters())  # noqa: E731
    n_enc, n_dec = count(vae.encoder, vae.quant_conv), count(vae.decoder, vae.post_quant_conv)
    n_disc = count(disc) if disc is not None else 0
    logger.info(f"VAE: encoder {n_enc / 1e6:.2f}M, decoder {n_dec / 1e6:.2f}M params; discriminator "
                f"{n_disc / 1e6:.2f}M (G:D = 1:{n_disc / (n_enc + n_dec):.2f})")
    return vae, disc, lpips


# ---------------------------------------------------------------------------------------------------------------
# Arguments


def build_parser():
    parser = ArgumentParser(description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = parser.add_argument_group("data")
    g.add_argument("--train_data_dir", type=str, default=None,
                   help="Folder of images (searched recursively; an imagefolder layout with metadata.jsonl works).")
    g.add_argument("--dataset_name", type=str, default=None,
                   help="A Hugging Face dataset (hub id or local path) to use instead of --train_data_dir.")
    g.add_argument("--dataset_config_name", type=str, default=None, help="Config of --dataset_name.")
    g.add_argument("--image_column", type=str, default="image", help="Image column of --dataset_name.")
    g.add_argument("--validation_data_dir", type=str, default=None,
                   help="Held-out images for validation; by default --num_validation_images are held out of "
                        "the training data.")
    g.add_argument("--num_validation_images", type=positive_int, default=32,
                   help="Held-out images for validation metrics (the first 8 make the reconstruction grid).")
    g.add_argument("--resolution", type=positive_int, default=256,
                   help="Training crop size; a multiple of the VAE's downsampling factor.")
    g.add_argument("--random_crop", action=argparse.BooleanOptionalAction, default=True,
                   help="Random (not centre) crops after resizing the shorter side to --resolution.")
    g.add_argument("--random_flip", action=argparse.BooleanOptionalAction, default=True, help="Random horizontal flips.")

    g = parser.add_argument_group("model")
    g.add_argument("--model", type=str, default="kl-f8-5m", choices=sorted(VAE_PRESETS),
                   help="VAE preset: kl-f8-5m (5.0M-param decoder), kl-f8-sd (the SD 1.x architecture), "
                        "kl-f8-small / kl-f8-tiny (demo and tests).")
    g.add_argument("--pretrained_vae_model_name_or_path", type=str, default=None,
                   help="Fine-tune this diffusers AutoencoderKL (e.g. stabilityai/sd-vae-ft-mse) instead of "
                        "training --model from scratch.")
    g.add_argument("--pretrained_vae_subfolder", type=str, default=None, help="e.g. 'vae' inside a pipeline repo.")
    g.add_argument("--revision", type=str, default=None, help="Revision of the pretrained VAE.")
    g.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=False,
                   help="NHWC memory format for the conv nets. Off by default: with AutoencoderKL's many GroupNorms "
                        "it measured 1.18x slower in eager mode on an H100, and no faster compiled (README).")
    g.add_argument("--fused_group_norm", action=argparse.BooleanOptionalAction, default=False,
                   help="Run each resnet block's GroupNorm -> SiLU as fused Triton kernels (two passes over the "
                        "input forward, two backward; common/group_norm.py) on a CUDA GPU; PyTorch's ops elsewhere. "
                        "Same weights and exports.")

    g = parser.add_argument_group("losses (weights of one mapping, summed)")
    g.add_argument("--rec_loss_weight", type=non_negative_float, default=1.0, help="Pixel L1.")
    g.add_argument("--lpips_weight", type=non_negative_float, default=1.0, help="LPIPS (VGG) perceptual loss.")
    g.add_argument("--lpips_backbone", type=str, default="imagenet", choices=["imagenet", "random"],
                   help="LPIPS VGG weights: 'imagenet' (downloaded by torchvision on first use); 'random' only "
                        "for speed benchmarks and tests (same cost, no perceptual meaning).")
    g.add_argument("--kl_weight", type=non_negative_float, default=1e-6,
                   help="KL, averaged over latent elements (reconstruction is averaged over pixels).")
    g.add_argument("--kl_free_bits", type=non_negative_float, default=0.0,
                   help="Free bits: floor (nats) on each latent channel's mean KL.")
    g.add_argument("--adv_weight", type=non_negative_float, default=0.5, help="Generator adversarial loss.")
    g.add_argument("--fm_weight", type=non_negative_float, default=0.0, help="Discriminator feature matching.")
    g.add_argument("--adaptive_adv_weight", action="store_true",
                   help="Scale the adversarial loss by VQGAN's adaptive weight ||grad rec|| / ||grad adv||.")
    g.add_argument("--gan_loss", type=str, default="hinge", choices=GAN_LOSSES, help="GAN objective.")

    g = parser.add_argument_group("discriminator")
    g.add_argument("--discriminator", type=str, default="patchgan", choices=IMAGE_DISCRIMINATORS,
                   help="PatchGAN (NLayerDiscriminator) or one PatchGAN per scale (1x, 1/2x, 1/4x).")
    g.add_argument("--disc_ndf", type=positive_int, default=64, help="Discriminator base width.")
    g.add_argument("--disc_layers", type=positive_int, default=3, help="Stride-2 stages (n_layers).")
    g.add_argument("--disc_norm", type=str, default="batch", choices=["batch", "group", "none"],
                   help="Normalisation in the discriminator.")
    g.add_argument("--disc_start_step", type=non_negative_int, default=50000,
                   help="Optimizer step at which the GAN (discriminator and adversarial loss) starts.")
    g.add_argument("--r1_gamma", type=non_negative_float, default=10.0, help="R1 penalty weight (0 disables).")
    g.add_argument("--r1_interval", type=positive_int, default=16,
                   help="Apply R1 lazily every this many steps, scaled by the interval (StyleGAN2).")

    add_optimizer_args(parser, title="VAE optimizer", lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0,
                       scheduler="cosine", warmup_steps=2000)
    add_optimizer_args(parser, prefix="disc_", title="discriminator optimizer", lr=1e-4, betas=(0.8, 0.99),
                       weight_decay=0.0, scheduler="constant", warmup_steps=0)
    add_ema_args(parser, decay=0.9999, power=0.75)
    add_run_args(parser, batch_size=16, max_train_steps=200000, checkpointing_steps=2000, validation_steps=1000)

    g = parser.add_argument_group("export")
    g.add_argument("--latent_stats_num_images", type=positive_int, default=1024,
                   help="Training images encoded to measure latent_stats.json.")
    g.add_argument("--export_checkpoint", type=str, default=None,
                   help="Only export this checkpoint folder (EMA weights + latent_stats.json) to --output_dir.")
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
    if bool(args.train_data_dir) == bool(args.dataset_name):
        parser.error("give exactly one of --train_data_dir (a folder of images) or --dataset_name")
    for flag in ("train_data_dir", "validation_data_dir"):
        folder = getattr(args, flag)
        if folder and not os.path.isdir(folder):
            parser.error(f"--{flag} {folder}: no such folder")
        if folder and not has_any_file(folder, IMAGE_EXTENSIONS):
            parser.error(f"--{flag} {folder}: contains no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    if not args.pretrained_vae_model_name_or_path:
        factor = VAE_PRESETS[args.model].downsampling_factor
        if args.resolution % factor:
            parser.error(f"--resolution {args.resolution} is not a multiple of {args.model}'s downsampling factor "
                         f"{factor} (try {max(factor, args.resolution // factor * factor)})")
    if args.adv_weight > 0 or args.fm_weight > 0:
        # Each PatchGAN stage halves the input and the last two 4x4 convolutions need at least 3 pixels.
        scales = 3 if args.discriminator == "multiscale-patchgan" else 1
        smallest = 2 ** (args.disc_layers + 1) * 2 ** (scales - 1)
        if args.resolution < smallest:
            parser.error(f"--resolution {args.resolution} is too small for --discriminator {args.discriminator} "
                         f"with --disc_layers {args.disc_layers} (needs >= {smallest})")


# ---------------------------------------------------------------------------------------------------------------
# Data


def image_sources(args):
    """(train, validation) sources: files on disk or a Hugging Face dataset, with held-out validation images."""
    if args.dataset_name:
        import datasets

        ds = datasets.load_dataset(args.dataset_name, args.dataset_config_name, split="train")
        train_idx, val_idx = split_holdout(list(range(len(ds))), args.num_validation_images, args.seed)
        train, val = HFImages(ds.select(train_idx), args.image_column), HFImages(ds.select(val_idx), args.image_column)
    else:
        files = find_files(args.train_data_dir, IMAGE_EXTENSIONS)
        if args.validation_data_dir:
            train, val = FileImages(files), FileImages(find_files(args.validation_data_dir, IMAGE_EXTENSIONS))
        else:
            train_files, val_files = split_holdout(files, args.num_validation_images, args.seed)
            train, val = FileImages(train_files), FileImages(val_files)
    if len(train) == 0 or len(val) == 0:
        raise SystemExit(f"need training and validation images, found {len(train)} and {len(val)}")
    return train, val


def fixed_images(source, resolution, count):
    """The first `count` readable images of `source`, centre-cropped: the same validation batch all run long."""
    dataset = ImageDataset(source, resolution, random_crop=False, random_flip=False)
    return torch.stack([dataset[i]["pixel_values"] for i in range(min(count, len(dataset)))])


# ---------------------------------------------------------------------------------------------------------------
# The training step


def loss_weights(args):
    """The loss mapping: every term's weight in one place, defaults from the seed's Image VAE table."""
    return {"rec": args.rec_loss_weight, "lpips": args.lpips_weight, "kl": args.kl_weight,
            "adv": args.adv_weight, "fm": args.fm_weight}


def is_r1_step(step, args):
    return args.r1_gamma > 0 and step % args.r1_interval == 0


def train_step(images, model, disc, lpips, opt_vae, opt_disc, accelerator, args, step):
    """One micro-batch: the discriminator's loss on detached reconstructions, then the VAE's loss through the
    frozen discriminator; both optimizers step at the end of the accumulation window. (Stepping D first, as
    HiFi-GAN does, would let the VAE's last micro-batch see a different discriminator than the others: with both
    stepping at the window's end, k micro-batches of b give exactly the update of one batch of k*b.)
    Returns a flat dict of tensors."""
    weights = loss_weights(args)
    gan_on = disc is not None and step >= args.disc_start_step
    models = (model, disc) if disc is not None else (model,)
    out = {}
    with accelerator.accumulate(*models), accelerator.autocast():
        reconstruction, mean, logvar = model(images)

        # Discriminator
        if gan_on:
            r1_now = is_r1_step(step, args)
            real = images.detach().requires_grad_(r1_now)
            # R1 needs a double backward, which compiled graphs do not support: run D eagerly on those steps.
            with torch.compiler.set_stance("force_eager") if r1_now else nullcontext():
                logits_real, _ = disc(real)
                logits_fake, _ = disc(reconstruction.detach())
                d_loss = discriminator_loss(logits_real, logits_fake, args.gan_loss)
                r1 = r1_penalty(logits_real, real) if r1_now else torch.zeros((), device=images.device)
            accelerator.backward(d_loss + 0.5 * args.r1_gamma * args.r1_interval * r1)
            out.update({"loss/disc": d_loss.detach(), "loss/r1": r1.detach(),
                        "disc/logits_real": _mean(logits_real), "disc/logits_fake": _mean(logits_fake),
                        # D(real) / D(fake) as probabilities: the seed's health ranges are 0.7-0.9 and 0.3-0.6.
                        "disc/real_prob": _mean(logits_real, torch.sigmoid),
                        "disc/fake_prob": _mean(logits_fake, torch.sigmoid)})

        # VAE (the "generator")
        losses = {"rec": F.l1_loss(reconstruction, images), "kl": kl_loss(mean, logvar, args.kl_free_bits)}
        if weights["lpips"] > 0:
            losses["lpips"] = lpips(reconstruction, images)  # gradients flow into the decoder
        adv_scale = 1.0
        if gan_on:
            d_plain = accelerator.unwrap_model(disc)
            with frozen(d_plain):  # adversarial gradients reach the VAE only, never D's accumulating grads
                logits_gen, features_gen = d_plain(reconstruction)
                losses["adv"] = generator_loss(logits_gen, args.gan_loss)
                if weights["fm"] > 0:
                    with torch.no_grad():
                        _, features_real = d_plain(images)
                    losses["fm"] = feature_matching_loss(features_real, features_gen)
            if args.adaptive_adv_weight:
                last_layer = accelerator.unwrap_model(model).vae.decoder.conv_out.weight
                nll = weights["rec"] * losses["rec"] + weights["lpips"] * losses.get("lpips", 0.0)
                adv_scale = adaptive_gan_weight(nll, losses["adv"], last_layer)
                out["weight/adaptive_adv"] = adv_scale
        total = sum(weights[k] * (adv_scale if k == "adv" else 1.0) * v for k, v in losses.items())
        accelerator.backward(total)

        if accelerator.sync_gradients:  # the end of the accumulation window: both optimizers step
            # defer: no host sync; a non-finite step is skipped on the GPU (fused AdamW) and counted at the next log
            if gan_on:
                out["grad_norm/disc"], out["stepped/disc"] = clip_and_step(
                    accelerator, opt_disc, disc.parameters(), args.max_grad_norm, defer=True)
            out["grad_norm/vae"], out["stepped/vae"] = clip_and_step(
                accelerator, opt_vae, model.parameters(), args.max_grad_norm, defer=True)

    out.update({f"loss/{k}": v.detach() for k, v in losses.items()})
    out.update({"loss/total": total.detach(), "latent/mean": mean.detach().mean(),
                "latent/std": mean.detach().std(), "latent/posterior_std": (0.5 * logvar.detach()).exp().mean()})
    return out


def _mean(logits, fn=None):
    values = [fn(x) if fn else x for x in (logits if isinstance(logits, list) else [logits])]
    return torch.stack([v.detach().float().mean() for v in values]).mean()


# ---------------------------------------------------------------------------------------------------------------
# Validation and export


@torch.no_grad()
def validate(vae_eval, images, lpips, args, step, accelerator):
    """Reconstruct the fixed held-out images with the evaluation (EMA) weights; save and log a grid
    (originals above, reconstructions below) and PSNR / SSIM / LPIPS / L1."""
    recon = torch.cat([vae_eval.decode(vae_eval.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
                       for x in images.split(args.train_batch_size)])
    metrics = {"val/psnr": psnr(recon, images).mean().item(), "val/ssim": ssim(recon, images).mean().item(),
               "val/l1": F.l1_loss(recon, images).item()}
    if lpips is not None:
        metrics["val/lpips"] = torch.stack([lpips(r, x) for r, x in zip(recon.split(8), images.split(8))]).mean().item()
    grid = image_grid([images[:8], recon[:8]])
    path = Path(args.output_dir) / "samples" / f"reconstruction_{step:07d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    log_images(accelerator, "val/reconstruction", grid, step)
    return metrics


@torch.no_grad()
def measure_latent_stats(vae, source, resolution, num_images, batch_size, device, seed=0):
    """Statistics of sampled latents z ~ q(z|x) over (up to) `num_images` centre-cropped training images,
    spread evenly over the dataset. An LDM trains on (z - shift_factor) * scaling_factor, which has zero mean and
    unit variance on this data (the role of SD's hand-derived 0.18215)."""
    dataset = ImageDataset(source, resolution, random_crop=False, random_flip=False)
    count = min(num_images, len(dataset))
    indices = torch.linspace(0, len(dataset) - 1, count).round().long().tolist()
    generator = torch.Generator(device=device).manual_seed(seed)
    stats = LatentStats()
    for start in range(0, count, batch_size):
        x = torch.stack([dataset[i]["pixel_values"] for i in indices[start:start + batch_size]]).to(device)
        stats.add(vae.encode(x).latent_dist.sample(generator=generator))  # (B, C, h, w)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    summary = stats.summary()
    del summary["num_values"]
    return {
        **summary, "downsampling_factor": factor, "resolution": resolution,
        "num_images": count, "sampled_posterior": True,
        "usage": "latents = (vae.encode(x).latent_dist.sample() - shift_factor) * scaling_factor",
    }


def export(vae, source, args, output_dir, device):
    """Save `vae` (already holding the weights to export) as a diffusers folder with latent_stats.json."""
    vae = vae.to(device).eval()
    stats = measure_latent_stats(vae, source, args.resolution, args.latent_stats_num_images,
                                 args.train_batch_size, device, args.seed)
    vae.register_to_config(scaling_factor=stats["scaling_factor"], shift_factor=stats["shift_factor"])
    vae.save_pretrained(output_dir, safe_serialization=True)
    Path(output_dir, "latent_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def export_from_checkpoint(args):
    """`--export_checkpoint PATH`: the EMA (or, without EMA, the trained) weights of a checkpoint, exported."""
    try:
        ckpt = Checkpoint(args.export_checkpoint)
    except CheckpointError as err:
        raise SystemExit(f"--export_checkpoint: {err}") from None
    saved = ckpt.json("training_state")["args"]
    for key in ("train_data_dir", "dataset_name", "dataset_config_name", "image_column", "validation_data_dir",
                "resolution", "seed", "num_validation_images", "latent_stats_num_images", "train_batch_size"):
        setattr(args, key, saved[key])
    vae = AutoencoderKL.from_config(ckpt.json("vae_config"))
    vae.load_state_dict(ckpt.tensors("ema" if ckpt.has("ema") else "vae"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    train_source, _ = image_sources(args)
    stats = export(vae, train_source, args, args.output_dir, device)
    print(f"exported {ckpt.path} (step {ckpt.step}) to {args.output_dir}: scaling_factor {stats['scaling_factor']:.5f}")


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(accelerator, args, step, state, models, optimizers, schedulers, ema, vae_config, guard, corrupt):
    """Everything a resumed run needs, written atomically (see common/checkpoint.py): the VAE and discriminator
    weights, the VAE's diffusers config, and the training parts every script saves."""
    refuse_non_finite(step, models)
    writer = start_checkpoint(accelerator, args.output_dir, step)
    save_training_parts(writer, accelerator, optimizers, schedulers, ema, per_process={"corrupt": corrupt})
    if accelerator.is_main_process:
        writer.add_tensors("vae", models["vae"].state_dict())
        if models["disc"] is not None:
            writer.add_tensors("discriminator", models["disc"].state_dict())
        writer.add_json("vae_config", dict(vae_config))
        writer.add_json("training_state", training_state(accelerator, args, step, state, ema, guard))
    commit_checkpoint(writer, accelerator, args.checkpoints_total_limit)


def load_checkpoint(ckpt, accelerator, args, models, optimizers, schedulers, ema, vae_config, guard, corrupt):
    """Restore a checkpoint into freshly built objects; returns the saved training state.

    A model whose architecture (its diffusers config or its tensors) differs from the checkpoint's is refused,
    unless --allow_model_change: then its tensors that still fit are loaded, the rest start fresh, and its
    optimizer state (and the EMA) start afresh. The latent scaling factors are measured at export, not trained.
    """
    state = ckpt.json("training_state")
    saved_config = ckpt.json("vae_config")
    config_changes = [f"config {k}" for k in sorted(set(saved_config) | set(vae_config))
                      if not k.startswith("_") and k not in ("scaling_factor", "shift_factor")
                      and _jsonable(saved_config.get(k)) != _jsonable(vae_config.get(k))]
    changed = load_models(ckpt, models, args.allow_model_change, files={"disc": "discriminator"},
                          config_changes={"vae": config_changes})
    restore_training_parts(ckpt, accelerator, state, optimizers, schedulers, guard, per_process={"corrupt": corrupt},
                           changed=changed)
    restore_ema(ckpt, ema, models["vae"], state, changed="vae" in changed)
    log_changed_settings(state["args"], args, SCHEDULE_FLAGS, state.get("num_processes"), accelerator.num_processes)
    return state


# What --dry_run suggests when the recipe would not fit the GPU, most effective first.
DRY_RUN_HINTS = ("a smaller --train_batch_size with a larger --gradient_accumulation_steps (the same effective batch)",
                 "--mixed_precision bf16", "a lower --resolution", "--lpips_weight 0 (no VGG pass)")


# Settings whose change on resume alters the run's course; each is stated in the log when it differs.
SCHEDULE_FLAGS = ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "num_train_epochs",
                  "learning_rate", "lr_scheduler", "lr_warmup_steps", "optimizer", "disc_learning_rate",
                  "disc_optimizer", "disc_start_step", "mixed_precision", "seed", "resolution", "kl_weight",
                  "adv_weight", "lpips_weight", "freeze")


def _jsonable(v):
    return json.loads(json.dumps(v)) if v is not None else None


# ---------------------------------------------------------------------------------------------------------------


def main(args):
    if args.export_checkpoint:
        return export_from_checkpoint(args)
    accelerator = setup_accelerator(args, args.mixed_precision or bf16_if_supported())
    stop, watchdog = GracefulStop(), Watchdog(args.stall_timeout)
    ckpt = open_resume(accelerator, args.resume_from_checkpoint, args.output_dir)
    set_seed(args.seed)  # identical initial weights on every process
    device = accelerator.device
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format

    # Data
    train_source, val_source = image_sources(args)
    train_set = ImageDataset(train_source, args.resolution, args.random_crop, args.random_flip, seed=args.seed)
    try:
        sampler = ResumableBatchSampler(len(train_set), args.train_batch_size, accelerator.num_processes,
                                        accelerator.process_index, args.seed)
    except ValueError as err:
        raise SystemExit(f"--train_batch_size {args.train_batch_size}: {err}") from None
    # The loader gets its own generator: creating an iterator draws a seed from it, and drawing that from the
    # global RNG would shift the training noise of a resumed run (augmentation has its own seeds, see common/data).
    loader = torch.utils.data.DataLoader(
        train_set, batch_sampler=sampler, collate_fn=collate, num_workers=args.dataloader_num_workers,
        pin_memory=device.type == "cuda", persistent_workers=args.dataloader_num_workers > 0,
        worker_init_fn=loader_worker_init,
        generator=torch.Generator().manual_seed(args.seed))
    val_images = fixed_images(val_source, args.resolution, args.num_validation_images).to(device)
    steps_per_epoch = max(1, sampler.batches_per_epoch // args.gradient_accumulation_steps)
    max_steps = args.num_train_epochs * steps_per_epoch if args.num_train_epochs else args.max_train_steps
    logger.info(f"{len(train_set)} training and {len(val_source)} validation images; {steps_per_epoch} optimizer "
                f"steps per epoch, {max_steps} in all")

    # Models
    vae, disc, lpips = build_models(args, device, memory_format)
    vae_config = dict(vae.config)
    ema = EMA(vae, args.ema_decay, args.ema_power, every=args.ema_update_every) if args.use_ema else None
    vae_eval = copy.deepcopy(vae).eval().requires_grad_(False)  # validation copy; training weights stay put

    # Optimizers
    opt_cfg, disc_cfg = optimizer_kwargs(args), optimizer_kwargs(args, "disc_")
    opt_vae = build_optimizer(params=freeze(vae, args.freeze), **opt_cfg["optimizer"])
    opt_disc = build_optimizer(params=disc.parameters(), **disc_cfg["optimizer"]) if disc is not None else None

    model = VAEForTraining(vae)
    if args.compile:
        model.compile()  # in place: state-dict keys keep their names
        if disc is not None:
            disc.compile()
    model, opt_vae = accelerator.prepare(model, opt_vae)
    optimizers = {"vae": opt_vae}
    if disc is not None:
        disc, opt_disc = accelerator.prepare(disc, opt_disc)
        optimizers["disc"] = opt_disc
    # Schedules are stepped by hand once per optimizer step (not through accelerate, which would step them once
    # per process), so the learning rate is the same function of the step on any number of GPUs.
    schedulers = {name: build_scheduler(opt, total_steps=max_steps, **cfg["scheduler"])
                  for (name, opt), cfg in zip(optimizers.items(), (opt_cfg, disc_cfg))}
    guard, corrupt = SkipGuard(args.max_consecutive_skips), CorruptSampleTracker(args.max_corrupt_fraction)
    set_seed(args.seed, device_specific=True)  # per-process noise from here on

    state = {"epoch": 0, "samples_in_epoch": 0, "run_id": new_run_id()}
    plain = {"vae": vae, "disc": accelerator.unwrap_model(disc) if disc is not None else None}
    if ckpt is not None:
        state = load_checkpoint(ckpt, accelerator, args, plain, optimizers, schedulers, ema, vae_config, guard,
                                corrupt)
        logger.info(f"resumed from {ckpt.path} at step {ckpt.step}")
    global_step = ckpt.step if ckpt is not None else 0
    stop_when = StopCondition(args.stop_when, args.stop_when_logs)
    stop_when.load_state_dict(state.get("stop_when"))
    if stop_when.met:  # this run already ended on the same --stop_when: nothing left to train
        max_steps = global_step
    samples_per_step = args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    if args.dry_run:  # pre-flight: a few real steps with the GAN on, the second with R1, a report, nothing written
        batches = infinite_batches(loader, sampler, state["epoch"], 0)
        first = -(-(max(global_step, args.disc_start_step) + 1) // args.r1_interval) * args.r1_interval - 1

        def one_step(i):
            for _ in range(args.gradient_accumulation_steps):
                images = next(batches)[2]["pixel_values"].to(device, non_blocking=True)
                train_step(images.contiguous(memory_format=memory_format), model, disc, lpips, opt_vae, opt_disc,
                           accelerator, args, first + i)
            watchdog.beat()

        dry = DryRun(args.dry_run_steps, samples_per_step, max_steps - global_step, DRY_RUN_HINTS, unit="images")
        accelerator.print("\n".join(dry.run(one_step)))
        return
    init_trackers(accelerator, args.tracker_project_name or "train_image_vae", vars(args), state["run_id"],
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
        images = batch["pixel_values"].to(device, non_blocking=True).contiguous(memory_format=memory_format)
        gan_on = disc is not None and global_step >= args.disc_start_step
        regime = (gan_on, gan_on and is_r1_step(global_step, args))  # steps of one regime cost the same FLOPs
        count = throughput.peak_flops and regime not in flops
        with FlopCount() if count else nullcontext() as counter:
            metrics = train_step(images, model, disc, lpips, opt_vae, opt_disc, accelerator, args, global_step)
        if count:
            flops[regime] = counter.total * args.gradient_accumulation_steps
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
        throughput.add(samples_per_step, flops.get(regime))
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
            accelerator.log(logs, step=global_step)
            metrics_file.write(global_step, logs)
            progress.set_postfix(loss=f"{logs['loss/total']:.4f}", img_s=f"{logs['perf/samples_per_s']:.1f}")
            for sched in schedulers.values():
                observe_plateau(sched, logs)  # --lr_scheduler plateau learns from the logged means
            if stop_when.update(logs):
                max_steps = global_step  # --stop_when held: this step is the last (validated, checkpointed, exported)
        if (global_step % args.validation_steps == 0 or global_step == max_steps) and not stopping:
            if accelerator.is_main_process:
                (ema.copy_to(vae_eval) if ema is not None else vae_eval.load_state_dict(vae.state_dict()))
                val = validate(vae_eval, val_images, lpips, args, global_step, accelerator)
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
                            optimizers, schedulers, ema, vae_config, guard, corrupt)
            watchdog.beat()
        if stopping:
            logger.info(f"stopped at step {global_step} on request; continue with --resume_from_checkpoint latest")
            break

    # Export: the EMA weights as a diffusers AutoencoderKL with latent_stats.json
    progress.close()
    if accelerator.is_main_process and global_step == max_steps:
        (ema.copy_to(vae_eval) if ema is not None else vae_eval.load_state_dict(vae.state_dict()))
        stats = export(vae_eval, train_source, args, args.output_dir, device)
        logger.info(f"exported to {args.output_dir} (scaling_factor {stats['scaling_factor']:.5f}); corrupt "
                    f"samples skipped: {corrupt.summary()}")
    accelerator.end_training()


if __name__ == "__main__":
    with fail_fast():
        main(parse_args())
