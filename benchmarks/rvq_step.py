"""Time train_rvq.py's training step, variants side by side in one process, at nanoGPT's shape, beside a plain GPT.

Each script variant runs the script's own step as its training loop does: `train_step`, `guarded_step` (clip,
outlier guard, fused AdamW that skips on the GPU), the scheduler, the EMA update and the metric sums, on random
codes of the real shape (9 x 1024) already on the GPU, so the numbers measure the step alone. `peer` is a plain
GPT with nanoGPT's `train.py` architecture and step at the same shape: one token embedding of 9 x 1024 = 9216
rows tied to the output head, learned positions, bias-free LayerNorm, dropout on embeddings, attention and
residuals, one cross-entropy over 9216 classes computed inside the compiled forward, fused AdamW, clipping at
1.0, bf16 autocast, `torch.compile`; no EMA, no guard. Each variant is built afresh, warmed up (compilation
happens there), then timed over --steps steps between two device synchronisations. Printed last, as JSON: per
variant, steps/s, frames/s (a frame is one time step of all 9 codebooks; for the peer, one token),
model-FLOPs utilisation of the dense bf16 peak (FLOPs counted from the eager step, attention included), peak
memory, warm-up time.

    python benchmarks/rvq_step.py --variants compile+learned,peer,compile+learned+oldloss [--profile peer] \
        -- --model big --ctx 1024 --train_batch_size 32 --mixed_precision bf16

Variant parts, joined with `+`: `compile` (--compile; otherwise eager), `learned` (--positions learned),
`lnbias` (--norm_bias: LayerNorms with a bias), `graphs` (the compiled model replayed as CUDA graphs),
`oldloss` (the model returns its logits, which Accelerate turns to float32, and the loss is compiled on its own:
the step before the model computed its own losses), `eagerema` (the EMA update in three eager passes, as without
--compile), `noema` (no EMA update), `noattndrop` (no dropout on the attention probabilities; residual and
embedding dropout stay), `oldce` (F.cross_entropy instead of the script's SmoothedCrossEntropy), `noacc` (no
training accuracy), `embfn` (the summed codebook embeddings as one autograd function whose backward is a single
scatter-add), `splitqkv` (q, k and v from three matmuls over the rows of the same weight, so the attention's
gradients need no interleaving copy), `ema1` (--ema_update_every 1: the EMA updated on every step), `autotune` (--compile_mode
max-autotune-no-cudagraphs: Inductor times Triton kernels against cuBLAS for each matmul and tunes its other
kernels' launch settings). A variant
named twice runs twice, which shows the spread between identical runs.
"""

import functools
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_rvq as tr  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from common.args import optimizer_kwargs  # noqa: E402
from common.ema import EMA  # noqa: E402
from common.optim import build_optimizer, build_scheduler  # noqa: E402
from common.perf import FlopCount, peak_bf16_flops  # noqa: E402
from common.training import MetricsAccumulator, configure_torch  # noqa: E402
import side_by_side  # noqa: E402  (beside this file)

PARTS = {"compile", "learned", "oldloss", "noattndrop", "lnbias", "noema", "eagerema", "graphs", "oldce", "noacc",
         "embfn", "ema1", "splitqkv", "autotune"}


def split_qkv_forward(block, x, rope):
    """Block.forward with q, k and v each from its own matmul (rows of the same qkv weight)."""
    B, T, D = x.shape
    h = block.norm1(x)
    q, k, v = (F.linear(h, w).view(B, T, block.heads, D // block.heads).transpose(1, 2)
               for w in block.qkv.weight.split(D))
    if rope is not None:
        q, k = tr.rotary(q, *rope), tr.rotary(k, *rope)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=block.dropout if block.training else 0.0)
    x = x + block.drop(block.proj(y.transpose(1, 2).reshape(B, T, D)))
    return x + block.drop(block.mlp(block.norm2(x)))


def torch_cross_entropy_losses(logits, targets, label_smoothing=0.0, accuracy=True):
    """codebook_losses with F.cross_entropy (which keeps its own tensors for the backward)."""
    B, T, K, V = logits.shape
    ce = F.cross_entropy(logits.float().reshape(-1, V), targets.reshape(-1), ignore_index=-100,
                         label_smoothing=label_smoothing, reduction="none").view(B, T, K)
    valid = targets >= 0
    if not accuracy:
        return ce.sum(dim=(0, 1)) / (B * T), torch.zeros(K, device=logits.device)
    correct = (logits.argmax(-1) == targets) & valid
    return ce.sum(dim=(0, 1)) / (B * T), correct.sum(dim=(0, 1)).float() / valid.sum(dim=(0, 1)).clamp(min=1)


