"""Command-line parsing shared by every script.

`--config file.yaml` supplies defaults and the command line overrides them, so a recipe lives in a YAML file and
one-off changes stay on the command line. Errors are one line naming the flag (or file) and what would be valid,
and they happen before any model is built.
"""

import argparse
import difflib
import os
import sys

import yaml


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: `train_x.py: error: --learning_rate must be > 0 (got -1.0)`."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def parse_args_with_config(parser, argv=None):
    """Parse `argv` with the keys of `--config` (if given) as defaults; explicit flags win over the file."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**load_config(known.config, parser))
    args = parser.parse_args(argv)
    check_optimizer_args_flags(parser, args)
    return args


def check_optimizer_args_flags(parser, args):
    """Every `--{prefix}optimizer_args` against its own `--{prefix}optimizer`, before any model is built."""
    from common.optim import check_optimizer_args

    for dest, extra in vars(args).items():
        if dest.endswith("optimizer_args") and extra:
            prefix = dest[: -len("optimizer_args")]
            problem = check_optimizer_args(getattr(args, f"{prefix}optimizer"), extra)
            if problem:
                parser.error(f"--{dest} {' '.join(f'{k}={v}' for k, v in extra.items())}: {problem}")


def load_config(path, parser):
    """Read a YAML recipe and convert its values through each flag's own type and choices."""
    if not os.path.isfile(path):
        parser.error(f"--config {path}: no such file")
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as err:
        parser.error(f"--config {path}: unreadable YAML ({' '.join(str(err).split())})")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        parser.error(f"--config {path}: expected a mapping of flag names to values, got {type(raw).__name__}")

    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    values = {}
    for key, value in raw.items():
        dest = str(key).lstrip("-").replace("-", "_")
        if dest not in actions:
            close = difflib.get_close_matches(dest, list(actions), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            parser.error(f"--config {path}: unknown key '{key}'{hint}")
        values[dest] = _convert(parser, actions[dest], value, path, key)
    return values


def _convert(parser, action, value, path, key):
    where = f"--config {path}: '{key}'"
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            parser.error(f"{where} must be true or false, got {value!r}")
        return value
    if value is None:
        return None
    if action.nargs in ("*", "+") or isinstance(action.nargs, int):
        items = value if isinstance(value, list) else [value]
        return [_convert_one(parser, action, v, where) for v in items]
    if isinstance(value, (list, dict)):
        if getattr(action.type, "takes_yaml_structures", False):  # e.g. optimizer_args as a mapping
            try:
                return action.type(value)
            except argparse.ArgumentTypeError as err:
                parser.error(f"{where}: {err}")
        parser.error(f"{where} must be a single value, got {value!r}")
    return _convert_one(parser, action, value, where)


def _convert_one(parser, action, value, where):
    # YAML reads `1e-4` as a string (YAML 1.1 wants `1.0e-4`), so every value goes through the flag's own type.
    # Going through str() also refuses 1.5 for an integer flag instead of truncating it.
    if action.type is not None:
        try:
            value = action.type(str(value))
        except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
            parser.error(f"{where}: {err}")
    if action.choices is not None and value not in action.choices:
        parser.error(f"{where}: invalid choice {value!r} (choose from {', '.join(map(str, action.choices))})")
    return value


# ---------------------------------------------------------------------------------------------------------------
# Value types and checks


def positive_float(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (got {text})")
    return value


def non_negative_float(text):
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (got {text})")
    return value


def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer (got {text})")
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (got {text})")
    return value


def fraction(text):
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (got {text})")
    return value


def key_values(text):
    """'a=1 b=true c=0.5' -> {'a': 1, 'b': True, 'c': 0.5} (values read as YAML scalars); also a dict from a config."""
    if isinstance(text, dict):
        if not all(isinstance(k, str) and k.isidentifier() for k in text):
            raise argparse.ArgumentTypeError(f"{text!r} must map argument names to values")
        return dict(text)
    out = {}
    for item in text.replace(",", " ").split():
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise argparse.ArgumentTypeError(f"'{item}' is not KEY=VALUE")
        out[key] = yaml.safe_load(value)
    return out


def int_list(text):
    try:
        items = text if isinstance(text, (list, tuple)) else str(text).replace(",", " ").split()
        return tuple(int(v) for v in items)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of integers") from None


key_values.takes_yaml_structures = int_list.takes_yaml_structures = True


def training_metric(text):
    if text.startswith("val/"):
        raise argparse.ArgumentTypeError(f"'{text}' is a validation metric, computed on the main process only; "
                                         f"watch a training metric such as loss/total")
    return text


def stop_condition(text):
    from common.training import StopCondition

    try:
        StopCondition.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text.strip()


# ---------------------------------------------------------------------------------------------------------------
# Flag groups every script shares. Names follow diffusers' examples so users find the flags they know.


def add_run_args(parser, *, batch_size, max_train_steps, checkpointing_steps, validation_steps):
    g = parser.add_argument_group("run")
    g.add_argument("--config", type=str, default=None, help="YAML file whose keys set the defaults of these flags.")
    g.add_argument("--output_dir", type=str, default=None, help="Where checkpoints, samples, logs and the export go.")
    g.add_argument("--seed", type=int, default=0, help="Seed for model init, data order and augmentation.")
    g.add_argument("--train_batch_size", type=positive_int, default=batch_size, help="Batch size per device.")
    g.add_argument("--gradient_accumulation_steps", type=positive_int, default=1,
                   help="Micro-batches summed into one optimizer step (effective batch = batch x this x devices).")
    g.add_argument("--max_train_steps", type=positive_int, default=max_train_steps,
                   help="Optimizer steps to train for.")
    g.add_argument("--num_train_epochs", type=positive_int, default=None,
                   help="If set, overrides --max_train_steps with this many passes over the training data.")
    g.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                   help="Autocast precision; defaults to accelerate's config (or 'no').")
    g.add_argument("--allow_tf32", action=argparse.BooleanOptionalAction, default=True,
                   help="TF32 matmuls and convolutions on GPUs that have them.")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the trained models (--no-compile turns off a recipe's compile: true).")
    g.add_argument("--dataloader_num_workers", type=non_negative_int, default=4, help="Data loading processes.")
    g.add_argument("--max_grad_norm", type=non_negative_float, default=1.0,
                   help="Clip gradients to this global norm (0 disables clipping; norms are logged either way).")
    g.add_argument("--max_consecutive_skips", type=positive_int, default=25,
                   help="Stop the run after this many optimizer steps in a row skipped for non-finite gradients.")
    g.add_argument("--max_corrupt_fraction", type=fraction, default=0.01,
                   help="Stop the run once more than this fraction of loaded samples was corrupt and skipped.")
    g.add_argument("--checkpointing_steps", type=positive_int, default=checkpointing_steps,
                   help="Save a resumable checkpoint every this many optimizer steps.")
    g.add_argument("--checkpoints_total_limit", type=positive_int, default=None,
                   help="Keep at most this many checkpoints; older ones go only after a new one is complete.")
    g.add_argument("--resume_from_checkpoint", type=str, default=None,
                   help="'latest' (the newest complete checkpoint in --output_dir, if any), a checkpoint folder, or "
                        "'none' (start fresh).")
    g.add_argument("--allow_model_change", action="store_true",
                   help="Resume even if the model's shape changed: load the tensors that still fit, start the rest "
                        "(and their optimizer state) fresh. Without it such a resume is refused.")
    g.add_argument("--stall_timeout", type=non_negative_float, default=1800.0,
                   help="Seconds without a finished step after which every thread's stack is printed and the run "
                        "exits (a stuck collective or data loader); counted from the first step, so start-up is "
                        "not, but each validation and checkpoint must finish within it; 0 disables.")
    g.add_argument("--report_to", type=str, default="tensorboard", choices=["tensorboard", "wandb", "all", "none"],
                   help="Experiment tracker (metrics.jsonl in --output_dir is written in every case).")
    g.add_argument("--tracker_project_name", type=str, default=None, help="wandb project / tensorboard run name.")
    g.add_argument("--tracker_run_name", type=str, default=None,
                   help="wandb run name (default: the --output_dir folder's name).")
    g.add_argument("--tracker_group", type=str, default=None,
                   help="wandb group: runs of one experiment or pipeline side by side (a pipeline sets its name).")
    g.add_argument("--tracker_tags", type=str, nargs="+", default=None,
                   help="wandb tags (default: the script, the --config file's name and the model preset).")
    g.add_argument("--logging_steps", type=positive_int, default=20,
                   help="Log metrics every this many optimizer steps (the only regular host-device sync).")
    g.add_argument("--validation_steps", type=positive_int, default=validation_steps,
                   help="Validate (samples and held-out metrics from the EMA weights) every this many steps.")
    g.add_argument("--freeze", type=str, nargs="+", default=None,
                   help="Keep these parameters of the trained model fixed, by name prefix (e.g. 'encoder quant_conv' "
                        "to fine-tune an image VAE's decoder alone); a stage of a pipeline can freeze what the "
                        "previous one trained.")
    g.add_argument("--dry_run", action="store_true",
                   help="Pre-flight check: build everything, train --dry_run_steps steps at the configured shapes, "
                        "print seconds per step, throughput, time to --max_train_steps and peak GPU memory (and what "
                        "to change if it would not fit 32 GB), then exit without writing anything.")
    g.add_argument("--dry_run_steps", type=positive_int, default=5, help="Optimizer steps of the --dry_run.")
    g.add_argument("--stop_when", type=stop_condition, default=None,
                   help="End the run early once a logged metric meets a threshold, e.g. 'loss/total<0.01' or "
                        "'val/psnr>=30' (operators <, <=, >, >=): that step is validated, checkpointed and exported "
                        "as the last.")
    g.add_argument("--stop_when_logs", type=positive_int, default=1,
                   help="--stop_when must hold in this many consecutive logs of its metric.")
    return g


def add_mel_args(parser, title="mel spectrogram (saved with the model; chained audio models must match it)"):
    """The mel configuration flags (common.spectral.MelConfig; HiFi-GAN's defaults) of every audio script."""
    from common.spectral import LOG_KINDS

    g = parser.add_argument_group(title)
    g.add_argument("--sample_rate", type=positive_int, default=22050, help="Audio sample rate.")
    g.add_argument("--n_fft", type=positive_int, default=1024, help="FFT size.")
    g.add_argument("--hop_length", type=positive_int, default=256, help="Hop in samples: one mel frame per hop.")
    g.add_argument("--win_length", type=positive_int, default=1024, help="Hann window length (<= --n_fft).")
    g.add_argument("--n_mels", type=positive_int, default=80, help="Mel bands.")
    g.add_argument("--fmin", type=non_negative_float, default=0.0, help="Lowest mel frequency (Hz).")
    g.add_argument("--fmax", type=positive_float, default=8000.0, help="Highest mel frequency (Hz).")
    g.add_argument("--mel_log", type=str, default="ln", choices=LOG_KINDS, help="Log of the mel magnitudes.")
    return g


def mel_config(args):
    """The common.spectral.MelConfig of `add_mel_args`' flags (ValueError naming what is wrong)."""
    from common.spectral import MelConfig

    return MelConfig(sample_rate=args.sample_rate, n_fft=args.n_fft, hop_length=args.hop_length,
                     win_length=args.win_length, n_mels=args.n_mels, fmin=args.fmin, fmax=args.fmax, log=args.mel_log)


def check_audio_data_args(parser, args):
    """The audio scripts' shared checks, one line each through `parser.error`: --train_data_dir given, the data
    folders exist and hold audio, and the mel flags form a valid configuration, which is returned."""
    from common.audio import AUDIO_EXTENSIONS
    from common.data import has_any_file

    if not args.train_data_dir:
        parser.error("--train_data_dir is required (a folder of audio files)")
    for flag in ("train_data_dir", "validation_data_dir"):
        folder = getattr(args, flag)
        if folder and not os.path.isdir(folder):
            parser.error(f"--{flag} {folder}: no such folder")
        if folder and not has_any_file(folder, AUDIO_EXTENSIONS):
            parser.error(f"--{flag} {folder}: contains no audio ({', '.join(sorted(AUDIO_EXTENSIONS))})")
    try:
        return mel_config(args)
    except ValueError as err:
        parser.error(f"mel settings: {err}")


def add_ema_args(parser, *, decay, power, every=1):
    g = parser.add_argument_group("EMA")
    g.add_argument("--use_ema", action=argparse.BooleanOptionalAction, default=True,
                   help="Keep an exponential moving average of the weights for validation and export.")
    g.add_argument("--ema_decay", type=fraction, default=decay, help="Largest EMA decay, reached after warm-up.")
    g.add_argument("--ema_power", type=positive_float, default=power,
                   help="EMA warm-up: decay = 1 - (1 + step)^-power, capped at --ema_decay (k-diffusion's EMAWarmup).")
    g.add_argument("--ema_update_every", type=positive_int, default=every,
                   help="Update the average on every N-th optimizer step, with the N steps' decays at once (the same "
                        "horizon for 1/N of the memory traffic; the average lags by at most N - 1 steps).")
    return g


def add_optimizer_args(parser, *, prefix="", title, optimizer="adamw", lr, betas, weight_decay,
                       scheduler="cosine", warmup_steps=0):
    """Optimizer and schedule flags for one trained model: `--{prefix}optimizer`, `--{prefix}learning_rate`, ..."""
    from common.optim import OPTIMIZERS, SCHEDULERS

    g = parser.add_argument_group(title)
    g.add_argument(f"--{prefix}optimizer", type=str, default=optimizer, choices=sorted(OPTIMIZERS),
                   help="Optimizer by name.")
    g.add_argument(f"--{prefix}learning_rate", type=positive_float, default=lr, help="Peak learning rate.")
    g.add_argument(f"--{prefix}adam_beta1", type=fraction, default=betas[0], help="Adam-family beta1.")
    g.add_argument(f"--{prefix}adam_beta2", type=fraction, default=betas[1], help="Adam-family beta2.")
    g.add_argument(f"--{prefix}adam_epsilon", type=positive_float, default=1e-8, help="Adam-family epsilon.")
    g.add_argument(f"--{prefix}weight_decay", type=non_negative_float, default=weight_decay,
                   help="Decoupled weight decay.")
    g.add_argument(f"--{prefix}lr_scheduler", type=str, default=scheduler, choices=sorted(SCHEDULERS),
                   help="Learning-rate schedule (all with linear warm-up).")
    g.add_argument(f"--{prefix}lr_warmup_steps", type=non_negative_int, default=warmup_steps,
                   help="Linear warm-up steps from 0 to the peak learning rate.")
    g.add_argument(f"--{prefix}optimizer_args", type=key_values, default={},
                   help="Further keyword arguments of the optimizer as KEY=VALUE pairs, e.g. 'amsgrad=true' or "
                        "'momentum=0.9 ns_steps=6' (the README lists what each optimizer takes).")
    g.add_argument(f"--{prefix}lr_min_ratio", type=fraction, default=0.0,
                   help="cosine/linear: final learning rate as a fraction of the peak; plateau: the floor.")
    g.add_argument(f"--{prefix}lr_gamma", type=fraction, default=0.999,
                   help="exponential: multiply the learning rate by this once per --lr_decay_every steps; step: "
                        "at each milestone.")
    g.add_argument(f"--{prefix}lr_decay_every", type=positive_int, default=1000,
                   help="exponential: steps between decays (use the steps per epoch for HiFi-GAN's per-epoch decay).")
    g.add_argument(f"--{prefix}lr_milestones", type=int_list, default=(),
                   help="step: optimizer steps at which the learning rate is multiplied by --lr_gamma, e.g. "
                        "'100000,150000'.")
    g.add_argument(f"--{prefix}lr_plateau_metric", type=training_metric, default="loss/total",
                   help="plateau: the training metric watched at every logging step (lower is better).")
    g.add_argument(f"--{prefix}lr_plateau_patience", type=positive_int, default=10,
                   help="plateau: logs without improvement before the learning rate drops.")
    g.add_argument(f"--{prefix}lr_plateau_factor", type=fraction, default=0.5,
                   help="plateau: multiply the learning rate by this at each drop.")
    return g


def optimizer_kwargs(args, prefix=""):
    """The `add_optimizer_args` values of one model as keyword arguments of `common.optim` builders."""
    get = lambda name: getattr(args, f"{prefix}{name}")  # noqa: E731
    return {
        "optimizer": dict(name=get("optimizer"), lr=get("learning_rate"), betas=(get("adam_beta1"), get("adam_beta2")),
                          eps=get("adam_epsilon"), weight_decay=get("weight_decay"), extra=get("optimizer_args")),
        "scheduler": dict(name=get("lr_scheduler"), warmup_steps=get("lr_warmup_steps"),
                          min_ratio=get("lr_min_ratio"), gamma=get("lr_gamma"), decay_every=get("lr_decay_every"),
                          milestones=get("lr_milestones"), plateau_metric=get("lr_plateau_metric"),
                          plateau_patience=get("lr_plateau_patience"), plateau_factor=get("lr_plateau_factor")),
    }
