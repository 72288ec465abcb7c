#!/usr/bin/env python
"""Train a decoder-only transformer over residual-vector-quantised codec tokens (DAC: 9 codebooks x 1024 at
44.1 kHz), with the stability guards a multi-day run needs: EMA, gradient clipping, an outlier-batch guard,
checkpoints that never hold non-finite weights, and a checkpoint doctor.

    python train_rvq.py encode --input ./music --output ./codes                 # audio -> code files (DAC)
    accelerate launch train_rvq.py --data ./codes --output_dir out/rvq --config configs/rvq_base512.yaml
    python train_rvq.py generate --model out/rvq --prompt codes/song.codes.safetensors --output song.wav
    python train_rvq.py doctor out/rvq                                           # a run's health, at a glance

Each frame's K codes are embedded and summed; K output heads predict the next frame's codes. With the `delay`
pattern (MusicGen, arXiv:2306.05284) codebook k is shifted k frames late, so a frame's finer codebooks are
predicted after seeing its coarser ones. The export in --output_dir (and in --output_dir/best, the best
validation loss) is `model.safetensors` (EMA weights) + `config.json` (the architecture and the codec it models).
"""

import argparse
import copy
import dataclasses
import glob
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from common.args import (ArgumentParser, add_ema_args, add_optimizer_args, add_run_args, fraction,
                         non_negative_float, non_negative_int, optimizer_kwargs, parse_args_with_config,
                         positive_float, positive_int)
from common.checkpoint import (Checkpoint, CheckpointError, checkpoint_dirs, commit_checkpoint, load_models,
                               open_resume, refuse_non_finite, restore_ema, restore_training_parts,
                               save_training_parts, start_checkpoint, training_state)
from common.data import (CorruptSample, CorruptSampleTracker, ResumableBatchSampler, infinite_batches,
                         loader_worker_init, split_holdout)
from common.ema import EMA
from common.optim import build_optimizer, build_scheduler, observe_plateau
from common.perf import DryRun, FlopCount, Throughput, peak_bf16_flops
from common.training import (GracefulStop, MetricsAccumulator, MetricsFile, SkipGuard, StopCondition, Watchdog,
                             bf16_if_supported, fail_fast, freeze, init_trackers, log_changed_settings, new_run_id,
                             read_metrics, setup_accelerator, skips_on_device, step_on_device, tracker_tags,
                             write_run_info)

logger = get_logger(__name__)

# ---------------------------------------------------------------------------------------------------------------
# Code files: one safetensors file per audio file, tensor "codes" (frames, codebooks) int16, and a header
# (safetensors metadata, strings) saying what made them. Validated on load; a bad file is skipped with its path.

CODE_SUFFIX = ".codes.safetensors"
HEADER_KEYS = ("format", "codec", "sample_rate", "frame_rate", "num_codebooks", "codebook_size", "num_frames")


def save_codes(path, codes, codec, sample_rate, frame_rate, codebook_size, source=""):
    """codes: (frames, codebooks) integer tensor."""
    codes = codes.to(torch.int16 if codebook_size <= 32768 else torch.int32).contiguous()
    header = {"format": "rvq-codes/1", "codec": str(codec), "sample_rate": str(sample_rate),
              "frame_rate": repr(float(frame_rate)), "num_codebooks": str(codes.shape[1]),
              "codebook_size": str(codebook_size), "num_frames": str(codes.shape[0]), "source": str(source)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"codes": codes}, tmp, metadata=header)
    os.replace(tmp, path)


def read_codes_header(path):
    """The header of a code file, checked against its data; raises CorruptSample(path, reason)."""
    path = str(path)
    size = os.path.getsize(path)
    if size == 0:
        raise CorruptSample(path, "empty file")
    _check_complete(path, size)
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            shape = f.get_slice("codes").get_shape() if "codes" in f.keys() else None
    except Exception:
        raise CorruptSample(path, "not a code file") from None
    if shape is None or any(k not in meta for k in HEADER_KEYS) or not meta["format"].startswith("rvq-codes/"):
        raise CorruptSample(path, "not a code file")
    try:
        header = {"codec": meta["codec"], "sample_rate": int(meta["sample_rate"]),
                  "frame_rate": float(meta["frame_rate"]), "num_codebooks": int(meta["num_codebooks"]),
                  "codebook_size": int(meta["codebook_size"]), "num_frames": int(meta["num_frames"])}
    except ValueError:
        raise CorruptSample(path, "not a code file") from None
    if len(shape) != 2 or shape[0] != header["num_frames"] or shape[1] != header["num_codebooks"]:
        raise CorruptSample(path, "header disagrees with data")
    return header


def _check_complete(path, size):
    """A safetensors file is an 8-byte header length, a JSON header, then the data: tell a file cut short (by a
    full disk or an interrupted copy) from one that is not a code file at all."""
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        start = f.read(1)
        if n < 2 or start != b"{":
            raise CorruptSample(path, "not a code file")
        if 8 + n > size:
            raise CorruptSample(path, "truncated")
        f.seek(8)
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise CorruptSample(path, "not a code file") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CorruptSample(path, "truncated")


def load_codes(path, start=0, stop=None):
    """Frames [start, stop) of a code file as an int64 tensor (frames, codebooks); memory-mapped, so a window
    reads only its own bytes."""
    with safe_open(str(path), framework="pt") as f:
        return f.get_slice("codes")[start:stop].long()


def scan_code_files(paths, tracker=None):
    """Validate every file (header, size, code range); returns ([(path, num_frames)], dataset header).

    Corrupt files are skipped and reported; files from different codecs stop the run with both names."""
    good, reference, skipped = [], None, []
    for path in paths:
        try:
            header = read_codes_header(path)
            codes = load_codes(path)
            if codes.numel() and (codes.min() < 0 or codes.max() >= header["codebook_size"]):
                raise CorruptSample(str(path), "codes outside the vocabulary")
        except CorruptSample as bad:
            skipped.append((bad.where, bad.reason))
            continue
        key = {k: header[k] for k in ("codec", "sample_rate", "num_codebooks", "codebook_size")}
        if reference is None:
            reference, first = key, path
        elif key != reference:
            raise SystemExit(f"--data: mixed codecs in one dataset: {first} is {_describe(reference)}, {path} is "
                             f"{_describe(key)}; encode everything with one codec")
        good.append((str(path), header["num_frames"]))
    if tracker is not None:
        tracker.update(skipped, len(good))
    if reference is not None:
        reference["frame_rate"] = read_codes_header(good[0][0])["frame_rate"]
    return good, reference


def _describe(h):
    return f"{h['codec']} ({h['num_codebooks']} x {h['codebook_size']} at {h['sample_rate']} Hz)"


