#!/usr/bin/env bash
# The runs behind README.md's train_audio_vae.py result on real speech, on one GPU.
#
#   bash benchmarks/gpu_audio_vae.sh vocoder OUT SECONDS   # a vocoder for listening: train_vocoder.py's recipe with
#                                                          # the small HiFi-GAN V3 generator (MODEL=...) on data/speech,
#                                                          # stopped (SIGTERM) after SECONDS, exported to OUT/vocoder
#   bash benchmarks/gpu_audio_vae.sh speech OUT STEPS VOC  # the mel recipe on data/speech with --vocoder VOC
#
# Data: ../shared/tools/build-datasets data --only speech  (22.05 kHz FLAC, 25 minutes; utterances of 0.5-16 s, median
# 1.1 s, hence segments of 16384 samples, 0.74 s, at batch 64 instead of the recipe's 3 s at batch 32).
# Speed and memory at the recipe's own shapes: ONLY="audio_vae_mel ..." bash benchmarks/run_all.sh OUT.
set -euo pipefail
what=$1 out=$2
mkdir -p "$out"
launch=(python3 -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision no
        --dynamo_backend no)
speech=(--train_data_dir data/speech/train --validation_data_dir data/speech/validation)
case $what in
  vocoder)
    timeout -s TERM "$3" python3 train_vocoder.py --config configs/vocoder_hifigan.yaml "${speech[@]}" \
      --model "${MODEL:-hifigan-v3}" --output_dir "$out/vocoder_run" --num_validation_files 4 --report_to none --dataloader_num_workers 8 \
      --checkpointing_steps 100000 --validation_steps 100000 --logging_steps 100 > "$out/vocoder.log" 2>&1 || true
    last=$(ls -d "$out"/vocoder_run/checkpoint-* | sort -V | tail -1)
    python3 train_vocoder.py --export_checkpoint "$last" --output_dir "$out/vocoder"
    ;;
  speech)
    "${launch[@]}" train_audio_vae.py --config configs/audio_vae_mel.yaml "${speech[@]}" --vocoder "$4" \
      --output_dir "$out/audio_vae" --segment_length 16384 --train_batch_size 64 --max_train_steps "$3" \
      --kl_anneal_start 500 --kl_anneal_end 2500 --disc_start_step 2000 --lr_warmup_steps 300 \
      --validation_steps 1000 --checkpointing_steps 100000 --logging_steps 50 --num_validation_files 16 \
      --report_to none --dataloader_num_workers 8 > "$out/audio_vae.log" 2>&1 || { tail -40 "$out/audio_vae.log"; exit 1; }
    grep -E "val/|exported" "$out/audio_vae.log" | tail -5
    ;;
esac
