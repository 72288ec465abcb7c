#!/usr/bin/env bash
# The runs behind README.md's train_rvq.py figures, on one GPU.
#
#   bash benchmarks/gpu_rvq.sh bench OUT        # speed at nanoGPT's shape: d768/16/12, ctx 1024, batch 32, bf16
#   bash benchmarks/gpu_rvq.sh music OUT STEPS  # encode data/music with a random-weight DAC, then train on it
#
# Data for `music`: ../shared/tools/build-datasets data --only music
set -euo pipefail
what=$1 out=$2
mkdir -p "$out"
launch=(python3 -m accelerate.commands.launch --num_processes 1 --num_machines 1 --dynamo_backend no)
quiet=(--report_to none --validation_steps 100000 --checkpointing_steps 100000 --eval_audio_every 0
       --dataloader_num_workers 4 --logging_steps 20 --resume_from_checkpoint none)
case $what in
  bench)
    # Random codes of the real shape (9 x 1024): speed does not depend on what the codes say.
    python3 - "$out/codes" <<'PY'
import sys, torch
from train_rvq import save_codes
g = torch.Generator().manual_seed(0)
for i in range(48):
    save_codes(f"{sys.argv[1]}/{i:03d}.codes.safetensors", torch.randint(1024, (8192, 9), generator=g),
               "descript/dac_44khz", 44100, 44100 / 512, 1024)
PY
    runs=${RUNS:-autotuned compiled eager run3}
    for run in "autotuned --compile --compile_mode max-autotune-no-cudagraphs" "compiled --compile" "eager"; do
      [[ " $runs " == *" ${run%% *} "* ]] || continue
      set -- $run
      "${launch[@]}" train_rvq.py --data "$out/codes" --output_dir "$out/$1" --model big --ctx 1024 --step 1024 \
        --train_batch_size 32 --mixed_precision bf16 --max_train_steps 80 "${quiet[@]}" "${@:2}" \
        > "$out/$1.log" 2>&1 || { tail -30 "$out/$1.log"; exit 1; }
    done
    # The run log's Run #3 recipe (ctx 512, micro-batch 6 x 6): its peak memory.
    if [[ " $runs " == *" run3 "* ]]; then
      "${launch[@]}" train_rvq.py --config configs/rvq_base512.yaml --data "$out/codes" --output_dir "$out/run3" \
        --num_train_epochs 1 --max_train_steps 20 "${quiet[@]}" --logging_steps 10 --quiet > "$out/run3.log" 2>&1 \
        || { tail -30 "$out/run3.log"; exit 1; }
    fi
    python3 - "$out" <<'PY'
import json, os, sys
from common.training import read_metrics
out = sys.argv[1]
table = {}
for run in ("autotuned", "compiled", "eager", "run3"):
    if not os.path.exists(f"{out}/{run}/metrics.jsonl"):
        continue
    logs = [m for m in read_metrics(f"{out}/{run}/metrics.jsonl") if "perf/frames_per_s" in m]
    last = logs[-1]  # the last logging window: compilation and warm-up excluded
    table[run] = {k: round(last[k], 4) for k in ("perf/frames_per_s", "perf/mfu", "perf/peak_mem_gib", "perf/steps_per_s") if k in last}
print(json.dumps(table, indent=1))
json.dump(table, open(f"{out}/bench_rvq.json", "w"), indent=1)
PY
    ;;
  music)
    steps=$3
    python3 train_rvq.py encode --input data/music --output "$out/codes" --codec random-dac-44khz --batch_size 16 \
      --chunk_seconds 10
    "${launch[@]}" train_rvq.py --data "$out/codes/train" --validation_data "$out/codes/validation" \
      --output_dir "$out/music" --model base --ctx 512 --step 128 --train_batch_size 16 --mixed_precision bf16 \
      --compile --max_train_steps "$steps" --lr_warmup_steps 200 --label_smoothing 0.05 --cb_weights auto \
      --validation_steps $((steps / 5)) \
      --checkpointing_steps "$steps" --eval_audio_every 0 --dataloader_num_workers 4 --logging_steps 50 \
      --report_to none "${@:4}"
    ;;
  *) echo "usage: $0 bench|music OUT [STEPS]" >&2; exit 2 ;;
esac
