"""Datasets and sampling that resume exactly and survive bad files.

- `ResumableBatchSampler` shuffles with (seed, epoch), gives each process its slice of every global batch and can
  start mid-epoch, so a resumed run sees the same batches an uninterrupted one would.
- Indices travel as (epoch, index) pairs, and datasets draw their augmentation from an RNG seeded by
  (seed, epoch, index): augmentation is the same whatever the number of loader workers or restarts.
- A sample that cannot be read is replaced by the next readable one (so batch shapes never change) and reported
  with its path and reason; `CorruptSampleTracker` counts them and stops a run that is mostly skipping.
"""

import json
import logging
import os
import signal
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class CorruptSample(Exception):
    def __init__(self, where, reason):
        super().__init__(f"{where}: {reason}")
        self.where, self.reason = str(where), reason


# ---------------------------------------------------------------------------------------------------------------
# Finding files


def find_files(root, extensions):
    """Files under `root` (recursively, hidden folders skipped) with one of `extensions`, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / f for f in filenames if Path(f).suffix.lower() in extensions)
    return sorted(found)


def has_any_file(root, extensions):
    """Cheap check for the argument parser: stops at the first match."""
    for _, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if any(Path(f).suffix.lower() in extensions for f in filenames):
            return True
    return False


def read_metadata(root):
    """Records of every `metadata.jsonl` under `root` (Hugging Face imagefolder/audiofolder layout), keyed by the
    resolved path of their `file_name`."""
    records = {}
    for meta in sorted(Path(root).rglob("metadata.jsonl")):
        for n, line in enumerate(meta.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                records[str((meta.parent / rec["file_name"]).resolve())] = rec
            except (json.JSONDecodeError, KeyError) as err:
                raise ValueError(f"{meta}:{n}: not a JSON object with a 'file_name' ({err})") from err
    return records


def split_holdout(items, count, seed):
    """Split a list into (train, held_out) with `count` items held out, chosen by `seed`, order kept."""
    if count <= 0:
        return list(items), []
    rng = np.random.default_rng(seed)
    held = set(rng.choice(len(items), size=min(count, len(items)), replace=False).tolist())
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


# ---------------------------------------------------------------------------------------------------------------
# Images


def load_image(path):
    """An RGB PIL image; transparent pixels are composited over white (emoji and icons come with alpha)."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise CorruptSample(path, "empty file")
        with Image.open(path) as img:
            img.load()
            return to_rgb(img)
    except CorruptSample:
        raise
    except UnidentifiedImageError:
        raise CorruptSample(path, "not an image") from None
    except (OSError, SyntaxError, ValueError) as err:
        reason = "truncated" if "truncated" in str(err).lower() else f"unreadable ({type(err).__name__})"
        raise CorruptSample(path, reason) from None


def to_rgb(img):
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")


def resize_and_crop(img, resolution, crop_rng=None, flip_rng=None):
    """Resize the shorter side to `resolution`, then crop a square: random with `crop_rng`, centred without.
    Horizontal flip with probability 1/2 when `flip_rng` is given. No colour changes."""
    w, h = img.size
    scale = resolution / min(w, h)
    if scale != 1.0:
        img = img.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    if crop_rng is None:
        left, top = (w - resolution) // 2, (h - resolution) // 2
    else:
        left, top = int(crop_rng.integers(0, w - resolution + 1)), int(crop_rng.integers(0, h - resolution + 1))
    img = img.crop((left, top, left + resolution, top + resolution))
    if flip_rng is not None and flip_rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return img


def image_to_tensor(img):
    """PIL RGB -> float tensor (3, H, W) in [-1, 1]."""
    array = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


class FileImages:
    """Image files on disk."""

    def __init__(self, paths):
        self.paths = list(paths)

    def __len__(self):
        return len(self.paths)

    def load(self, i):
        return load_image(self.paths[i]), str(self.paths[i])


class HFImages:
    """A Hugging Face `datasets` split with an image column (`--dataset_name`)."""

    def __init__(self, dataset, image_column="image"):
        if image_column not in dataset.column_names:
            raise ValueError(f"--image_column '{image_column}' is not a column of the dataset "
                             f"(columns: {', '.join(dataset.column_names)})")
        self.dataset, self.column = dataset, image_column

    def __len__(self):
        return len(self.dataset)

    def load(self, i):
        where = f"dataset[{i}]"
        try:
            img = self.dataset[int(i)][self.column]
        except Exception as err:  # decoding happens inside datasets; any failure is this sample's
            raise CorruptSample(where, f"unreadable ({type(err).__name__})") from None
        if not isinstance(img, Image.Image):
            raise CorruptSample(where, f"not an image ({type(img).__name__})")
        return to_rgb(img), where