def find_code_files(patterns):
    """Code files from globs or folders (searched recursively), sorted."""
    found = set()
    for pattern in patterns:
        if os.path.isdir(pattern):
            found.update(str(p) for p in Path(pattern).rglob(f"*{CODE_SUFFIX}"))
        else:
            found.update(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    return sorted(found)


class CodeWindows(torch.utils.data.Dataset):
    """Windows of `ctx` + 1 frames every `step` frames of each file (input and next-frame target), preceded by
    `history` frames for the delay pattern (-1 where they fall before the file's start).

    Indexed by (epoch, index) like every dataset here; no randomness of its own."""

    def __init__(self, files, ctx, step, history=0):
        self.ctx, self.history = ctx, history
        self.windows = [(path, s) for path, frames in files for s in range(0, frames - ctx, step)]

    def __len__(self):
        return len(self.windows)

    def __getitem__(self, key):
        _, index = key if isinstance(key, tuple) else (0, key)
        path, s = self.windows[index]
        first = s - self.history
        codes = load_codes(path, max(first, 0), s + self.ctx + 1)
        if first < 0:
            codes = torch.cat([codes.new_full((-first, codes.shape[1]), -1), codes])
        return {"codes": codes, "index": index, "skipped": []}


def collate_windows(items):
    return {"codes": torch.stack([i["codes"] for i in items]), "index": [i["index"] for i in items],
            "skipped": [s for i in items for s in i["skipped"]]}


# ---------------------------------------------------------------------------------------------------------------
# Codebook patterns


def pattern_inputs_targets(window, pattern, pad_id):
    """window: (B, history + ctx + 1, K) codes (-1 before a file's start) -> inputs and targets (B, ctx, K).

    parallel: position t holds frame t; the target is frame t + 1.
    delay:    position t holds codebook k of frame t - k, so at position t the model has seen codebooks < k of
              the frame whose codebook k it predicts, and never codebook k itself (history = K - 1 frames).
    Inputs use `pad_id` where there is no code; targets there are -100 (ignored)."""
    if pattern == "delay":
        K = window.shape[2]
        history = K - 1
        T = window.shape[1] - history
        window = torch.stack([window[:, history - k:history - k + T, k] for k in range(K)], dim=2)
    inputs, targets = window[:, :-1], window[:, 1:]
    return inputs.masked_fill(inputs < 0, pad_id), targets.masked_fill(targets < 0, -100)


def undelay(codes):
    """(B, T, K) in the delay pattern -> (B, T - K + 1, K) frames: frame f, codebook k sits at position f + k."""
    K = codes.shape[2]
    T = codes.shape[1] - K + 1
    return torch.stack([codes[:, k:k + T, k] for k in range(K)], dim=2)


def delay(codes, pad_id):
    """(B, T, K) frames -> (B, T + K - 1, K) in the delay pattern (pad_id where a codebook has not started or
    has ended)."""
    B, T, K = codes.shape
    out = codes.new_full((B, T + K - 1, K), pad_id)
    for k in range(K):
        out[:, k:k + T, k] = codes[:, :, k]
    return out


# ---------------------------------------------------------------------------------------------------------------
# Model


@dataclasses.dataclass
class RVQConfig:
    num_codebooks: int = 9
    codebook_size: int = 1024
    d_model: int = 768
    layers: int = 16
    heads: int = 12
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    positions: str = "rope"  # or "learned"
    max_positions: int = 4096  # learned positions only
    pattern: str = "delay"
    norm_bias: bool = True  # LayerNorm biases; new models have none (--norm_bias), configs saved before had them

    @property
    def pad_id(self):
        return self.codebook_size  # one extra embedding row per codebook: "no code here"


PRESETS = {
    "tiny": dict(d_model=32, layers=2, heads=2),  # tests and the demo
    "small": dict(d_model=256, layers=6, heads=4),
    "base": dict(d_model=512, layers=12, heads=8),  # the seed's Run #1
    "big": dict(d_model=768, layers=16, heads=12),  # the seed's Runs #2 and #3
    "large": dict(d_model=896, layers=20, heads=14),  # the seed's "slightly larger capacity" next step
}
ARCH_FLAGS = ("d_model", "layers", "heads", "mlp_ratio", "positions", "pattern", "norm_bias")


def rotary(x, cos, sin):
    """Rotate pairs (x1, x2) of the two halves of the head dimension by the position's angles."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg.d_model
        self.heads, self.dropout = cfg.heads, cfg.dropout
        self.norm1, self.norm2 = nn.LayerNorm(d, bias=cfg.norm_bias), nn.LayerNorm(d, bias=cfg.norm_bias)
        self.qkv, self.proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        hidden = int(cfg.mlp_ratio * d)
        self.mlp = nn.Sequential(nn.Linear(d, hidden, bias=False), nn.GELU(), nn.Linear(hidden, d, bias=False))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope):
        B, T, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = rotary(q, *rope), rotary(k, *rope)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(B, T, D)))
        return x + self.drop(self.mlp(self.norm2(x)))


class RVQTransformer(nn.Module):
    """Summed per-codebook embeddings -> pre-LayerNorm causal transformer -> K heads of `codebook_size` logits."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        K, V, d = cfg.num_codebooks, cfg.codebook_size, cfg.d_model
        if d % cfg.heads or (d // cfg.heads) % 2:
            raise ValueError(f"d_model {d} must split into {cfg.heads} heads of even size")
        # One table for all codebooks: codebook k's token t is row k * (V + 1) + t (row V is the pad).
        self.embed = nn.Embedding(K * (V + 1), d)
        self.register_buffer("offsets", torch.arange(K) * (V + 1), persistent=False)
        self.pos = nn.Embedding(cfg.max_positions, d) if cfg.positions == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(d, bias=cfg.norm_bias)
        self.head = nn.Linear(d, K * V, bias=False)
        if self.pos is None:  # the rotary angles' cos and sin, computed once (not in every attention layer's kernel)
            self.register_buffer("rope_cos", torch.empty(0), persistent=False)
            self.register_buffer("rope_sin", torch.empty(0), persistent=False)
            self._extend_rope(cfg.max_positions)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by depth
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.layers))

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def _extend_rope(self, length):
        """Tables of cos and sin for positions 0..length-1 (float32). Computed inside the compiled forward, the
        angles were recomputed in each layer's rotary kernel: a quarter of an H100 step at d768/16 layers/ctx 1024."""
        half = self.cfg.d_model // self.cfg.heads // 2
        device = self.rope_cos.device
        freqs = 1.0 / (10000 ** (torch.arange(half, device=device, dtype=torch.float32) / half))
        angles = torch.arange(length, device=device, dtype=torch.float32)[:, None] * freqs
        self.rope_cos, self.rope_sin = angles.cos(), angles.sin()

    def rope(self, T):
        if T > self.rope_cos.shape[0]:  # longer than any context so far: rare, and recompiles
            self._extend_rope(max(T, 2 * self.rope_cos.shape[0]))
        return self.rope_cos[:T], self.rope_sin[:T]

    def embed_frames(self, tokens):
        """(B, T, K) codes -> (B, T, d_model): the sum of each codebook's embedding of its code."""
        ids = tokens + self.offsets
        x = self.embed(ids[..., 0])
        for k in range(1, ids.shape[-1]):  # one by one: compiled, 0.8 ms per step faster on an H100 than .sum(dim=2)
            x = x + self.embed(ids[..., k])
        return x

    def forward(self, tokens, targets=None, label_smoothing=0.0):
        """tokens: (B, T, K) in [0, codebook_size] (codebook_size = pad) -> logits (B, T, K, codebook_size); with
        targets (B, T, K), `codebook_losses` of those logits instead.

        Training asks for the losses, so the logits (the step's largest tensor, B x T x K x V) never leave the
        compiled graph: the loss fuses with the output head, and Accelerate's mixed-precision wrapper, which
        turns a prepared model's outputs to float32, casts K-vectors instead of a float32 copy of the logits."""
        B, T, K = tokens.shape
        x = self.embed_frames(tokens)
        rope = None
        if self.pos is not None:
            x = x + self.pos(torch.arange(T, device=tokens.device))
        else:
            rope = self.rope(T)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, rope)
        logits = self.head(self.norm(x)).view(B, T, K, self.cfg.codebook_size)
        return logits if targets is None else codebook_losses(logits, targets, label_smoothing)


def build_model(cfg):
    return RVQTransformer(cfg)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------------
# Loss and codebook weights


class SmoothedCrossEntropy(torch.autograd.Function):
    """Label-smoothed cross-entropy of each row of `logits` (N, V) against `targets` (N,), 0 where a target is < 0;
    the same values and gradients as F.cross_entropy(..., label_smoothing, reduction="none").

    It computes in float32 (in the reductions' registers when compiled) but saves for the backward only the logits
    in their own dtype and each row's log-sum-exp. F.cross_entropy under torch.compile keeps a float32 copy of the
    logits for its backward instead: B x T x K x V, 1.2 GB a step at the big preset (0.6 ms on an H100)."""

    @staticmethod
    def forward(ctx, logits, targets, smoothing):
        x = logits.to(torch.promote_types(logits.dtype, torch.float32))
        lse = torch.logsumexp(x, dim=-1)
        picked = x.gather(-1, targets.clamp(min=0)[:, None]).squeeze(-1)
        # -log p(target) smoothed towards the mean of -log p over all classes
        loss = lse - (1 - smoothing) * picked - smoothing * x.mean(dim=-1)
        ctx.save_for_backward(logits, lse, targets)
        ctx.smoothing = smoothing
        return torch.where(targets >= 0, loss, 0.0)

    @staticmethod
    def backward(ctx, grad):
        logits, lse, targets = ctx.saved_tensors
        s, V = ctx.smoothing, logits.shape[-1]
        x = logits.to(lse.dtype)
        hit = torch.arange(V, device=logits.device) == targets[:, None]
        g = torch.exp(x - lse[:, None]) - (1 - s) * hit - s / V  # softmax - smoothed one-hot
        g = g * torch.where(targets >= 0, grad, 0.0)[:, None]
        return g.to(logits.dtype), None, None


