import argparse

import pytest

from common.args import ArgumentParser, add_optimizer_args, parse_args_with_config, positive_float, positive_int


def make_parser():
    p = ArgumentParser(prog="train_x.py")
    p.add_argument("--config")
    p.add_argument("--learning_rate", type=positive_float, default=1e-4)
    p.add_argument("--steps", type=positive_int, default=10)
    p.add_argument("--mode", choices=["a", "b"], default="a")
    p.add_argument("--flag", action="store_true")
    p.add_argument("--toggle", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--sizes", type=int, nargs="+", default=[1])
    return p


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_config_sets_defaults_and_cli_wins(tmp_path):
    cfg = write(tmp_path, "learning_rate: 3e-4\nsteps: 5\nmode: b\nflag: true\ntoggle: false\nsizes: [2, 3]\n")
    args = parse_args_with_config(make_parser(), ["--config", cfg])
    # YAML reads 3e-4 as a string; it must come out a float, through the flag's own type.
    assert args.learning_rate == pytest.approx(3e-4) and isinstance(args.learning_rate, float)
    assert (args.steps, args.mode, args.flag, args.toggle, args.sizes) == (5, "b", True, False, [2, 3])
    args = parse_args_with_config(make_parser(), ["--config", cfg, "--steps", "7", "--toggle"])
    assert args.steps == 7 and args.toggle is True


def test_dashed_keys_are_accepted(tmp_path):
    args = parse_args_with_config(make_parser(), ["--config", write(tmp_path, "learning-rate: 0.5\n")])
    assert args.learning_rate == 0.5


@pytest.mark.parametrize("text, message", [
    ("learning_rat: 1.0\n", "unknown key 'learning_rat' (did you mean 'learning_rate'?)"),
    ("learning_rate: -1\n", "'learning_rate': must be > 0 (got -1)"),
    ("steps: 1.5\n", "'steps'"),
    ("mode: c\n", "invalid choice 'c' (choose from a, b)"),
    ("flag: yes please\n", "'flag' must be true or false"),
    ("[1, 2]\n", "expected a mapping"),
    ("a: [unclosed\n", "unreadable YAML"),
])
def test_bad_config_is_one_line_error(tmp_path, capsys, text, message):
    with pytest.raises(SystemExit) as exit_info:
        parse_args_with_config(make_parser(), ["--config", write(tmp_path, text)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_missing_config_file(capsys):
    with pytest.raises(SystemExit):
        parse_args_with_config(make_parser(), ["--config", "/nonexistent.yaml"])
    assert "--config /nonexistent.yaml: no such file" in capsys.readouterr().err


def test_bad_flag_value_is_one_line(capsys):
    with pytest.raises(SystemExit):
        parse_args_with_config(make_parser(), ["--learning_rate", "0"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--learning_rate" in err and "must be > 0" in err


def test_optimizer_flag_groups_are_prefixed():
    p = ArgumentParser()
    add_optimizer_args(p, title="g", lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0)
    add_optimizer_args(p, prefix="disc_", title="d", lr=2e-4, betas=(0.8, 0.99), weight_decay=0.0)
    args = p.parse_args(["--disc_optimizer", "lion"])
    assert args.optimizer == "adamw" and args.disc_optimizer == "lion"
    assert (args.learning_rate, args.disc_learning_rate, args.disc_adam_beta1) == (1e-4, 2e-4, 0.8)
