#!/usr/bin/env bash
# One command for every script's speed and memory on one GPU: each recipe in configs/ at its default shapes, and the
# shapes the README compares with peers, run through the script's own `--dry_run` (real models, optimizers and data
# loaders; STEPS optimizer steps with the discriminators and R1 on; FLOPs counted on the real model in one more
# step), then one table: throughput, model-FLOPs utilisation of the dense bf16 peak, peak memory after step 1, and
# the precision and compile settings.
#
#   bash benchmarks/run_all.sh OUT [STEPS]        # STEPS: 20 by default; ONLY="run names" for some of them
#
# Data of the real shapes is generated: 256 px images, 22.05 kHz noise-and-tone audio, 9 x 1024 code files.
# The image VAE's LPIPS runs a randomly initialised VGG (the same compute as the pretrained one).
# A new script joins with one `run` line.
set -uo pipefail
out=$1 steps=${2:-20}
mkdir -p "$out/data"
python3 - "$out/data" <<'PY'
import sys
import numpy as np
import soundfile as sf
from pathlib import Path
from common.demo_data import make_demo_codes, make_demo_images
root = Path(sys.argv[1])
make_demo_images(root / "images", num_images=96, size=256, seed=0)
make_demo_codes(root / "codes", num_files=16, frames=2700, seed=0, num_codebooks=9, codebook_size=1024,
                codec="descript/dac_44khz")
rng = np.random.default_rng(0)
for split, n in (("train", 64), ("validation", 2), ("train_512", 512)):
    (root / "audio" / split).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        t = np.arange(22050 * 3) / 22050
        clip = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 400) * t) + 0.05 * rng.standard_normal(t.size)
        sf.write(root / "audio" / split / f"{i:03d}.wav", clip.astype(np.float32), 22050)
PY
audio=(--train_data_dir "$out/data/audio/train" --validation_data_dir "$out/data/audio/validation")
# The audio VAE's batches of 32 would make an epoch of the 64 files two steps long, and every epoch's first batch
# waits for the loader: it trains on 512.
audio_512=(--train_data_dir "$out/data/audio/train_512" --validation_data_dir "$out/data/audio/validation")
run() {  # run NAME [VAR=value ...] SCRIPT ARGS...
  name=$1; shift
  [[ -z "${ONLY:-}" || " $ONLY " == *" $name "* ]] || return 0  # ONLY="a b": just those runs
  vars=(); while [[ $1 =~ ^[A-Z_]+= ]]; do vars+=("$1"); shift; done
  env "${vars[@]}" python3 "$@" --output_dir "$out/$name" --dry_run --dry_run_steps "$steps" --report_to none \
    --dataloader_num_workers 4 > "$out/$name.log" 2>&1
  echo "$name exit $? :: ${vars[*]:+${vars[*]} }$*" >> "$out/commands.txt"
}
rm -f "$out/commands.txt"
run image_vae train_image_vae.py --config configs/image_vae.yaml --train_data_dir "$out/data/images" --lpips_backbone random
run image_vae_compiled train_image_vae.py --config configs/image_vae.yaml --train_data_dir "$out/data/images" \
  --lpips_backbone random --compile
run image_vae_compiled_fused train_image_vae.py --config configs/image_vae.yaml --train_data_dir "$out/data/images" \
  --lpips_backbone random --compile --fused_group_norm
run vocoder_hifigan train_vocoder.py --config configs/vocoder_hifigan.yaml "${audio[@]}"
run vocoder_v1_peer_shape train_vocoder.py --config configs/vocoder_hifigan.yaml "${audio[@]}" --model hifigan-v1
run vocoder_dac train_vocoder.py --config configs/vocoder_dac.yaml "${audio[@]}"
run vocoder_bigvgan train_vocoder.py --config configs/vocoder_bigvgan.yaml "${audio[@]}"
run audio_vae_mel train_audio_vae.py --config configs/audio_vae_mel.yaml "${audio_512[@]}"
run audio_vae_mel_channels_last train_audio_vae.py --config configs/audio_vae_mel.yaml "${audio_512[@]}" --channels_last
run audio_vae_mel_compiled train_audio_vae.py --config configs/audio_vae_mel.yaml "${audio_512[@]}" --compile
run audio_vae_mel_compiled_nographs train_audio_vae.py --config configs/audio_vae_mel.yaml "${audio_512[@]}" --compile \
  --compile_mode default
# Inductor's coordinate-descent tuning of its own kernels (with --fused_group_norm: no faster, README)
run audio_vae_mel_compiled_cdt TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 train_audio_vae.py \
  --config configs/audio_vae_mel.yaml "${audio_512[@]}" --compile
# GroupNorm -> SiLU as common/group_norm.py's Triton kernels, eager and compiled
run audio_vae_mel_fused train_audio_vae.py --config configs/audio_vae_mel.yaml "${audio_512[@]}" --fused_group_norm
run audio_vae_mel_compiled_fused train_audio_vae.py --config configs/audio_vae_mel.yaml "${audio_512[@]}" --compile \
  --fused_group_norm
run audio_vae_waveform train_audio_vae.py --config configs/audio_vae_waveform.yaml "${audio_512[@]}"
run rvq_base512 train_rvq.py --config configs/rvq_base512.yaml --data "$out/data/codes"
run rvq_big1280 train_rvq.py --config configs/rvq_big1280.yaml --data "$out/data/codes"
run rvq_nanogpt_peer_shape train_rvq.py --config configs/rvq_base512.yaml --data "$out/data/codes" --ctx 1024 \
  --step 512 --train_batch_size 32 --gradient_accumulation_steps 1
python3 - "$out" <<'PY'
import json, re, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = []
for line in (out / "commands.txt").read_text().splitlines():
    name, rest = line.split(" exit ", 1)
    status, command = rest.split(" :: ", 1)
    text = (out / f"{name}.log").read_text()
    get = lambda pattern: (re.search(pattern, text) or [None, None])[1]
    config = command.split("--config ")[1].split()[0] if "--config " in command else ""
    rows.append({"run": name, "exit": int(status), "throughput": get(r"; ([\d.]+ \w+/s);"),
                 "s_per_step": get(r"seconds per step ([\d.]+)"), "mfu": get(r"([\d.]+%) of the GPU"),
                 "peak_gib": get(r"peak GPU memory ([\d.]+) GiB"), "first_step_gib": get(r"first (?:step|\d+ steps) ([\d.]+) GiB"),
                 "compile": "--compile" in command or "compile: true" in (Path(config).read_text() if config else ""),
                 "precision": re.search(r"mixed_precision: \"?(\w+)", Path(config).read_text())[1] if config else "",
                 "command": command})
(out / "benchmarks.json").write_text(json.dumps(rows, indent=1))
print(f"{'run':26s} {'throughput':>20s} {'s/step':>7s} {'MFU':>6s} {'peak GiB':>9s} {'1st GiB':>8s} precision compile")
for r in rows:
    print(f"{r['run']:26s} {r['throughput'] or 'exit ' + str(r['exit']):>20s} {r['s_per_step'] or '':>7s} "
          f"{r['mfu'] or '':>6s} {r['peak_gib'] or '':>9s} {r['first_step_gib'] or '':>8s} {r['precision']:9s} "
          f"{r['compile']}")
PY