def codebook_losses(logits, targets, label_smoothing=0.0):
    """Cross-entropy of each codebook, (K,), and top-1 accuracy, (K,), over the positions that have a target.

    Each codebook's summed loss is divided by the number of positions B x T (not of valid targets), so
    k micro-batches average to exactly the loss of their union; pads are only the K - 1 first positions of a
    file's first window under the delay pattern."""
    B, T, K, V = logits.shape
    ce = SmoothedCrossEntropy.apply(logits.reshape(-1, V), targets.reshape(-1), label_smoothing).view(B, T, K)
    valid = targets >= 0
    per_codebook = ce.sum(dim=(0, 1)) / (B * T)
    correct = (logits.argmax(-1) == targets) & valid
    accuracy = correct.sum(dim=(0, 1)).float() / valid.sum(dim=(0, 1)).clamp(min=1)
    return per_codebook, accuracy


def unigram_entropy(files, num_codebooks, codebook_size):
    """Entropy (nats) of each codebook's code frequencies over `files`: the loss of a model that ignores context."""
    counts = torch.zeros(num_codebooks, codebook_size, dtype=torch.float64)
    for path, _ in files:
        codes = load_codes(path)
        for k in range(num_codebooks):
            counts[k] += torch.bincount(codes[:, k], minlength=codebook_size).double()
    p = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    return -(p * p.clamp(min=1e-30).log()).sum(dim=1)


def codebook_weights(spec, entropies, alpha):
    """`--cb_weights`: "uniform", "auto", or K comma-separated numbers; returned normalised to mean 1.

    auto: w_k = H_k^alpha / mean_j(H_j^alpha), with H_k the unigram entropy of codebook k on the training codes.
    Finer codebooks are closer to noise (higher entropy) and learn last; alpha > 0 gives them more weight,
    alpha = 0 is uniform."""
    K = len(entropies)
    if spec == "uniform":
        w = torch.ones(K, dtype=torch.float64)
    elif spec == "auto":
        w = entropies.clamp(min=1e-6) ** alpha
    else:
        w = torch.tensor([float(v) for v in spec.split(",")], dtype=torch.float64)
        if len(w) != K:
            raise SystemExit(f"--cb_weights {spec}: {len(w)} weights for {K} codebooks")
    return (w / w.mean()).float()


class OutlierGuard:
    """Skips an optimizer step whose (all-reduced) loss is non-finite or above `factor` x its running average.

    The average (an EMA with coefficient `beta`, in float64) moves only on accepted steps and starts judging after
    `warmup` of them; factor 0 disables the spike check (non-finite losses are always skipped). It is kept on the
    loss's device and decided there, so a step needs no host sync."""

    def __init__(self, factor, warmup, beta=0.98):
        self.factor, self.warmup, self.beta = factor, warmup, beta
        self.average, self.accepted = 0.0, 0  # tensors on the loss's device after the first check

    def check(self, loss, grad_norm):
        """(ok, reason): ok, a bool tensor, says whether the step may go ahead; reason(), called once ok was read
        as False, says why not (None for non-finite gradients with a finite loss: SkipGuard's wording)."""
        loss = loss.detach().double().reshape(())
        average = torch.as_tensor(self.average, dtype=torch.float64, device=loss.device)
        accepted = torch.as_tensor(self.accepted, dtype=torch.int64, device=loss.device)
        finite_loss = torch.isfinite(loss)
        finite = finite_loss & torch.isfinite(grad_norm.detach().reshape(()))
        spike = finite & (accepted >= self.warmup) & (loss > self.factor * average) if self.factor > 0 \
            else torch.zeros_like(finite)
        ok = finite & ~spike
        moved = torch.where(accepted == 0, loss, self.beta * average + (1 - self.beta) * loss)
        self.average, self.accepted = torch.where(ok, moved, average), accepted + ok.long()

        def reason():
            if not finite_loss:
                return "non-finite loss"
            if spike:
                return f"loss {loss.item():.4f} is over {self.factor:g}x its running average {average.item():.4f}"
            return None

        return ok, reason

    def state_dict(self):
        accepted = int(self.accepted)
        return {"average": float(self.average) if accepted else None, "accepted": accepted}

    def load_state_dict(self, state):
        self.average, self.accepted = state["average"] or 0.0, int(state["accepted"])


# ---------------------------------------------------------------------------------------------------------------
# Arguments