def losses_without_accuracy(logits, targets, label_smoothing=0.0):
    B, T, K, V = logits.shape
    ce = tr.SmoothedCrossEntropy.apply(logits.reshape(-1, V), targets.reshape(-1), label_smoothing).view(B, T, K)
    return ce.sum(dim=(0, 1)) / (B * T), torch.zeros(K, device=logits.device)


class SummedEmbedding(torch.autograd.Function):
    """Sum over codebooks of weight[ids[..., k]]; the backward is one scatter-add of the (B, T, d) gradient to all
    K rows of each frame (instead of K embedding backwards)."""

    @staticmethod
    def forward(ctx, weight, ids):
        x = weight[ids[..., 0]]
        for k in range(1, ids.shape[-1]):
            x = x + weight[ids[..., k]]
        ctx.save_for_backward(ids)
        ctx.rows = weight.shape[0]
        return x

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        D, K = grad.shape[-1], ids.shape[-1]
        spread = grad.reshape(-1, 1, D).expand(-1, K, D).reshape(-1, D)
        return grad.new_zeros(ctx.rows, D).index_add_(0, ids.reshape(-1), spread), None


class LogitsOut(nn.Module):
    """The step as it was before the model computed its own losses: the prepared model returns its logits (which
    Accelerate turns to float32) and the loss, compiled on its own, runs outside it."""

    def __init__(self, prepared, loss_fn):
        super().__init__()
        self.prepared, self.loss_fn = prepared, loss_fn

    def forward(self, inputs, targets, label_smoothing):
        return self.loss_fn(self.prepared(inputs), targets, label_smoothing)


class PeerBlock(nn.Module):
    def __init__(self, d, heads, dropout):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln_1, self.ln_2 = nn.LayerNorm(d, bias=False), nn.LayerNorm(d, bias=False)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.fc, self.fc_proj = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(D, dim=2)
        q, k, v = (t.view(B, T, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.c_proj(y.transpose(1, 2).reshape(B, T, D)))
        return x + self.drop(self.fc_proj(F.gelu(self.fc(self.ln_2(x)))))


class PeerGPT(nn.Module):
    """nanoGPT's GPT at a given shape: tied embedding/head, learned positions, pre-LN blocks, loss in forward."""

    def __init__(self, vocab, ctx, d, layers, heads, dropout):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(PeerBlock(d, heads, dropout) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d, bias=False)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, tokens, targets):
        x = self.drop(self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1], device=tokens.device)))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-1)


def peer_variant(args, accelerator, device):
    K, V = 9, 1024
    cfg = tr.model_config_from_args(args, K, V)
    model = PeerGPT(K * V, args.ctx, cfg.d_model, cfg.layers, cfg.heads, cfg.dropout).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=6e-4, betas=(0.9, 0.95), fused=True)
    model.compile()
    g = torch.Generator(device=device).manual_seed(0)
    batches = [torch.randint(K * V, (args.train_batch_size, args.ctx + 1), device=device, generator=g)
               for _ in range(4)]

    def step(i):
        tokens = batches[i % len(batches)]
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {"loss/total": loss.detach()}

    return step, sum(p.numel() for p in model.parameters())


