"""train_rvq.py: patterns, loss, guards and file format as units; encode -> train -> generate -> doctor end to end
with a tiny randomly initialised DAC codec on generated audio. (Resume, NaN, corrupt files, SIGTERM, hangs:
tests/test_reliability.py.)"""

import json
import math
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import train_rvq as script
from common.checkpoint import Checkpoint
from common.data import CorruptSample
from common.training import read_metrics
from helpers import run
from scripts import RVQ_CODEBOOKS, RVQ_VOCAB, make_codes

TINY = ["--model", "tiny", "--ctx", "16", "--step", "8", "--train_batch_size", "4", "--report_to", "none",
        "--mixed_precision", "no", "--learning_rate", "3e-3", "--lr_warmup_steps", "5", "--logging_steps", "5",
        "--dataloader_num_workers", "0", "--dropout", "0"]


def test_help_documents_every_flag():
    undocumented = [a.option_strings for a in script.build_parser()._actions if a.dest != "help" and not a.help]
    assert not undocumented


# Patterns ----------------------------------------------------------------------------------------------------------

def test_delay_round_trips_and_never_shows_a_codebook_its_own_future():
    K, T = 4, 12
    frames = torch.arange(T)[None, :, None] * 10 + torch.arange(K)[None, None, :]  # code = 10 * frame + codebook
    assert torch.equal(script.undelay(script.delay(frames, pad_id=-5)), frames)
    # A window from frame 5 on, with the K - 1 frames of history the delay pattern needs.
    start, ctx = 5, 6
    window = frames[:, start - (K - 1):start + ctx + 1]
    inputs, targets = script.pattern_inputs_targets(window, "delay", pad_id=999)
    for t in range(ctx):
        for k in range(K):
            assert inputs[0, t, k] == 10 * (start + t - k) + k
            assert targets[0, t, k] == 10 * (start + t + 1 - k) + k
            # Everything of codebook k the model has seen up to position t is from earlier frames.
            seen = inputs[0, :t + 1, k] // 10
            assert (seen < targets[0, t, k] // 10).all()
    # At a file's start the missing history becomes pad in the inputs and "ignore" in the targets.
    first = torch.cat([torch.full((1, K - 1, K), -1), frames[:, :ctx + 1]], dim=1)
    inputs, targets = script.pattern_inputs_targets(first, "delay", pad_id=999)
    assert inputs[0, 0, 1] == 999 and targets[0, 0, 2] == -100 and targets[0, 0, 1] == 1


def test_parallel_pattern_predicts_the_next_frame():
    frames = torch.arange(9 * 2).view(1, 9, 2)
    inputs, targets = script.pattern_inputs_targets(frames, "parallel", pad_id=99)
    assert torch.equal(inputs, frames[:, :-1]) and torch.equal(targets, frames[:, 1:])


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_model_is_causal(positions):
    cfg = script.RVQConfig(num_codebooks=3, codebook_size=16, dropout=0.0, positions=positions, max_positions=32,
                           **script.PRESETS["tiny"])
    model = script.build_model(cfg).eval()
    tokens = torch.randint(17, (2, 10, 3))
    changed = tokens.clone()
    changed[:, 6:] = torch.randint(17, (2, 4, 3))
    a, b = model(tokens), model(changed)
    assert a.shape == (2, 10, 3, 16)
    assert torch.allclose(a[:, :6], b[:, :6], atol=1e-6) and not torch.allclose(a[:, 6:], b[:, 6:])


def test_rotary_tables_extend_past_max_positions_and_are_relative():
    cfg = dict(num_codebooks=3, codebook_size=16, dropout=0.0, **script.PRESETS["tiny"])
    short = script.build_model(script.RVQConfig(max_positions=8, **cfg)).eval()
    long = script.build_model(script.RVQConfig(max_positions=64, **cfg)).eval()
    long.load_state_dict(short.state_dict())  # the tables are not weights: nothing to load, nothing saved
    assert "rope_cos" not in short.state_dict()
    tokens = torch.randint(17, (2, 20, 3))
    assert torch.equal(short(tokens), long(tokens)) and short.rope_cos.shape[0] >= 20
    # Rotary attention sees relative positions only: q.k between positions i and j depends on i - j alone.
    q = torch.randn(1, 1, 1, 16).expand(1, 1, 30, 16)
    cos, sin = long.rope(30)
    rotated = script.rotary(q, cos, sin)[0, 0]
    dots = rotated @ rotated.T
    assert torch.allclose(dots.diagonal(3)[:-1], dots.diagonal(3)[1:], atol=1e-5)


# Loss, weights, guard ----------------------------------------------------------------------------------------------

def test_codebook_losses_known_values():
    targets = torch.randint(16, (2, 5, 3))
    uniform = torch.zeros(2, 5, 3, 16)
    ce, acc = script.codebook_losses(uniform, targets)
    assert torch.allclose(ce, torch.full((3,), math.log(16)))
    perfect = torch.nn.functional.one_hot(targets, 16).float() * 100
    ce, acc = script.codebook_losses(perfect, targets)
    assert ce.max() < 1e-6 and torch.equal(acc, torch.ones(3))
    ce_smooth, _ = script.codebook_losses(perfect, targets, label_smoothing=0.1)
    assert (ce_smooth > 1).all()  # smoothing puts 10% of the target on the other 15 classes


@pytest.mark.parametrize("smoothing", [0.0, 0.05, 0.3])
def test_smoothed_cross_entropy_matches_torch_in_value_and_gradient(smoothing):
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(40, 24, generator=g, dtype=torch.float64)).requires_grad_()
    targets = torch.randint(24, (40,), generator=g)
    targets[::7] = -100
    weights = torch.rand(40, generator=g, dtype=torch.float64)  # a non-uniform upstream gradient
    ours = script.SmoothedCrossEntropy.apply(logits, targets, smoothing)
    (grad,) = torch.autograd.grad((ours * weights).sum(), logits)
    ref = F.cross_entropy(logits, targets, ignore_index=-100, label_smoothing=smoothing, reduction="none")
    (grad_ref,) = torch.autograd.grad((ref * weights).sum(), logits)
    assert torch.allclose(ours, ref, atol=1e-12) and torch.allclose(grad, grad_ref, atol=1e-12)
    assert ours.dtype == torch.float64 and (ours[::7] == 0).all() and (grad[::7] == 0).all()
    # bf16 logits: computed in float32, the gradient returned in bf16
    half = logits.detach().bfloat16().requires_grad_()
    ours = script.SmoothedCrossEntropy.apply(half, targets, smoothing)
    (grad,) = torch.autograd.grad((ours * weights.float()).sum(), half)
    ref = F.cross_entropy(half.double(), targets, ignore_index=-100, label_smoothing=smoothing, reduction="none")
    assert ours.dtype == torch.float32 and grad.dtype == torch.bfloat16
    assert torch.allclose(ours.double(), ref, atol=1e-5)
    (grad_ref,) = torch.autograd.grad((ref * weights).sum(), half)
    assert torch.allclose(grad.double(), grad_ref.double(), atol=4e-3)


