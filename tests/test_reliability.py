"""What a week-long unattended run can count on, tested for every training script (see tests/scripts.py).

Each test runs the script as users do (a subprocess; `accelerate launch` with two gloo processes where it says so)
on tiny generated data, with faults injected by tests/fault_runner.py.
"""

import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from common.checkpoint import Checkpoint, checkpoint_dirs
from common.training import read_metrics
from helpers import ROOT, run, start
from scripts import SCRIPTS

pytestmark = pytest.mark.parametrize("spec", SCRIPTS, ids=[s.name for s in SCRIPTS])

# 40 training samples, batch 4, accumulation 2: 10 micro-batches and 5 optimizer steps per epoch; 15 steps = 3 epochs.
BATCH, ACCUMULATION, STEPS, PER_EPOCH = 4, 2, 15, 5
BATCH_NORM_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    cache = {}

    def make(spec):
        if spec.name not in cache:
            cache[spec.name] = spec.make_data(tmp_path_factory.mktemp(spec.name))
        return cache[spec.name]

    return make


def base_args(spec, data, out, steps=STEPS, accumulation=ACCUMULATION, workers=0, gan_start=7, **overrides):
    flags = {"--train_batch_size": BATCH, "--gradient_accumulation_steps": accumulation, "--max_train_steps": steps,
             "--checkpointing_steps": PER_EPOCH, "--validation_steps": 1000, "--dataloader_num_workers": workers,
             "--lr_scheduler": "cosine", **{f"--{k}": v for k, v in overrides.items()}}
    return [*data(spec), "--output_dir", out, *spec.tiny, *spec.gan(gan_start),
            *[str(x) for kv in flags.items() for x in kv]]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
    """Uninterrupted runs, one per script: 15 steps (3 epochs) with accumulation 2, shuffling, two loader workers,
    the GAN from step 7 with R1 every 3 steps, and validation every 4 steps (which must not disturb training)."""
    runs = {}

    def get(spec):
        if spec.name not in runs:
            out = tmp_path_factory.mktemp(f"{spec.name}_reference")
            run(spec.script, *base_args(spec, data, out, workers=2, validation_steps=4))
            runs[spec.name] = out
        return runs[spec.name]

    return get


def losses(out):
    return [(m["step"], m["loss/total"], m["train/epoch"]) for m in read_metrics(Path(out) / "metrics.jsonl")
            if "loss/total" in m]


def assert_same_checkpoints(spec, a, b):
    """Weights, EMA, optimizer moments and schedules identical, bit for bit."""
    ca, cb = Checkpoint(a), Checkpoint(b)
    for name in spec.weights:
        ta, tb = ca.tensors(name), cb.tensors(name)
        assert ta.keys() == tb.keys()
        assert all(torch.equal(ta[k], tb[k]) for k in ta), f"{name} differs"
    for name in spec.optimizers:
        sa, sb = ca.object(f"optimizer_{name}"), cb.object(f"optimizer_{name}")
        assert sa["state"].keys() == sb["state"].keys()
        for i in sa["state"]:
            assert all(torch.equal(torch.as_tensor(sa["state"][i][k]), torch.as_tensor(sb["state"][i][k]))
                       for k in sa["state"][i]), f"optimizer_{name} state differs"
        assert [g["lr"] for g in sa["param_groups"]] == [g["lr"] for g in sb["param_groups"]]
        assert ca.object(f"scheduler_{name}") == cb.object(f"scheduler_{name}")
    sa, sb = ca.json("training_state"), cb.json("training_state")
    assert (sa["step"], sa["epoch"], sa["samples_in_epoch"], sa["ema_updates"]) == \
        (sb["step"], sb["epoch"], sb["samples_in_epoch"], sb["ema_updates"])


def assert_consistent(spec, path):
    """Every part of one checkpoint comes from the same step: the manifest, the training state, each schedule
    and the number of updates in each optimizer's state agree."""
    ck = Checkpoint(path)
    state = ck.json("training_state")
    assert state["step"] == ck.step
    for name in spec.optimizers:
        sched = ck.object(f"scheduler_{name}")
        steps = {int(torch.as_tensor(s["step"])) for s in ck.object(f"optimizer_{name}")["state"].values()}
        assert steps <= {sched["last_epoch"]}, (name, steps, sched["last_epoch"])
    assert state["ema_updates"] == ck.object(f"scheduler_{spec.optimizers[0]}")["last_epoch"]


