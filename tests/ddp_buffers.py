"""The PatchGAN discriminator (BatchNorm) under the DDP of common.training.setup_accelerator, called on real and then
on generated images before one backward, as the image and audio VAE scripts call it. Each process writes
OUT/rank<r>.json: whether the backward succeeded, whether DDP re-broadcasts buffers at each forward, and the
discriminator's first BatchNorm running mean.

    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 tests/ddp_buffers.py OUT

(DDP's default re-broadcast writes every buffer in place at each forward; on GPUs cuDNN's BatchNorm backward then
refuses the first pass's statistics as "modified by an inplace operation". CPUs do not show that failure, so this
records the setting; tests/test_reliability.py also runs the GAN scripts on two GPUs where there are two.)
"""

import gc
import json
import sys
from argparse import Namespace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common.discriminators import build_image_discriminator  # noqa: E402
from common.training import setup_accelerator  # noqa: E402

out = Path(sys.argv[1])
accelerator = setup_accelerator(Namespace(gradient_accumulation_steps=1, report_to="none", stall_timeout=0,
                                          output_dir=str(out), allow_tf32=True), "no")
torch.manual_seed(0)
disc = accelerator.prepare(build_image_discriminator("patchgan", 3, 8, 3, "batch"))
torch.manual_seed(accelerator.process_index + 1)
try:
    logits_real, _ = disc(torch.randn(2, 3, 32, 32))
    logits_fake, _ = disc(torch.randn(2, 3, 32, 32))
    (torch.relu(1 - logits_real[0]).mean() + torch.relu(1 + logits_fake[0]).mean()).backward()
    backward = "ok"
except RuntimeError as error:
    backward = str(error).splitlines()[0]
batch_norm = next(m for m in disc.module.modules() if isinstance(m, torch.nn.BatchNorm2d))
(out / f"rank{accelerator.process_index}.json").write_text(json.dumps(
    {"backward": backward, "broadcast_buffers": disc.broadcast_buffers,
     "running_mean": batch_norm.running_mean.tolist()}))
accelerator.wait_for_everyone()
# The DDP wrapper and the accelerator's reference to it go first, while the interpreter is whole, then the process
# group. A module-level DDP object would otherwise outlive the group into the interpreter's teardown, where Gloo's
# worker threads can release the last tensors they hold and abort the process (pytorch/pytorch#179291): one run on
# 2 busy cores ended "terminate called without an active exception".
accelerator.free_memory()
del disc, batch_norm
gc.collect()
accelerator.end_training()