def test_the_model_computes_its_own_losses_like_codebook_losses_of_its_logits():
    cfg = script.RVQConfig(num_codebooks=3, codebook_size=16, dropout=0.0, **script.PRESETS["tiny"])
    model = script.build_model(cfg).eval()
    tokens, targets = torch.randint(17, (2, 8, 3)), torch.randint(16, (2, 8, 3))
    targets[0, :2] = -100
    ce, acc = model(tokens, targets, 0.05)
    ce_ref, acc_ref = script.codebook_losses(model(tokens), targets, 0.05)
    assert torch.allclose(ce, ce_ref) and torch.equal(acc, acc_ref)


def test_norm_bias_flag_and_models_saved_before_it(tmp_path):
    args = script.build_parser().parse_args(["--output_dir", "x", "--data", "x", "--model", "tiny"])
    cfg = script.model_config_from_args(args, 3, 16)
    assert not cfg.norm_bias and not any(k.endswith("norm.bias") or "norm1.bias" in k
                                         for k in script.build_model(cfg).state_dict())
    # An export whose config predates the flag had LayerNorm biases: it loads with them.
    old = script.RVQConfig(num_codebooks=3, codebook_size=16, norm_bias=True, **script.PRESETS["tiny"])
    model = script.build_model(old)
    script.export(model, old, {"codec": "test"}, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["model"]["norm_bias"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded, _ = script.load_export(tmp_path)
    assert loaded.cfg.norm_bias and torch.equal(loaded.norm.bias, model.norm.bias)


def test_codebook_weights():
    h = torch.tensor([1.0, 4.0], dtype=torch.float64)
    assert torch.allclose(script.codebook_weights("auto", h, 0.5), torch.tensor([2 / 3, 4 / 3]))
    assert torch.equal(script.codebook_weights("auto", h, 0.0), torch.ones(2))
    assert torch.allclose(script.codebook_weights("1,3", h, 0.5), torch.tensor([0.5, 1.5]))
    with pytest.raises(SystemExit, match="3 weights for 2 codebooks"):
        script.codebook_weights("1,2,3", h, 0.5)


def test_outlier_guard_skips_spikes_and_non_finite_losses():
    guard = script.OutlierGuard(factor=3.0, warmup=3)

    def check(loss, norm):
        ok, reason = guard.check(torch.tensor(loss), torch.tensor(norm))
        return bool(ok), reason()

    assert all(check(1.0, 1.0) == (True, None) for _ in range(3))
    ok, reason = check(10.0, 1.0)
    assert not ok and reason == "loss 10.0000 is over 3x its running average 1.0000"
    assert check(float("nan"), 1.0) == (False, "non-finite loss")
    assert check(2.0, float("inf")) == (False, None)  # non-finite gradients: SkipGuard's wording
    assert check(2.9, 1.0) == (True, None)
    # The average moved on accepted steps only, as an EMA in float64; it survives a checkpoint.
    assert guard.state_dict() == {"average": pytest.approx(0.98 * 1.0 + 0.02 * 2.9, rel=1e-7), "accepted": 4}
    fresh = script.OutlierGuard(factor=3.0, warmup=3)
    fresh.load_state_dict(guard.state_dict())
    assert fresh.state_dict() == guard.state_dict()
    assert script.OutlierGuard(3.0, 3).state_dict() == {"average": None, "accepted": 0}


def test_a_spiked_step_leaves_weights_and_moments_untouched():
    from accelerate import Accelerator

    from common.optim import build_optimizer

    cfg = script.RVQConfig(num_codebooks=3, codebook_size=16, dropout=0.0, **script.PRESETS["tiny"])
    model = script.build_model(cfg)
    optimizer = build_optimizer("adamw", model.parameters(), lr=1e-2)
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    args = script.build_parser().parse_args(["--output_dir", "x", "--data", "x", "--ctx", "8"])
    guard = script.OutlierGuard(factor=2.0, warmup=1)
    window = torch.randint(16, (4, 2 + 9, 3))
    for spike in (1.0, 1.0, 50.0):
        out = script.train_step(window, model, accelerator, args, torch.ones(3), cfg.pad_id)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        moments = [s["exp_avg"].clone() for s in optimizer.state.values()]
        _, reason, stepped = script.guarded_step(accelerator, model, optimizer, out["loss/total"] * spike, guard, args)
    assert torch.is_tensor(stepped) and not stepped and "over 2x" in reason()  # decided without a host sync
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(m, s["exp_avg"]) for m, s in zip(moments, optimizer.state.values()))


# File format -------------------------------------------------------------------------------------------------------

def test_code_files_round_trip_and_are_validated(tmp_path):
    codes = torch.randint(16, (30, 3))
    path = tmp_path / "a.codes.safetensors"
    script.save_codes(path, codes, "my-codec", 8000, 1000.0, 16)
    assert script.read_codes_header(path) == {"codec": "my-codec", "sample_rate": 8000, "frame_rate": 1000.0,
                                              "num_codebooks": 3, "codebook_size": 16, "num_frames": 30}
    assert torch.equal(script.load_codes(path, 5, 9), codes[5:9])
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CorruptSample, match="truncated"):
        script.read_codes_header(path)


