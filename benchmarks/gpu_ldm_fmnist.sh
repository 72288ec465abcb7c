#!/usr/bin/env bash
# Class-conditional Fashion-MNIST on one GPU, end to end: an image VAE, a DiT over its latents, a classifier trained on
# the real images, and how often it recognises the asked class in samples at CFG scales 1 and 4.
#
#   bash benchmarks/gpu_ldm_fmnist.sh DATA OUT        # DATA: build-datasets' fashion-mnist folder (train/, test/)
set -euo pipefail
data=$1 out=$2
mkdir -p "$out"
# 1. A small image VAE (8x: 64 px -> 4 x 8 x 8 latents); reconstruction and KL only.
python3 train_image_vae.py --train_data_dir "$data/train" --output_dir "$out/vae" --model kl-f8-small --resolution 64 \
  --no-random_crop --train_batch_size 128 --lpips_weight 0 --adv_weight 0 --max_train_steps 2000 --learning_rate 1e-3 \
  --lr_warmup_steps 100 --mixed_precision bf16 --report_to none --validation_steps 1000 --checkpointing_steps 100000 \
  --num_validation_images 32 --latent_stats_num_images 1024 --dataloader_num_workers 8 > "$out/vae.log" 2>&1
# 2. The DiT, conditioned on the class label, from the cache, compiled.
python3 train_ldm.py --train_data_dir "$data/train" --vae "$out/vae" --conditioning class --class_embed_dim 384 \
  --model dit-s --resolution 64 --train_batch_size 256 --max_train_steps 3000 --learning_rate 3e-4 --lr_warmup_steps 200 \
  --ema_decay 0.999 --cache_dir "$out/cache" --compile --mixed_precision bf16 --report_to none --validation_steps 1500 \
  --checkpointing_steps 100000 --num_validation_prompts 10 --num_validation_seeds 4 --guidance_scale 4 \
  --dataloader_num_workers 8 --output_dir "$out/ldm" > "$out/ldm.log" 2>&1
# 3. The judge, and the samples it judges.
python3 benchmarks/fashion_mnist_cfg.py train-classifier --train "$data/train" --test "$data/test" --out "$out/clf.pt"
python3 benchmarks/fashion_mnist_cfg.py evaluate --classifier "$out/clf.pt" --model "$out/ldm" --scales 1 4 \
  --per_class 100 --output "$out/samples" --mixed_precision bf16
