"""Optimizers and learning-rate schedules by name.

`build_optimizer("adamw", params, lr=..., betas=..., eps=..., weight_decay=...)` and
`build_scheduler(optimizer, "cosine", total_steps, warmup_steps=...)`. Every schedule is a function of the
optimizer step, so a resumed run recomputes it from the step instead of trusting a saved copy.
"""

import math

import torch


# ---------------------------------------------------------------------------------------------------------------
# Optimizers


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, arXiv:2302.06675): the sign of an interpolated momentum, decoupled weight decay.

    Use a learning rate 3-10x smaller than AdamW's and a weight decay 3-10x larger.
    """

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                exp_avg = state["exp_avg"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                update = exp_avg.mul(beta1).add_(p.grad, alpha=1 - beta1).sign_()
                p.add_(update, alpha=-group["lr"])
                exp_avg.mul_(beta2).add_(p.grad, alpha=1 - beta2)
        return loss


def orthogonalize(grad, steps=5, eps=1e-7):
    """Approximate U V^T of grad = U S V^T with a quintic Newton-Schulz iteration in bf16.

    Coefficients (3.4445, -4.7750, 2.0315) from Keller Jordan's Muon write-up (kellerjordan.github.io/posts/muon):
    they push singular values towards ~1 in five steps without converging exactly, which does not hurt training.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    x = grad.bfloat16()
    transposed = x.size(0) > x.size(1)
    if transposed:
        x = x.T
    x = x / (x.norm() + eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if transposed else x).to(grad.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for matrices and convolution kernels, AdamW for everything else, in one optimizer.

    A parameter group with `use_muon=True` gets momentum SGD whose update is orthogonalized (kernels are viewed
    as (out, in * k...) matrices, as the Muon reference does for convolutions); other groups get AdamW. The
    orthogonal update is rescaled by 0.2 * sqrt(max(rows, cols)) so that its RMS matches AdamW's (Liu et al. 2025,
    "Muon is Scalable for LLM Training"), which lets Muon use the AdamW learning rate and weight decay.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, momentum=0.95,
                 nesterov=True, ns_steps=5):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, momentum=momentum,
                        nesterov=nesterov, ns_steps=ns_steps, use_muon=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if group["use_muon"]:
                    if not state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    buf = state["momentum_buffer"]
                    buf.lerp_(p.grad, 1 - group["momentum"])
                    update = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                    matrix = update.reshape(update.size(0), -1)
                    update = orthogonalize(matrix, group["ns_steps"]).view_as(p)
                    update = update * (0.2 * math.sqrt(max(matrix.shape)))
                    p.mul_(1 - lr * wd).add_(update, alpha=-lr)
                else:
                    beta1, beta2 = group["betas"]
                    if not state:
                        state["step"] = 0  # a Python int: no host-device sync for the bias corrections
                        state["exp_avg"] = torch.zeros_like(p)
                        state["exp_avg_sq"] = torch.zeros_like(p)
                    state["step"] += 1
                    t = state["step"]
                    state["exp_avg"].lerp_(p.grad, 1 - beta1)
                    state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                    denom = (state["exp_avg_sq"] / (1 - beta2**t)).sqrt_().add_(group["eps"])
                    p.mul_(1 - lr * wd).addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**t))
        return loss


def muon_param_groups(params, min_side=16):
    """Split parameters for `Muon`: matrices/kernels whose 2-D view has both sides >= min_side use Muon;
    biases, norms and thin input/output layers (e.g. a conv to 3 RGB channels) stay on AdamW."""
    muon, other = [], []
    for p in params:
        if p.ndim >= 2 and p.size(0) >= min_side and p[0].numel() >= min_side:
            muon.append(p)
        else:
            other.append(p)
    return [g for g in (dict(params=muon, use_muon=True), dict(params=other, use_muon=False)) if g["params"]]