class ImageDataset(torch.utils.data.Dataset):
    """Square crops in [-1, 1]. Indexed by (epoch, index); augmentation drawn from (seed, epoch, index)."""

    def __init__(self, source, resolution, random_crop=True, random_flip=True, seed=0, max_retries=16):
        self.source, self.resolution, self.seed, self.max_retries = source, resolution, seed, max_retries
        self.random_crop, self.random_flip = random_crop, random_flip

    def __len__(self):
        return len(self.source)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        skipped = []
        for attempt in range(self.max_retries):
            i = (index + attempt) % len(self.source)
            try:
                img, _ = self.source.load(i)
            except CorruptSample as bad:
                skipped.append((bad.where, bad.reason))
                continue
            rng = np.random.default_rng([self.seed, epoch, index])
            img = resize_and_crop(img, self.resolution, rng if self.random_crop else None, rng if self.random_flip else None)
            return {"pixel_values": image_to_tensor(img), "index": i, "skipped": skipped}
        raise RuntimeError(f"{self.max_retries} unreadable samples in a row from index {index}: "
                           + "; ".join(f"{w}: {r}" for w, r in skipped))


def collate(items):
    """Stack tensors; gather the per-item lists of skipped samples into one list."""
    batch = {"skipped": [s for item in items for s in item["skipped"]]}
    for key in items[0]:
        if key != "skipped":
            values = [item[key] for item in items]
            batch[key] = torch.stack(values) if torch.is_tensor(values[0]) else values
    return batch


class CorruptSampleTracker:
    """Counts skipped samples by reason, logs each bad path once, and stops the run past a fraction."""

    def __init__(self, max_fraction, min_samples=100):
        self.max_fraction, self.min_samples = max_fraction, min_samples
        self.by_reason, self.paths, self.loaded = Counter(), {}, 0

    def update(self, skipped, batch_size):
        self.loaded += batch_size + len(skipped)
        for where, reason in skipped:
            self.by_reason[reason] += 1
            if where not in self.paths:
                self.paths[where] = reason
                logger.warning(f"skipped corrupt sample {where}: {reason}")
        skips = sum(self.by_reason.values())
        if skips and self.loaded >= self.min_samples and skips / self.loaded > self.max_fraction:
            listed = "; ".join(f"{w} ({r})" for w, r in list(self.paths.items())[:10])
            more = f" and {len(self.paths) - 10} more" if len(self.paths) > 10 else ""
            raise SystemExit(f"stopping: {skips} of {self.loaded} loaded samples were corrupt "
                             f"({self.summary()}), over --max_corrupt_fraction {self.max_fraction}: {listed}{more}")

    def summary(self):
        return ", ".join(f"{n} {reason}" for reason, n in sorted(self.by_reason.items())) or "none"

    def metrics(self):
        return {"data/skipped": float(sum(self.by_reason.values()))}

    def state_dict(self):
        return {"by_reason": dict(self.by_reason), "paths": dict(self.paths), "loaded": self.loaded}

    def load_state_dict(self, state):
        self.by_reason, self.paths, self.loaded = Counter(state["by_reason"]), dict(state["paths"]), state["loaded"]


# ---------------------------------------------------------------------------------------------------------------
# Sampling


class ResumableBatchSampler:
    """Batches of (epoch, index) for one process.

    Each epoch is a permutation drawn from (seed, epoch); it is cut into global batches of
    batch_size x num_replicas and process `rank` takes its slice of each. An incomplete last global batch is
    dropped, so every process runs the same number of steps. `set_position(epoch, batch)` starts mid-epoch.
    """

    def __init__(self, num_samples, batch_size, num_replicas=1, rank=0, seed=0, shuffle=True):
        self.num_samples, self.batch_size = num_samples, batch_size
        self.num_replicas, self.rank, self.seed, self.shuffle = num_replicas, rank, seed, shuffle
        self.global_batch = batch_size * num_replicas
        self.batches_per_epoch = num_samples // self.global_batch
        if self.batches_per_epoch == 0:
            raise ValueError(f"{num_samples} training samples cannot fill one batch of {batch_size} x "
                             f"{num_replicas} processes; lower --train_batch_size or add data")
        self.epoch, self.start_batch = 0, 0

    def set_position(self, epoch, batch=0):
        self.epoch, self.start_batch = epoch, batch

    def __len__(self):
        return self.batches_per_epoch - self.start_batch

    def __iter__(self):
        epoch, start = self.epoch, self.start_batch
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + epoch))
        else:
            order = torch.arange(self.num_samples)
        for b in range(start, self.batches_per_epoch):
            first = b * self.global_batch + self.rank * self.batch_size
            yield [(epoch, int(i)) for i in order[first:first + self.batch_size]]


def loader_worker_init(worker_id):
    """DataLoader `worker_init_fn`: workers ignore SIGTERM. Schedulers (SLURM, Kubernetes, `timeout`) often signal
    the whole process group; a worker that died of it would end the run with "DataLoader worker killed" before the
    main process, which received the same signal, could checkpoint and exit. Workers still end with the run: the
    main process shuts them down, and they exit on their own when it is gone."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def infinite_batches(loader, sampler, epoch, batch_in_epoch):
    """Yield (epoch, batch_in_epoch, batch) forever, starting at the given position."""
    while True:
        sampler.set_position(epoch, batch_in_epoch)
        for batch in loader:
            yield epoch, batch_in_epoch, batch
            batch_in_epoch += 1
        epoch, batch_in_epoch = epoch + 1, 0