def test_mixed_codecs_are_refused_with_both_names(tmp_path):
    make_codes(tmp_path / "a", 1, 20, seed=0, codec="codec-one")
    make_codes(tmp_path / "b", 1, 20, seed=0, codec="codec-two")
    with pytest.raises(SystemExit, match="mixed codecs in one dataset: .*codec-one.*codec-two"):
        script.scan_code_files(script.find_code_files([str(tmp_path)]))


# End to end --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def codec(tmp_path_factory):
    """A tiny DAC (3 codebooks x 16, hop 8, 8 kHz), randomly initialised and saved like a hub checkpoint."""
    from transformers import DacConfig, DacModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("codec") / "tiny-dac"
    DacModel(DacConfig(encoder_hidden_size=4, downsampling_ratios=[2, 4], decoder_hidden_size=8, n_codebooks=3,
                       codebook_size=16, codebook_dim=4, hidden_size=16, sampling_rate=8000)).save_pretrained(path)
    return path


def test_encode_turns_audio_of_any_rate_into_validated_code_files(tmp_path, codec):
    audio = tmp_path / "audio"
    (audio / "sub").mkdir(parents=True)
    t = np.arange(11025) / 22050
    sf.write(audio / "sub" / "stereo.wav", np.stack([np.sin(2 * np.pi * 440 * t)] * 2, 1) * 0.5, 22050)
    sf.write(audio / "low.flac", np.sin(2 * np.pi * 220 * np.arange(4000) / 8000) * 0.3, 8000)
    (audio / "broken.wav").write_text("not audio")
    done = run("train_rvq.py", "encode", "--input", audio, "--output", tmp_path / "codes", "--codec", codec,
               "--chunk_seconds", "0.2", "--batch_size", "2")
    assert "encoded 2 files" in done.stdout and "broken.wav" in done.stderr
    header = script.read_codes_header(tmp_path / "codes" / "sub" / "stereo.wav.codes.safetensors")
    assert header["num_frames"] == math.ceil(4000 / 8) and header["num_codebooks"] == 3  # 0.5 s at 8 kHz, hop 8
    assert header["codec"] == str(codec) and header["frame_rate"] == 1000.0
    assert script.read_codes_header(tmp_path / "codes" / "low.flac.codes.safetensors")["num_frames"] == 500


