"""Atomic, self-describing checkpoints: `output_dir/checkpoint-<step>/`.

A checkpoint is written into a hidden temporary folder; its manifest `complete.json` (every file and its size) is
written last, and only then is the folder renamed into place. A run killed at any moment leaves either a complete
checkpoint or a temporary folder that is ignored and later removed, never a half-written `checkpoint-<step>`.
Older checkpoints are deleted only after the new one is complete.

Files: model weights as safetensors; optimizer/scheduler states with torch.save (read back with
`weights_only=True`); the training state as JSON; RNG states, one file per process.

The second half holds the parts of saving and resuming that every training script shares (the training state
besides the models, and the decision to refuse or adapt a changed model); each script's `save_checkpoint` and
`load_checkpoint` name its own models, model configuration and extra state and call these for the rest.
"""

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from common.training import all_finite, rng_state, set_rng_state

logger = logging.getLogger(__name__)

MANIFEST = "complete.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the folder and the problem."""


def checkpoint_dirs(output_dir):
    """Complete checkpoints in `output_dir`, oldest first, as (step, Path)."""
    found = []
    root = Path(output_dir)
    if not root.is_dir():
        return found
    for path in root.iterdir():
        m = _NAME.match(path.name)
        if m and path.is_dir() and (path / MANIFEST).is_file():
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir):
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1][1] if dirs else None


def resolve_resume(resume_from_checkpoint, output_dir):
    """`latest` -> the newest complete checkpoint (or None when there is none); a path -> that folder, checked."""
    if not resume_from_checkpoint or resume_from_checkpoint == "none":
        return None
    if resume_from_checkpoint == "latest":
        return latest_checkpoint(output_dir)
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        raise CheckpointError(f"--resume_from_checkpoint {path}: no such folder")
    if not (path / MANIFEST).is_file():
        raise CheckpointError(f"--resume_from_checkpoint {path}: incomplete checkpoint (no {MANIFEST}; "
                              f"it was interrupted while being written)")
    return path


def open_resume(accelerator, resume_from_checkpoint, output_dir):
    """--resume_from_checkpoint opened and checked before anything is built, or None for a new run. A folder that
    cannot be resumed from stops the run with one line saying why, rather than a traceback after minutes of setup."""
    try:
        resume = resolve_resume(resume_from_checkpoint, output_dir)
        ckpt = Checkpoint(resume) if resume else None
    except CheckpointError as err:
        raise SystemExit(str(err)) from None
    if resume_from_checkpoint == "latest" and ckpt is None and accelerator.is_main_process:
        logger.info(f"no checkpoint in {output_dir}: starting a new run")
    return ckpt


