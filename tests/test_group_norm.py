"""common.group_norm: the fused GroupNorm + SiLU kernels against PyTorch (through Triton's interpreter on the CPU,
natively on a GPU), the in-place fusion of a diffusers VAE, and --fused_group_norm in the training scripts."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.group_norm import GroupNormSiLU, fuse_group_norm_silu, group_norm_silu
from common.training import read_metrics
from helpers import ROOT, env, run
from scripts import AUDIO_VAE_TINY_MEL, vocoder_data

triton = pytest.importorskip("triton", reason="the fused kernels need Triton (a CPU-only torch build has none)")


@pytest.fixture(scope="module")
def probe():
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "group_norm_probe.py")], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", ["nchw_fp32", "channels_last_fp32", "offset_mean_fp32", "one_row_fp32",
                                  "split_channels_last_fp32", "split_nchw_fp32", "unsplit_channels_last_fp32",
                                  "sample_order_channels_last_fp32", "sample_order_nchw_fp32",
                                  "memory_order_channels_last_fp32", "memory_order_nchw_fp32",
                                  "channel_slice_fp32"])
def test_interpreted_kernels_match_pytorch_in_float32(probe, case):
    err = probe["cases"][case]
    assert err["strides"] and err["dtype"], err
    # float32 rounding: about 2e-7 at zero mean, 6e-6 where the mean is 50 standard deviations away
    for key in ("y", "dx", "dweight", "dbias"):
        assert err[key] < 3e-5, (key, err)


@pytest.mark.parametrize("case", ["nchw_bf16", "channels_last_bf16"])
def test_interpreted_kernels_take_bf16_and_return_bf16(probe, case):
    err = probe["cases"][case]
    assert err["strides"] and err["dtype"], err
    # float32 arithmetic inside: only the output's rounding to bf16 (8 bits of mantissa) is left
    for key in ("y", "dx"):
        assert err[key] < 1e-2, (key, err)
    assert err["dweight"] < 1e-4 and err["dbias"] < 1e-4, err


def test_compiled_operators_keep_channels_last_and_match_eager(probe):
    """torch.compile traces the operators with their fake implementations and runs the real ones: the two must agree
    on the output's layout (a channels-last graph keeps its tensors channels-last through the norm)."""
    assert probe["compiled"]["channels_last"], probe["compiled"]
    assert probe["compiled"]["err"] < 1e-6, probe["compiled"]


def test_a_fused_vae_computes_the_unfused_one(probe):
    vae = probe["vae"]
    # two resnet blocks a level in the encoder, two (layers_per_block + 1) in the decoder, two in each mid block:
    # 2 norms each, and conv_norm_out of the encoder and the decoder
    assert vae["count"] == 2 * (2 + 4 + 2 + 2) + 2
    assert vae["same_keys"] and vae["kinds"] == ["GroupNorm", "GroupNormSiLU"], vae  # attention's norm stays
    assert vae["out"] < 1e-5 and vae["grad"] < 1e-4, vae


def test_off_the_gpu_the_module_is_pytorchs_ops_with_the_same_parameters():
    norm = nn.GroupNorm(4, 16, eps=1e-6)
    nn.init.normal_(norm.weight), nn.init.normal_(norm.bias)
    fused = GroupNormSiLU(4, 16, eps=1e-6)
    fused.load_state_dict(norm.state_dict())
    x = torch.randn(2, 16, 5, 6)
    assert torch.equal(fused(x), F.silu(norm(x)))
    assert torch.equal(group_norm_silu(x, norm.weight, norm.bias, 4, 1e-6), F.silu(norm(x)))


def test_fusion_keeps_the_parameters_the_optimizer_holds():
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=2)
    before = [id(p) for p in vae.parameters()]
    assert fuse_group_norm_silu(vae) > 0
    assert [id(p) for p in vae.parameters()] == before
    assert fuse_group_norm_silu(vae) == 0  # nothing left to fuse


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the native kernels need a CUDA GPU")
@pytest.mark.parametrize("compiled", [False, True])
def test_gpu_kernels_match_pytorch_under_autocast(compiled):
    torch.manual_seed(0)
    x = torch.randn(4, 96, 40, 128, device="cuda").contiguous(memory_format=torch.channels_last)
    dy = torch.randn_like(x)
    norm = nn.GroupNorm(16, 96, eps=1e-6).cuda()
    nn.init.normal_(norm.weight), nn.init.normal_(norm.bias)
    fused = GroupNormSiLU(16, 96, eps=1e-6).cuda()
    fused.load_state_dict(norm.state_dict())

    def step(module, act):
        xb = x.bfloat16().requires_grad_(True)
        with torch.autocast("cuda", torch.bfloat16):
            y = act(module(xb))
        y.backward(dy.to(y.dtype))
        return y.float(), xb.grad.float(), module.weight.grad.clone(), module.bias.grad.clone()

    ref = step(norm, F.silu)
    run_fused = torch.compile(fused, mode="reduce-overhead") if compiled else fused
    out = step(run_fused, lambda y: y)
    for name, a, r in zip(("y", "dx", "dweight", "dbias"), out, ref):
        assert float((a - r).detach().abs().max() / r.abs().max()) < 2e-2, name


@pytest.fixture(scope="module")
def audio(tmp_path_factory):
    return vocoder_data(tmp_path_factory.mktemp("audio"))


def test_fused_group_norm_flag_trains_like_pytorchs_ops(audio, tmp_path):
    """Three steps of the mel VAE with --fused_group_norm, the kernels run by the interpreter: the losses of a run
    with PyTorch's ops."""
    common = [*audio, "--model", "mel-tiny", *AUDIO_VAE_TINY_MEL, "--train_batch_size", "2", "--report_to", "none",
              "--dataloader_num_workers", "0", "--num_validation_files", "1", "--logging_steps", "1", "--disc_ndf",
              "8", "--disc_layers", "2", "--latent_stats_num_segments", "4", "--mel_norm_num_segments", "8",
              "--max_train_steps", "3", "--learning_rate", "3e-3", "--validation_steps", "100", "--checkpointing_steps",
              "100"]
    run("train_audio_vae.py", *common, "--output_dir", tmp_path / "ref")
    proc = run("train_audio_vae.py", *common, "--output_dir", tmp_path / "fused", "--fused_group_norm",
               TRITON_INTERPRET="1")
    assert "--fused_group_norm: 28 GroupNorm -> SiLU pairs fused" in proc.stdout + proc.stderr
    ref = [m["loss/rec"] for m in read_metrics(tmp_path / "ref" / "metrics.jsonl") if "loss/rec" in m]
    fused = [m["loss/rec"] for m in read_metrics(tmp_path / "fused" / "metrics.jsonl") if "loss/rec" in m]
    assert len(ref) == 3 and ref[0] != ref[-1] and fused == pytest.approx(ref, rel=1e-4)
