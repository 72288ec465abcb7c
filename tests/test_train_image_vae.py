"""train_image_vae.py end to end, as users run it: tiny VAE, generated images, a few dozen CPU steps."""

import argparse
import json

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

import train_image_vae as script
from common.checkpoint import Checkpoint
from common.metrics import psnr
from common.training import read_metrics
from helpers import run

TINY = ["--model", "kl-f8-tiny", "--resolution", "32", "--train_batch_size", "4", "--disc_ndf", "8",
        "--lpips_backbone", "random", "--lpips_weight", "0.5", "--report_to", "none", "--dataloader_num_workers", "0",
        "--num_validation_images", "8", "--latent_stats_num_images", "16", "--mixed_precision", "no",
        "--learning_rate", "2e-3", "--lr_warmup_steps", "0", "--logging_steps", "1"]


def test_help_documents_every_flag():
    parser = script.build_parser()
    undocumented = [a.option_strings for a in parser._actions if a.dest != "help" and not a.help]
    assert not undocumented
    assert run("train_image_vae.py", "--help").stdout.count("--") > 60


@pytest.mark.parametrize("args, message", [
    (["--train_data_dir", "/nonexistent"], "--train_data_dir /nonexistent: no such folder"),
    (["--train_data_dir", "{empty}"], "contains no images"),
    (["--model", "kl-f8-huge"], "invalid choice: 'kl-f8-huge'"),
    (["--learning_rate", "0"], "--learning_rate: must be > 0"),
    (["--learning_rate=-1e-4"], "--learning_rate: must be > 0"),
    (["--resolution", "36"], "--resolution 36 is not a multiple of kl-f8-tiny's downsampling factor 8"),
    (["--config", "{bad_config}"], "unreadable YAML"),
    (["--config", "{missing}"], "no such file"),
    ([], "exactly one of --train_data_dir"),
])
def test_bad_input_stops_with_one_line_before_any_model(tmp_path, demo_images, capsys, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.yaml").write_text("model: [kl-f8")
    fill = {"{empty}": str(tmp_path / "empty"), "{bad_config}": str(tmp_path / "bad.yaml"),
            "{missing}": str(tmp_path / "missing.yaml")}
    args = [fill.get(a, a) for a in args]
    base = ["--output_dir", str(tmp_path / "out"), "--model", "kl-f8-tiny"]
    if "--train_data_dir" not in args and args != []:
        base += ["--train_data_dir", str(demo_images)]
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(base + args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_bad_input_from_the_command_line(tmp_path):
    proc = run("train_image_vae.py", "--train_data_dir", tmp_path, "--output_dir", tmp_path / "o", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"train_image_vae.py: error: --train_data_dir {tmp_path}: contains "
                                                f"no images (.bmp, .gif, .jpeg, .jpg, .png, .tif, .tiff, .webp)"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_images):
    """One 30-step run through `accelerate launch`, with the GAN from step 15 and R1 every 5 steps."""
    out = tmp_path_factory.mktemp("run")
    run("train_image_vae.py", "--train_data_dir", demo_images, "--output_dir", out, *TINY,
        "--max_train_steps", "30", "--disc_start_step", "15", "--r1_interval", "5", "--validation_steps", "15",
        "--adv_weight", "0.1",
        "--checkpointing_steps", "15", "--checkpoints_total_limit", "1", launcher="accelerate")
    return out


def test_training_learns_and_logs(trained):
    metrics = read_metrics(trained / "metrics.jsonl")
    rec = [m["loss/rec"] for m in metrics if "loss/rec" in m]
    assert len(rec) == 30
    assert sum(rec[-10:]) / 10 < 0.85 * sum(rec[:3]) / 3, rec
    gan = [m for m in metrics if "loss/disc" in m]
    assert gan and gan[0]["step"] == 16  # the 16th optimizer step is step index 15, the GAN's start
    assert any(m["loss/r1"] > 0 for m in gan)
    for key in ("disc/real_prob", "disc/fake_prob", "grad_norm/disc", "grad_norm/vae", "latent/std", "lr/vae",
                "perf/samples_per_s", "loss/lpips", "loss/kl"):
        assert key in gan[-1], key
    vals = [m for m in metrics if "val/psnr" in m]
    assert [m["step"] for m in vals] == [15, 30] and "val/ssim" in vals[-1] and "val/lpips" in vals[-1]
    assert (trained / "samples" / "reconstruction_0000030.png").exists()
    info = json.loads((trained / "run.json").read_text())
    assert info["script"] == "train_image_vae.py" and info["args"]["disc_start_step"] == 15 and info["git"]
    assert [p.name for p in trained.glob("checkpoint-*")] == ["checkpoint-30"]  # total limit 1


def test_export_loads_in_diffusers_and_reproduces_validation(trained):
    vae = AutoencoderKL.from_pretrained(trained).eval()
    stats = json.loads((trained / "latent_stats.json").read_text())
    assert vae.config.scaling_factor == pytest.approx(stats["scaling_factor"])
    assert vae.config.shift_factor == pytest.approx(stats["shift_factor"])
    assert len(stats["channel_mean"]) == len(stats["channel_std"]) == stats["latent_channels"] == 4
    assert stats["downsampling_factor"] == 8 and stats["scaling_factor"] > 0

    # The held-out images, reconstructed by the export, give the final validation PSNR: the export holds the
    # EMA weights that validation used.
    saved = Checkpoint(trained / "checkpoint-30").json("training_state")["args"]
    args = argparse.Namespace(**saved)
    train_source, val_source = script.image_sources(args)
    images = script.fixed_images(val_source, 32, 8)
    with torch.no_grad():
        recon = vae.decode(vae.encode(images).latent_dist.mode()).sample.clamp(-1, 1)
        final_psnr = [m["val/psnr"] for m in read_metrics(trained / "metrics.jsonl") if "val/psnr" in m][-1]
        assert psnr(recon, images).mean().item() == pytest.approx(final_psnr, abs=1e-3)
        # latent_stats.json normalises latents of the training images to zero mean, unit variance.
        x = script.fixed_images(train_source, 32, 16)
        z = (vae.encode(x).latent_dist.sample() - stats["shift_factor"]) * stats["scaling_factor"]
        assert abs(z.mean().item()) < 0.3 and 0.7 < z.std().item() < 1.3


def test_export_from_a_checkpoint(trained, tmp_path):
    run("train_image_vae.py", "--export_checkpoint", trained / "checkpoint-30", "--output_dir", tmp_path / "e")
    a, b = (load_file(p / "diffusion_pytorch_model.safetensors") for p in (trained, tmp_path / "e"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "e" / "latent_stats.json").read_text()) == \
        json.loads((trained / "latent_stats.json").read_text())


def test_finetunes_a_pretrained_diffusers_vae_and_a_hf_dataset(tmp_path, demo_images):
    """... with --fused_group_norm (PyTorch's ops on the CPU): the export is a plain AutoencoderKL of the same keys."""
    pretrained = tmp_path / "pretrained"
    script.build_vae(script.VAE_PRESETS["kl-f8-tiny"]).save_pretrained(pretrained)
    proc = run("train_image_vae.py", "--dataset_name", demo_images, "--output_dir", tmp_path / "out", *TINY,
               "--pretrained_vae_model_name_or_path", pretrained, "--max_train_steps", "3", "--adv_weight", "0",
               "--fused_group_norm", HF_DATASETS_OFFLINE="1")
    assert "--fused_group_norm: 34 GroupNorm -> SiLU pairs fused (PyTorch's ops on cpu" in proc.stderr
    assert AutoencoderKL.from_pretrained(tmp_path / "out").config.block_out_channels == [16, 32, 32, 32]
    a, b = (load_file(p / "diffusion_pytorch_model.safetensors") for p in (pretrained, tmp_path / "out"))
    assert a.keys() == b.keys()
