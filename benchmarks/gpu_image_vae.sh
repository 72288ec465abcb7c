#!/usr/bin/env bash
# The runs behind README.md's image VAE figures, on one GPU.
# Data: ../shared/tools/build-datasets data --only emoji fashion-mnist --size 256
#
#   bash benchmarks/gpu_image_vae.sh bench OUT                # step speed: 256 px, batch 16, GAN + LPIPS + R1
#   bash benchmarks/gpu_image_vae.sh emoji OUT STEPS [ARGS]   # the default recipe on the emoji set (LPIPS off)
#   bash benchmarks/gpu_image_vae.sh fashion-mnist OUT STEPS [ARGS]  # a second look, 32 px
# ARGS go to train_image_vae.py (the README's emoji run adds --compile).
#
# LPIPS is off in the real-data runs only because its VGG weights cannot be downloaded on the machine these figures
# come from; with internet, leave it on.
set -euo pipefail
what=$1 out=$2 steps=${3:-}
extra=("${@:4}")
[ "$what" = bench ] && extra=("${@:3}")
mkdir -p "$out"
launch=(python3 -m accelerate.commands.launch --num_processes 1 --num_machines 1 --dynamo_backend no)
case $what in
  bench)
    python3 benchmarks/image_vae.py --json "$out/bench_image_vae.json" "${extra[@]}" ;;
  emoji)
    "${launch[@]}" train_image_vae.py --config configs/image_vae.yaml --output_dir "$out/emoji" \
      --train_data_dir data/emoji/train --validation_data_dir data/emoji/validation --num_validation_images 64 \
      --lpips_weight 0 --max_train_steps "$steps" --disc_start_step $((steps * 2 / 5)) --lr_warmup_steps 500 \
      --validation_steps $((steps / 4)) --checkpointing_steps "$steps" --dataloader_num_workers 12 --report_to none "${extra[@]}" ;;
  fashion-mnist)
    "${launch[@]}" train_image_vae.py --config configs/image_vae.yaml --output_dir "$out/fashion-mnist" \
      --train_data_dir data/fashion-mnist/train --validation_data_dir data/fashion-mnist/test \
      --num_validation_images 64 --resolution 32 --train_batch_size 64 --lpips_weight 0 \
      --max_train_steps "$steps" --disc_start_step $((steps / 2)) --lr_warmup_steps 200 \
      --validation_steps $((steps / 2)) --checkpointing_steps "$steps" --dataloader_num_workers 8 --report_to none \
      "${extra[@]}" ;;
  *) echo "usage: $0 bench|emoji|fashion-mnist OUT [STEPS]" >&2; exit 2 ;;
esac