def build_parser():
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = parser.add_argument_group("data")
    g.add_argument("--data", type=str, nargs="+", default=None,
                   help=f"Code files: folders (searched for *{CODE_SUFFIX}) or globs, as `encode` writes them.")
    g.add_argument("--validation_data", type=str, nargs="+", default=None,
                   help="Validation code files; by default --val_fraction of the files (never windows) are held out.")
    g.add_argument("--val_fraction", type=fraction, default=0.05, help="Files held out for validation (at least 1).")
    g.add_argument("--ctx", type=positive_int, default=512, help="Context length in frames (DAC: ~86 frames per second).")
    g.add_argument("--step", type=positive_int, default=256, help="Hop between training windows, in frames.")
    g.add_argument("--max_val_windows", type=positive_int, default=256,
                   help="Validation windows (non-overlapping, from the held-out files) per evaluation.")
    g.add_argument("--prefetch_factor", type=positive_int, default=4, help="Batches each loader worker prepares ahead.")

    g = parser.add_argument_group("model")
    g.add_argument("--model", type=str, default="big", choices=sorted(PRESETS),
                   help="Preset: big = d768/16 layers/12 heads (the seed's runs #2-#3), base = d512/12/8, "
                        "large = d896/20/14, small, tiny. --d_model/--layers/--heads override it.")
    g.add_argument("--d_model", type=positive_int, default=None, help="Width (overrides the preset).")
    g.add_argument("--layers", type=positive_int, default=None, help="Transformer blocks (overrides the preset).")
    g.add_argument("--heads", type=positive_int, default=None, help="Attention heads (overrides the preset).")
    g.add_argument("--mlp_ratio", type=positive_float, default=4.0, help="MLP hidden width / d_model.")
    g.add_argument("--dropout", type=fraction, default=0.1, help="Dropout on embeddings, attention and residuals.")
    g.add_argument("--positions", type=str, default="rope", choices=["rope", "learned"],
                   help="Rotary position embeddings (any context length) or learned ones (up to --max_positions).")
    g.add_argument("--max_positions", type=positive_int, default=4096, help="Longest context for learned positions.")
    g.add_argument("--norm_bias", action=argparse.BooleanOptionalAction, default=False,
                   help="LayerNorms with a bias. Off, as in nanoGPT: 1%% faster at d768/16 layers on an H100.")
    g.add_argument("--pattern", type=str, default="delay", choices=["delay", "parallel"],
                   help="Codebook pattern: delay (codebook k k frames late, MusicGen) or parallel (all at once).")
    g.add_argument("--compile_mode", type=str, default="default", choices=["default", "max-autotune-no-cudagraphs"],
                   help="torch.compile mode with --compile. max-autotune-no-cudagraphs also times Triton kernels "
                        "against cuBLAS for every matmul shape: 0.8%% faster at d768/16 layers on an H100, after "
                        "about 6 minutes of tuning on the first run (cached for later runs). CUDA graphs gave "
                        "nothing here (README), so the modes that use them are not offered.")
    g.add_argument("--ignore_arch", action="store_true",
                   help="On resume, build the model from these flags instead of the checkpoint's architecture.")

    g = parser.add_argument_group("loss")
    g.add_argument("--label_smoothing", type=fraction, default=0.05, help="Label smoothing of each codebook's CE.")
    g.add_argument("--cb_weights", type=str, default="uniform",
                   help="Codebook loss weights: uniform, auto (from each codebook's code entropy, see "
                        "--cb_weights_auto_alpha) or K comma-separated numbers; normalised to mean 1.")
    g.add_argument("--cb_weights_auto_alpha", type=non_negative_float, default=0.5,
                   help="auto: w_k proportional to H_k^alpha, H_k the unigram entropy of codebook k.")
    g.add_argument("--outlier_factor", type=non_negative_float, default=3.0,
                   help="Skip a step whose loss exceeds this multiple of its running average (0: only non-finite).")
    g.add_argument("--outlier_warmup", type=non_negative_int, default=100,
                   help="Accepted steps before the outlier guard starts judging.")

    add_optimizer_args(parser, title="optimizer", lr=2e-4, betas=(0.9, 0.95), weight_decay=0.02,
                       scheduler="cosine", warmup_steps=500)
    parser.set_defaults(lr_min_ratio=0.05)  # cosine to eta_min 1e-5 at lr 2e-4, as the seed's runs
    add_ema_args(parser, decay=0.999, power=2 / 3, every=10)  # ema-pytorch's update_every: 0.5 ms a step on an H100
    add_run_args(parser, batch_size=32, max_train_steps=100_000, checkpointing_steps=2000, validation_steps=2000)
    parser.set_defaults(resume_from_checkpoint="latest")  # auto-resume, as the seed's script did

    g = parser.add_argument_group("evaluation and checkpoints")
    g.add_argument("--val_every", type=non_negative_int, default=0,
                   help="Also validate at the end of every N-th epoch (0: only every --validation_steps).")
    g.add_argument("--eval_audio_every", type=non_negative_int, default=5,
                   help="Generate a continuation every N-th epoch end and at the last step (0: never).")
    g.add_argument("--eval_frames", type=positive_int, default=1290, help="Frames to generate (DAC: 1290 = 15 s).")
    g.add_argument("--eval_prompt_frames", type=positive_int, default=256,
                   help="Frames of the first held-out file that the continuation starts from.")
    g.add_argument("--eval_temperature", type=positive_float, default=1.0, help="Sampling temperature.")
    g.add_argument("--eval_top_k", type=non_negative_int, default=250, help="Top-k sampling (0: off).")
    g.add_argument("--eval_top_p", type=fraction, default=0.0, help="Nucleus sampling (0: off).")
    g.add_argument("--eval_on_cpu", action="store_true",
                   help="Decode generated codes to audio on the CPU (avoids a GPU memory spike mid-run).")
    g.add_argument("--codec", type=str, default=None,
                   help="Codec for decoding continuations (path or hub id); default: the one in the code files' header.")
    g.add_argument("--archive_every", type=non_negative_int, default=0,
                   help="Copy the checkpoint of every N-th epoch end into output_dir/archive (never pruned by "
                        "--checkpoints_total_limit).")
    g.add_argument("--keep_archived", type=non_negative_int, default=0, help="Keep the newest K archives (0: all).")
    g.add_argument("--tag", type=str, default=None, help="A name for the run (tracker run name, metrics).")
    g.add_argument("--quiet", action="store_true", help="One console line per epoch; no progress bar.")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parse_args_with_config(parser, argv)
    if args.output_dir is None:
        parser.error("--output_dir is required")
    if not args.data:
        parser.error("--data is required (folders or globs of code files; make them with `train_rvq.py encode`)")
    for flag in ("data", "validation_data"):
        if getattr(args, flag) and not find_code_files(getattr(args, flag)):
            parser.error(f"--{flag} {' '.join(getattr(args, flag))}: no code files (*{CODE_SUFFIX}); make them with "
                         f"`train_rvq.py encode --input AUDIO --output CODES`")
    if args.cb_weights not in ("uniform", "auto"):
        try:
            [float(v) for v in args.cb_weights.split(",")]
        except ValueError:
            parser.error(f"--cb_weights {args.cb_weights}: use uniform, auto or comma-separated numbers")
    arch = model_config_from_args(args, num_codebooks=1, codebook_size=1)
    if arch.d_model % arch.heads or (arch.d_model // arch.heads) % 2:
        parser.error(f"--d_model {arch.d_model} must split into --heads {arch.heads} heads of even size")
    if arch.positions == "learned" and args.ctx > args.max_positions:
        parser.error(f"--ctx {args.ctx} is longer than --max_positions {args.max_positions} (learned positions)")
    return args


def model_config_from_args(args, num_codebooks, codebook_size):
    arch = dict(PRESETS[args.model])
    arch.update({k: getattr(args, k) for k in ("d_model", "layers", "heads") if getattr(args, k) is not None})
    return RVQConfig(num_codebooks=num_codebooks, codebook_size=codebook_size, mlp_ratio=args.mlp_ratio,
                     dropout=args.dropout, positions=args.positions, max_positions=args.max_positions,
                     pattern=args.pattern, norm_bias=args.norm_bias, **arch)


# ---------------------------------------------------------------------------------------------------------------
# Training step


def train_step(window, model, accelerator, args, cb_weights, pad_id):
    """One micro-batch: forward (the model computes its own losses) and backward. The optimizer step, at the end
    of the accumulation window, is `guarded_step`'s. Returns a flat dict of detached tensors."""
    inputs, targets = pattern_inputs_targets(window, args.pattern, pad_id)
    with accelerator.accumulate(model), accelerator.autocast():
        ce, accuracy = model(inputs, targets, args.label_smoothing)
        loss = (cb_weights * ce).mean()
        accelerator.backward(loss)
    out = {"loss/total": loss.detach()}
    out.update({f"loss/ce_cb{k}": v for k, v in enumerate(ce.detach())})
    out.update({f"train/acc_cb{k}": v for k, v in enumerate(accuracy.detach())})
    return out


def guarded_step(accelerator, model, optimizer, window_loss, outlier, args, defer=True):
    """Clip, then step unless the window's loss or gradients are non-finite or the loss is an outlier.

    The loss is averaged over processes and the gradients are already all-reduced, so every process takes the
    same decision. It is taken on the GPU: fused AdamW skips a step from a device flag, so nothing waits for the
    host, and `stepped` is a bool tensor that SkipGuard reads at its next flush. Other optimizers, fp16 and
    `defer=False` decide on the host (one sync). Returns (grad_norm, reason callable, stepped)."""
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm or math.inf)
    loss = accelerator.reduce(window_loss.detach().float().reshape(1), reduction="mean")[0]
    ok, reason = outlier.check(loss, grad_norm)
    if defer and accelerator.scaler is None and skips_on_device(optimizer):
        step_on_device(optimizer, ok)
    else:
        ok = bool(ok)  # sync point
        if ok:
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm.detach(), reason, ok


# ---------------------------------------------------------------------------------------------------------------
# Validation and generation


