#!/bin/bash
# slurm/test_one_node.sh (`make slurm-test`): slurm/train.sbatch for real, on a one-node Slurm cluster on localhost.
#
#   sudo slurm/test_one_node.sh          # root: installs Debian's Slurm if missing, starts and stops the daemons
#
# 1. brings the cluster up (slurm/up.sh);
# 2. job A: the debug experiment as 2 srun tasks (CPU DDP over gloo) runs to the end and checkpoints;
# 3. job B: a longer run gets SIGUSR1 mid-training (what `#SBATCH --signal=USR1@90` sends before the time limit);
#    Lightning saves hpc_ckpt_1.ckpt and requeues the job, which starts again, resumes from the newer of that
#    checkpoint and checkpoints/last.ckpt (global_step continues) and finishes, logging to the same W&B run id (the
#    one train.sbatch drew at the job's first start);
# 4. tears the daemons down (slurm/down.sh), also on failure. The whole log is kept in $WORK/test.log.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${WORK:-$(mktemp -d /tmp/lm-slurm-test.XXXXXX)}
mkdir -p "$WORK"
exec > >(tee "$WORK/test.log") 2>&1
say() { echo "[$(date +%T)] $*"; }
fail() { say "FAIL: $*"; exit 1; }
trap 'say "tearing down"; "$REPO/slurm/down.sh"' EXIT

say "bringing up Slurm"
"$REPO/slurm/up.sh"

cd "$REPO"  # job A runs from the checkout (its root is LM_ROOT), job B from $WORK
export PATH="$REPO/.venv/bin:$PATH" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline
export XDG_CACHE_HOME="$WORK/cache" PYTHONUNBUFFERED=1
PY="$REPO/.venv/bin/python"
# 2 tasks x 1 CPU on this 2-CPU node; no GPUs here, so the template's GPU request is dropped
SBATCH=(sbatch --parsable --nodes=1 --ntasks-per-node=2 --cpus-per-task=1 --gpus-per-node=0)
FIT=(--config "$REPO/experiments/debug.yaml" --config "$REPO/experiments/trainer/ddp_cpu.yaml"
     --samples.max_new_tokens 0)

state() { scontrol show job "$1" -o | grep -o 'JobState=[A-Z_]*' | cut -d= -f2; }
wait_state() {  # wait_state JOB TIMEOUT STATE...: until the job is in one of the states
  local job=$1 timeout=$2; shift 2
  for i in $(seq "$timeout"); do
    local s; s=$(state "$job")
    for want in "$@"; do [ "$s" = "$want" ] && return 0; done
    sleep 1
  done
  fail "job $job still $(state "$job") after ${timeout}s (wanted $*)"
}
step_of() { "$PY" -c "import sys, torch; print(torch.load(sys.argv[1], map_location='cpu', weights_only=True, mmap=True)['global_step'])" "$1"; }

# ---- job A: to completion ------------------------------------------------------------------------------------------
ROOT_A="$WORK/job-a"
A=$(LM_ROOT="$ROOT_A" "${SBATCH[@]}" --job-name=lm-a --output="$WORK/job-a-%j.out" slurm/train.sbatch "${FIT[@]}" \
    --trainer.max_steps 20 --trainer.val_check_interval 20)
say "submitted job A = $A (debug experiment, 2 tasks, 20 steps)"
wait_state "$A" 600 COMPLETED FAILED CANCELLED TIMEOUT NODE_FAIL
scontrol show job "$A" -o | grep -o 'JobState=[^ ]* Reason=[^ ]* .*ExitCode=[^ ]*' | sed 's/ Dependency.*ExitCode/ ExitCode/'
[ "$(state "$A")" = COMPLETED ] || { tail -50 "$WORK"/job-a-*.out; fail "job A did not complete"; }
grep -h "lm-slurm:\|world_size\|Initializing distributed\|GLOBAL_RANK\|MEMBER" "$WORK"/job-a-*.out || true
STEP_A=$(step_of "$ROOT_A/checkpoints/last.ckpt")
say "job A: COMPLETED, $ROOT_A/checkpoints/last.ckpt global_step=$STEP_A; checkpoints: $(ls "$ROOT_A/checkpoints" | tr '\n' ' ')"
[ "$STEP_A" = 20 ] || fail "job A's last.ckpt is at step $STEP_A, not 20"