def script_variant(parts, args, accelerator, device):
    K, V = 9, 1024
    cfg = tr.model_config_from_args(args, K, V)
    model = tr.build_model(cfg).to(device)
    if "splitqkv" in parts:
        for block in model.blocks:
            block.forward = functools.partial(split_qkv_forward, block)
    if "embfn" in parts:
        model.embed_frames = lambda tokens: SummedEmbedding.apply(model.embed.weight, tokens + model.offsets)
    if "noattndrop" in parts:
        for block in model.blocks:
            block.dropout = 0.0  # SDPA's dropout_p; the residual nn.Dropout stays
    ema = None if "noema" in parts else EMA(model, args.ema_decay, args.ema_power,
                                            compile=args.compile and "eagerema" not in parts,
                                            every=1 if "ema1" in parts else args.ema_update_every)
    opt_cfg = optimizer_kwargs(args)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = build_optimizer(params=[{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
                                **opt_cfg["optimizer"])
    plain = model
    if args.compile:
        graphs = {"default": "reduce-overhead", "max-autotune-no-cudagraphs": "max-autotune"}
        model.compile(mode=graphs[args.compile_mode] if "graphs" in parts else args.compile_mode)
    model, optimizer = accelerator.prepare(model, optimizer)
    if "oldloss" in parts:
        model = LogitsOut(model, torch.compile(tr.codebook_losses) if args.compile else tr.codebook_losses)
    scheduler = build_scheduler(optimizer, total_steps=100_000, **opt_cfg["scheduler"])
    outlier = tr.OutlierGuard(args.outlier_factor, args.outlier_warmup)
    cb_weights = torch.ones(K, device=device)
    accumulated = MetricsAccumulator()
    g = torch.Generator(device=device).manual_seed(0)
    history = K - 1 if cfg.pattern == "delay" else 0
    batches = [torch.randint(V, (args.train_batch_size, history + args.ctx + 1, K), device=device, generator=g)
               for _ in range(4)]

    def step(i):
        if "graphs" in parts:
            torch.compiler.cudagraph_mark_step_begin()
        metrics = tr.train_step(batches[i % len(batches)], model, accelerator, args, cb_weights, cfg.pad_id)
        grad_norm, _, stepped = tr.guarded_step(accelerator, model, optimizer, metrics["loss/total"], outlier, args)
        scheduler.step()
        if ema is not None:
            ema.update(plain, applied=stepped)
        if "graphs" in parts:  # the graphs' outputs are overwritten by the next replay
            metrics = {k: v.clone() for k, v in metrics.items()}
        accumulated.add({**metrics, "grad_norm/model": grad_norm})
        return metrics

    return step, tr.count_parameters(plain)


def run_variant(variant, script_argv, steps, warmup, profile):
    parts = set(variant.split("+"))
    if variant != "peer" and parts - PARTS:
        raise SystemExit(f"unknown variant part(s) {sorted(parts - PARTS)}; known: peer, {sorted(PARTS)}")
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["--data", tmp, "--output_dir", tmp, *script_argv, *(["--compile"] if "compile" in parts else []),
                *(["--positions", "learned"] if "learned" in parts else []),
                *(["--norm_bias"] if "lnbias" in parts else []),
                *(["--compile_mode", "max-autotune-no-cudagraphs"] if "autotune" in parts else [])]
        args = tr.build_parser().parse_args(argv)
    torch._dynamo.reset()
    configure_torch(args.allow_tf32)
    accelerator = Accelerator(mixed_precision=args.mixed_precision or "bf16")
    device = accelerator.device
    torch.manual_seed(0)
    losses = tr.codebook_losses
    if "oldce" in parts:
        tr.codebook_losses = functools.partial(torch_cross_entropy_losses, accuracy="noacc" not in parts)
    elif "noacc" in parts:
        tr.codebook_losses = losses_without_accuracy
    try:
        step, parameters = (peer_variant(args, accelerator, device) if variant == "peer"
                            else script_variant(parts, args, accelerator, device))
        return measure(step, parameters, variant, args, device, steps, warmup, profile)
    finally:
        tr.codebook_losses = losses


def measure(step, parameters, variant, args, device, steps, warmup, profile):
    with FlopCount() as counter:
        step(0)
    flops = counter.total
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for i in range(1, warmup):
        step(i)
    sync()
    warmup_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        out = step(i)
    sync()
    elapsed = time.perf_counter() - start
    peak = peak_bf16_flops()
    result = {
        "steps_per_s": round(steps / elapsed, 3),
        "frames_per_s": round(steps * args.train_batch_size * args.ctx / elapsed, 1),
        "ms_per_step": round(elapsed / steps * 1000, 2),
        "mfu_bf16_peak": round(flops * steps / elapsed / peak, 4) if peak else None,
        "step_tflop": round(flops / 1e12, 5),
        "parameters_m": round(parameters / 1e6, 2),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        "warmup_s": round(warmup_s, 1),
        "loss": round(float(out["loss/total"]), 4),
    }
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for i in range(5):
                step(warmup + steps + i)
            torch.cuda.synchronize()
        kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA
                   and e.self_device_time_total > 0]
        result["kernel_ms_per_step"] = round(sum(e.self_device_time_total for e in kernels) / 5 / 1000, 2)
        print(f"---- kernels of 5 steps, {variant} (ms per step, launches per step, name)")
        for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:70]:
            print(f"{e.self_device_time_total / 5000:8.3f} {e.count / 5:6.1f}  {e.key[:110]}")
        result["kernel_launches_per_step"] = round(sum(e.count for e in kernels) / 5, 1)
    return result


if __name__ == "__main__":
    side_by_side.main(run_variant, __doc__.split("\n\n")[0], "compile+learned,peer", steps=60, warmup=15)
