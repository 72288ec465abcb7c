#!/usr/bin/env bash
# The README's memory table: each recipe in configs/ at its default shapes, through `--dry_run` on one GPU
# (5 optimizer steps with the discriminators and R1 on; peak memory after step 1).
#
#   bash benchmarks/gpu_dry_runs.sh OUT
#
# Data: the speech set of the data tools in data/speech; images and code files of the real shapes are generated.
# The image VAE's LPIPS runs a randomly initialised VGG (the same compute as the pretrained one, whose weights are
# not downloaded here).
set -uo pipefail
out=$1
mkdir -p "$out/data"
python3 - "$out/data" <<'PY'
import sys
from common.demo_data import make_demo_codes, make_demo_images
make_demo_images(f"{sys.argv[1]}/images", num_images=96, size=256, seed=0)
make_demo_codes(f"{sys.argv[1]}/codes", num_files=16, frames=2700, seed=0, num_codebooks=9, codebook_size=1024,
                codec="descript/dac_44khz")
PY
run() {
  name=$1; shift
  python3 "$@" --output_dir "$out/$name" --dry_run --report_to none --dataloader_num_workers 4 > "$out/$name.log" 2>&1
  echo "== $name (exit $?)"; grep -A4 "^dry run" "$out/$name.log" | cut -c1-300 || tail -5 "$out/$name.log"
}
speech=(--train_data_dir data/speech/train --validation_data_dir data/speech/validation)
run image_vae train_image_vae.py --config configs/image_vae.yaml --train_data_dir "$out/data/images" --lpips_backbone random
run vocoder_hifigan train_vocoder.py --config configs/vocoder_hifigan.yaml "${speech[@]}"
run vocoder_dac train_vocoder.py --config configs/vocoder_dac.yaml "${speech[@]}"
run vocoder_bigvgan train_vocoder.py --config configs/vocoder_bigvgan.yaml "${speech[@]}"
run rvq_base512 train_rvq.py --config configs/rvq_base512.yaml --data "$out/data/codes"
run rvq_big1280 train_rvq.py --config configs/rvq_big1280.yaml --data "$out/data/codes"
