"""Audio files in and out: any common format at any sample rate, read as mono float32 at the rate a model needs."""

import os

import numpy as np
import torch

from common.data import CorruptSample

AUDIO_EXTENSIONS = {".wav", ".flac", ".ogg", ".mp3", ".opus", ".aiff", ".aif"}


def load_audio(path, sample_rate):
    """(samples,) float32 tensor in [-1, 1], mono (channels averaged), resampled to `sample_rate` (soxr, high
    quality). Unreadable, empty or non-finite files raise CorruptSample with the reason."""
    import soundfile as sf

    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as err:  # libsndfile's errors are all "this file is bad"
        reason = "empty file" if _size(path) == 0 else f"unreadable audio ({str(err).splitlines()[0][:80]})"
        raise CorruptSample(str(path), reason) from None
    if data.size == 0:
        raise CorruptSample(str(path), "no samples")
    if not np.isfinite(data).all():
        raise CorruptSample(str(path), "non-finite samples")
    mono = data.mean(axis=1)
    if rate != sample_rate:
        import soxr

        mono = soxr.resample(mono, rate, sample_rate, quality="HQ").astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(mono))


def save_audio(path, waveform, sample_rate):
    """Write a (samples,) or (1, samples) tensor as 16-bit PCM WAV."""
    import soundfile as sf

    x = waveform.detach().float().reshape(-1).clamp(-1, 1).cpu().numpy()
    sf.write(str(path), x, sample_rate, subtype="PCM_16")


def _size(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return -1
