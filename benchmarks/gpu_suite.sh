#!/usr/bin/env bash
# Every GPU measurement of docs/benchmarks.md, on one GPU. Phases run in the order PHASES lists them:
#   time        shakespeare_char alone on the GPU: time from launch to each validation (experiments/shakespeare_char.yaml);
#   time512     the same for experiments/shakespeare_char_ctx512.yaml;
#   time512_b64 the same for experiments/shakespeare_char_fast.yaml (ctx512 at batch 64, lr 1.4e-3, a 700-step schedule, 625 run);
#   time512_b128 four times the tokens per step (batch 128, lr 2e-3, schedule ending at step 400);
#   throughput  training throughput of the GPT-2 124M shape, lm's Lightning path and a raw loop in one process (best
#               of 2 alternations), with a count of host synchronisations in an extra untimed run of the lm path, and a profile
#               of where each path's step goes (benchmarks/train_throughput.py);
#   fp8         the same with float8 block matmuls (needs torchao);
#   muon, adamw the same with Muon for the hidden matrices, and its AdamW baseline (one run of each path);
#   cdtuning    the adamw phase with Inductor's coordinate-descent kernel tuning (not run yet);
#   actckpt     the adamw phase with activation checkpointing (not run yet);
#   optstep     the optimizer step alone at that shape: fused AdamW, lm's Muon (batched by shape, with and without
#               the device flag) and torch.optim.Muon (benchmarks/optimizer_step.py);
#   generation  the KV-cache generation benchmark;
#   variants    shakespeare_char recipe variants side by side (best val loss; not timed, they share the GPU);
#   variants4   the fourth round of them (docs/benchmarks.md);
#   variants5   a fifth round: longer contexts and schedules, heavier weight decay, deeper or wider models;
#   variants6   a sixth: weight decay 1-4 on the ctx512 recipe; variants7: deeper and wider with weight decay 2-4;
#   variants8   an eighth, not run yet: the best recipe's seed spread and its neighbours.
# PHASES defaults to: time time512 time512_b64 throughput fp8 generation variants. A time* phase named again runs
# again (its files get a _2, _3, ... suffix); the other phases write over their files. Each phase has a time limit
# (the time* phases 120 s each, throughput 300 s, fp8, muon and adamw 200 s each, optstep and generation 120 s,
# variants 270 s, variants5 420 s, variants6-8 330 s; the default phases: 21 minutes in all).
# With DEADLINE=S, no phase runs past S seconds after the suite started, so the variants, run last, get what is left
# (270 s at most).
# Logs go to CSV (no W&B needed). Every result lands in OUT_DIR; summary.txt collects the headline lines.
#
#   bash benchmarks/gpu_suite.sh path/to/tinyshakespeare.txt OUT_DIR
#   PHASES="throughput time variants" DEADLINE=540 bash benchmarks/gpu_suite.sh ...
set -u
DATA=${1:?usage: gpu_suite.sh path/to/tinyshakespeare.txt OUT_DIR}
OUT=${2:?usage: gpu_suite.sh path/to/tinyshakespeare.txt OUT_DIR}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
PHASES=${PHASES:-time time512 time512_b64 throughput fp8 generation variants}
DEADLINE=${DEADLINE:-100000}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # benchmarks/*.py import lm without an install
# CSV logs (no W&B), and no progress bar: a log holds lm's own lines only (tqdm's redraws, which lm fit drew into
# files before it printed plain progress lines there, put the "step N: val/loss" lines mid-line)
CSV=(--trainer.logger=lightning.pytorch.loggers.CSVLogger --trainer.enable_progress_bar=false)

