"""Each script's accumulation probe (tests/scripts.py) under DistributedDataParallel: every process takes its share
of the probe batch, split further into --gradient_accumulation_steps micro-batches, runs one optimizer step of the
script's own training step, and saves the weights it ends with (and the logged gradient norm).

    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 tests/ddp_probe.py OUT

writes OUT/<script>-acc<k>-rank<r>.pt for k = 1 and 2.
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scripts import SCRIPTS  # noqa: E402

out = Path(sys.argv[1])
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
for spec in SCRIPTS:
    torch.manual_seed(0)
    share = spec.probe_batch().chunk(world)[rank]
    for accumulation in (1, 2):
        weights, _, _, metrics = spec.accumulation_probe(list(share.chunk(accumulation)), accumulation, 1e-3)
        torch.save({"weights": weights, "grad_norm": torch.as_tensor(metrics[-1][spec.grad_norm_key])},
                   out / f"{spec.name}-acc{accumulation}-rank{rank}.pt")
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()  # before the interpreter's teardown, which could abort with it