# 1 --------------------------------------------------------------------------------------------------------------

def test_kill_while_checkpointing_resumes_from_the_last_complete_one(spec, data, tmp_path):
    args = base_args(spec, data, tmp_path, steps=12, checkpointing_steps=4)
    proc = start(spec.script, *args, faults=["--slow_checkpoint", "8"])
    deadline = time.time() + 300
    while not (tmp_path / ".checkpoint-8.tmp").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (tmp_path / ".checkpoint-8.tmp").exists() and not (tmp_path / "checkpoint-8").exists()
    resumed = run(spec.script, *args, "--resume_from_checkpoint", "latest")
    assert re.search(r"resumed from \S*checkpoint-4 at step 4", resumed.stderr)
    assert_consistent(spec, tmp_path / "checkpoint-4")
    assert [s for s, _ in checkpoint_dirs(tmp_path)] == [4, 8, 12]
    assert not list(tmp_path.glob(".checkpoint-*"))


# 2 --------------------------------------------------------------------------------------------------------------

def test_retention_never_leaves_a_gap(spec, data, tmp_path):
    """--checkpoints_total_limit 1 and a full disk while writing checkpoint-8: checkpoint-4 survives and loads."""
    args = base_args(spec, data, tmp_path, steps=12, checkpointing_steps=4, checkpoints_total_limit=1)
    crashed = run(spec.script, *args, faults=["--fail_checkpoint", "8"], check=False)
    assert crashed.returncode != 0 and "No space left on device" in crashed.stderr
    assert [s for s, _ in checkpoint_dirs(tmp_path)] == [4]
    assert_consistent(spec, tmp_path / "checkpoint-4")
    run(spec.script, *args, "--resume_from_checkpoint", "latest")
    assert [s for s, _ in checkpoint_dirs(tmp_path)] == [12]


# 3 --------------------------------------------------------------------------------------------------------------

def test_resume_in_the_middle_of_an_accumulation_window_is_exact(spec, data, reference, tmp_path):
    """Checkpoint at step 3 (mid-epoch); killed at the 7th micro-batch, the first of step 4's window."""
    args = base_args(spec, data, tmp_path, workers=2, checkpointing_steps=3)
    crashed = run(spec.script, *args, faults=["--exit_at_backward", "7"], check=False)
    assert crashed.returncode == 17
    run(spec.script, *args, "--resume_from_checkpoint", "latest")
    ref = reference(spec)
    assert losses(tmp_path) == losses(ref) and len(losses(ref)) == STEPS
    assert_same_checkpoints(spec, ref / f"checkpoint-{STEPS}", tmp_path / f"checkpoint-{STEPS}")