{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch, lightning, datasets, jsonargparse; print('python', __import__('sys').version.split()[0], \
'torch', torch.__version__, 'cuda', torch.version.cuda, 'lightning', lightning.__version__, \
'datasets', datasets.__version__, 'jsonargparse', jsonargparse.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

limit() {  # the phase's own limit, or what is left before DEADLINE if that is less
  local left=$((DEADLINE - SECONDS))
  left=$((left > 1 ? left : 1))  # timeout 0 would mean no limit
  echo $(($1 < left ? $1 : left))
}
note() { echo "$*" >> "$OUT/summary.txt"; }

# time-to-loss, alone on the GPU; the data cache is cold (tokenization is part of the time)
time_to_loss() {  # experiment, name of the run, then overrides
  local start=$SECONDS experiment=$1 name=$2
  shift 2
  local base=$name n=1
  while [[ -e "$OUT/$name.log" ]]; do n=$((n + 1)); name=${base}_$n; done  # a repeat keeps the earlier logs
  rm -rf "$OUT/cache_$name"
  timeout "$(limit 120)" $PY -m lm fit --config "experiments/$experiment.yaml" --data.init_args.source "$DATA" \
    --data.init_args.cache_dir "$OUT/cache_$name" --trainer.default_root_dir "$OUT/$name" "${CSV[@]}" "$@" \
    > "$OUT/$name.log" 2>&1
  note "$name: exit $?, $((SECONDS - start)) s launch to exit"
  grep -aE "since launch" "$OUT/$name.log" >> "$OUT/summary.txt"
}
phase_time() { time_to_loss shakespeare_char shakespeare_char; }
phase_time512() { time_to_loss shakespeare_char_ctx512 shakespeare_char_ctx512; }
# experiments/shakespeare_char_fast.yaml: the ctx512 recipe with twice the tokens per step (batch 64, lr 1.4e-3,
# schedule ending at step 700). The eager baby GPT's step is bound by kernel launches, so it costs little more.
phase_time512_b64() { time_to_loss shakespeare_char_fast ctx512_batch64; }
phase_time512_b128() {
  time_to_loss shakespeare_char_ctx512 ctx512_batch128 --data.init_args.batch_size 128 --model.init_args.lr 2e-3 \
    --trainer.max_steps 400 --trainer.val_check_interval 50
}

# throughput, GPT-2 124M shape (tied embedding), batch 32 x 1024, bf16, compiled, alone on the GPU
throughput() {  # name, then extra arguments
  local name=$1; shift
  timeout "$(limit "$LIMIT")" $PY benchmarks/train_throughput.py --size 124m --tie_embeddings --batch 32 \
    --device cuda --precision bf16 --compile --steps 50 --warmup 10 --repeats 2 --json "$OUT/$name.json" "$@" \
    > "$OUT/$name.log" 2>&1
  note "$name: exit $?"
  grep -E "timed steps$|^(raw|lm) +[0-9]|overhead|host syncs|rror" "$OUT/$name.log" >> "$OUT/summary.txt"
}
phase_throughput() {
  LIMIT=300 throughput throughput_124m --sync_debug --profile "$OUT/profile_124m"
  head -12 "$OUT"/profile_124m/profile_*.txt >> "$OUT/summary.txt" 2>/dev/null
}
phase_fp8() { LIMIT=200 throughput throughput_124m_fp8 --fp8 --repeats 1; }
phase_muon() { LIMIT=200 throughput throughput_124m_muon --optimizer muon --repeats 1; }
phase_adamw() { LIMIT=200 throughput throughput_124m_adamw --repeats 1; }  # muon's baseline: same settings
# Activation checkpointing (model.activation_checkpointing): the step time it costs and the memory it saves
phase_actckpt() { LIMIT=200 throughput throughput_124m_actckpt --activation_checkpointing --repeats 1; }
# Inductor's coordinate-descent tuning of its generated kernels (the norms, RoPE, SwiGLU and the loss: ~29% of the
# step in the second round's profile); compare with the adamw phase, run in the same call. Compilation takes longer.
phase_cdtuning() {
  TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 LIMIT=300 throughput throughput_124m_cdtuning --repeats 1
}
phase_optstep() {
  timeout "$(limit 120)" $PY benchmarks/optimizer_step.py --size 124m --device cuda --repeats 3 \
    --json "$OUT/optimizer_step.json" > "$OUT/optimizer_step.log" 2>&1
  note "optstep: exit $?"
  cat "$OUT/optimizer_step.log" >> "$OUT/summary.txt"
}

# KV-cache generation, 124M shape, fp32, alone on the GPU
phase_generation() {
  timeout "$(limit 120)" $PY benchmarks/generation.py --size 124m --device cuda --new_tokens 256 \
    --json "$OUT/generation.json" > "$OUT/generation.log" 2>&1
  note "generation: exit $?"
  tail -5 "$OUT/generation.log" >> "$OUT/summary.txt"
}

# shakespeare_char recipe variants side by side: compiled, validated every 125 steps, no samples or checkpoints
variant() {  # name, then overrides of experiments/shakespeare_char.yaml
  local name=$1; shift
  timeout "$VARIANT_LIMIT" $PY -m lm fit --config experiments/shakespeare_char.yaml --data.init_args.source "$DATA" \
    --data.init_args.cache_dir "$OUT/cache" --trainer.default_root_dir "$OUT/variants/$name" "${CSV[@]}" \
    --model.init_args.compile true --trainer.val_check_interval 125 --samples.prompts '[]' \
    --checkpoint.save_top_k 0 --checkpoint.save_last false "$@" > "$OUT/variant_$name.log" 2>&1
  echo "lm fit exit $?" >> "$OUT/variant_$name.log"  # 124: cut off by its time limit
}
# the ctx512 recipe (experiments/shakespeare_char_ctx512.yaml) as overrides of shakespeare_char.yaml
CTX512=(--model.init_args.arch.block_size 512 --data.init_args.batch_size 32 --trainer.max_steps 1250)
summarise_variants() {  # each variant's lowest val loss and its last validation
  local validations="step [0-9]+: val/loss [0-9.]+, [0-9.]+ s since launch"
  for log in "$@"; do
    best=$(grep -aoE "$validations" "$log" | sort -t' ' -k4 -n | head -1)
    note "$(basename "$log" .log): ${best:-no validation: $(grep -aE "Error|error" "$log" | tail -1)}," \
      "last: $(grep -aoE "$validations" "$log" | tail -1), $(tail -1 "$log")"
  done
}
phase_variants() {
  # Rounds 1-2 (docs/benchmarks.md): lowest 1.4408 with context 512 and the schedule ending at step 1250, where
  # every shape starts to overfit. Round 3: the same recipe again (run-to-run spread), weight averaging, Muon,
  # a longer context, and wider models with heavier dropout.
  VARIANT_LIMIT=$(limit 270)
  local ema=(--trainer.callbacks+=lm.callbacks.EMA --trainer.callbacks.update_starting_at_step 250
    --trainer.callbacks.decay 0.99)
  local w512=(--model.init_args.arch.n_layer 8 --model.init_args.arch.n_head 8 --model.init_args.arch.n_embd 512
    --trainer.max_steps 1500)
  local ctx1024=(--model.init_args.arch.block_size 1024 --data.init_args.batch_size 16)
  variant ctx512 "${CTX512[@]}" &
  variant ctx512_ema "${CTX512[@]}" "${ema[@]}" &
  variant ctx512_muon "${CTX512[@]}" --model.init_args.optimizer muon &
  variant ctx512_muon_lr2e-3 "${CTX512[@]}" --model.init_args.optimizer muon --model.init_args.lr 2e-3 &
  variant ctx1024_ema "${CTX512[@]}" "${ctx1024[@]}" "${ema[@]}" &
  variant w512_drop0.4_wd0.5_ema "${CTX512[@]}" "${w512[@]}" --model.init_args.arch.dropout 0.4 \
    --model.init_args.weight_decay 0.5 "${ema[@]}" &
  variant w512_ctx1024_drop0.4_ema "${CTX512[@]}" "${w512[@]}" "${ctx1024[@]}" --model.init_args.arch.dropout 0.4 \
    "${ema[@]}" &
  variant w512_drop0.5 "${CTX512[@]}" "${w512[@]}" --model.init_args.arch.dropout 0.5 &
  wait
  local logs=()
  for log in "$OUT"/variant_*.log; do [[ $log == */variant_r[4-8]_* ]] || logs+=("$log"); done  # not rounds 4-8
  summarise_variants "${logs[@]}"
}

# Round 4: bolder regularisation and more tokens per step on the ctx512 recipe.
phase_variants4() {
  VARIANT_LIMIT=$(limit 270)
  variant r4_drop0.3 "${CTX512[@]}" --model.init_args.arch.dropout 0.3 &
  variant r4_drop0.25_wd0.3 "${CTX512[@]}" --model.init_args.arch.dropout 0.25 --model.init_args.weight_decay 0.3 &
  variant r4_b64_lr1.4e-3 "${CTX512[@]}" --data.init_args.batch_size 64 --model.init_args.lr 1.4e-3 &
  variant r4_12layer_drop0.3 "${CTX512[@]}" --model.init_args.arch.n_layer 12 --model.init_args.arch.dropout 0.3 &
  variant r4_8x512_drop0.3_wd0.3 "${CTX512[@]}" --model.init_args.arch.n_layer 8 --model.init_args.arch.n_head 8 \
    --model.init_args.arch.n_embd 512 --model.init_args.arch.dropout 0.3 --model.init_args.weight_decay 0.3 &
  variant r4_minlr0_lr1.5e-3 "${CTX512[@]}" --model.init_args.min_lr_ratio 0.0 --model.init_args.lr 1.5e-3 &
  variant r4_b64_drop0.3_1000 "${CTX512[@]}" --data.init_args.batch_size 64 --model.init_args.lr 1.4e-3 \
    --model.init_args.arch.dropout 0.3 --trainer.max_steps 1000 &
  variant r4_ctx1024_b16_drop0.3 "${CTX512[@]}" --model.init_args.arch.block_size 1024 --data.init_args.batch_size 16 \
    --model.init_args.arch.dropout 0.3 &
  wait
  summarise_variants "$OUT"/variant_r4_*.log
}

# Round 5: longer contexts with longer schedules (round 4's context 1024 was still falling at step 1250), heavier
# weight decay (small data wants far more than the usual 0.1), and deeper or wider models with more dropout. Six at
# once, each with up to 420 s, so that the longer runs fit.
phase_variants5() {
  VARIANT_LIMIT=$(limit 420)
  local ctx1024=(--model.init_args.arch.block_size 1024 --data.init_args.batch_size 16)
  variant r5_ctx1024_2000 "${CTX512[@]}" "${ctx1024[@]}" --trainer.max_steps 2000 &
  variant r5_ctx1024_drop0.25_wd0.5_2000 "${CTX512[@]}" "${ctx1024[@]}" --model.init_args.arch.dropout 0.25 \
    --model.init_args.weight_decay 0.5 --trainer.max_steps 2000 &
  variant r5_ctx2048_b8_2000 "${CTX512[@]}" --model.init_args.arch.block_size 2048 --data.init_args.batch_size 8 \
    --trainer.max_steps 2000 &
  variant r5_ctx1024_wd1.0_1750 "${CTX512[@]}" "${ctx1024[@]}" --model.init_args.weight_decay 1.0 \
    --trainer.max_steps 1750 &
  variant r5_ctx1024_12layer_drop0.3_1750 "${CTX512[@]}" "${ctx1024[@]}" --model.init_args.arch.n_layer 12 \
    --model.init_args.arch.dropout 0.3 --trainer.max_steps 1750 &
  variant r5_ctx1024_8x512_drop0.35_wd0.5_2000 "${CTX512[@]}" "${ctx1024[@]}" --model.init_args.arch.n_layer 8 \
    --model.init_args.arch.n_head 8 --model.init_args.arch.n_embd 512 --model.init_args.arch.dropout 0.35 \
    --model.init_args.weight_decay 0.5 --trainer.max_steps 2000 &
  wait
  summarise_variants "$OUT"/variant_r5_*.log
}

# Round 6: round 5's one gain was weight decay 1.0 (-0.017 at context 1024), so heavier weight decay on the ctx512
# recipe, alone and with a higher LR (AdamW's decay per step is lr x weight_decay), less dropout or a larger model.
phase_variants6() {
  VARIANT_LIMIT=$(limit 330)
  variant r6_wd1.0 "${CTX512[@]}" --model.init_args.weight_decay 1.0 &
  variant r6_wd2.0 "${CTX512[@]}" --model.init_args.weight_decay 2.0 &
  variant r6_wd4.0 "${CTX512[@]}" --model.init_args.weight_decay 4.0 &
  variant r6_wd1.0_1500 "${CTX512[@]}" --model.init_args.weight_decay 1.0 --trainer.max_steps 1500 &
  variant r6_wd1.0_lr2e-3 "${CTX512[@]}" --model.init_args.weight_decay 1.0 --model.init_args.lr 2e-3 &
  variant r6_wd2.0_drop0.1 "${CTX512[@]}" --model.init_args.weight_decay 2.0 --model.init_args.arch.dropout 0.1 &
  variant r6_8x512_wd2.0 "${CTX512[@]}" --model.init_args.arch.n_layer 8 --model.init_args.arch.n_head 8 \
    --model.init_args.arch.n_embd 512 --model.init_args.weight_decay 2.0 &
  variant r6_12layer_wd2.0 "${CTX512[@]}" --model.init_args.arch.n_layer 12 --model.init_args.weight_decay 2.0 &
  wait
  summarise_variants "$OUT"/variant_r6_*.log
}

# Round 7: round 6's lowest was 12 layers with weight decay 2.0 (1.4151 at step 1000, then rising), so deeper and
# wider models with weight decay 2-4, more dropout, and schedules that end at step 1000.
phase_variants7() {
  VARIANT_LIMIT=$(limit 330)
  local l12=(--model.init_args.arch.n_layer 12)
  local w512=(--model.init_args.arch.n_head 8 --model.init_args.arch.n_embd 512)
  variant r7_12layer_wd2.0_1000 "${CTX512[@]}" "${l12[@]}" --model.init_args.weight_decay 2.0 --trainer.max_steps 1000 &
  variant r7_12layer_wd4.0 "${CTX512[@]}" "${l12[@]}" --model.init_args.weight_decay 4.0 &
  variant r7_12layer_wd2.0_drop0.3 "${CTX512[@]}" "${l12[@]}" --model.init_args.weight_decay 2.0 \
    --model.init_args.arch.dropout 0.3 &
  variant r7_16layer_wd2.0_1000 "${CTX512[@]}" --model.init_args.arch.n_layer 16 --model.init_args.weight_decay 2.0 \
    --trainer.max_steps 1000 &
  variant r7_8x512_wd4.0_drop0.3_1000 "${CTX512[@]}" --model.init_args.arch.n_layer 8 "${w512[@]}" \
    --model.init_args.weight_decay 4.0 --model.init_args.arch.dropout 0.3 --trainer.max_steps 1000 &
  variant r7_12layer_wd3.0_drop0.25_1000 "${CTX512[@]}" "${l12[@]}" --model.init_args.weight_decay 3.0 \
    --model.init_args.arch.dropout 0.25 --trainer.max_steps 1000 &
  variant r7_12x512_wd4.0_drop0.3_1000 "${CTX512[@]}" "${l12[@]}" "${w512[@]}" --model.init_args.weight_decay 4.0 \
    --model.init_args.arch.dropout 0.3 --trainer.max_steps 1000 &
  variant r7_12layer_wd2.0_lr7e-4 "${CTX512[@]}" "${l12[@]}" --model.init_args.weight_decay 2.0 --model.init_args.lr 7e-4 &
  wait
  summarise_variants "$OUT"/variant_r7_*.log
}

# Round 8 (not run yet): the round-6 best (12 layers, weight decay 2.0) again under two more seeds, to measure its
# spread, and around it: weight averaging over its noisy end, less dropout, a higher LR, no LR floor, deeper and
# narrower, and Muon with the same decay.
phase_variants8() {
  VARIANT_LIMIT=$(limit 330)
  local best=(--model.init_args.arch.n_layer 12 --model.init_args.weight_decay 2.0)
  local ema=(--trainer.callbacks+=lm.callbacks.EMA --trainer.callbacks.update_starting_at_step 500
    --trainer.callbacks.decay 0.99)
  variant r8_best_seed1 "${CTX512[@]}" "${best[@]}" --seed_everything 1 &
  variant r8_best_seed2 "${CTX512[@]}" "${best[@]}" --seed_everything 2 &
  variant r8_best_ema "${CTX512[@]}" "${best[@]}" "${ema[@]}" &
  variant r8_best_drop0.15 "${CTX512[@]}" "${best[@]}" --model.init_args.arch.dropout 0.15 &
  variant r8_best_lr1.5e-3 "${CTX512[@]}" "${best[@]}" --model.init_args.lr 1.5e-3 &
  variant r8_best_minlr0 "${CTX512[@]}" "${best[@]}" --model.init_args.min_lr_ratio 0.0 &
  variant r8_24x256_wd2.0 "${CTX512[@]}" --model.init_args.arch.n_layer 24 --model.init_args.arch.n_head 4 \
    --model.init_args.arch.n_embd 256 --model.init_args.weight_decay 2.0 &
  variant r8_best_muon "${CTX512[@]}" "${best[@]}" --model.init_args.optimizer muon &
  wait
  summarise_variants "$OUT"/variant_r8_*.log
}

for phase in $PHASES; do  # a misspelt phase stops the suite before it spends any GPU time
  declare -F "phase_$phase" > /dev/null || { echo "gpu_suite.sh: no phase '$phase'" >&2; exit 2; }
done
for phase in $PHASES; do
  if ((DEADLINE - SECONDS < 30)); then note "$phase: skipped, past the deadline"; continue; fi
  note "--- $phase at $SECONDS s"
  "phase_$phase"
done
cat "$OUT/summary.txt"