@pytest.fixture(scope="module")
def trained(tmp_path_factory, codec):
    """60 steps on structured codes, a continuation decoded by the tiny codec at the end."""
    root = tmp_path_factory.mktemp("rvq_run")
    train = make_codes(root / "train", 10, 41, seed=0, codec=str(codec))
    val = make_codes(root / "val", 2, 41, seed=1, codec=str(codec))
    out = root / "out"
    done = run("train_rvq.py", "--data", train, "--validation_data", val, "--output_dir", out, *TINY,
               "--max_train_steps", "60", "--checkpointing_steps", "30", "--validation_steps", "20",
               "--eval_audio_every", "100", "--eval_frames", "12", "--eval_prompt_frames", "4",
               "--cb_weights", "auto")
    return out, train, val, done


def test_training_learns_below_the_unigram_entropy(trained):
    out, train, _, done = trained
    entropy = script.unigram_entropy(script.scan_code_files(script.find_code_files([str(train)]))[0], 3, 16)
    metrics = read_metrics(out / "metrics.jsonl")
    vals = [m["val/loss"] for m in metrics if "val/loss" in m]
    assert len(vals) == 3 and vals[-1] < vals[0] and vals[-1] < 0.8 * float(entropy.mean())
    assert json.loads((out / "run.json").read_text())["script"] == "train_rvq.py"
    losses = [m["loss/total"] for m in metrics if "loss/total" in m]
    assert losses[-1] < 0.6 * losses[0]
    last_val = [m for m in metrics if "val/loss" in m][-1]
    assert all(f"val/ce_cb{k}" in last_val and f"val/acc_cb{k}" in last_val for k in range(3))
    assert "unigram entropy per codebook" in done.stderr
    assert [m for m in metrics if "loss/total" in m][-1]["perf/frames_per_s"] > 0


def test_export_best_and_continuation(trained, tmp_path):
    out, train, _, _ = trained
    model, config = script.load_export(out)
    assert config["codec"]["num_codebooks"] == 3 and config["model"]["pattern"] == "delay"
    ema = Checkpoint(out / "checkpoint-60").tensors("ema")
    exported = load_file(out / "model.safetensors")
    assert all(torch.equal(ema[k].float(), exported[k]) for k in exported)
    best = json.loads((out / "best" / "config.json").read_text())
    assert best["val_loss"] == min(m["val/loss"] for m in read_metrics(out / "metrics.jsonl") if "val/loss" in m)
    # The continuation written during training: 4 prompt frames + 12 generated, decoded by the codec.
    frames = script.load_codes(out / "samples" / "continuation_0000060.codes.safetensors")
    assert frames.shape == (16, 3) and (frames < 16).all()
    audio, rate = sf.read(out / "samples" / "continuation_0000060.wav")
    assert rate == 8000 and len(audio) == 16 * 8
    prompt = next(train.iterdir())
    gen = run("train_rvq.py", "generate", "--model", out, "--prompt", prompt, "--prompt_frames", "8", "--frames",
              "10", "--ctx", "16", "--output", tmp_path / "song.wav")
    assert "wrote" in gen.stdout and sf.read(tmp_path / "song.wav")[0].shape == (18 * 8,)
    again = script.load_codes(tmp_path / "song.codes.safetensors")
    assert torch.equal(again[:8], script.load_codes(prompt, 0, 8))


