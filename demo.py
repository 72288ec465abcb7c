#!/usr/bin/env python
"""A short tour on built-in demo data: trains each model family briefly on the CPU (or a GPU if there is one)
and writes an output of each under demo_out/. Nothing is downloaded.

    python demo.py [--out demo_out]

image VAE: demo_out/image_vae/samples/reconstruction_*.png (originals above, reconstructions below),
           metrics.jsonl, and the exported diffusers AutoencoderKL with latent_stats.json.
LDM:       demo_out/ldm/samples/step_*.png (samples for held-out captions, one row per seed), the export.
vocoder:   demo_out/vocoder/samples/step-*/ (real and resynthesised clips, spectrograms real | generated), the export.
audio VAE: demo_out/audio_vae/samples/step-*/ (mels real | reconstructed, clips through the demo vocoder), the export.
RVQ LM:    demo_out/rvq/samples/continuation_*.codes.safetensors (a generated continuation of held-out codes),
           metrics.jsonl (held-out cross-entropy per codebook), the export and `train_rvq.py doctor`'s report.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common.demo_data import make_demo_audio, make_demo_codes, make_demo_images, make_demo_text_encoder

ROOT = Path(__file__).resolve().parent


def run(script, *args):
    cmd = [sys.executable, str(ROOT / script), *map(str, args)]
    print("$", " ".join(cmd), flush=True)
    start = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.time() - start


def last_values(metrics_path, prefix):
    values = {}
    for line in Path(metrics_path).read_text().splitlines():
        values.update({k: v for k, v in json.loads(line).items() if k.startswith(prefix)})
    return values


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "demo_out", help="Where data and outputs go.")
    out = parser.parse_args().out

    images = make_demo_images(out / "data" / "shapes", num_images=512, size=64, seed=0)
    seconds = run("train_image_vae.py", "--config", ROOT / "configs/demo/image_vae.yaml", "--train_data_dir", images,
                  "--output_dir", out / "image_vae")
    val = last_values(out / "image_vae" / "metrics.jsonl", "val/")
    grids = sorted((out / "image_vae" / "samples").glob("reconstruction_*.png"))
    print(f"\nimage VAE ({seconds / 60:.1f} min): held-out PSNR {val['val/psnr']:.2f} dB, SSIM {val['val/ssim']:.3f}")
    print(f"  reconstructions: {grids[0]} (first) ... {grids[-1]} (last)")
    print(f"  export: {out / 'image_vae'} (diffusers AutoencoderKL + latent_stats.json)")

    # Latent diffusion in that VAE's latents; a small random BERT stands in for CLIP (whose weights are a download).
    text_encoder = make_demo_text_encoder(out / "data" / "text_encoder")
    seconds = run("train_ldm.py", "--config", ROOT / "configs/demo/ldm.yaml", "--train_data_dir", images,
                  "--vae", out / "image_vae", "--text_encoder", f"hf:{text_encoder}", "--cache_dir", out / "ldm_cache",
                  "--output_dir", out / "ldm", "--resume_from_checkpoint", "none")
    val = last_values(out / "ldm" / "metrics.jsonl", "val/")
    grids = sorted((out / "ldm" / "samples").glob("step_*.png"))
    print(f"\nlatent diffusion ({seconds / 60:.1f} min): held-out loss {val['val/loss']:.3f}; samples for 6 held-out "
          f"captions x 2 seeds: {grids[-1]}")
    print(f"  python train_ldm.py generate --model {out / 'ldm'} --prompt 'a red circle on a blue background' "
          f"--output {out / 'ldm_generated'}")

    audio = make_demo_audio(out / "data" / "notes", num_files=48, seconds=(1.0, 2.0), sample_rate=16000, seed=0)
    seconds = run("train_vocoder.py", "--config", ROOT / "configs/demo/vocoder.yaml", "--train_data_dir", audio,
                  "--output_dir", out / "vocoder", "--resume_from_checkpoint", "none")
    val = last_values(out / "vocoder" / "metrics.jsonl", "val/")
    last = sorted((out / "vocoder" / "samples").glob("step-*"))[-1]
    print(f"\nvocoder ({seconds / 60:.1f} min): held-out mel L1 {val['val/mel_l1']:.3f}, MR-STFT {val['val/mrstft']:.3f}"
          + (f", PESQ {val['val/pesq']:.2f}" if "val/pesq" in val else ""))
    print(f"  clips and spectrograms: {last}; resynthesise any file with")
    print(f"  python -m common.vocoder --vocoder {out / 'vocoder'} --input {sorted(audio.glob('*.wav'))[0]} "
          f"--output resynthesised.wav")

    seconds = run("train_audio_vae.py", "--config", ROOT / "configs/demo/audio_vae.yaml", "--train_data_dir", audio,
                  "--output_dir", out / "audio_vae", "--vocoder", out / "vocoder", "--resume_from_checkpoint", "none")
    val = last_values(out / "audio_vae" / "metrics.jsonl", "val/")
    stats = json.loads((out / "audio_vae" / "latent_stats.json").read_text())
    print(f"\naudio VAE ({seconds / 60:.1f} min): held-out mel L1 {val['val/mel_l1']:.3f}, KL {val['val/kl']:.3f} nats, "
          f"latent {stats['latent_shape_per_segment']} per {stats['segment_samples']} samples")
    print(f"  spectrograms (real | reconstructed) and clips through the vocoder: "
          f"{sorted((out / 'audio_vae' / 'samples').glob('step-*'))[-1]}")
    print(f"  export: {out / 'audio_vae'} (diffusers AutoencoderKL + audio_vae.json + latent_stats.json)")

    train = make_demo_codes(out / "data" / "codes" / "train", num_files=24, seed=0)
    held_out = make_demo_codes(out / "data" / "codes" / "validation", num_files=4, seed=1)
    seconds = run("train_rvq.py", "--config", ROOT / "configs/demo/rvq.yaml", "--data", train, "--validation_data",
                  held_out, "--output_dir", out / "rvq", "--resume_from_checkpoint", "none", "--eval_audio_every", "1000",
                  "--eval_frames", "64", "--eval_prompt_frames", "32")
    val = last_values(out / "rvq" / "metrics.jsonl", "val/")
    print(f"\nRVQ LM ({seconds / 60:.1f} min): held-out cross-entropy {val['val/loss']:.3f} nats per code "
          f"(a model that ignores context: log 64 = 4.159 at best)")
    print(f"  continuation: {sorted((out / 'rvq' / 'samples').glob('continuation_*'))[-1]}")
    run("train_rvq.py", "doctor", out / "rvq")


if __name__ == "__main__":
    main()
