"""train_ldm.py end to end, as users run it: a tiny DiT over a tiny VAE and a tiny text encoder, generated images,
a few dozen CPU steps; the cache, the export and `generate`, resume, class conditioning, audio, bad input."""

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import train_ldm as script
from common.checkpoint import Checkpoint
from common.demo_data import make_demo_images, make_demo_text_encoder, make_demo_vae
from common.training import read_metrics
from helpers import run

TINY = ["--model", "dit-tiny", "--resolution", "16", "--train_batch_size", "8", "--report_to", "none",
        "--dataloader_num_workers", "0", "--mixed_precision", "no", "--learning_rate", "1e-3",
        "--lr_warmup_steps", "0", "--logging_steps", "1", "--num_holdout", "4", "--num_inference_steps", "4",
        "--num_validation_prompts", "2", "--guidance_scale", "2.0", "--text_max_length", "16"]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A tiny VAE (downsampling 2), a tiny BERT text encoder, and 40 captioned 16-pixel images."""
    root = tmp_path_factory.mktemp("ldm_parts")
    return {"vae": str(make_demo_vae(root / "vae")), "text": "hf:" + str(make_demo_text_encoder(root / "text", 32, 1)),
            "images": str(make_demo_images(root / "images", num_images=40, size=16, seed=0))}


def flags(parts, out, *extra):
    return ["--train_data_dir", parts["images"], "--vae", parts["vae"], "--text_encoder", parts["text"],
            "--output_dir", str(out), *TINY, *extra]


def test_trains_builds_the_cache_once_and_exports_what_it_validated(parts, tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    run("train_ldm.py", *flags(parts, out, "--cache_dir", cache, "--max_train_steps", "40", "--validation_steps", "40",
                               "--checkpointing_steps", "40"))
    meta = json.loads((cache / "cache.json").read_text())
    assert meta["complete"] and meta["num_items"] == 36 and meta["key"]["flips"] == 2
    mean = np.load(cache / "shard_00000" / "mean.npy")
    assert mean.shape == (36, 2, 4, 8, 8) and mean.dtype == np.float16
    assert np.load(cache / "shard_00000" / "context.npy").shape == (36, 16, 32)

    losses = [m["loss/total"] for m in read_metrics(out / "metrics.jsonl") if "loss/total" in m]
    assert len(losses) == 40 and np.mean(losses[-10:]) < 0.7 * np.mean(losses[:5]), losses
    val = [m for m in read_metrics(out / "metrics.jsonl") if "val/loss" in m]
    assert val and all(f"val/loss_t{t:03d}" in val[-1] for t in (100, 300, 500, 700, 900))
    assert (out / "samples" / "step_0000040.png").is_file()

    # The export reloads and `generate` draws the same samples for the same prompts and seeds.
    config = json.loads((out / "ldm_config.json").read_text())
    assert config["prediction_type"] == "v_prediction" and config["latent_shape"] == [4, 8, 8]
    last = load_file(out / "samples" / "last_validation.safetensors")
    prompts = json.loads(__import__("safetensors").safe_open(str(out / "samples" / "last_validation.safetensors"),
                                                             "pt").metadata()["labels"])
    gen = tmp_path / "gen"
    run("train_ldm.py", "generate", "--model", out, "--output", gen, "--prompt", *prompts,
        "--num_images_per_prompt", "2")
    generated = load_file(gen / "samples.safetensors")
    torch.testing.assert_close(generated["latents"], last["latents"], rtol=0, atol=0)
    torch.testing.assert_close(generated["decoded"], last["decoded"], rtol=0, atol=0)
    assert len(list(gen.glob("0*.png"))) == 4

    # --export_checkpoint exports a checkpoint's EMA weights: the same as the run's own export.
    run("train_ldm.py", "--export_checkpoint", out / "checkpoint-40", "--output_dir", tmp_path / "exported")
    for k, v in load_file(out / "model.safetensors").items():
        assert torch.equal(v, load_file(tmp_path / "exported" / "model.safetensors")[k]), k

    # A second run with the same cache encodes nothing.
    stamp = (cache / "shard_00000" / "mean.npy").stat().st_mtime_ns
    proc = run("train_ldm.py", *flags(parts, tmp_path / "run2", "--cache_dir", cache, "--max_train_steps", "2",
                                      "--validation_steps", "100"))
    assert "using the cache" in proc.stderr and "encoding the cache" not in proc.stderr
    assert (cache / "shard_00000" / "mean.npy").stat().st_mtime_ns == stamp


def test_resume_from_the_cache_is_exact(parts, tmp_path):
    """(Resuming without the cache is exact too: tests/test_reliability.py, whose LDM runs read the images.)"""
    # A constant learning rate: with a decaying one, a 3-step run's schedule is not the first half of a 6-step one.
    common = ["--cache_dir", str(tmp_path / "cache"), "--validation_steps", "100", "--checkpointing_steps", "3",
              "--lr_scheduler", "constant"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    run("train_ldm.py", *flags(parts, whole, *common, "--max_train_steps", "6"))
    run("train_ldm.py", *flags(parts, split, *common, "--max_train_steps", "3"))
    proc = run("train_ldm.py", *flags(parts, split, *common, "--max_train_steps", "6", "--resume_from_checkpoint",
                                      "latest"))
    assert "resumed from" in proc.stderr and "using the cache in" in proc.stderr
    a, b = Checkpoint(whole / "checkpoint-6"), Checkpoint(split / "checkpoint-6")
    for name in ("model", "ema"):
        for k, v in a.tensors(name).items():
            assert torch.equal(v, b.tensors(name)[k]), (name, k)


def test_class_conditioning_generates_the_asked_class(tmp_path):
    """Two classes that differ in brightness; after a few hundred CPU steps, samples guided towards a class land
    nearer that class's mean latent far more often than chance."""
    from PIL import Image

    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for cls, level in (("dark", 40), ("bright", 215)):
        (data / cls).mkdir(parents=True)
        for i in range(32):
            pixels = np.clip(level + rng.normal(0, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(data / cls / f"{i}.png")
    vae = make_demo_vae(tmp_path / "vae")
    out = tmp_path / "run"
    run("train_ldm.py", "--train_data_dir", data, "--vae", vae, "--output_dir", out, "--conditioning", "class",
        "--class_embed_dim", "32", *TINY, "--cache_dir", tmp_path / "cache", "--max_train_steps", "400",
        "--validation_steps", "1000", "--checkpointing_steps", "1000", "--num_holdout", "0",
        "--train_batch_size", "16", "--lr_warmup_steps", "20")
    gen = tmp_path / "gen"
    run("train_ldm.py", "generate", "--model", out, "--output", gen, "--prompt", "bright", "dark",
        "--num_images_per_prompt", "8", "--guidance_scale", "4", "--num_inference_steps", "10")
    # Nearest class mean, on each sample's channel means: the classes differ in brightness, i.e. in those means.
    latents = load_file(gen / "samples.safetensors")["latents"].mean((2, 3))  # (16, C): bright, dark, bright, ...
    shard = tmp_path / "cache" / "shard_00000"
    cached = torch.from_numpy(np.load(shard / "mean.npy")[:, 0].astype(np.float32))
    labels = torch.from_numpy(np.load(shard / "label.npy"))
    config = json.loads((out / "ldm_config.json").read_text())
    scale, shift = config["vae"]["scaling_factor"], config["vae"]["shift_factor"]
    data = ((cached - shift) * scale).mean((2, 3))
    centroids = torch.stack([data[labels == c].mean(0) for c in (0, 1)])  # bright = 0, dark = 1
    asked = torch.tensor([0, 1] * 8)
    accuracy = (torch.cdist(latents, centroids).argmin(1) == asked).float().mean().item()
    assert config["class_names"] == ["bright", "dark"]
    assert accuracy >= 0.8, accuracy


def test_flow_matching_and_the_unet_preset_train(parts, tmp_path):
    run("train_ldm.py", *flags(parts, tmp_path / "flow", "--prediction_type", "flow", "--max_train_steps", "3",
                               "--validation_steps", "3"))
    assert json.loads((tmp_path / "flow" / "ldm_config.json").read_text())["sampler"]["name"] == "euler"
    run("train_ldm.py", *flags(parts, tmp_path / "unet", "--model", "unet-tiny", "--max_train_steps", "3",
                               "--validation_steps", "3", "--prediction_type", "epsilon", "--sampler", "ddim",
                               "--noise_offset", "0.1", "--input_perturbation", "0.1", "--null_condition", "learned"))
    assert (tmp_path / "unet" / "samples" / "step_0000003.png").is_file()


def make_shards(images, folder, per_shard=20):
    """WebDataset shards of the demo images: key.png + key.txt per sample."""
    records = [json.loads(line) for line in (Path(images) / "metadata.jsonl").read_text().splitlines()]
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(0, len(records), per_shard):
        with tarfile.open(folder / f"data-{s // per_shard:03d}.tar", "w") as tar:
            for rec in records[s:s + per_shard]:
                key = Path(rec["file_name"]).stem
                tar.add(Path(images) / rec["file_name"], arcname=f"{key}.png")
                caption = folder / f"{key}.txt"
                caption.write_text(rec["text"])
                tar.add(caption, arcname=f"{key}.txt")
                caption.unlink()
    return str(folder / "data-{000..001}.tar")


def test_folder_tsv_shards_and_hf_dataset_give_the_same_items(parts, tmp_path):
    base = script.build_parser().parse_args(["--output_dir", "x", "--conditioning", "text"])
    records = [json.loads(line) for line in (Path(parts["images"]) / "metadata.jsonl").read_text().splitlines()]
    expected = {Path(r["file_name"]).stem: r["text"] for r in records}

    folder, kind = script.folder_items(_with(base, train_data_dir=parts["images"]))
    assert kind == "image" and {Path(w).stem: c for w, c in zip(folder.wheres, folder.captions)} == expected

    tsv = tmp_path / "captions.tsv"
    tsv.write_text("".join(f"{r['file_name']}\tTSV {r['text']}\n" for r in records))
    from_tsv, _ = script.folder_items(_with(base, train_data_dir=parts["images"], captions_file=str(tsv)))
    assert {Path(w).stem: c for w, c in zip(from_tsv.wheres, from_tsv.captions)} == {
        k: f"TSV {v}" for k, v in expected.items()}

    shards = script.shard_items(_with(base, train_shards=[make_shards(parts["images"], tmp_path / "shards")]))
    assert {Path(w.split(":")[-1]).stem: c for w, c in zip(shards.wheres, shards.captions)} == expected
    img = script.read_item(shards.readers[0], "image", 16, False, None, None)
    ref = script.read_item(str(Path(parts["images"]) / f"{Path(shards.wheres[0].split(':')[-1]).stem}.png"), "image",
                           16, False, None, None)
    assert torch.equal(img, ref)

    hf = script.hf_items(_with(base, dataset_name=parts["images"]))
    assert sorted(hf.captions) == sorted(expected.values())
    assert script.read_item(hf.readers[0], "image", 16, False, None, None).shape == (3, 16, 16)


def _with(args, **changes):
    import argparse

    return argparse.Namespace(**{**vars(args), **changes})


def test_a_cache_built_for_another_vae_is_refused(parts, tmp_path):
    cache = tmp_path / "cache"
    run("train_ldm.py", *flags(parts, tmp_path / "a", "--cache_dir", cache, "--max_train_steps", "1",
                               "--validation_steps", "10"))
    other = make_demo_vae(tmp_path / "other_vae", seed=1)
    proc = run("train_ldm.py", *flags(parts, tmp_path / "b", "--cache_dir", cache, "--max_train_steps", "1",
                                      "--vae", other), check=False)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert "was built for another setup: vae (" in last and "give a new --cache_dir" in last, last


def test_other_processes_wait_for_the_cache_without_a_collective(tmp_path):
    """With several GPUs the main process builds the cache, which may take longer than a collective's timeout; the
    others poll its cache.json until it says complete (and refuse a cache built for another setup)."""
    import threading
    import time

    key = {"vae": "a", "flips": 1}
    meta = {"format": script.CACHE_FORMAT, "key": key, "complete": False, "shards": [], "skipped": []}
    script.write_cache_meta(tmp_path, meta)
    (tmp_path / "shard_00000").mkdir()  # a build in progress
    got = {}
    waiter = threading.Thread(target=lambda: got.update(meta=script.wait_for_cache(tmp_path, key, poll_seconds=0.02)))
    waiter.start()
    time.sleep(0.3)
    assert waiter.is_alive() and not got
    script.write_cache_meta(tmp_path, {**meta, "complete": True, "num_items": 3})
    waiter.join(timeout=10)
    assert got["meta"]["complete"] and got["meta"]["num_items"] == 3
    with pytest.raises(SystemExit, match="was built for another setup: vae"):
        script.wait_for_cache(tmp_path, {"vae": "b", "flips": 1}, poll_seconds=0.02)


def test_corrupt_images_are_left_out_of_the_cache_and_counted(parts, tmp_path):
    import shutil

    data = tmp_path / "images"
    shutil.copytree(parts["images"], data)
    png = (data / "00000.png").read_bytes()
    (data / "broken.png").write_bytes(png[:len(png) // 2])
    (data / "empty.png").write_bytes(b"")
    run("train_ldm.py", *flags(parts, tmp_path / "out", "--cache_dir", tmp_path / "cache", "--max_train_steps", "1",
                               "--validation_steps", "10", "--num_holdout", "0", "--train_data_dir", data))
    meta = json.loads((tmp_path / "cache" / "cache.json").read_text())
    assert sorted((Path(w).name, r) for w, r in meta["skipped"]) == [("broken.png", "truncated"),
                                                                       ("empty.png", "empty file")]
    assert meta["num_items"] == 40


@pytest.mark.parametrize("extra, message", [
    (["--resolution", "18"], "--resolution 18 is not a multiple of the VAE's downsampling factor 2 times dit-tiny's"),
    (["--validation_prompts_file", "/nonexistent.txt"], "--validation_prompts_file /nonexistent.txt: no such file"),
    (["--prediction_type", "epsilon", "--zero_terminal_snr"], "--prediction_type epsilon:"),
    (["--prediction_type", "flow", "--sampler", "ddim"], "--sampler ddim does not fit --prediction_type flow"),
    (["--train_data_dir", "/nonexistent"], "--train_data_dir /nonexistent: no such folder"),
    (["--vae", "/nonexistent_vae"], "--vae /nonexistent_vae: not a diffusers AutoencoderKL"),
    (["--text_encoder", "nope:thing"], "--text_encoder"),
    (["--model", "dit-huge"], "invalid choice: 'dit-huge'"),
])
def test_bad_input_stops_with_one_line(parts, tmp_path, extra, message):
    proc = run("train_ldm.py", *flags(parts, tmp_path / "out", "--max_train_steps", "1", *extra), check=False)
    assert proc.returncode in (1, 2), proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert message in last, proc.stderr[-2000:]


def test_help_documents_every_flag():
    parser = script.build_parser()
    assert not [a.option_strings for a in parser._actions if a.dest != "help" and not a.help]


def test_text_to_audio_over_a_mel_audio_vae(tmp_path):
    """Audio mode: a (random) mel audio VAE export, captioned clips; samples become clips and spectrograms, heard
    through Griffin-Lim when no vocoder is given (and marked so)."""
    from common.audio_vae import PRESETS, build_vae, save_audio_vae
    from common.demo_data import make_demo_audio
    from common.spectral import MelConfig

    mel = MelConfig(sample_rate=8000, n_fft=512, hop_length=128, win_length=512, n_mels=16, fmax=4000.0)
    torch.manual_seed(0)
    vae = build_vae(PRESETS["mel-tiny"], 4, mel.sample_rate)  # 4x in time and frequency
    save_audio_vae(tmp_path / "audio_vae", vae, "mel", mel, -4.0, 2.0, {"scaling_factor": 1.5, "shift_factor": 0.1})
    audio = make_demo_audio(tmp_path / "clips", num_files=12, seconds=1.0, sample_rate=8000, seed=0)
    text = "hf:" + str(make_demo_text_encoder(tmp_path / "text", 32, 1))
    out = tmp_path / "run"
    run("train_ldm.py", "--train_data_dir", audio, "--vae", tmp_path / "audio_vae", "--text_encoder", text,
        "--output_dir", out, *TINY, "--audio_seconds", "0.5", "--train_batch_size", "4", "--max_train_steps", "3",
        "--validation_steps", "3", "--cache_dir", tmp_path / "cache", "--validation_prompts", "a few notes")
    config = json.loads((out / "ldm_config.json").read_text())
    assert config["kind"] == "audio" and config["latent_shape"] == [4, 4, 8]  # 0.5 s -> 8 frames of 4 x 128 samples
    assert np.load(tmp_path / "cache" / "shard_00000" / "mean.npy").shape == (8, 1, 4, 4, 8)  # one crop, no flips
    clips = sorted((out / "samples").glob("step_0000003_*_griffinlim.wav"))
    assert len(clips) == 2 and (out / "samples" / "step_0000003_mel.png").is_file()
    import soundfile as sf

    wave, rate = sf.read(clips[0])
    assert rate == 8000 and len(wave) > 3000
    gen = tmp_path / "gen"
    run("train_ldm.py", "generate", "--model", out, "--output", gen, "--prompt", "a few notes")
    assert len(list(gen.glob("grid_*_griffinlim.wav"))) == 1


def test_text_to_audio_over_a_waveform_audio_vae(tmp_path):
    """A waveform (Oobleck) audio VAE's latents are (C, frames): the DiT sees one row and patches along time only.
    Samples are the VAE's own audio (no vocoder, no Griffin-Lim), and `generate` draws the same clips again."""
    from common.audio_vae import PRESETS, build_vae, save_audio_vae
    from common.demo_data import make_demo_audio
    from common.spectral import MelConfig

    mel = MelConfig(sample_rate=8000, n_fft=512, hop_length=128, win_length=512, n_mels=16, fmax=4000.0)
    torch.manual_seed(0)
    vae = build_vae(PRESETS["wave-tiny"], 4, mel.sample_rate)  # one latent frame per 256 samples
    save_audio_vae(tmp_path / "audio_vae", vae, "waveform", mel, 0.0, 1.0, {"scaling_factor": 2.0, "shift_factor": 0.0})
    audio = make_demo_audio(tmp_path / "clips", num_files=12, seconds=1.0, sample_rate=8000, seed=0)
    text = "hf:" + str(make_demo_text_encoder(tmp_path / "text", 32, 1))
    out = tmp_path / "run"
    base = ["--train_data_dir", audio, "--vae", tmp_path / "audio_vae", "--text_encoder", text, *TINY,
            "--audio_seconds", "0.5", "--train_batch_size", "4", "--validation_prompts", "a few notes", "low hum", "--num_validation_seeds", "1"]
    run("train_ldm.py", *base, "--output_dir", out, "--max_train_steps", "4", "--validation_steps", "4",
        "--cache_dir", tmp_path / "cache")
    config = json.loads((out / "ldm_config.json").read_text())
    # 0.5 s = 4000 samples -> 15.6 frames of 256, rounded up to 16 (a whole number of 2-frame patches)
    assert config["kind"] == "audio" and config["latent_shape"] == [4, 1, 16]
    assert config["denoiser"]["patch_size"] == [1, 2]
    assert np.load(tmp_path / "cache" / "shard_00000" / "mean.npy").shape == (8, 1, 4, 1, 16)
    losses = [m["loss/total"] for m in read_metrics(out / "metrics.jsonl") if "loss/total" in m]
    assert len(losses) == 4 and np.isfinite(losses).all()
    clips = sorted((out / "samples").glob("step_0000004_*.wav"))
    assert [c.name for c in clips] == ["step_0000004_00.wav", "step_0000004_01.wav"]  # no '_griffinlim' mark
    assert (out / "samples" / "step_0000004_mel.png").is_file()
    import soundfile as sf

    wave, rate = sf.read(clips[0])
    assert rate == 8000 and len(wave) == 16 * 256
    last = load_file(out / "samples" / "last_validation.safetensors")
    gen = tmp_path / "gen"
    run("train_ldm.py", "generate", "--model", out, "--output", gen, "--prompt", "a few notes", "low hum")
    generated = load_file(gen / "samples.safetensors")
    assert generated["latents"].shape == (2, 4, 1, 16) and generated["decoded"].shape == (2, 16 * 256)
    torch.testing.assert_close(generated["latents"], last["latents"], rtol=0, atol=0)
    torch.testing.assert_close(generated["decoded"], last["decoded"], rtol=0, atol=0)
    assert len(list(gen.glob("grid_*.wav"))) == 2 and not list(gen.glob("*griffinlim*"))

    # A UNet cannot downsample one-row latents: refused before any encoding.
    proc = run("train_ldm.py", *base, "--output_dir", tmp_path / "unet", "--model", "unet-tiny", "--max_train_steps",
               "1", check=False)
    assert proc.returncode != 0 and "--model unet-tiny: a waveform audio VAE's latents are one row" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_fid_inception_score_and_clip_score_against_a_reference_folder(parts, tmp_path):
    """The metric code path with stand-in weights: a random Inception-v3 and a tiny random open_clip CLIP."""
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    clip_cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16,
                                                "head_width": 16},
                "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "tiny-clip-score.json").write_text(json.dumps(clip_cfg))
    torch.manual_seed(0)
    save_file(CLIP(**clip_cfg).state_dict(), str(tmp_path / "clip.safetensors"))
    out = tmp_path / "run"
    run("train_ldm.py", *flags(parts, out, "--max_train_steps", "2", "--validation_steps", "2",
                               "--reference_dir", parts["images"], "--inception_weights", "random",
                               "--num_metric_samples", "6",
                               "--clip_score_model", f"{tmp_path / 'tiny-clip-score.json'}:{tmp_path / 'clip.safetensors'}"))
    val = [m for m in read_metrics(out / "metrics.jsonl") if "val/fid" in m][-1]
    assert val["val/fid"] > 0 and val["val/inception_score"] >= 1.0 and 0 <= val["val/clip_score"] <= 100
    assert len(list((out / "fid_reference").glob("fid_reference_*.npz"))) == 1