@torch.no_grad()
def evaluate(model, windows, args, pad_id, device, batch_size):
    """Held-out cross-entropy (no label smoothing), perplexity and top-1 accuracy per codebook."""
    model.eval()
    K = model.cfg.num_codebooks
    ce_sum, acc_sum, n = torch.zeros(K, device=device), torch.zeros(K, device=device), 0
    for start in range(0, len(windows), batch_size):
        batch = torch.stack([windows[i]["codes"] for i in range(start, min(start + batch_size, len(windows)))])
        inputs, targets = pattern_inputs_targets(batch.to(device), args.pattern, pad_id)
        logits = model(inputs)
        valid = (targets >= 0).sum(dim=(0, 1)).clamp(min=1)
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                             reduction="none").view(targets.shape)
        ce_sum += ce.sum(dim=(0, 1)) / valid * len(batch)
        acc_sum += ((logits.argmax(-1) == targets) & (targets >= 0)).sum(dim=(0, 1)) / valid * len(batch)
        n += len(batch)
    ce, acc = (ce_sum / n).tolist(), (acc_sum / n).tolist()
    loss = sum(ce) / K
    out = {"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0))}
    out.update({f"val/ce_cb{k}": v for k, v in enumerate(ce)})
    out.update({f"val/acc_cb{k}": v for k, v in enumerate(acc)})
    return out


def sample_logits(logits, temperature, top_k, top_p, generator):
    """(N, V) logits -> (N,) tokens: temperature, then top-k, then nucleus (top-p) filtering."""
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > top_p  # keep the smallest set reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, -math.inf))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(model, prompt, num_frames, temperature=1.0, top_k=0, top_p=0.0, seed=0, ctx=None):
    """Continue `prompt` ((P, K) frames, P >= 1) by `num_frames` frames; returns (P + num_frames, K).

    Autoregressive over positions of the model's pattern, with a sliding window of `ctx` positions."""
    model.eval()
    cfg, device = model.cfg, next(model.parameters()).device
    K, pad = cfg.num_codebooks, cfg.pad_id
    generator = torch.Generator(device=device).manual_seed(seed)
    prompt = prompt.to(device).long()
    P = prompt.shape[0]
    total = P + num_frames
    if P == 0:
        raise ValueError("generation continues a prompt of at least one frame")
    frames = torch.cat([prompt, prompt.new_full((num_frames, K), pad)])
    known = torch.zeros_like(frames, dtype=torch.bool)
    known[:P] = True
    if cfg.pattern == "delay":  # (total + K - 1, K); the pads before each codebook starts stay, as in training
        seq, known = delay(frames[None], pad)[0], delay(known[None].long(), 2)[0]
        known = known != 0
    else:
        seq = frames
    window = ctx or 10**9
    for t in range(1, seq.shape[0]):
        if known[t].all():
            continue
        lo = max(0, t - window)
        logits = model(seq[None, lo:t])[0, -1]  # (K, V): predictions for position t
        tokens = sample_logits(logits, temperature, top_k, top_p, generator)
        seq[t] = torch.where(known[t], seq[t], tokens)
    frames = undelay(seq[None])[0] if cfg.pattern == "delay" else seq
    return frames[:total]


class CodecDecoder:
    """Codes -> audio with the codec that made them (transformers' DacModel: a path or hub id). Loaded on first
    use; if it cannot be loaded (offline, no weights) continuations are kept as code files only, said once."""

    def __init__(self, name, device):
        self.name, self.device, self.model, self.failed = name, device, None, False

    def __call__(self, frames):
        if self.failed:
            return None
        if self.model is None:
            try:
                if not (os.path.isdir(self.name) or "/" in self.name or self.name == "random-dac-44khz"):
                    raise ValueError("neither a folder nor a hub id")
                self.model = load_codec(self.name).to(self.device).eval()
            except Exception as err:
                self.failed = True
                logger.warning(f"cannot load codec {self.name} ({type(err).__name__}: {str(err)[:120]}); "
                               f"continuations are saved as code files only")
                return None
        with torch.no_grad():
            audio = self.model.decode(audio_codes=frames.T[None].to(self.device)).audio_values
        return audio.reshape(-1).float().cpu()


def load_codec(name):
    """A DAC codec by path or hub id; `random-dac-44khz` is the real 44.1 kHz architecture, randomly initialised
    (deterministic codes of real audio for pipeline tests; they decode to noise)."""
    from transformers import DacConfig, DacModel

    if name == "random-dac-44khz":
        torch.manual_seed(0)
        return DacModel(DacConfig(sampling_rate=44100, downsampling_ratios=[2, 4, 8, 8], n_codebooks=9,
                                  codebook_size=1024, encoder_hidden_size=64, decoder_hidden_size=1536))
    return DacModel.from_pretrained(name)


def write_continuation(model, decoder, prompt, args, header, step, accelerator, out_dir):
    """Generate, save codes (and audio when the codec loads), log the clip."""
    from common.audio import save_audio
    from common.media import log_audio

    frames = generate(model, prompt, args.eval_frames, args.eval_temperature, args.eval_top_k, args.eval_top_p,
                      seed=args.seed, ctx=args.ctx)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"continuation_{step:07d}"
    save_codes(f"{stem}{CODE_SUFFIX}", frames.cpu(), header["codec"], header["sample_rate"], header["frame_rate"],
               header["codebook_size"], source=f"generated at step {step}")
    audio = decoder(frames.cpu() if args.eval_on_cpu else frames)
    if audio is not None:
        save_audio(f"{stem}.wav", audio, header["sample_rate"])
        log_audio(accelerator, "val/continuation", audio, header["sample_rate"], step)
    return frames


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints and export


def export(model_or_state, cfg, header, folder, extra=None):
    """model.safetensors + config.json: what `generate` (or anyone) needs to rebuild the model."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = model_or_state if isinstance(model_or_state, dict) else model_or_state.state_dict()
    save_file({k: v.detach().float().cpu().contiguous() for k, v in state.items()}, folder / "model.safetensors")
    config = {"model": dataclasses.asdict(cfg), "codec": header, **(extra or {})}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_export(folder, device="cpu"):
    config = json.loads((Path(folder) / "config.json").read_text())
    model = build_model(RVQConfig(**config["model"]))
    model.load_state_dict(load_file(Path(folder) / "model.safetensors", device="cpu"))
    return model.to(device).eval(), config


def save_checkpoint(accelerator, args, step, state, model, optimizer, scheduler, ema, cfg, guard, outlier):
    """Everything a resumed run needs, written atomically (see common/checkpoint.py): the model's weights and
    architecture, the outlier guard's running loss, and the training parts every script saves. Returns the
    checkpoint's folder on the main process (to archive it), None elsewhere."""
    refuse_non_finite(step, {"model": model, "EMA": ema.shadow if ema is not None else None},
                      hint=f"; `train_rvq.py doctor {args.output_dir}` shows it")
    writer = start_checkpoint(accelerator, args.output_dir, step)
    save_training_parts(writer, accelerator, {"model": optimizer}, {"model": scheduler}, ema)
    if accelerator.is_main_process:
        writer.add_tensors("model", model.state_dict())
        writer.add_json("model_config", dataclasses.asdict(cfg))
        writer.add_json("training_state", training_state(accelerator, args, step, state, ema, guard,
                                                         outlier=outlier.state_dict()))
    return commit_checkpoint(writer, accelerator, args.checkpoints_total_limit)


def archive_checkpoint(path, output_dir, keep):
    """Copy a complete checkpoint to output_dir/archive/checkpoint-<step>-<time>/ (copied, then renamed into
    place) and keep the newest `keep` archives."""
    archive = Path(output_dir) / "archive"
    archive.mkdir(exist_ok=True)
    final = archive / f"{Path(path).name}-{time.strftime('%Y%m%d-%H%M%S')}"
    tmp = archive / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(path, tmp)
    os.replace(tmp, final)
    kept = sorted((p for p in archive.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: (int(p.name.split("-")[1]), p.name))
    for old in kept[:-keep] if keep else []:
        shutil.rmtree(old)
    logger.info(f"archived {final}")


def load_checkpoint(ckpt, accelerator, args, model, optimizer, scheduler, ema, guard, outlier):
    """Restore a checkpoint into the built objects; returns the saved training state. A model whose shape differs
    (possible only with --ignore_arch) is refused unless --allow_model_change."""
    state = ckpt.json("training_state")
    changed = load_models(ckpt, {"model": model}, args.allow_model_change)
    restore_training_parts(ckpt, accelerator, state, {"model": optimizer}, {"model": scheduler}, guard,
                           changed=changed)
    restore_ema(ckpt, ema, model, state, changed="model" in changed)
    saved = state["args"]
    if (saved["ctx"], saved["step"]) != (args.ctx, args.step):
        # The curriculum the seed asks for (ctx 512, then 1024): windows change, so the epoch restarts and the
        # loss's running average (a different context gives a different loss) starts afresh.
        logger.warning(f"resuming with --ctx {args.ctx} --step {args.step} (the checkpoint was trained with --ctx "
                       f"{saved['ctx']} --step {saved['step']}): the windows change, so epoch {state['epoch']} "
                       f"restarts and the outlier guard's running loss starts afresh")
        state["samples_in_epoch"] = 0
    else:
        outlier.load_state_dict(state["outlier"])
    log_changed_settings(saved, args, SCHEDULE_FLAGS, state.get("num_processes"), accelerator.num_processes)
    return state


# What --dry_run suggests when the recipe would not fit the GPU, most effective first.
DRY_RUN_HINTS = ("a smaller --train_batch_size with a larger --gradient_accumulation_steps (the same effective batch)",
                 "--mixed_precision bf16", "a shorter --ctx", "a smaller --model preset")

# Settings whose change on resume alters the run's course; each is stated in the log when it differs.
SCHEDULE_FLAGS = ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "num_train_epochs",
                  "learning_rate", "lr_scheduler", "lr_warmup_steps", "optimizer", "weight_decay", "mixed_precision",
                  "seed", "label_smoothing", "cb_weights", "cb_weights_auto_alpha", "outlier_factor", "freeze")


def restore_architecture(ckpt, args):
    """The checkpoint's architecture, unless --ignore_arch; says which flags it overrides."""
    saved = RVQConfig(**ckpt.json("model_config"))
    if args.ignore_arch:
        return None
    saved.dropout = args.dropout  # not part of the architecture: it may change on resume
    flagged = model_config_from_args(args, saved.num_codebooks, saved.codebook_size)
    differ = [f"--{k} {getattr(flagged, k)}" for k in ARCH_FLAGS if getattr(flagged, k) != getattr(saved, k)]
    if differ:
        logger.warning(f"architecture restored from {ckpt.path} (d_model {saved.d_model}, {saved.layers} layers, "
                       f"{saved.heads} heads, {saved.pattern} pattern); ignoring {', '.join(differ)}: pass "
                       f"--ignore_arch to build from the flags")
    return saved


# ---------------------------------------------------------------------------------------------------------------


def main(args):
    accelerator = setup_accelerator(args, args.mixed_precision or bf16_if_supported())
    stop, watchdog = GracefulStop(), Watchdog(args.stall_timeout)
    ckpt = open_resume(accelerator, args.resume_from_checkpoint, args.output_dir)
    set_seed(args.seed)
    device = accelerator.device

    # Data: files validated once (corrupt ones skipped and counted), split by file, cut into windows.
    corrupt = CorruptSampleTracker(args.max_corrupt_fraction, min_samples=1)
    files, header = scan_code_files(find_code_files(args.data), corrupt)
    if header is None:
        raise SystemExit(f"--data {' '.join(args.data)}: no readable code files ({corrupt.summary()})")
    if args.validation_data:
        val_files, val_header = scan_code_files(find_code_files(args.validation_data), corrupt)
        if val_header is not None and {k: val_header[k] for k in ("codec", "num_codebooks", "codebook_size")} != \
                {k: header[k] for k in ("codec", "num_codebooks", "codebook_size")}:
            raise SystemExit(f"--validation_data: {_describe(val_header)} differs from --data's {_describe(header)}")
        train_files = files
    else:
        if len(files) < 2:
            raise SystemExit(f"--data: {len(files)} readable code file; validation holds out whole files, so give "
                             f"at least 2 (or --validation_data)")
        count = max(1, round(args.val_fraction * len(files)))
        train_files, val_files = split_holdout(files, count, args.seed)
    longest = max(frames for _, frames in train_files)
    if args.ctx >= longest:
        raise SystemExit(f"--ctx {args.ctx} is larger than every training file (the longest has {longest} frames; "
                         f"a window needs ctx + 1): lower --ctx")
    K, V = header["num_codebooks"], header["codebook_size"]
    cfg = restore_architecture(ckpt, args) if ckpt is not None else None
    cfg = cfg or model_config_from_args(args, K, V)
    if (cfg.num_codebooks, cfg.codebook_size) != (K, V):
        raise SystemExit(f"--data: the codes are {K} x {V} but the checkpoint's model predicts {cfg.num_codebooks} x "
                         f"{cfg.codebook_size} (vocabulary mismatch on resume); use matching codes or a new "
                         f"--output_dir")
    args.pattern = cfg.pattern
    if cfg.positions == "learned" and args.ctx > cfg.max_positions:
        raise SystemExit(f"--ctx {args.ctx} is longer than the model's {cfg.max_positions} learned positions")
    history = K - 1 if cfg.pattern == "delay" else 0
    train_set = CodeWindows(train_files, args.ctx, args.step, history)
    val_windows = CodeWindows(val_files, args.ctx, args.ctx, history)
    val_windows.windows = val_windows.windows[:args.max_val_windows]
    if not len(val_windows):
        raise SystemExit(f"--ctx {args.ctx}: every validation file is shorter than ctx + 1 frames; lower --ctx or "
                         f"hold out longer files")
    try:
        sampler = ResumableBatchSampler(len(train_set), args.train_batch_size, accelerator.num_processes,
                                        accelerator.process_index, args.seed)
    except ValueError as err:
        raise SystemExit(f"--train_batch_size {args.train_batch_size}: {err}") from None
    workers = args.dataloader_num_workers
    loader = torch.utils.data.DataLoader(
        train_set, batch_sampler=sampler, collate_fn=collate_windows, num_workers=workers,
        pin_memory=device.type == "cuda", persistent_workers=workers > 0,
        prefetch_factor=args.prefetch_factor if workers else None, worker_init_fn=loader_worker_init,
        generator=torch.Generator().manual_seed(args.seed))
    steps_per_epoch = max(1, sampler.batches_per_epoch // args.gradient_accumulation_steps)
    max_steps = args.num_train_epochs * steps_per_epoch if args.num_train_epochs else args.max_train_steps
    entropy = unigram_entropy(train_files, K, V)
    cb_weights = codebook_weights(args.cb_weights, entropy, args.cb_weights_auto_alpha).to(device)
    logger.info(f"{len(train_files)} training files ({len(train_set)} windows of {args.ctx} frames), "
                f"{len(val_files)} validation files ({len(val_windows)} windows); {K} codebooks x {V} from "
                f"{header['codec']} at {header['frame_rate']:.2f} frames/s; {steps_per_epoch} steps per epoch, "
                f"{max_steps} in all; unigram entropy per codebook (nats): "
                f"{', '.join(f'{h:.3f}' for h in entropy.tolist())}; codebook weights "
                f"{', '.join(f'{w:.3f}' for w in cb_weights.tolist())}")

    # Model, EMA, optimizer
    model = build_model(cfg).to(device)
    logger.info(f"model: {count_parameters(model) / 1e6:.2f}M parameters (d_model {cfg.d_model}, {cfg.layers} layers, "
                f"{cfg.heads} heads, {cfg.positions} positions, {cfg.pattern} pattern)")
    ema = (EMA(model, args.ema_decay, args.ema_power, compile=args.compile, every=args.ema_update_every)
           if args.use_ema else None)
    model_eval = copy.deepcopy(model).eval().requires_grad_(False)
    opt_cfg = optimizer_kwargs(args)
    trainable = freeze(model, args.freeze)
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]  # norms: no weight decay (nanoGPT)
    optimizer = build_optimizer(params=[{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
                                **opt_cfg["optimizer"])
    plain = model
    if args.compile:
        model.compile(mode=args.compile_mode)  # in place: state-dict keys keep their names
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = build_scheduler(optimizer, total_steps=max_steps, **opt_cfg["scheduler"])
    guard, outlier = SkipGuard(args.max_consecutive_skips), OutlierGuard(args.outlier_factor, args.outlier_warmup)
    set_seed(args.seed, device_specific=True)

    state = {"epoch": 0, "samples_in_epoch": 0, "run_id": new_run_id(), "best_val": None}
    if ckpt is not None:
        state = {"best_val": None, **load_checkpoint(ckpt, accelerator, args, plain, optimizer, scheduler, ema,
                                                      guard, outlier)}
        logger.info(f"resumed from {ckpt.path} at step {ckpt.step}")
    global_step = ckpt.step if ckpt is not None else 0
    stop_when = StopCondition(args.stop_when, args.stop_when_logs)
    stop_when.load_state_dict(state.get("stop_when"))
    if stop_when.met:  # this run already ended on the same --stop_when: nothing left to train
        max_steps = global_step
    windows_per_step = args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    if args.dry_run:  # pre-flight: a few real guarded steps, a report, nothing written
        batches = infinite_batches(loader, sampler, state["epoch"], 0)

        def one_step(i):
            window_loss = torch.zeros((), device=device)
            for _ in range(args.gradient_accumulation_steps):
                window = next(batches)[2]["codes"].to(device, non_blocking=True)
                metrics = train_step(window, model, accelerator, args, cb_weights, cfg.pad_id)
                window_loss += metrics["loss/total"] / args.gradient_accumulation_steps
            guarded_step(accelerator, model, optimizer, window_loss, outlier, args)
            watchdog.beat()

        dry = DryRun(args.dry_run_steps, windows_per_step * args.ctx, max_steps - global_step, DRY_RUN_HINTS,
                     unit="frames")
        accelerator.print("\n".join(dry.run(one_step)))
        return
    init_trackers(accelerator, args.tracker_project_name or "train_rvq", vars(args), state["run_id"],
                  args.output_dir, args.tracker_run_name, args.tracker_group,
                  args.tracker_tags or tracker_tags(args, __file__))
    write_run_info(args.output_dir, args, accelerator, __file__)
    metrics_file = MetricsFile(Path(args.output_dir, "metrics.jsonl"), resume_step=global_step if ckpt else None,
                               enabled=accelerator.is_main_process)
    decoder = CodecDecoder(args.codec or header["codec"], "cpu" if args.eval_on_cpu else device)
    prompt = load_codes(val_files[0][0], 0, args.eval_prompt_frames)

    # Train
    batches = infinite_batches(loader, sampler, state["epoch"], state["samples_in_epoch"] // sampler.global_batch)
    throughput, accumulated, flops = Throughput(peak_bf16_flops()), MetricsAccumulator(), None
    window_loss = torch.zeros((), device=device)
    progress = tqdm(total=max_steps, initial=global_step, desc="steps",
                    disable=args.quiet or not accelerator.is_local_main_process)
    epoch_started, run_started = time.time(), time.time()
    watchdog.beat()
    while global_step < max_steps:
        epoch, b, batch = next(batches)
        window = batch["codes"].to(device, non_blocking=True)
        count = throughput.peak_flops and flops is None
        with FlopCount() if count else nullcontext() as counter:
            metrics = train_step(window, model, accelerator, args, cb_weights, cfg.pad_id)
        if count:
            flops = counter.total * args.gradient_accumulation_steps * accelerator.num_processes
        window_loss += metrics["loss/total"] / args.gradient_accumulation_steps
        accumulated.add(metrics)
        if not accelerator.sync_gradients:
            continue

        # The end of the accumulation window: one guarded optimizer step.
        grad_norm, reason, stepped = guarded_step(accelerator, model, optimizer, window_loss, outlier, args)
        window_loss = torch.zeros((), device=device)
        guard.update(stepped, global_step + 1, reason=reason)
        if stepped is not False:
            scheduler.step()
            if ema is not None:
                ema.update(plain, applied=stepped)
        accumulated.add({"grad_norm/model": grad_norm})
        global_step += 1
        state["epoch"], state["samples_in_epoch"] = epoch, (b + 1) * sampler.global_batch
        # The epoch's last optimizer step (its window may run into the next epoch if accumulation does not divide it).
        epoch_end = b + 1 + args.gradient_accumulation_steps > sampler.batches_per_epoch
        throughput.add(windows_per_step, flops)
        progress.update(1)
        watchdog.beat()
        stopping = stop.requested(accelerator)

        if global_step % args.logging_steps == 0 or global_step == max_steps:
            logs = accumulated.pop(accelerator)
            guard.flush()  # the skip flags of the steps since the last log (the sync that accumulated.pop made)
            logs.update(throughput.measure())  # samples are windows of --ctx frames
            logs["perf/frames_per_s"] = logs["perf/samples_per_s"] * args.ctx
            logs.update({"lr/model": scheduler.get_last_lr()[0], "train/skipped_steps": guard.total,
                         "train/epoch": epoch, "train/elapsed_s": time.time() - run_started, **corrupt.metrics()})
            if ema is not None:
                logs["train/ema_decay"] = ema.decay()
            accelerator.log(logs, step=global_step)
            metrics_file.write(global_step, logs)
            progress.set_postfix(loss=f"{logs['loss/total']:.4f}", fps=f"{logs['perf/frames_per_s']:.0f}")
            observe_plateau(scheduler, logs)  # --lr_scheduler plateau learns from the logged means
            if stop_when.update(logs):
                max_steps = global_step  # --stop_when held: this step is the last (validated, checkpointed, exported)
        last = global_step == max_steps
        validate_now = global_step % args.validation_steps == 0 or last or (
            epoch_end and args.val_every and (epoch + 1) % args.val_every == 0)
        if validate_now and not stopping:
            if accelerator.is_main_process:
                (ema.copy_to(model_eval) if ema is not None else model_eval.load_state_dict(plain.state_dict()))
                val = evaluate(model_eval, val_windows, args, cfg.pad_id, device, args.train_batch_size)
                if state["best_val"] is None or val["val/loss"] < state["best_val"]:
                    state["best_val"] = val["val/loss"]
                    export(model_eval, cfg, header, Path(args.output_dir, "best"),
                           {"step": global_step, "val_loss": val["val/loss"]})
                val["val/best_loss"] = state["best_val"]
                accelerator.log(val, step=global_step)
                metrics_file.write(global_step, val)
                per_cb = " ".join(f"{val[f'val/ce_cb{k}']:.3f}" for k in range(K))
                logger.info(f"step {global_step}: val loss {val['val/loss']:.4f} (ppl {val['val/ppl']:.1f}, best "
                            f"{state['best_val']:.4f}); CE per codebook {per_cb}")
            accelerator.wait_for_everyone()
            watchdog.beat()
            if stop_when.update(val if accelerator.is_main_process else {}, accelerator, main_only=True):
                max_steps, last = global_step, True  # --stop_when held on a validation metric: the last step
        audio_now = args.eval_audio_every and (last or (epoch_end and (epoch + 1) % args.eval_audio_every == 0))
        if audio_now and not stopping:
            if accelerator.is_main_process:
                (ema.copy_to(model_eval) if ema is not None else model_eval.load_state_dict(plain.state_dict()))
                write_continuation(model_eval, decoder, prompt, args, header, global_step, accelerator,
                                   Path(args.output_dir, "samples"))
            accelerator.wait_for_everyone()
            watchdog.beat()
        if global_step % args.checkpointing_steps == 0 or last or stopping or (
                epoch_end and args.archive_every and (epoch + 1) % args.archive_every == 0):
            guard.flush()  # a run that must stop for skipped steps stops before writing
            path = save_checkpoint(accelerator, args, global_step, {**state, "stop_when": stop_when.state_dict()},
                                   plain, optimizer, scheduler, ema, cfg, guard, outlier)
            if accelerator.is_main_process and epoch_end and args.archive_every and (epoch + 1) % args.archive_every == 0:
                archive_checkpoint(path, args.output_dir, args.keep_archived)
            watchdog.beat()
        if epoch_end and accelerator.is_main_process:
            now = time.time()
            message = (f"epoch {epoch + 1} done at step {global_step}: {now - epoch_started:.1f} s "
                       f"(elapsed {now - run_started:.0f} s)")
            (print(message, flush=True) if args.quiet else logger.info(message))
            epoch_started = now
        if stopping:
            logger.info(f"stopped at step {global_step} on request; continue with --resume_from_checkpoint latest")
            break

    progress.close()
    if accelerator.is_main_process and global_step == max_steps:
        (ema.copy_to(model_eval) if ema is not None else model_eval.load_state_dict(plain.state_dict()))
        export(model_eval, cfg, header, args.output_dir, {"step": global_step})
        logger.info(f"exported to {args.output_dir}; corrupt code files skipped: {corrupt.summary()}")
    accelerator.end_training()


# ---------------------------------------------------------------------------------------------------------------
# Sub-commands: encode, generate, doctor


def encode_main(argv):
    """Audio folders -> code files, batched on the GPU."""
    from common.audio import AUDIO_EXTENSIONS, load_audio
    from common.data import find_files

    p = ArgumentParser(prog="train_rvq.py encode", description=encode_main.__doc__)
    p.add_argument("--input", required=True, help="Folder of audio files (wav/flac/ogg/mp3, any sample rate).")
    p.add_argument("--output", required=True, help=f"Folder for the code files (*{CODE_SUFFIX}), same layout.")
    p.add_argument("--codec", default="descript/dac_44khz",
                   help="DAC codec (path or hub id); `random-dac-44khz` = real architecture, random weights.")
    p.add_argument("--chunk_seconds", type=positive_float, default=30.0, help="Audio encoded per forward pass.")
    p.add_argument("--batch_size", type=positive_int, default=8, help="Chunks per forward pass.")
    p.add_argument("--overwrite", action="store_true", help="Re-encode files whose code file exists.")
    a = p.parse_args(argv)
    if not os.path.isdir(a.input):
        p.error(f"--input {a.input}: no such folder")
    paths = find_files(a.input, AUDIO_EXTENSIONS)
    if not paths:
        p.error(f"--input {a.input}: no audio files ({', '.join(sorted(AUDIO_EXTENSIONS))})")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    codec = load_codec(a.codec).to(device).eval()
    rate, hop = codec.config.sampling_rate, int(codec.config.hop_length)
    chunk = max(hop, int(a.chunk_seconds * rate) // hop * hop)
    done = skipped = 0
    for path in tqdm(paths, desc="encoding"):
        rel = Path(path).relative_to(a.input)
        out = Path(a.output) / rel.with_name(rel.name + CODE_SUFFIX)
        if out.exists() and not a.overwrite:
            continue
        try:
            audio = load_audio(path, rate)
        except CorruptSample as bad:
            print(f"skipped {bad.where}: {bad.reason}", file=sys.stderr)
            skipped += 1
            continue
        frames = math.ceil(len(audio) / hop)
        audio = F.pad(audio, (0, -len(audio) % chunk))
        pieces = audio.view(-1, chunk)
        codes = []
        with torch.no_grad():
            for batch in pieces.split(a.batch_size):
                codes.append(codec.encode(batch[:, None].to(device)).audio_codes.cpu())  # (B, K, T)
        codes = torch.cat(codes).permute(0, 2, 1).reshape(-1, codec.config.n_codebooks)[:frames]
        save_codes(out, codes, a.codec, rate, rate / hop, codec.config.codebook_size, source=str(rel))
        done += 1
    print(f"encoded {done} files into {a.output} ({skipped} unreadable skipped)")


def generate_main(argv):
    """An exported model (or best/) -> a continuation: code file, and audio when the codec loads."""
    from common.audio import save_audio

    p = ArgumentParser(prog="train_rvq.py generate", description=generate_main.__doc__)
    p.add_argument("--model", required=True, help="Export folder (model.safetensors + config.json).")
    p.add_argument("--prompt", required=True, help=f"A code file (*{CODE_SUFFIX}) whose start is continued.")
    p.add_argument("--prompt_frames", type=positive_int, default=256, help="Frames of --prompt to use.")
    p.add_argument("--frames", type=positive_int, default=1290, help="Frames to generate.")
    p.add_argument("--temperature", type=positive_float, default=1.0)
    p.add_argument("--top_k", type=non_negative_int, default=250)
    p.add_argument("--top_p", type=fraction, default=0.0)
    p.add_argument("--ctx", type=positive_int, default=512, help="Sliding attention window, in positions.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--codec", default=None, help="Codec to decode with (default: the one the model was trained on).")
    p.add_argument("--output", required=True, help="Output .wav (the codes go beside it).")
    a = p.parse_args(argv)
    if not (Path(a.model) / "config.json").is_file():
        p.error(f"--model {a.model}: no config.json (an export folder of train_rvq.py)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, config = load_export(a.model, device)
    header = config["codec"]
    K = model.cfg.num_codebooks
    try:
        h = read_codes_header(a.prompt)
    except (CorruptSample, OSError) as bad:
        p.error(f"--prompt {a.prompt}: {getattr(bad, 'reason', bad)}")
    if (h["num_codebooks"], h["codebook_size"]) != (K, model.cfg.codebook_size):
        p.error(f"--prompt {a.prompt}: {h['num_codebooks']} x {h['codebook_size']} codes, the model predicts "
                f"{K} x {model.cfg.codebook_size}")
    prompt = load_codes(a.prompt, 0, a.prompt_frames)
    frames = generate(model, prompt, a.frames, a.temperature, a.top_k, a.top_p, a.seed, a.ctx).cpu()
    stem = str(Path(a.output).with_suffix(""))
    save_codes(stem + CODE_SUFFIX, frames, header["codec"], header["sample_rate"], header["frame_rate"],
               header["codebook_size"], source=f"generated by {a.model}")
    audio = CodecDecoder(a.codec or header["codec"], device)(frames)
    if audio is not None:
        save_audio(a.output, audio, header["sample_rate"])
        print(f"wrote {a.output} and {stem + CODE_SUFFIX} ({len(frames)} frames)")
    else:
        print(f"wrote {stem + CODE_SUFFIX} ({len(frames)} frames; no audio: the codec did not load)")


def doctor_main(argv):
    """A checkpoint's (or a whole run's) health: step, arguments, weight and EMA norms, non-finite tensors, the
    EMA-vs-raw distance, and the loss history with spikes marked. Exits 1 when something is wrong."""
    p = ArgumentParser(prog="train_rvq.py doctor", description=doctor_main.__doc__)
    p.add_argument("path", help="A checkpoint folder or a run's --output_dir.")
    p.add_argument("--spike_factor", type=positive_float, default=1.5,
                   help="Mark logged losses above this multiple of the median of the 20 before them.")
    a = p.parse_args(argv)
    path = Path(a.path)
    if (path / "training_state.json").exists() or path.name.startswith("checkpoint-"):
        run_dir, ckpts = path.parent, [path]
    else:
        run_dir, ckpts = path, [c for _, c in checkpoint_dirs(path)]
        if not ckpts and not (path / "metrics.jsonl").exists():
            p.error(f"{path}: neither a checkpoint nor a run folder (no checkpoint-*/, no metrics.jsonl)")
    problems = 0
    for i, folder in enumerate(ckpts):
        try:
            ck = Checkpoint(folder)
        except CheckpointError as err:
            print(f"{folder}: unreadable: {err}")
            problems += 1
            continue
        state = ck.json("training_state")
        print(f"== {folder} (step {ck.step}, epoch {state.get('epoch')}, skipped steps {state['skips']['total']})")
        if i == len(ckpts) - 1:
            args = state["args"]
            print("   args: " + " ".join(f"--{k} {v}" for k, v in sorted(args.items()) if v not in (None, False)))
        weights = ck.tensors("model")
        ema = ck.tensors("ema") if ck.has("ema") else None
        bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        bad += [f"ema.{k}" for k, v in (ema or {}).items() if v.is_floating_point() and not torch.isfinite(v).all()]
        norm = lambda ts: math.sqrt(sum(float(t.double().pow(2).sum()) for t in ts.values()))  # noqa: E731
        line = f"   weight norm {norm(weights):.3f}"
        if ema is not None:
            dist = math.sqrt(sum(float((weights[k].double() - ema[k].double()).pow(2).sum()) for k in weights if k in ema))
            line += f", EMA norm {norm(ema):.3f}, EMA-raw distance {dist:.4f}"
        print(line)
        if bad:
            problems += 1
            print(f"   NON-FINITE: {', '.join(bad[:10])}{' ...' if len(bad) > 10 else ''}")
        else:
            print("   all tensors finite")
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        history = [(m["step"], m["loss/total"]) for m in read_metrics(metrics) if "loss/total" in m]
        vals = [(m["step"], m["val/loss"]) for m in read_metrics(metrics) if "val/loss" in m]
        spikes = []
        for i, (step, loss) in enumerate(history):
            before = sorted(v for _, v in history[max(0, i - 20):i])
            if not math.isfinite(loss) or (before and loss > a.spike_factor * before[len(before) // 2]):
                spikes.append(step)
        print(f"== loss history ({len(history)} logged steps; spikes over {a.spike_factor:g}x the running median "
              f"marked *)")
        stride = max(1, len(history) // 20)
        for i, (step, loss) in enumerate(history):
            if i % stride == 0 or step in spikes or i == len(history) - 1:
                print(f"   step {step:>8}  loss {loss:.4f}{'  *' if step in spikes else ''}")
        if vals:
            best = min(vals, key=lambda v: v[1])
            print(f"   validation: last {vals[-1][1]:.4f} at step {vals[-1][0]}, best {best[1]:.4f} at step {best[0]}")
        problems += sum(not math.isfinite(loss) for _, loss in history)
    print("problems found" if problems else "no problems found")
    return 1 if problems else 0


if __name__ == "__main__":
    commands = {"encode": encode_main, "generate": generate_main, "doctor": doctor_main}
    if len(sys.argv) > 1 and sys.argv[1] in commands:
        sys.exit(commands[sys.argv[1]](sys.argv[2:]))
    with fail_fast():
        main(parse_args())
