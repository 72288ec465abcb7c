"""Turning tensors into things people look at: image grids and audio clips, logged to the running trackers."""

import numpy as np
import torch
from PIL import Image


def to_uint8_images(x):
    """(B, 3, H, W) in [-1, 1] -> uint8 array (B, H, W, 3)."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def image_grid(rows, padding=2):
    """A PIL image with one row per tensor (B, 3, H, W) in [-1, 1]; e.g. [originals, reconstructions]."""
    rows = [to_uint8_images(r) for r in rows]
    n, h, w = max(len(r) for r in rows), rows[0].shape[1], rows[0].shape[2]
    grid = np.full((len(rows) * (h + padding) + padding, n * (w + padding) + padding, 3), 255, dtype=np.uint8)
    for r, images in enumerate(rows):
        for c, img in enumerate(images):
            top, left = padding + r * (h + padding), padding + c * (w + padding)
            grid[top:top + h, left:left + w] = img
    return Image.fromarray(grid)


def log_images(accelerator, key, image, step):
    """Send a PIL image to whichever trackers are running."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(key, np.asarray(image), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({key: wandb.Image(image)}, step=step)


def log_audio(accelerator, key, waveform, sample_rate, step):
    """Send a (samples,) waveform to whichever trackers are running."""
    x = waveform.detach().float().reshape(-1).clamp(-1, 1).cpu()
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_audio(key, x[None], step, sample_rate=sample_rate)
        elif tracker.name == "wandb":
            import wandb

            tracker.log({key: wandb.Audio(x.numpy(), sample_rate=sample_rate)}, step=step)
