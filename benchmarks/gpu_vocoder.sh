#!/usr/bin/env bash
# The runs behind README.md's train_vocoder.py figures, on one GPU.
#
#   bash benchmarks/gpu_vocoder.sh bench OUT          # speed at the official HiFi-GAN V1 setup: V1 generator, MPD + MSD,
#                                                     # batch 16, segments of 8192, default precision (fp32 + TF32)
#   bash benchmarks/gpu_vocoder.sh speech OUT STEPS   # the default preset on data/speech, with held-out metrics
#
# Data: ../shared/tools/build-datasets data --only speech  (22.05 kHz FLAC, 25 minutes)
# RUNS selects bench runs (default: "eager compiled"; the recipe compiles with CUDA graphs, eager is --no-compile);
# STEPS their length (default 300).
# FLOPs per step for MFU: python benchmarks/vocoder_flops.py (CPU; figures in benchmarks/results_vocoder_h100.json).
set -euo pipefail
what=$1 out=$2
mkdir -p "$out"
launch=(python3 -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision no
        --dynamo_backend no)
quiet=(--report_to none --checkpointing_steps 100000 --dataloader_num_workers 8 --resume_from_checkpoint none)
case $what in
  bench)
    runs=${RUNS:-eager compiled}
    for run in "eager --no-compile" "compiled --compile" "discbf16 --no-compile --disc_precision bf16"; do
      [[ " $runs " == *" ${run%% *} "* ]] || continue
      set -- $run
      "${launch[@]}" train_vocoder.py --config configs/vocoder_hifigan.yaml --train_data_dir data/speech/train \
        --validation_data_dir data/speech/validation --num_validation_files 2 --output_dir "$out/$1" \
        --model hifigan-v1 --discriminator hifigan --train_batch_size 16 --segment_length 8192 \
        --max_train_steps ${STEPS:-300} --logging_steps 50 --validation_steps 100000 "${quiet[@]}" "${@:2}" \
        > "$out/$1.log" 2>&1 || { tail -30 "$out/$1.log"; exit 1; }
    done
    python3 - "$out" <<'PY'
import json, os, sys
from common.training import read_metrics
out = sys.argv[1]
table = {}
for run in ("eager", "compiled", "discbf16"):
    if not os.path.exists(f"{out}/{run}/metrics.jsonl"):
        continue
    logs = [m for m in read_metrics(f"{out}/{run}/metrics.jsonl") if "perf/steps_per_s" in m]
    last = logs[-1]  # the last logging window: compilation and warm-up excluded
    table[run] = {k: round(last[k], 4) for k in ("perf/steps_per_s", "perf/samples_per_s", "perf/mfu",
                                                 "perf/peak_mem_gib", "loss/mel") if k in last}
print(json.dumps(table, indent=1))
json.dump(table, open(f"{out}/bench_vocoder.json", "w"), indent=1)
PY
    ;;
  speech)
    steps=$3
    "${launch[@]}" train_vocoder.py --config configs/vocoder_hifigan.yaml --train_data_dir data/speech/train \
      --validation_data_dir data/speech/validation --num_validation_files 8 --output_dir "$out/speech" \
      --max_train_steps "$steps" --validation_steps $((steps / 4)) --logging_steps 100 "${quiet[@]}" "${@:4}"
    ;;
  *) echo "usage: $0 bench|speech OUT [STEPS]" >&2; exit 2 ;;
esac
