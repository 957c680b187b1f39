#!/usr/bin/env bash
# Every GPU measurement of docs/benchmarks.md in one go, on one GPU (about 7 minutes on an H100/H200):
#   1. shakespeare_char, alone on the GPU: time from launch to each validation (experiments/shakespeare_char.yaml);
#   2. training throughput of the GPT-2 124M shape, lm's Lightning path and a raw loop in one process, with a
#      count of host synchronisations in the lm path's timed steps (benchmarks/train_throughput.py);
#   3. shakespeare_char recipe variants side by side (best val loss; not timed, they share the GPU), plus the
#      KV-cache generation benchmark and a short FSDP run of the debug model alongside.
# Logs go to CSV (no W&B needed). Every result lands in OUT_DIR; summary.txt collects the headline lines.
#
#   bash benchmarks/gpu_suite.sh path/to/tinyshakespeare.txt OUT_DIR
#   PHASES="throughput variants" bash benchmarks/gpu_suite.sh ...      # some phases only
set -u
DATA=${1:?usage: gpu_suite.sh path/to/tinyshakespeare.txt OUT_DIR}
OUT=${2:?usage: gpu_suite.sh path/to/tinyshakespeare.txt OUT_DIR}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
PHASES=${PHASES:-time throughput generation variants}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # benchmarks/*.py import lm without an install
CSV=(--trainer.logger=lightning.pytorch.loggers.CSVLogger)

{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch, lightning, datasets, jsonargparse; print('python', __import__('sys').version.split()[0], \
'torch', torch.__version__, 'cuda', torch.version.cuda, 'lightning', lightning.__version__, \
'datasets', datasets.__version__, 'jsonargparse', jsonargparse.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 1. time-to-loss, alone on the GPU; the data cache is cold (tokenization is part of the time)
if [[ $PHASES == *time* ]]; then
  start=$(date +%s.%N)
  timeout 150 $PY -m lm fit --config experiments/shakespeare_char.yaml --data.init_args.source "$DATA" \
    --data.init_args.cache_dir "$OUT/cache" --trainer.default_root_dir "$OUT/shakespeare_char" "${CSV[@]}" \
    > "$OUT/shakespeare_char.log" 2>&1
  echo "shakespeare_char: exit $?, $(awk "BEGIN {print $(date +%s.%N) - $start}") s launch to exit" >> "$OUT/summary.txt"
  grep "since launch" "$OUT/shakespeare_char.log" >> "$OUT/summary.txt"
fi

# 2. throughput, GPT-2 124M shape (tied embedding), batch 32 x 1024, bf16, compiled, alone on the GPU
if [[ $PHASES == *throughput* ]]; then
  timeout 240 $PY benchmarks/train_throughput.py --size 124m --tie_embeddings --batch 32 --device cuda \
    --precision bf16 --compile --steps 50 --warmup 10 --repeats 1 --sync_debug --json "$OUT/throughput_124m.json" \
    > "$OUT/throughput_124m.log" 2>&1
  tail -6 "$OUT/throughput_124m.log" >> "$OUT/summary.txt"
fi

# 3. KV-cache generation, 124M shape, fp32, alone on the GPU
if [[ $PHASES == *generation* ]]; then
  timeout 120 $PY benchmarks/generation.py --size 124m --device cuda --new_tokens 256 --json "$OUT/generation.json" \
    > "$OUT/generation.log" 2>&1
  tail -5 "$OUT/generation.log" >> "$OUT/summary.txt"
fi

# 4. shakespeare_char recipe variants side by side (3 minutes at most each), and a short FSDP run alongside
variant() {  # name, then overrides of experiments/shakespeare_char.yaml
  local name=$1; shift
  timeout 200 $PY -m lm fit --config experiments/shakespeare_char.yaml --data.init_args.source "$DATA" \
    --data.init_args.cache_dir "$OUT/cache" --trainer.default_root_dir "$OUT/variants/$name" "${CSV[@]}" \
    --trainer.max_time 00:00:03:00 --samples.prompts '[]' --checkpoint.save_top_k 0 --checkpoint.save_last false \
    "$@" > "$OUT/variant_$name.log" 2>&1
}
if [[ $PHASES == *variants* ]]; then
  # round 1 (docs/benchmarks.md) overfit at step 1000-1250 whatever the shape: round 2 regularises harder
  ctx512=(--model.init_args.arch.block_size 512 --data.init_args.batch_size 32)
  variant ctx512_anneal1250 "${ctx512[@]}" --trainer.max_steps 1250 &
  variant ctx512_wd1 "${ctx512[@]}" --model.init_args.weight_decay 1.0 &
  variant w512_drop0.5 "${ctx512[@]}" --trainer.max_steps 3000 --model.init_args.arch.n_layer 8 \
    --model.init_args.arch.n_head 8 --model.init_args.arch.n_embd 512 --model.init_args.arch.dropout 0.5 &
  variant w512_drop0.4_wd0.5 "${ctx512[@]}" --trainer.max_steps 2500 --model.init_args.arch.n_layer 8 \
    --model.init_args.arch.n_head 8 --model.init_args.arch.n_embd 512 --model.init_args.arch.dropout 0.4 \
    --model.init_args.weight_decay 0.5 &
  variant w768_drop0.5 "${ctx512[@]}" --trainer.max_steps 3000 --model.init_args.arch.n_layer 8 \
    --model.init_args.arch.n_head 12 --model.init_args.arch.n_embd 768 --model.init_args.arch.dropout 0.5 \
    --model.init_args.lr 6.0e-4 &
  timeout 200 $PY -m lm fit --config experiments/debug.yaml --config experiments/trainer/fsdp.yaml \
    --data.init_args.source "$DATA" --data.init_args.cache_dir "$OUT/cache_fsdp" \
    --trainer.default_root_dir "$OUT/fsdp" "${CSV[@]}" > "$OUT/fsdp.log" 2>&1 &
  wait
  for log in "$OUT"/variant_*.log; do
    echo "$(basename "$log" .log): $(grep "since launch" "$log" | sort -t' ' -k4 -n | head -1)" >> "$OUT/summary.txt"
  done
  echo "fsdp: $(grep -E "since launch|rror" "$OUT/fsdp.log" | tail -2)" >> "$OUT/summary.txt"
fi
cat "$OUT/summary.txt"