class CheckpointWriter:
    """Collects the files of one checkpoint in a temporary folder, then publishes it atomically.

    Every process calls `add_rank_object` for its own per-process state; the main process adds the rest. Call
    `commit()` on the main process after a barrier, so all processes' files are in place.
    """

    def __init__(self, output_dir, step):
        self.output_dir = Path(output_dir)
        self.step = step
        self.final = self.output_dir / f"checkpoint-{step}"
        self.tmp = self.output_dir / f".checkpoint-{step}.tmp"

    def start(self):
        """Main process only: a fresh temporary folder (a leftover one from a killed run is discarded)."""
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)

    def add_tensors(self, name, tensors):
        """A flat dict of tensors (e.g. a model or EMA state dict) as `<name>.safetensors`."""
        # clone() breaks any storage sharing (tied weights), which safetensors refuses.
        _write(self.tmp / f"{name}.safetensors",
               lambda p: save_file({k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}, p))

    def add_object(self, name, obj):
        """Nested dicts/lists of tensors and plain values (optimizer, scheduler states) as `<name>.pt`."""
        _write(self.tmp / f"{name}.pt", lambda p: torch.save(obj, p))

    def add_json(self, name, obj):
        _write(self.tmp / f"{name}.json", lambda p: Path(p).write_text(json.dumps(obj, indent=2, default=str)))

    def add_rank_object(self, name, obj, rank):
        self.add_object(f"{name}_{rank}", obj)

    def commit(self, total_limit=None):
        """Write the manifest last, rename into place, then apply retention. Returns the checkpoint folder."""
        files = {p.name: p.stat().st_size for p in sorted(self.tmp.iterdir())}
        _write(self.tmp / MANIFEST, lambda p: Path(p).write_text(json.dumps({"step": self.step, "files": files})))
        _fsync_dir(self.tmp)
        if self.final.exists():  # re-saving a step (e.g. after a resume): swap, never leave a gap
            trash = self.output_dir / f".checkpoint-{self.step}.old"
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(self.final, trash)
            os.replace(self.tmp, self.final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(self.tmp, self.final)
        _fsync_dir(self.output_dir)
        prune(self.output_dir, total_limit, keep=self.final)
        return self.final


def prune(output_dir, total_limit, keep=None):
    """Delete the oldest complete checkpoints beyond `total_limit`, and leftover temporary folders."""
    root = Path(output_dir)
    for path in root.glob(".checkpoint-*.tmp"):
        shutil.rmtree(path, ignore_errors=True)
    if not total_limit:
        return
    dirs = [p for _, p in checkpoint_dirs(root) if p != keep]
    excess = len(dirs) + (1 if keep is not None else 0) - total_limit
    for path in dirs[:max(0, excess)]:
        shutil.rmtree(path, ignore_errors=True)


def _write(path, writer):
    writer(str(path))
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class Checkpoint:
    """A complete checkpoint opened for reading; every file is checked against the manifest first."""

    def __init__(self, path):
        self.path = Path(path)
        manifest = self.path / MANIFEST
        if not manifest.is_file():
            raise CheckpointError(f"{self.path}: incomplete checkpoint (no {MANIFEST})")
        try:
            meta = json.loads(manifest.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{manifest}: unreadable ({err})") from err
        self.step = int(meta["step"])
        expected = meta["files"]
        present = {p.name for p in self.path.iterdir()} - {MANIFEST}
        for name in sorted(set(expected) - present):
            raise CheckpointError(f"{self.path}: missing file {name}")
        for name in sorted(present - set(expected)):
            raise CheckpointError(f"{self.path}: unexpected file {name} (not in {MANIFEST})")
        for name, size in expected.items():
            if (self.path / name).stat().st_size != size:
                raise CheckpointError(f"{self.path}: {name} has {(self.path / name).stat().st_size} bytes, "
                                      f"{MANIFEST} says {size}")
        self.files = set(expected)

    def has(self, name):
        return any(f.startswith(name + ".") for f in self.files)

    def tensors(self, name, device="cpu"):
        tensors = load_file(str(self.path / f"{name}.safetensors"))
        return {k: v.to(device) for k, v in tensors.items()} if str(device) != "cpu" else tensors

    def object(self, name):
        return torch.load(self.path / f"{name}.pt", map_location="cpu", weights_only=True)

    def json(self, name):
        return json.loads((self.path / f"{name}.json").read_text())

    def rank_object(self, name, rank):
        """Per-process state; None when this checkpoint was written by fewer processes."""
        if f"{name}_{rank}.pt" not in self.files:
            return None
        return self.object(f"{name}_{rank}")


def wait_for(path, timeout=600.0):
    """Used by non-main processes on shared filesystems that lag: wait until `path` exists."""
    start = time.monotonic()
    while not Path(path).exists():
        if time.monotonic() - start > timeout:
            raise CheckpointError(f"{path} did not appear within {timeout:.0f} s")
        time.sleep(0.1)


def state_mismatches(model, tensors):
    """How a saved state dict differs from a model's, as readable strings (empty when it loads as is)."""
    own = model.state_dict()
    out = [f"missing {k}" for k in own if k not in tensors]
    out += [f"unexpected {k}" for k in tensors if k not in own]
    out += [f"{k}: {tuple(tensors[k].shape)} in the checkpoint, {tuple(v.shape)} in the model"
            for k, v in own.items() if k in tensors and tensors[k].shape != v.shape]
    return out


def load_matching(model, tensors):
    """Load the tensors whose name and shape match; the rest of `model` keeps its fresh initialisation.
    Returns the names that were not loaded."""
    own = model.state_dict()
    matching = {k: v for k, v in tensors.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(matching, strict=False)
    return sorted(set(own) - set(matching))



# ---------------------------------------------------------------------------------------------------------------
# Saving and resuming a training run: the parts every script shares. `save_training_parts` and
# `restore_training_parts` are counterparts, as are `training_state` and the `state` a script reads back.


def refuse_non_finite(step, parts, hint=""):
    """Stop the run rather than checkpoint non-finite weights, so the newest checkpoint is always one to resume
    from. `parts`: name -> a module or a dict of tensors (an EMA's shadow); None entries are passed over."""
    for name, part in parts.items():
        if part is None:
            continue
        tensors = list(part.values()) if isinstance(part, dict) else list(part.parameters())
        if not all_finite(tensors):
            raise SystemExit(f"stopping: the {name} weights hold non-finite values at step {step}; not "
                             f"checkpointing them (the previous checkpoint is intact{hint})")


def start_checkpoint(accelerator, output_dir, step):
    """A CheckpointWriter whose temporary folder exists before any process writes into it."""
    writer = CheckpointWriter(output_dir, step)
    if accelerator.is_main_process:
        writer.start()
    accelerator.wait_for_everyone()
    return writer


def save_training_parts(writer, accelerator, optimizers, schedulers, ema=None, per_process=None):
    """What a resumed run needs besides the models and the training state. Every process calls it.

    Each process writes `rng_state_<rank>.pt`: its RNG state under "rng" and, under their names, the state of the
    `per_process` objects (e.g. a CorruptSampleTracker: each process counts the samples it drew). The main process
    writes `optimizer_<name>.pt` and `scheduler_<name>.pt` for each entry of `optimizers` and `schedulers`, the EMA
    weights as `ema.safetensors` and the fp16 grad scaler's state as `scaler.pt`.
    """
    own = {name: obj.state_dict() for name, obj in (per_process or {}).items()}
    writer.add_rank_object("rng_state", {"rng": rng_state(), **own}, accelerator.process_index)
    if not accelerator.is_main_process:
        return
    if ema is not None:
        writer.add_tensors("ema", ema.shadow)
    for name, opt in optimizers.items():
        writer.add_object(f"optimizer_{name}", opt.state_dict())
    for name, sched in schedulers.items():
        writer.add_object(f"scheduler_{name}", sched.state_dict())
    if accelerator.scaler is not None:
        writer.add_object("scaler", accelerator.scaler.state_dict())


def training_state(accelerator, args, step, state, ema, guard, **extra):
    """The contents of training_state.json: the script's own `state` (epoch, position in it, run id, ...), the step,
    the EMA's update count, the skip guard, any `extra` entries of the script, the number of processes and every
    argument (to state changed settings on resume)."""
    return {**state, "step": step, "ema_updates": ema.num_updates if ema else 0, "skips": guard.state_dict(), **extra,
            "num_processes": accelerator.num_processes, "args": vars(args)}


def commit_checkpoint(writer, accelerator, total_limit=None):
    """Once every process has written its files: publish the checkpoint and apply retention (main process), and
    hold every process until it is in place. Returns the checkpoint's folder on the main process, None elsewhere."""
    accelerator.wait_for_everyone()
    path = None
    if accelerator.is_main_process:
        path = writer.commit(total_limit)
        logger.info(f"saved {path}")
    accelerator.wait_for_everyone()
    return path


def load_models(ckpt, models, allow_model_change, files=None, config_changes=None):
    """Load each model's weights from `ckpt`, or refuse a model that changed; returns the names of those that did.

    `models`: name -> module (None: not part of this run); `files`: name -> its tensor file in the checkpoint (by
    default the name itself); `config_changes`: name -> differences the script found in the model's configuration.
    A model whose configuration or tensors differ from the checkpoint's stops the run with a message naming the
    differences, unless `allow_model_change`: then its tensors that still fit are loaded and the rest keep their
    fresh initialisation. Its optimizer state (and an EMA of it) cannot carry over: pass the returned names to
    `restore_training_parts` and `restore_ema`.
    """
    files, config_changes = files or {}, config_changes or {}
    used = {name: model for name, model in models.items() if model is not None}
    tensors, changed = {}, {}
    for name, model in used.items():
        file = files.get(name, name)
        changed[name] = list(config_changes.get(name, []))
        if ckpt.has(file):
            tensors[name] = ckpt.tensors(file)
            changed[name] += state_mismatches(model, tensors[name])
        else:
            changed[name].append(f"the checkpoint has no {file}")
    # With several models each difference says whose it is; a script's only model needs no name.
    differences = [f"{name}: {d}" if len(models) > 1 else d for name, ds in changed.items() for d in ds]
    if differences and not allow_model_change:
        raise SystemExit(f"--resume_from_checkpoint {ckpt.path}: the model differs from the checkpoint's "
                         f"({'; '.join(differences[:4])}{'; ...' if len(differences) > 4 else ''}); pass "
                         f"--allow_model_change to start from the weights that still fit")
    for name, model in used.items():
        if changed[name]:
            fresh = load_matching(model, tensors.get(name, {}))
            logger.warning(f"--allow_model_change: the {name} loads the tensors that fit; {len(fresh)} start fresh "
                           f"({', '.join(fresh[:5])}{', ...' if len(fresh) > 5 else ''}); its optimizer starts afresh")
        else:
            model.load_state_dict(tensors[name])
    return {name for name, ds in changed.items() if ds}


def restore_training_parts(ckpt, accelerator, state, optimizers, schedulers, guard, per_process=None, changed=()):
    """The counterpart of `save_training_parts` (and of the skip guard in `training_state`); every process calls it.

    The optimizers of `changed` models (see `load_models`) keep their fresh state; the schedules continue from the
    saved step either way. A process that the checkpoint has no RNG state for (it was written by fewer processes)
    starts with fresh random state and fresh `per_process` objects, and says so.
    """
    for name, opt in optimizers.items():
        if name not in changed:
            opt.load_state_dict(ckpt.object(f"optimizer_{name}"))
    for name, sched in schedulers.items():
        if ckpt.has(f"scheduler_{name}"):
            sched.load_state_dict(ckpt.object(f"scheduler_{name}"))
    if accelerator.scaler is not None and ckpt.has("scaler"):
        accelerator.scaler.load_state_dict(ckpt.object("scaler"))
    guard.load_state_dict(state["skips"])
    mine = ckpt.rank_object("rng_state", accelerator.process_index)
    if mine is None:
        logger.warning(f"{ckpt.path} was written by fewer processes: process {accelerator.process_index} starts "
                       f"with fresh random state")
        return
    set_rng_state(mine["rng"])
    for name, obj in (per_process or {}).items():
        obj.load_state_dict(mine[name])


def restore_ema(ckpt, ema, model, state, changed=False):
    """The EMA continues from the checkpoint's average; it restarts from `model`'s weights when that model
    `changed` (see `load_models`) or when the checkpoint has no EMA (its run was trained without one)."""
    if ema is None:
        return
    if changed or not ckpt.has("ema"):
        ema.reset(model)
    else:
        ema.load_state_dict({"shadow": ckpt.tensors("ema"), "num_updates": state["ema_updates"]})