def _adamw(params, lr, betas, eps, weight_decay, **extra):
    # The fused kernel (one launch for all tensors) runs on CUDA and on the CPU.
    return torch.optim.AdamW(params, **{"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                                        "fused": True, **extra})


def _adam(params, lr, betas, eps, weight_decay, **extra):
    return torch.optim.Adam(params, **{"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                                       "fused": True, **extra})


def _adamw8bit(params, lr, betas, eps, weight_decay, **extra):
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise SystemExit("--optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes") from err
    return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **extra)


OPTIMIZERS = {
    "adamw": _adamw,
    "adamw8bit": _adamw8bit,
    "adam": _adam,
    "lion": lambda params, lr, betas, eps, weight_decay, **extra: Lion(
        params, lr=lr, betas=betas, weight_decay=weight_decay, **extra),
    "muon": lambda params, lr, betas, eps, weight_decay, **extra: Muon(
        muon_param_groups(params), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **extra),
    "sgd": lambda params, lr, betas, eps, weight_decay, **extra: torch.optim.SGD(
        params, **{"lr": lr, "momentum": betas[0], "nesterov": betas[0] > 0, "weight_decay": weight_decay, **extra}),
    "rmsprop": lambda params, lr, betas, eps, weight_decay, **extra: torch.optim.RMSprop(
        params, **{"lr": lr, "alpha": betas[1], "eps": eps, "weight_decay": weight_decay, **extra}),
}

# The keyword arguments each optimizer takes beyond lr, betas, eps and weight_decay (`--optimizer_args`).
OPTIMIZER_EXTRA_ARGS = {
    "adamw": ("amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused"),
    "adam": ("amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused", "decoupled_weight_decay"),
    "adamw8bit": ("amsgrad", "optim_bits", "min_8bit_size", "percentile_clipping", "block_wise", "is_paged"),
    "lion": (),
    "muon": ("momentum", "nesterov", "ns_steps"),
    "sgd": ("momentum", "dampening", "nesterov", "maximize", "foreach", "differentiable", "fused"),
    "rmsprop": ("momentum", "centered", "capturable", "foreach", "maximize", "differentiable"),
}


def check_optimizer_args(name, extra):
    """The message naming what `name` does not take among `extra`'s keys, or None when all are known."""
    unknown = sorted(set(extra) - set(OPTIMIZER_EXTRA_ARGS.get(name, ())))
    if unknown:
        valid = ", ".join(OPTIMIZER_EXTRA_ARGS.get(name, ())) or "none beyond the learning rate, betas, epsilon and "\
            "weight decay flags"
        return f"{name} takes no argument {', '.join(unknown)} (it takes: {valid})"
    return None


def build_optimizer(name, params, *, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, extra=None):
    """An optimizer by name. For `sgd` beta1 is the momentum; for `rmsprop` beta2 is the smoothing constant.
    `extra`: further keyword arguments of that optimizer (see OPTIMIZER_EXTRA_ARGS)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer '{name}' (choose from {', '.join(sorted(OPTIMIZERS))})")
    problem = check_optimizer_args(name, extra or {})
    if problem:
        raise ValueError(problem)
    return OPTIMIZERS[name](list(params), lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                            **(extra or {}))


# ---------------------------------------------------------------------------------------------------------------
# Schedules: multipliers of the peak learning rate as functions of the optimizer step, all with linear warm-up.


def _warmup(step, warmup_steps):
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def _progress(step, warmup_steps, total_steps):
    return min(1.0, max(0.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))


class Plateau:
    """The multiplier of the `plateau` schedule: linear warm-up, then x `factor` whenever `metric` (a training
    metric, lower is better) has not improved on its best by more than 0.01% for `patience` logs in a row, floored
    at `min_ratio`. It learns only from `observe()`, called at logging steps with the logged means, which are the
    same on every process. A callable object rather than a function, so LambdaLR's state_dict saves its state
    and a resumed run continues where it was."""

    def __init__(self, warmup_steps, metric, patience, factor, min_ratio):
        self.warmup_steps, self.metric, self.patience = warmup_steps, metric, patience
        self.factor, self.min_ratio = factor, min_ratio
        self.scale, self.best, self.bad_logs = 1.0, None, 0

    def __call__(self, step):
        return _warmup(step, self.warmup_steps) * self.scale

    def observe(self, logs):
        if self.metric not in logs:
            return
        value = float(logs[self.metric])
        if self.best is None or value < self.best - 1e-4 * abs(self.best):
            self.best, self.bad_logs = value, 0
            return
        self.bad_logs += 1
        if self.bad_logs >= self.patience:
            self.scale, self.bad_logs = max(self.min_ratio, self.scale * self.factor), 0


def observe_plateau(scheduler, logs):
    """Feed one logging step's values to a `plateau` schedule (a no-op for the others)."""
    for fn in {id(fn): fn for fn in scheduler.lr_lambdas}.values():  # one object serves every parameter group
        if isinstance(fn, Plateau):
            fn.observe(logs)


def _milestones(step, warmup, gamma, milestones):
    return gamma ** sum(step >= m for m in milestones)


SCHEDULERS = {
    "constant": lambda step, total, warmup, min_ratio, gamma, every, milestones: _warmup(step, warmup),
    "cosine": lambda step, total, warmup, min_ratio, gamma, every, milestones: _warmup(step, warmup) * (
        min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * _progress(step, warmup, total)))),
    "linear": lambda step, total, warmup, min_ratio, gamma, every, milestones: _warmup(step, warmup) * (
        1 - (1 - min_ratio) * _progress(step, warmup, total)),
    "exponential": lambda step, total, warmup, min_ratio, gamma, every, milestones: _warmup(step, warmup) * (
        gamma ** (max(0, step - warmup) // every)),
    "step": lambda step, total, warmup, min_ratio, gamma, every, milestones: _warmup(step, warmup) * _milestones(
        step, warmup, gamma, milestones),
    "plateau": None,  # driven by a logged metric: see Plateau
}


def lr_multiplier(name, step, total_steps, warmup_steps=0, min_ratio=0.0, gamma=0.999, decay_every=1000,
                  milestones=()):
    """The factor applied to the peak learning rate at optimizer step `step` (0-based), for the schedules that are
    functions of the step alone."""
    return SCHEDULERS[name](step, total_steps, warmup_steps, min_ratio, gamma, decay_every, tuple(milestones))


def build_scheduler(optimizer, name, total_steps, *, warmup_steps=0, min_ratio=0.0, gamma=0.999, decay_every=1000,
                    milestones=(), plateau_metric="loss/total", plateau_patience=10, plateau_factor=0.5):
    if name not in SCHEDULERS:
        raise ValueError(f"unknown lr scheduler '{name}' (choose from {', '.join(sorted(SCHEDULERS))})")
    if name == "plateau":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, Plateau(warmup_steps, plateau_metric, plateau_patience, plateau_factor, min_ratio))

    def multiplier(step):  # a plain function, so LambdaLR's state_dict never pickles the schedule
        return lr_multiplier(name, step, total_steps, warmup_steps, min_ratio, gamma, decay_every, milestones)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
