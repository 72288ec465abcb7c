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


# ---------------------------------------------------------------------------------------------------------------
# Training segments


def audio_info(path):
    """(frames, sample rate) from the file's header, without decoding it. Raises CorruptSample."""
    import soundfile as sf

    try:
        info = sf.info(str(path))
    except Exception as err:
        reason = "empty file" if _size(path) == 0 else f"unreadable audio ({str(err).splitlines()[0][:80]})"
        raise CorruptSample(str(path), reason) from None
    if info.frames <= 0:
        raise CorruptSample(str(path), "no samples")
    return info.frames, info.samplerate


def read_segment(path, sample_rate, length, rng):
    """A random `length`-sample stretch of the file at `sample_rate`, decoding only that stretch (plus a margin
    for the resampler), so an hour-long file costs no more than a short one. Returns (segment, file_length at
    `sample_rate`); a file shorter than `length` comes back whole."""
    import soundfile as sf

    frames, rate = audio_info(path)
    total = frames * sample_rate // rate
    if total <= length or rate != sample_rate and frames <= 4 * length:
        whole = load_audio(path, sample_rate)
        if len(whole) <= length:
            return whole, len(whole)
        start = int(rng.integers(0, len(whole) - length + 1))
        return whole[start:start + length], len(whole)
    need = -(-length * rate // sample_rate)  # source frames for `length` output samples
    margin = 0 if rate == sample_rate else 64
    start = int(rng.integers(0, frames - need + 1))
    lo, hi = max(0, start - margin), min(frames, start + need + margin)
    try:
        data, _ = sf.read(str(path), start=lo, stop=hi, dtype="float32", always_2d=True)
    except Exception as err:
        raise CorruptSample(str(path), f"unreadable audio ({str(err).splitlines()[0][:80]})") from None
    if data.shape[0] < hi - lo or not np.isfinite(data).all():
        raise CorruptSample(str(path), "truncated" if data.shape[0] < hi - lo else "non-finite samples")
    mono = data.mean(axis=1)
    if rate != sample_rate:
        import soxr

        mono = soxr.resample(mono, rate, sample_rate, quality="HQ").astype(np.float32)
        offset = (start - lo) * sample_rate // rate
        mono = mono[offset:offset + length]
        if len(mono) < length:  # rounding at the file's end
            mono = np.pad(mono, (0, length - len(mono)))
    return torch.from_numpy(np.ascontiguousarray(mono)), total


class AudioSegments(torch.utils.data.Dataset):
    """Random fixed-length segments of audio files for GAN vocoders and audio VAEs, one per file per epoch.

    Indexed by (epoch, index); the segment's position comes from an RNG seeded by (seed, epoch, index), so a
    resumed run and any number of loader workers see the same segments. A file shorter than the segment is
    zero-padded at the end when it holds at least `min_fraction` of a segment, and skipped as "too short"
    otherwise; empty, unreadable and silent files (peak under `silence_threshold`, checked on the whole file when
    the drawn segment is silent) are skipped too, replaced by the next readable file and reported through the
    batch's `skipped` list (see common.data.CorruptSampleTracker)."""

    def __init__(self, paths, sample_rate, segment_length, seed=0, min_fraction=0.5, silence_threshold=1e-4,
                 max_retries=16):
        self.paths, self.sample_rate, self.segment_length = list(paths), sample_rate, segment_length
        self.seed, self.min_fraction, self.silence_threshold = seed, min_fraction, silence_threshold
        self.max_retries = max_retries

    def __len__(self):
        return len(self.paths)

    def load(self, i, rng):
        path = self.paths[i]
        segment, total = read_segment(path, self.sample_rate, self.segment_length, rng)
        if total < self.min_fraction * self.segment_length:
            raise CorruptSample(str(path), f"too short ({total} samples; segments are {self.segment_length})")
        if segment.abs().max() < self.silence_threshold:
            if load_audio(path, self.sample_rate).abs().max() < self.silence_threshold:
                raise CorruptSample(str(path), "silent")
        if len(segment) < self.segment_length:
            segment = torch.nn.functional.pad(segment, (0, self.segment_length - len(segment)))
        return segment

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        skipped = []
        for attempt in range(self.max_retries):
            i = (index + attempt) % len(self.paths)
            try:
                audio = self.load(i, np.random.default_rng([self.seed, epoch, index]))
            except CorruptSample as bad:
                skipped.append((bad.where, bad.reason))
                continue
            return {"audio": audio, "index": i, "skipped": skipped}
        raise RuntimeError(f"{self.max_retries} unusable audio files in a row from index {index}: "
                           + "; ".join(f"{w}: {r}" for w, r in skipped))


# ---------------------------------------------------------------------------------------------------------------
# Training and held-out files


def train_and_validation_files(train_dir, validation_dir, num_validation, seed):
    """(train, validation) audio file lists: the files of `validation_dir`, or `num_validation` whole files held
    out of `train_dir` (split by file, so no utterance is in both). SystemExit when either is empty."""
    from common.data import find_files, split_holdout

    files = find_files(train_dir, AUDIO_EXTENSIONS)
    if validation_dir:
        train, val = files, find_files(validation_dir, AUDIO_EXTENSIONS)
    else:
        train, val = split_holdout(files, num_validation, seed)
    if not train or not val:
        raise SystemExit(f"need training and validation audio, found {len(train)} and {len(val)} files")
    return train, val


def validation_clips(files, sample_rate, count, max_seconds, multiple, min_samples, warn=print):
    """Up to `count` readable, non-silent utterances [(path, (T,) audio)], each cut to at most `max_seconds` and
    to a multiple of `multiple` samples; files that are unreadable, silent or under `min_samples` are passed over
    with a warning. SystemExit when none is usable."""
    clips, limit = [], int(max_seconds * sample_rate)
    for path in files:
        try:
            audio = load_audio(path, sample_rate)[:limit]
        except CorruptSample as bad:
            warn(f"validation file skipped: {bad}")
            continue
        usable = len(audio) // multiple * multiple
        if usable < max(min_samples, multiple) or audio.abs().max() < 1e-4:
            warn(f"validation file skipped: {path}: too short or silent")
            continue
        clips.append((str(path), audio[:usable]))
        if len(clips) == count:
            break
    if not clips:
        raise SystemExit("no usable validation audio (every held-out file was unreadable, silent or too short)")
    return clips