def test_doctor_reports_health_and_finds_a_planted_nan(trained, tmp_path):
    out = trained[0]
    healthy = run("train_rvq.py", "doctor", out)
    assert "no problems found" in healthy.stdout and "EMA-raw distance" in healthy.stdout
    assert "loss history" in healthy.stdout and "step 60" in healthy.stdout
    shutil.copytree(out / "checkpoint-60", tmp_path / "checkpoint-60")
    path = tmp_path / "checkpoint-60" / "model.safetensors"
    tensors = load_file(path)
    name = sorted(tensors)[3]
    tensors[name][0] = float("nan")
    save_file(tensors, path)
    sick = run("train_rvq.py", "doctor", tmp_path / "checkpoint-60", check=False)
    assert sick.returncode == 1 and f"NON-FINITE: {name}" in sick.stdout


def test_archives_and_a_longer_context_on_resume(trained, tmp_path):
    _, train, val, _ = trained
    args = ["--data", train, "--validation_data", val, "--output_dir", tmp_path, *TINY, "--checkpointing_steps",
            "100", "--validation_steps", "100", "--eval_audio_every", "0", "--archive_every", "1",
            "--keep_archived", "2"]
    run("train_rvq.py", *args, "--num_train_epochs", "3")  # 10 steps per epoch
    archived = sorted(p.name.split("-")[1] for p in (tmp_path / "archive").iterdir())
    assert archived == ["20", "30"]
    # The seed's curriculum: a longer context for the same model (rotary positions), the data restarting its epoch.
    longer = run("train_rvq.py", *args, "--max_train_steps", "36", "--ctx", "24", "--archive_every", "0")
    assert "resuming with --ctx 24 --step 8 (the checkpoint was trained with --ctx 16 --step 8)" in longer.stderr
    assert "checkpoint-30 at step 30" in longer.stderr and "30 windows of 24 frames" in longer.stderr
    steps = [m["step"] for m in read_metrics(tmp_path / "metrics.jsonl") if "loss/total" in m]
    assert steps == list(range(5, 31, 5)) + [35, 36]


@pytest.mark.parametrize("extra, message", [
    (["--ctx", "64"], "--ctx 64 is larger than every training file (the longest has 41 frames"),
    (["--model", "huge"], "argument --model: invalid choice: 'huge'"),
    (["--cb_weights", "1,x"], "--cb_weights 1,x: use uniform, auto or comma-separated numbers"),
    (["--heads", "3"], "--d_model 32 must split into --heads 3 heads of even size"),
])
def test_bad_input_stops_with_one_line(tmp_path, extra, message):
    train = make_codes(tmp_path / "train", 3, 41, seed=0)
    done = run("train_rvq.py", "--data", train, "--output_dir", tmp_path / "out", *TINY, *extra, check=False)
    assert done.returncode != 0 and message in done.stderr
    assert not (tmp_path / "out" / "checkpoint-1").exists()


def test_no_code_files_and_a_vocabulary_change_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    done = run("train_rvq.py", "--data", tmp_path / "empty", "--output_dir", tmp_path / "out", *TINY, check=False)
    assert done.returncode == 2 and "no code files (*.codes.safetensors)" in done.stderr
    train = make_codes(tmp_path / "train", 3, 41, seed=0)
    run("train_rvq.py", "--data", train, "--output_dir", tmp_path / "out", *TINY, "--max_train_steps", "2",
        "--eval_audio_every", "0")
    bigger = tmp_path / "bigger"
    bigger.mkdir()
    for i in range(3):
        script.save_codes(bigger / f"{i}.codes.safetensors", torch.randint(32, (41, RVQ_CODEBOOKS)), "test-codec",
                          8000, 1000.0, 32)
    refused = run("train_rvq.py", "--data", bigger, "--output_dir", tmp_path / "out", *TINY, "--max_train_steps",
                  "4", check=False)
    assert refused.returncode != 0 and f"the codes are 3 x 32 but the checkpoint's model predicts 3 x {RVQ_VOCAB}" \
        in refused.stderr