def test_resuming_twice_at_epoch_boundaries_is_exact(spec, data, reference, tmp_path):
    """Killed right after the checkpoints at the ends of epochs 1 and 2; the step and epoch counts stay right."""
    args = base_args(spec, data, tmp_path, workers=2)
    for boundary in (PER_EPOCH, 2 * PER_EPOCH):
        resume = ["--resume_from_checkpoint", "latest"] if boundary > PER_EPOCH else []
        crashed = run(spec.script, *args, *resume, faults=["--exit_after_checkpoint", boundary], check=False)
        assert crashed.returncode == 17
        assert Checkpoint(tmp_path / f"checkpoint-{boundary}").json("training_state")["epoch"] == boundary // PER_EPOCH - 1
    run(spec.script, *args, "--resume_from_checkpoint", "latest")
    ref = reference(spec)
    assert losses(tmp_path) == losses(ref)
    assert [e for _, _, e in losses(tmp_path)] == [(s - 1) // PER_EPOCH for s in range(1, STEPS + 1)]
    assert_same_checkpoints(spec, ref / f"checkpoint-{STEPS}", tmp_path / f"checkpoint-{STEPS}")
    state = Checkpoint(tmp_path / f"checkpoint-{STEPS}").json("training_state")
    assert state["ema_updates"] == STEPS  # EMA: once per optimizer step, not per micro-batch


@pytest.mark.slow
def test_resume_with_two_processes_is_exact(spec, data, tmp_path):
    """...with wandb (offline) logging one run continued across the resume; and a main process that is slow at
    every barrier (its validations, samples and checkpoint writing) holds the others up without a deadlock or a
    change of result."""
    steps = 8
    common = dict(steps=steps, accumulation=1, checkpointing_steps=4, validation_steps=4)
    slow = run(spec.script, *base_args(spec, data, tmp_path / "a", **common), faults=["--main_delay", "0.5"],
               launcher="accelerate", processes=2)
    assert "process 0 is 0.5 s late at every barrier" in slow.stderr
    b = tmp_path / "b"
    args = base_args(spec, data, b, **common, report_to="wandb")
    crashed = run(spec.script, *args, faults=["--exit_after_checkpoint", "4"], launcher="accelerate", processes=2,
                  check=False)
    assert crashed.returncode != 0
    assert {"rng_state_0.pt", "rng_state_1.pt"} <= Checkpoint(b / "checkpoint-4").files
    run(spec.script, *args, "--resume_from_checkpoint", "latest", launcher="accelerate", processes=2)
    # One metrics file, written by the main process only, with every step once.
    assert losses(tmp_path / "a") == losses(b) and len(losses(tmp_path / "a")) == steps
    assert_same_checkpoints(spec, tmp_path / "a" / f"checkpoint-{steps}", b / f"checkpoint-{steps}")
    # wandb: one run, continued on resume, never one per process; its steps never go back.
    run_id = Checkpoint(b / f"checkpoint-{steps}").json("training_state")["run_id"]
    assert Checkpoint(b / "checkpoint-4").json("training_state")["run_id"] == run_id
    runs = sorted((b / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(p.name.endswith(run_id) for p in runs)  # one per launch, never one per process
    logs = "".join(p.read_text(errors="ignore") for p in (b / "wandb").rglob("*.log"))
    assert "less than current step" not in logs and "monotonically" not in logs


def test_sigterm_checkpoints_exits_cleanly_and_resumes_exactly(spec, data, reference, tmp_path):
    args = base_args(spec, data, tmp_path, workers=2, checkpointing_steps=1000)
    proc = start(spec.script, *args, faults=["--step_delay", "0.3"])
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (metrics.exists() and len(losses(tmp_path)) >= 3):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    stopped = [s for s, _ in checkpoint_dirs(tmp_path)]
    assert len(stopped) == 1 and 3 <= stopped[0] < STEPS and f"stopped at step {stopped[0]}" in out
    assert not list(tmp_path.glob(".checkpoint-*"))
    run(spec.script, *args, "--resume_from_checkpoint", "latest")
    ref = reference(spec)
    assert losses(tmp_path) == losses(ref)
    assert_same_checkpoints(spec, ref / f"checkpoint-{STEPS}", tmp_path / f"checkpoint-{STEPS}")


# 4 --------------------------------------------------------------------------------------------------------------

def test_changed_settings_on_resume_are_stated_and_model_changes_refused(spec, data, reference, tmp_path):
    shutil.copytree(reference(spec) / f"checkpoint-{PER_EPOCH}", tmp_path / f"checkpoint-{PER_EPOCH}")
    args = base_args(spec, data, tmp_path, steps=PER_EPOCH + 1, accumulation=1)
    resumed = run(spec.script, *args, "--train_batch_size", "2", "--resume_from_checkpoint", "latest")
    for flag, now, before in (("train_batch_size", 2, 4), ("gradient_accumulation_steps", 1, 2),
                              ("max_train_steps", PER_EPOCH + 1, STEPS)):
        assert f"resuming with --{flag} {now} (the checkpoint was trained with {before})" in resumed.stderr

    shutil.rmtree(tmp_path / f"checkpoint-{PER_EPOCH + 1}")
    refused = run(spec.script, *args, *spec.bigger_model, "--resume_from_checkpoint", "latest", check=False)
    assert refused.returncode != 0
    assert "the model differs from the checkpoint's" in refused.stderr and "--allow_model_change" in refused.stderr
    allowed = run(spec.script, *args, *spec.bigger_model, "--resume_from_checkpoint", "latest", "--allow_model_change")
    assert "start fresh" in allowed.stderr and (tmp_path / f"checkpoint-{PER_EPOCH + 1}").exists()


# 5 --------------------------------------------------------------------------------------------------------------

def test_accumulation_matches_the_big_batch(spec):
    """k micro-batches of b == one batch of k*b (float64), with gradient clipping active; the discriminator does
    not move before the window ends, and gets exactly one gradient per micro-batch: its own, never the generator's."""
    torch.manual_seed(0)
    batch = spec.probe_batch()
    big, _, _, big_metrics = spec.accumulation_probe([batch], 1, 1e-3)
    small, history, grad_count, metrics = spec.accumulation_probe(list(batch.split(2)), 4, 1e-3)
    assert big_metrics[-1][spec.grad_norm_key] > 1e-3  # clipping was active
    for k in big:
        assert torch.allclose(big[k], small[k], rtol=1e-9, atol=1e-12), k
    if not history:  # no discriminator
        return
    initial = history[0]
    for after in history[1:-1]:  # after micro-batches 1..3 of the window: D has not moved
        assert all(torch.equal(after[k], initial[k]) for k in initial)
    assert not all(torch.equal(history[-1][k], initial[k]) for k in initial)  # the window's end steps it
    assert set(grad_count.values()) == {4}


@pytest.fixture(scope="module")
def ddp_probes(tmp_path_factory):
    """tests/ddp_probe.py: every script's probe step run once by two gloo processes under DDP."""
    out = tmp_path_factory.mktemp("ddp_probes")
    run("tests/ddp_probe.py", out, launcher="accelerate", processes=2, timeout=600)
    return out


def test_two_processes_step_like_one_process_with_the_whole_batch(spec, ddp_probes):
    """2 processes x batch 4 (and 2 x 2 micro-batches of 2) == 1 process x batch 8 (float64): both optimizers of
    the GAN scripts, clipping active, both processes left with identical weights, and no unused-parameter error
    from DDP (which runs without find_unused_parameters)."""
    torch.manual_seed(0)
    big, _, _, big_metrics = spec.accumulation_probe([spec.probe_batch()], 1, 1e-3)
    for accumulation in (1, 2):
        ranks = [torch.load(ddp_probes / f"{spec.name}-acc{accumulation}-rank{r}.pt") for r in (0, 1)]
        assert all(torch.equal(ranks[0]["weights"][k], ranks[1]["weights"][k]) for k in big)
        for k in big:
            assert torch.allclose(big[k], ranks[0]["weights"][k], rtol=1e-9, atol=1e-12), (accumulation, k)
        assert torch.allclose(ranks[0]["grad_norm"], torch.as_tensor(big_metrics[-1][spec.grad_norm_key]),
                              rtol=1e-12)
        assert float(ranks[0]["grad_norm"]) > 1e-3  # clipping was active


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus_train_with_nccl(spec, data, tmp_path):
    """On two GPUs (DDP over NCCL, NVLink multicast off): six steps with the GAN on from the first (BatchNorm
    discriminators called twice before a backward) complete, checkpointed with finite weights."""
    args = base_args(spec, data, tmp_path, steps=6, accumulation=1, gan_start=0, checkpointing_steps=6)
    run(spec.script, *args, launcher="accelerate", processes=2, timeout=900, ACCELERATE_USE_CPU="false",
        NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1")
    checkpoint = Checkpoint(tmp_path / "checkpoint-6")
    for name in spec.weights:
        assert all(torch.isfinite(t).all() for t in checkpoint.tensors(name).values()), name


# 6 --------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_nan_on_one_process_is_skipped_everywhere_and_a_diverged_run_stops(spec, data, tmp_path):
    """Process 1's loss is NaN at step 4, then at every step from 7 on (with --max_consecutive_skips 3)."""
    args = base_args(spec, data, tmp_path, steps=12, accumulation=1, checkpointing_steps=1, max_consecutive_skips=3,
                     gan_start=2)
    stopped = run(spec.script, *args, faults=["--nan_at_step", "4", "--nan_from_step", "7", "--nan_rank", "1"],
                  launcher="accelerate", processes=2, check=False, timeout=300)
    assert "NaN loss at micro-step 4 on process 1" in stopped.stderr
    assert re.search(r"step 4: non-finite optimizer gradients, update skipped", stopped.stderr)
    skipped = {m["step"]: m["train/skipped_steps"] for m in read_metrics(tmp_path / "metrics.jsonl")
               if "train/skipped_steps" in m}
    assert skipped[3] == 0 and skipped[4] == skipped[6] == 1
    # Step 4 changed nothing: weights, EMA and optimizer moments are those of step 3. (Batch-norm statistics are
    # not weights: the forward pass updates them before anyone knows the loss is non-finite.)
    a, b = Checkpoint(tmp_path / "checkpoint-3"), Checkpoint(tmp_path / "checkpoint-4")
    for name in spec.weights:
        ta, tb = a.tensors(name), b.tensors(name)
        assert all(torch.equal(ta[k], tb[k]) for k in ta if not k.endswith(BATCH_NORM_STATISTICS)), name
    for name in spec.optimizers:
        sa, sb = a.object(f"optimizer_{name}")["state"], b.object(f"optimizer_{name}")["state"]
        assert all(torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k])) for i in sa for k in sa[i])
    # Steps 7, 8 and 9 skipped: the run stops, every checkpoint it left finite.
    assert stopped.returncode != 0
    assert "stopping: 3 optimizer steps in a row had non-finite gradients" in stopped.stderr
    steps = [s for s, _ in checkpoint_dirs(tmp_path)]
    assert 6 <= max(steps) <= 9
    for _, path in checkpoint_dirs(tmp_path):
        for name in spec.weights:
            assert all(torch.isfinite(t.float()).all() for t in Checkpoint(path).tensors(name).values())


# 7 --------------------------------------------------------------------------------------------------------------

def test_corrupt_inputs_are_skipped_counted_and_bounded(spec, data, tmp_path):
    folder = tmp_path / "data"
    flags = data(spec)
    train_flag = flags.index(spec.data_flag) + 1
    shutil.copytree(flags[train_flag], folder)
    expected = spec.corrupt(folder)
    flags = [*flags[:train_flag], folder, *flags[train_flag + 1:]]
    args = [*flags, "--output_dir", tmp_path / "out", *spec.tiny, "--train_batch_size", "4", "--num_train_epochs", "3",
            "--checkpointing_steps", "1000", "--validation_steps", "1000"]
    done = run(spec.script, *args, "--max_corrupt_fraction", "0.5")
    for name, reason in expected.items():
        assert f"skipped corrupt sample {folder / name}: {reason}" in done.stderr, name
    assert done.stderr.count("skipped corrupt sample") == len(expected)  # each path logged once
    skipped = [m["data/skipped"] for m in read_metrics(tmp_path / "out" / "metrics.jsonl") if "data/skipped" in m]
    assert skipped[-1] >= len(expected)
    stopped = run(spec.script, *args, "--max_corrupt_fraction", "0.01", check=False)
    assert stopped.returncode != 0
    message = stopped.stderr[stopped.stderr.index("stopping:"):]
    assert "over --max_corrupt_fraction 0.01" in message and any(name in message for name in expected)
    assert re.search(r"stopping: \d+ of \d+ loaded samples were corrupt \(", message)


# 9 --------------------------------------------------------------------------------------------------------------

def test_a_hung_data_loader_is_reported_not_waited_on(spec, data, tmp_path):
    args = base_args(spec, data, tmp_path, steps=12, accumulation=1, stall_timeout=6)
    started = time.time()
    hung = run(spec.script, *args, faults=["--hang_data_at", "3"], check=False, timeout=240)
    assert hung.returncode == 3 and time.time() - started < 200
    assert "no training progress for" in hung.stderr and "Stacks of every thread follow" in hung.stderr
    assert "hanging_batches" in hung.stderr  # the stuck frame is in the dump


@pytest.mark.slow
def test_a_stuck_collective_is_reported_not_waited_on(spec, data, tmp_path):
    args = base_args(spec, data, tmp_path, steps=12, accumulation=1, stall_timeout=8)
    hung = run(spec.script, *args, faults=["--hang_at_step", "3", "--hang_rank", "1"], launcher="accelerate",
               processes=2, check=False, timeout=240)
    assert hung.returncode != 0
    assert "process 1 hangs at micro-step 3" in hung.stderr and "no training progress for" in hung.stderr


def test_an_error_on_every_process_ends_the_launch_even_if_teardown_would_block(spec, data, tmp_path):
    """Both processes fail at the same step and their interpreter teardown would wait for ever (a process group's
    destructor waiting on failing peers): each still exits with the error, and so does the launch."""
    args = base_args(spec, data, tmp_path, steps=12, accumulation=1)
    started = time.time()
    failed = run(spec.script, *args, faults=["--raise_at_step", "2", "--block_teardown"], launcher="accelerate",
                 processes=2, check=False, timeout=240)
    assert failed.returncode != 0 and time.time() - started < 200
    for rank in (0, 1):
        assert f"RuntimeError: injected error at micro-step 2 on process {rank}" in failed.stderr
    assert "teardown blocks" not in failed.stderr


# 10 -------------------------------------------------------------------------------------------------------------

# (wandb offline, one run continued on resume: test_resume_with_two_processes_is_exact.)

# 11 -------------------------------------------------------------------------------------------------------------
# (EMA once per optimizer step: test_resuming_twice_at_epoch_boundaries_is_exact. Swapping the EMA weights in for
# validation restores the training weights: the reference run validates every 4 steps, the resumed runs never do,
# and their losses agree bit for bit.)

@pytest.mark.slow
def test_a_compiled_model_saves_plain_keys_that_the_eager_model_resumes_from(spec, data, tmp_path):
    args = base_args(spec, data, tmp_path, steps=3, accumulation=1, checkpointing_steps=3)
    # torch.compile's graphs run through AOT autograd without Inductor's code generation, which takes 47-110 s a
    # script on 2 cores: the keys and the resume depend on the compiled wrapper, not on the generated kernels
    # (Inductor itself runs in the GPU tests of the compiled steps, against eager). The long stall timeout stays
    # for a torch without TORCH_COMPILE_OVERRIDE_BACKENDS, where Inductor compiles as usual.
    run(spec.script, *args, "--compile", *spec.compile_flags, "--stall_timeout", "1200",
        TORCH_COMPILE_OVERRIDE_BACKENDS=">=0:aot_eager")
    compiled = Checkpoint(tmp_path / "checkpoint-3")
    for name in spec.weights:
        keys = compiled.tensors(name).keys()
        assert keys and not any("_orig_mod" in k for k in keys), name
    eager = run(spec.script, *base_args(spec, data, tmp_path, steps=4, accumulation=1, checkpointing_steps=4),
                "--resume_from_checkpoint", "latest")
    assert "checkpoint-3 at step 3" in eager.stderr and "start fresh" not in eager.stderr
    assert [s for s, _, _ in losses(tmp_path)] == [1, 2, 3, 4]


# Also ------------------------------------------------------------------------------------------------------------

def test_nothing_loads_pickles_or_unsafe_yaml(spec):
    for path in [ROOT / spec.script, *sorted((ROOT / "common").glob("*.py"))]:
        text = path.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path.name}: {call}"
        assert "yaml.load(" not in text and "pickle.load" not in text, path.name


def test_a_checkpoint_with_a_stray_or_missing_file_is_refused(spec, data, reference, tmp_path):
    ckpt = tmp_path / f"checkpoint-{PER_EPOCH}"
    shutil.copytree(reference(spec) / ckpt.name, ckpt)
    (ckpt / "notes.txt").write_text("not part of the checkpoint")
    args = base_args(spec, data, tmp_path, steps=PER_EPOCH + 1)
    refused = run(spec.script, *args, "--resume_from_checkpoint", ckpt, check=False)
    assert refused.returncode != 0 and f"{ckpt}: unexpected file notes.txt" in refused.stderr
    (ckpt / "notes.txt").unlink()
    (ckpt / f"optimizer_{spec.optimizers[0]}.pt").unlink()
    refused = run(spec.script, *args, "--resume_from_checkpoint", ckpt, check=False)
    assert refused.returncode != 0 and f"missing file optimizer_{spec.optimizers[0]}.pt" in refused.stderr
