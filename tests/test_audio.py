"""Audio files: windowed segment reads, resampling, padding and the skipping of unusable files."""

import numpy as np
import pytest
import soundfile as sf
import torch

from common.audio import AudioSegments, load_audio, read_segment
from common.data import CorruptSample
from common.demo_data import make_demo_audio
from common.media import spectrogram_image


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    t = np.arange(48000) / 16000
    long = (0.5 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.normal(size=t.size)).astype(np.float32)
    sf.write(str(tmp_path / "long.flac"), long, 16000)
    sf.write(str(tmp_path / "long44.wav"), np.repeat(long, 2)[:96000] * 0.5, 32000)
    sf.write(str(tmp_path / "short.wav"), long[:700], 16000)
    sf.write(str(tmp_path / "tiny.wav"), long[:100], 16000)
    sf.write(str(tmp_path / "silent.wav"), np.zeros(8000, np.float32), 16000)
    (tmp_path / "empty.wav").write_bytes(b"")
    return tmp_path, long


def test_a_segment_is_the_matching_stretch_of_the_whole_file(files):
    folder, long = files
    segment, total = read_segment(folder / "long.flac", 16000, 1024, np.random.default_rng(3))
    assert total == 48000 and segment.shape == (1024,)
    start = int(np.argmin([np.abs(long[i:i + 1024] - segment.numpy()).max() for i in range(0, 48000 - 1024)]))
    assert np.abs(long[start:start + 1024] - segment.numpy()).max() < 1e-4  # 16-bit FLAC


def test_a_windowed_read_resamples_like_the_whole_file(files):
    folder, _ = files
    whole = load_audio(folder / "long44.wav", 16000)
    segment, total = read_segment(folder / "long44.wav", 16000, 2048, np.random.default_rng(1))
    assert abs(total - len(whole)) <= 1 and segment.shape == (2048,)
    errors = [float((whole[i:i + 2048] - segment).abs().max()) for i in range(len(whole) - 2048)]
    assert min(errors) < 5e-3  # the same samples, up to the resampler's edge effects


def test_segments_depend_on_seed_epoch_and_index_only(files):
    folder, _ = files
    paths = [folder / "long.flac", folder / "long44.wav", folder / "short.wav"]
    a = AudioSegments(paths, 16000, 1024, seed=0)
    b = AudioSegments(paths, 16000, 1024, seed=0)
    assert torch.equal(a[(2, 0)]["audio"], b[(2, 0)]["audio"])
    assert not torch.equal(a[(2, 0)]["audio"], a[(3, 0)]["audio"])
    short = a[(0, 2)]["audio"]  # 700 of 1024 samples: padded with zeros at the end
    assert short.shape == (1024,) and torch.all(short[700:] == 0) and short[:700].abs().max() > 0


def test_unusable_files_are_skipped_with_their_reason(files):
    folder, _ = files
    paths = [folder / "tiny.wav", folder / "silent.wav", folder / "empty.wav", folder / "long.flac"]
    item = AudioSegments(paths, 16000, 1024, min_fraction=0.5)[(0, 0)]
    reasons = [r for _, r in item["skipped"]]
    assert reasons[0].startswith("too short") and reasons[1:] == ["silent", "empty file"]
    assert item["index"] == 3 and item["audio"].shape == (1024,)
    with pytest.raises(CorruptSample, match="empty file"):
        load_audio(folder / "empty.wav", 16000)


def test_demo_audio_is_deterministic_and_varied(tmp_path):
    a = make_demo_audio(tmp_path / "a", num_files=3, seconds=(0.5, 1.0), sample_rate=8000, seed=0)
    b = make_demo_audio(tmp_path / "b", num_files=3, seconds=(0.5, 1.0), sample_rate=8000, seed=0)
    clips = [sf.read(str(p))[0] for p in sorted(a.glob("*.wav"))]
    assert all(np.array_equal(x, sf.read(str(b / p.name))[0]) for x, p in zip(clips, sorted(a.glob("*.wav"))))
    assert len({len(c) for c in clips}) == 3 and all(0.3 < np.abs(c).max() <= 0.5 for c in clips)


def test_spectrogram_image_lays_out_pairs_with_low_frequencies_at_the_bottom():
    spec = torch.full((20, 30), -11.0)
    spec[0] = 0.0  # loud lowest band
    image = np.asarray(spectrogram_image([spec, spec, spec, spec], columns=2, padding=4))
    assert image.shape == (2 * 24 + 4, 2 * 34 + 4, 3)
    assert image[4 + 19, 10].sum() > image[4, 10].sum()  # bright bottom row, dark top
