"""The command line shared by the step benchmarks (vocoder_step.py, rvq_step.py): variants side by side in one
process, each one's figures printed as it finishes, then the whole table as JSON.

    python benchmarks/<bench>.py [--variants A,B,A] [--steps N] [--warmup N] [--profile A] [--json F] -- SCRIPT FLAGS
"""

import argparse
import json
import sys
from pathlib import Path

import torch


def main(run_variant, description, variants, steps, warmup):
    """`run_variant(variant, script_argv, steps, warmup, profile)` -> a dict of figures for one variant."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--variants", default=variants)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--profile", default="", help="Comma-separated variants to profile after timing.")
    parser.add_argument("--json", default=None, help="Also write the table here.")
    argv = sys.argv[1:]
    script_argv = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    profiled = set(filter(None, args.profile.split(",")))
    cuda = torch.cuda.is_available()
    table = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
             "script_flags": script_argv}
    for n, variant in enumerate(args.variants.split(",")):
        key = variant if variant not in table else f"{variant} (run {n + 1})"  # a repeat shows the noise
        try:
            table[key] = run_variant(variant, script_argv, args.steps, args.warmup, variant in profiled)
        except Exception as err:  # one failing variant must not lose the others' figures
            table[key] = {"error": f"{type(err).__name__}: {err}"[:500]}
        print(key, json.dumps(table[key]), flush=True)
        if cuda:
            torch.cuda.empty_cache()  # the variant's models and optimizer states are gone with its frame
    print(json.dumps(table, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=1))
