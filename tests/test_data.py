import numpy as np
import pytest
import torch
from PIL import Image

from common.data import (CorruptSampleTracker, FileImages, ImageDataset, ResumableBatchSampler, collate, find_files,
                         infinite_batches, load_image, read_metadata, split_holdout)
from common.demo_data import SHAPES, make_demo_images


def test_sampler_is_deterministic_and_partitions_global_batches():
    single = list(ResumableBatchSampler(20, 4, seed=3))
    assert single == list(ResumableBatchSampler(20, 4, seed=3))
    assert len(single) == 5
    ranks = [list(ResumableBatchSampler(20, 2, num_replicas=2, rank=r, seed=3)) for r in (0, 1)]
    for b in range(5):  # two processes x batch 2 see exactly the samples of one process x batch 4
        assert sorted(ranks[0][b] + ranks[1][b]) == sorted(single[b])


def test_sampler_resumes_mid_epoch_and_drops_incomplete_batches():
    s = ResumableBatchSampler(10, 3, seed=0)
    assert s.batches_per_epoch == 3
    full = list(s)
    s.set_position(0, 2)
    assert list(s) == full[2:]
    s.set_position(1, 0)
    assert list(s) != full and all(e == 1 for batch in s for e, _ in batch)
    with pytest.raises(ValueError, match="cannot fill one batch"):
        ResumableBatchSampler(3, 2, num_replicas=2)


def test_infinite_batches_cross_epochs_in_order():
    s = ResumableBatchSampler(6, 2, seed=0)
    class Keys(torch.utils.data.Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, key):
            return key

    loader = torch.utils.data.DataLoader(Keys(), batch_sampler=s, collate_fn=lambda b: b)
    got = [(e, b) for (e, b, _), _ in zip(infinite_batches(loader, s, 0, 1), range(5))]
    assert got == [(0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]


def test_augmentation_depends_only_on_seed_epoch_index(tmp_path):
    root = make_demo_images(tmp_path / "img", num_images=8, size=40, seed=1)
    ds = ImageDataset(FileImages(find_files(root, {".png"})), 32, seed=5)
    a = ds[(3, 2)]["pixel_values"]
    assert torch.equal(a, ds[(3, 2)]["pixel_values"])
    loader = torch.utils.data.DataLoader(ds, batch_sampler=[[(3, 2)]], num_workers=2, collate_fn=collate)
    assert torch.equal(next(iter(loader))["pixel_values"][0], a)  # same in a worker process
    assert not all(torch.equal(a, ds[(e, 2)]["pixel_values"]) for e in range(4, 12))
    assert a.shape == (3, 32, 32) and a.min() >= -1 and a.max() <= 1


def test_corrupt_files_are_replaced_and_reported(tmp_path):
    root = make_demo_images(tmp_path / "img", num_images=4, size=32)
    (root / "empty.png").write_bytes(b"")
    (root / "text.jpg").write_text("not an image at all")
    good = (root / "00000.png").read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    files = find_files(root, {".png", ".jpg"})
    ds = ImageDataset(FileImages(files), 32, random_crop=False, random_flip=False)
    reasons = {}
    for i, path in enumerate(files):
        item = ds[(0, i)]
        assert item["pixel_values"].shape == (3, 32, 32)  # always a full sample: the next readable one
        reasons.update({p.split("/")[-1]: r for p, r in item["skipped"]})
    assert reasons == {"empty.png": "empty file", "text.jpg": "not an image", "truncated.png": "truncated"}


def test_tracker_counts_by_reason_and_stops_past_the_fraction(caplog):
    t = CorruptSampleTracker(max_fraction=0.1, min_samples=10)
    t.update([("a.png", "truncated")], batch_size=20)
    t.update([("a.png", "truncated"), ("b.png", "empty file")], batch_size=20)
    assert t.summary() == "1 empty file, 2 truncated"
    assert caplog.text.count("a.png") == 1  # each bad path logged once
    with pytest.raises(SystemExit, match=r"stopping: 7 of .* a.png \(truncated\)"):
        t.update([("c.png", "truncated")] * 4, batch_size=4)


def test_alpha_is_composited_over_white(tmp_path):
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    img.save(tmp_path / "t.png")
    assert np.asarray(load_image(tmp_path / "t.png"))[0, 0].tolist() == [255, 255, 255]


def test_demo_metadata_and_holdout(tmp_path):
    root = make_demo_images(tmp_path / "img", num_images=10, size=32)
    records = read_metadata(root)
    assert len(records) == 10
    rec = next(iter(records.values()))
    assert rec["text"].startswith("a ") and 0 <= rec["label"] < len(SHAPES)
    train, held = split_holdout(list(range(10)), 3, seed=0)
    assert len(held) == 3 and sorted(train + held) == list(range(10))
    assert split_holdout(list(range(10)), 3, seed=0) == (train, held)


def test_loader_workers_outlive_a_sigterm_sent_to_the_process_group():
    """A scheduler's SIGTERM often reaches every process of the group: the workers must not die of it (the main
    process checkpoints and shuts them down itself)."""
    import os
    import signal

    from common.data import loader_worker_init

    class Pids(torch.utils.data.Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            return torch.tensor([os.getpid(), i])

    loader = torch.utils.data.DataLoader(Pids(), batch_size=4, num_workers=2, worker_init_fn=loader_worker_init,
                                         persistent_workers=True)
    batches = iter(loader)
    pids = {int(p) for p in next(batches)[:, 0]} | {int(p) for p in next(batches)[:, 0]}
    assert len(pids) == 2 and os.getpid() not in pids
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    rest = list(batches)  # the epoch completes: no "DataLoader worker killed by signal: Terminated"
    assert len(rest) == 14 and {int(p) for b in rest for p in b[:, 0]} == pids