# ---- job B: SIGUSR1 mid-run -> hpc checkpoint + requeue -> resume -> completion ------------------------------------
# submitted from $WORK without LM_ROOT: the default root, runs/slurm-<job id>, which only a requeue may continue
B=$(cd "$WORK" && "${SBATCH[@]}" --job-name=lm-b --output="$WORK/job-b.out" "$REPO/slurm/train.sbatch" "${FIT[@]}" \
    --trainer.max_steps 400 --trainer.val_check_interval 200 --snapshots.every_n_train_steps 20)
ROOT_B="$WORK/runs/slurm-$B"
say "submitted job B = $B (400 steps, root $ROOT_B)"
for i in $(seq 600); do  # wait until training is under way: the step-20 snapshot exists
  ls "$ROOT_B"/checkpoints/snapshot-step=20*.ckpt >/dev/null 2>&1 && break
  case $(state "$B") in COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL) fail "job B ended before the signal";; esac
  sleep 1
done
say "job B is training; sending SIGUSR1 to its tasks (scancel --signal=USR1 $B)"
scancel --signal=USR1 "$B"
for i in $(seq 120); do  # Lightning's handler saves hpc_ckpt_1.ckpt, then rank 0 runs `scontrol requeue`
  [ "$(scontrol show job "$B" -o | grep -o 'Restarts=[0-9]*' | cut -d= -f2)" -ge 1 ] && break
  sleep 1
done
scontrol show job "$B" -o | grep -o 'JobState=[^ ]* Reason=[^ ]*\|Restarts=[0-9]*' | tr '\n' ' '; echo
[ -f "$ROOT_B/hpc_ckpt_1.ckpt" ] || fail "no $ROOT_B/hpc_ckpt_1.ckpt after SIGUSR1"
say "job B requeued by Lightning; hpc_ckpt_1.ckpt global_step=$(step_of "$ROOT_B/hpc_ckpt_1.ckpt")"
wait_state "$B" 60 PENDING RUNNING
# the checkpoint the restart will pick (train.sbatch's rule: the newest hpc_ckpt_N or last.ckpt); the requeue's
# SIGTERM may have made last.ckpt (checkpoint.save_on_exception) a moment after hpc_ckpt_1
RESUME_CKPT=$(ls -t "$ROOT_B"/hpc_ckpt_*.ckpt "$ROOT_B"/checkpoints/last.ckpt 2>/dev/null | head -n 1 || true)
STEP_HPC=$(step_of "$RESUME_CKPT")
say "job B will resume from $RESUME_CKPT (global_step=$STEP_HPC)"
# a requeued job waits for BeginTime (cred_expire + 1 s); start it now instead
[ "$(state "$B")" = PENDING ] && scontrol update JobId="$B" StartTime=now
wait_state "$B" 600 COMPLETED FAILED CANCELLED TIMEOUT NODE_FAIL
scontrol show job "$B" -o | grep -o 'JobState=[^ ]* Reason=[^ ]*\|Restarts=[0-9]*\|ExitCode=[^ ]*' | tr '\n' ' '; echo
grep -ah "lm-slurm:\|auto-requeue\|equeu\|Restoring states\|Restored all states" "$WORK/job-b.out" || true
[ "$(state "$B")" = COMPLETED ] || { tail -60 "$WORK/job-b.out"; fail "job B did not complete after the requeue"; }
STEP_B=$(step_of "$ROOT_B/checkpoints/last.ckpt")
RUNS=$(ls -d "$ROOT_B"/wandb/offline-run-* 2>/dev/null | xargs -n1 basename | tr '\n' ' ')
say "job B: COMPLETED after 1 restart; resumed at global_step=$STEP_HPC, last.ckpt global_step=$STEP_B; W&B runs: $RUNS"
grep -aq "Restoring states from the checkpoint path at ${RESUME_CKPT#"$WORK"/}" "$WORK/job-b.out" \
    || fail "job B's second run did not restore $RESUME_CKPT"
[ "$STEP_HPC" -gt 0 ] && [ "$STEP_HPC" -lt 400 ] || fail "the resumed checkpoint is at step $STEP_HPC, not mid-run"
[ "$STEP_B" = 400 ] || fail "job B's last.ckpt is at step $STEP_B, not 400"
RUN_ID=$(cat "$ROOT_B/wandb_run_id")  # train.sbatch draws it at the job's first start
[ "$(echo "$RUNS" | wc -w)" -ge 2 ] && ! echo "$RUNS" | tr ' ' '\n' | grep -v "^$" | grep -vq -- "-$RUN_ID\$" \
    || fail "the restarted job did not continue W&B run $RUN_ID"
say "PASS: job A completed and checkpointed; job B was requeued at step $STEP_HPC and resumed to step $STEP_B"
