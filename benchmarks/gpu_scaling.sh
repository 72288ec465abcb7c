#!/usr/bin/env bash
# Throughput on N GPUs over one GPU at the same per-GPU batch, for every script: each recipe's own --dry_run
# (real models, optimizers and data loaders; DDP over NCCL with N processes), once with one process and once with N.
#
#   bash benchmarks/gpu_scaling.sh OUT [STEPS] [N]     # STEPS: 15 by default; N: 2; ONLY="run names" for some;
#                                                      # LAUNCH_TIMEOUT: seconds per launch (600)
#
# Eager (--no-compile) everywhere, so both launches measure the same thing without minutes of compilation each.
# Data of the real shapes is generated (benchmarks/run_all.sh's); the LDM runs from a latent cache built once with a
# small 8x VAE and a random-weight open_clip ViT-L-14 (77 x 768 text states, as CLIP-L gives).
set -uo pipefail
out=$1 steps=${2:-15} n=${3:-2}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1  # NVLink multicast off
ONLY=none bash benchmarks/run_all.sh "$out" > /dev/null 2>&1  # data only
audio=(--train_data_dir "$out/data/audio/train" --validation_data_dir "$out/data/audio/validation")
ldm=(--train_data_dir "$out/ldm_images" --vae "$out/vae8x" --text_encoder "open_clip:ViT-L-14:$out/clip.pt"
     --resolution 256 --train_batch_size 64 --mixed_precision bf16 --num_holdout 8 --cache_dir "$out/ldm_cache")
if [[ -z "${ONLY:-}" || " $ONLY " == *" ldm "* ]]; then
  python3 - "$out" <<'PY'
import sys
from pathlib import Path
import open_clip, torch
from common.demo_data import make_demo_images, make_demo_vae
root = Path(sys.argv[1])
make_demo_images(root / "ldm_images", num_images=520, size=256, seed=0)  # 4 batches of 64 per GPU on 2 GPUs
make_demo_vae(root / "vae8x", latent_channels=4, block_out_channels=(32, 64, 64, 64))
if not (root / "clip.pt").exists():
    torch.save(open_clip.create_model("ViT-L-14", pretrained=None).state_dict(), root / "clip.pt")
PY
  python3 train_ldm.py "${ldm[@]}" --output_dir "$out/ldm_cache_build" --dry_run --dry_run_steps 2 --report_to none \
    > "$out/ldm_cache.log" 2>&1
fi
rm -f "$out/commands.txt"
run() {
  name=$1; shift
  [[ -z "${ONLY:-}" || " $ONLY " == *" $name "* ]] || return 0
  for procs in 1 "$n"; do
    timeout "${LAUNCH_TIMEOUT:-600}" python3 -m accelerate.commands.launch --num_machines 1 --dynamo_backend no \
      $([ "$procs" -gt 1 ] && echo --multi_gpu) --num_processes "$procs" "$@" --output_dir "$out/$name-$procs" --dry_run --dry_run_steps "$steps" --no-compile \
      --report_to none --dataloader_num_workers 4 > "$out/$name-$procs.log" 2>&1
    echo "$name-$procs exit $? :: $*" >> "$out/commands.txt"
  done
}
run rvq train_rvq.py --config configs/rvq_base512.yaml --data "$out/data/codes"
run ldm train_ldm.py "${ldm[@]}"
run audio_vae train_audio_vae.py --config configs/audio_vae_mel.yaml "${audio[@]}"
run image_vae train_image_vae.py --config configs/image_vae.yaml --train_data_dir "$out/data/images" --lpips_backbone random
run vocoder train_vocoder.py --config configs/vocoder_hifigan.yaml "${audio[@]}"
python3 - "$out" "$n" <<'PY'
import json, re, sys
from pathlib import Path
out, n = Path(sys.argv[1]), sys.argv[2]
runs = {}
for line in (out / "commands.txt").read_text().splitlines():
    name, rest = line.split(" exit ", 1)
    text = (out / f"{name}.log").read_text()
    rate = re.search(r"; ([\d.]+) (\w+/s);", text)
    runs[name] = {"exit": int(rest.split(" :: ")[0]), "throughput": float(rate[1]) if rate else None,
                  "unit": rate[2] if rate else "", "s_per_step": (re.search(r"seconds per step ([\d.]+)", text) or [0, None])[1],
                  "peak_gib": (re.search(r"peak GPU memory ([\d.]+) GiB", text) or [0, None])[1],
                  "command": rest.split(" :: ")[1]}
table = {}
for name in dict.fromkeys(k.rsplit("-", 1)[0] for k in runs):
    one, many = runs.get(f"{name}-1", {}), runs.get(f"{name}-{n}", {})
    ratio = many["throughput"] / one["throughput"] if one.get("throughput") and many.get("throughput") else None
    table[name] = {"1_gpu": one, f"{n}_gpus": many, "scaling": round(ratio, 3) if ratio else None}
    print(f"{name:10s} 1 GPU {one.get('throughput')} {one.get('unit')}  {n} GPUs {many.get('throughput')}  "
          f"scaling {table[name]['scaling']}  (exit {one.get('exit')}, {many.get('exit')})")
(out / "scaling.json").write_text(json.dumps(table, indent=1))
PY
