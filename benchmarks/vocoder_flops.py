"""FLOPs of one train_vocoder.py step at the HiFi-GAN V1 benchmark shape, counted two ways (printed as JSON):

- `counted`: torch's per-operator formulas over the real step (what the script's perf/mfu uses), with grouped
  convolution gradients counted at their true cost (common/perf.py);
- `from_forward`: forward passes only, times the usual factors: 3x for the generator and for the discriminator
  pass on real + generated audio (forward, input and weight gradients), 2x for the generator's pass through the
  frozen discriminator (no weight gradients).

The two agree when backward costs about twice the forward pass. Also the memory each pass keeps for its backward
(`saved_gib`: tensors saved by autograd, each counted once). FLOPs and saved memory grow linearly with the batch, so the step
is run at batch 1 on the CPU (a few seconds) and scaled to --batch.

    python benchmarks/vocoder_flops.py [--model hifigan-v1] [--discriminator hifigan] [--batch 16] [--segment 8192]
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common.discriminators import build_audio_discriminator  # noqa: E402
from common.perf import FlopCount  # noqa: E402
from common.spectral import MelConfig, MelSpectrogram  # noqa: E402
from common.vocoder import build_generator, generator_config  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="hifigan-v1")
    parser.add_argument("--discriminator", default="hifigan")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--segment", type=int, default=8192)
    args = parser.parse_args()
    device, scale = torch.device("cpu"), args.batch
    mel_config = MelConfig()
    generator = build_generator(generator_config(args.model, mel_config.n_mels)).to(device)
    disc = build_audio_discriminator(args.discriminator).to(device)
    mel = torch.randn(1, mel_config.n_mels, args.segment // mel_config.hop_length, device=device)
    audio = torch.randn(1, 1, args.segment, device=device)

    saved = {"generator": 0, "disc_real_and_generated": 0, "disc_generated": 0}

    def keep(key):  # adds up the bytes autograd saves for backward inside the block
        seen = set()

        def pack(t):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                saved[key] += t.numel() * t.element_size() * scale
            return t
        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

    with keep("generator"):
        fake = generator(mel)
    with keep("disc_real_and_generated"):
        disc(torch.cat([audio, fake.detach()]))
    disc.requires_grad_(False)
    with keep("disc_generated"):
        disc(fake)
    disc.requires_grad_(True)
    del fake

    with FlopCount() as g_fwd, torch.no_grad():
        generator(mel)
    with FlopCount() as d_fwd, torch.no_grad():
        disc(torch.cat([audio, audio]))
    with FlopCount() as d_fwd_b, torch.no_grad():
        disc(audio)
    with FlopCount() as mel_fwd, torch.no_grad():
        MelSpectrogram(mel_config).to(device)(audio)

    # The step as train_step runs it (losses reduced to what costs FLOPs: the discriminator passes and backward).
    with FlopCount() as step:
        fake = generator(mel)
        logits, _ = disc(torch.cat([audio, fake.detach()]))
        sum(x.mean() for x in logits).backward()
        disc.requires_grad_(False)
        logits, _ = disc(fake)
        sum(x.mean() for x in logits).backward()
        disc.requires_grad_(True)
    for counter in (g_fwd, d_fwd, d_fwd_b, mel_fwd, step):
        counter.total *= scale
    from_forward = 3 * g_fwd.total + 3 * d_fwd.total + 2 * d_fwd_b.total
    print(json.dumps({
        "model": args.model, "discriminator": args.discriminator, "batch": args.batch, "segment": args.segment,
        "generator_forward_gflop": g_fwd.total / 1e9, "disc_forward_2b_gflop": d_fwd.total / 1e9,
        "disc_forward_b_gflop": d_fwd_b.total / 1e9, "mel_forward_gflop": mel_fwd.total / 1e9,
        "step_counted_gflop": step.total / 1e9, "step_from_forward_gflop": from_forward / 1e9,
        "counted_over_from_forward": step.total / from_forward,
        "saved_gib": {k: round(v / 2**30, 3) for k, v in saved.items()}}, indent=1))


if __name__ == "__main__":
    main()
