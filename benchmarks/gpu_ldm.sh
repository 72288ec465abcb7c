#!/usr/bin/env bash
# train_ldm.py's speed and memory on one GPU, at the shape the README compares with diffusers' text-to-image example:
# 256 px, batch 64, bf16, 4 x 32 x 32 latents, 77 x 768 CLIP ViT-L/14 text states. Each run is the script's own
# --dry_run (real models, optimizer, data loader; FLOPs counted on the real model).
#
#   bash benchmarks/gpu_ldm.sh OUT [STEPS]        # STEPS: 30 by default; ONLY="run names" for some of them
#
# The VAE has Stable Diffusion's architecture (the compute of stabilityai/sd-vae-ft-mse) and the text encoder is
# open_clip's ViT-L-14, both with random weights saved to files: nothing can be downloaded here, and speed does not
# depend on the weights. The cache is built once (its build time is in OUT/cache.log) and shared by the cached runs.
set -uo pipefail
out=$1 steps=${2:-30}
mkdir -p "$out"
python3 - "$out" <<'PY'
import sys
from pathlib import Path
import open_clip, torch
from common.demo_data import make_demo_images, make_demo_vae
root = Path(sys.argv[1])
make_demo_images(root / "images", num_images=640, size=256, seed=0)
make_demo_vae(root / "sd_vae", latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2)
if not (root / "clip.pt").exists():
    torch.save(open_clip.create_model("ViT-L-14", pretrained=None).state_dict(), root / "clip.pt")
PY
common=(--train_data_dir "$out/images" --vae "$out/sd_vae" --text_encoder "open_clip:ViT-L-14:$out/clip.pt"
        --resolution 256 --train_batch_size 64 --mixed_precision bf16 --report_to none --dataloader_num_workers 8
        --num_holdout 16)
( time python3 train_ldm.py "${common[@]}" --cache_dir "$out/cache" --output_dir "$out/cache_build" --dry_run \
    --dry_run_steps 2 ) > "$out/cache.log" 2>&1
run() {  # run NAME [VAR=value ...] ARGS...
  name=$1; shift
  [[ -z "${ONLY:-}" || " $ONLY " == *" $name "* ]] || return 0
  vars=(); while [[ $1 =~ ^[A-Z_]+= ]]; do vars+=("$1"); shift; done
  env "${vars[@]}" python3 train_ldm.py "${common[@]}" --output_dir "$out/$name" --dry_run --dry_run_steps "$steps" \
    "$@" > "$out/$name.log" 2>&1
  echo "$name exit $? :: ${vars[*]:+${vars[*]} }$*" >> "$out/commands.txt"
}
rm -f "$out/commands.txt"
run dit45m_cache --cache_dir "$out/cache"
run dit45m_cache_compiled --cache_dir "$out/cache" --compile                 # CUDA graphs (reduce-overhead)
run dit45m_cache_compiled_autotune --cache_dir "$out/cache" --compile --compile_mode max-autotune  # + Inductor's GEMM search
# Inductor's GEMM search alone (Triton templates against cuBLAS, epilogues fused), without max-autotune's
# coordinate-descent tuning of every other kernel
run dit45m_cache_compiled_gemm_autotune TORCHINDUCTOR_MAX_AUTOTUNE_GEMM=1 --cache_dir "$out/cache" --compile
run dit45m_cache_compiled_default --cache_dir "$out/cache" --compile --compile_mode default
run dit45m_cache_compiled_b128 --cache_dir "$out/cache" --compile --train_batch_size 128
run unet45m_cache --cache_dir "$out/cache" --model unet-45m
run unet45m_cache_channels_last --cache_dir "$out/cache" --model unet-45m --channels_last
run unet45m_cache_compiled --cache_dir "$out/cache" --model unet-45m --compile
run unet45m_cache_compiled_channels_last --cache_dir "$out/cache" --model unet-45m --compile --channels_last
run unet45m_cache_compiled_default --cache_dir "$out/cache" --model unet-45m --compile --compile_mode default
run ditb_cache_compiled --cache_dir "$out/cache" --model dit-b --compile      # the larger preset: 181.5M
run dit45m_no_cache                                  # VAE and CLIP in the loop, as diffusers' example runs them
python3 - "$out" <<'PY'
import json, sys
from pathlib import Path
import torch
out = Path(sys.argv[1])
runs = {}
for log in sorted(out.glob("*.log")):
    lines = log.read_text().splitlines()
    runs[log.stem] = [l.split("] ")[-1] for l in lines if l.startswith(("dry run", "seconds per step", "model FLOPs",
                                                                           "peak GPU", "real", "out of memory"))
                      or "denoiser " in l or "Traceback" in l or "Error" in l][-8:]
device = f"{torch.cuda.get_device_name()}, torch {torch.__version__}" if torch.cuda.is_available() else "cpu"
print(json.dumps({"device": device, "runs": runs}, indent=1))
PY
