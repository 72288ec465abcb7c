"""Turning tensors into things people look at: image grids, spectrogram images and audio clips, logged to the
running trackers."""

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


# A perceptually ordered dark-to-bright colour ramp (black, purple, red, orange, pale yellow) for spectrograms.
_RAMP = np.array([[0, 0, 4], [59, 15, 112], [140, 41, 129], [222, 73, 104], [254, 159, 109], [252, 253, 191]],
                 dtype=np.float64)


def spectrogram_image(spectrograms, columns=1, padding=4, floor_db=80.0):
    """A PIL image of log-magnitude spectrograms (each (bins, frames), any log base), low frequencies at the
    bottom, laid out `columns` to a row (e.g. [real, generated, real, generated, ...] with columns=2). All share
    one colour scale: from the loudest value down `floor_db` decibels (values taken as natural-log magnitudes)."""
    specs = [s.detach().float().cpu().numpy() for s in spectrograms]
    top = max(float(s.max()) for s in specs)
    floor = top - floor_db / 20 * np.log(10)  # natural-log magnitude floor_db below the top
    height, width = max(s.shape[0] for s in specs), max(s.shape[1] for s in specs)
    rows = -(-len(specs) // columns)
    canvas = np.full((rows * (height + padding) + padding, columns * (width + padding) + padding, 3), 255, np.uint8)
    anchors = np.linspace(0, 1, len(_RAMP))
    for n, s in enumerate(specs):
        level = np.clip((s[::-1] - floor) / max(top - floor, 1e-9), 0, 1)  # low frequencies at the bottom
        rgb = np.stack([np.interp(level, anchors, _RAMP[:, c]) for c in range(3)], axis=-1).astype(np.uint8)
        r, c = divmod(n, columns)
        y, x = padding + r * (height + padding), padding + c * (width + padding)
        canvas[y:y + s.shape[0], x:x + s.shape[1]] = rgb
    return Image.fromarray(canvas)
