#!/usr/bin/env bash
# GPU proof: one run on a CUDA machine that proves `pytest -m gpu`, the memory grid (measured vs predicted peak)
# and the throughput benchmarks, writing everything under $OUT. It installs nothing from the network: wheels the
# machine lacks are carried in .whl/ (benchmarks/gpu_proof_wheels.sh downloads them) and installed with
# `pip install --no-index --no-deps --target`. It stops itself inside its time budget (default 420 s) and writes
# the JSON after every step and grid row, so a run cut short keeps what it has.
#
# usage: bash benchmarks/gpu_proof.sh [--rehearse] [--budget-s SECONDS] [--steps gpu,grid,benchmark] [--rows REGEX]
#   --rehearse   CPU rehearsal of every step with tiny shapes and CPU semantics (OUT defaults to a temp dir)
#   --steps      which of the three steps to run (default all; versions, models, monitor and summary always run)
#   --rows       only the grid rows whose "model name" matches REGEX (e.g. 'kogpt2 lora fp32')
# env:   OUT (output folder), PYTHON (default python3), GPU_PROOF_WHEELS (default .whl), GPU_PROOF_SITE,
#        GPU_PROOF_PLAN (plan for the pytest runs, default the project's default plan)
#
# $OUT receives (at most 8 files, at most one folder deep):
#   gpu-<device>.json          versions, models, steps (exit codes, JUnit counts), rows, monitor peaks, summary
#   gpu-proof.log              everything printed
#   monitor/samples.jsonl, monitor/summary.json, monitor/timeline.png   `kolora-probe monitor` over the whole run
#   reports-gpu.tar.gz         `pytest -m gpu`: report.html, junit.xml, environment.json, per-check monitor logs
#   reports-benchmark.tar.gz   `pytest -m benchmark`: the same three reports, pytest-benchmark.json, benchmarks.json
# the whole script is one brace group: bash reads it completely before running it (safe to edit mid-run)
{
set -u -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REHEARSE=0
BUDGET_S=420
STEPS=gpu,grid,benchmark
ROWS=
while [ $# -gt 0 ]; do
  case "$1" in
    --rehearse) REHEARSE=1 ;;
    --budget-s) BUDGET_S=$2; shift ;;
    --budget-s=*) BUDGET_S=${1#*=} ;;
    --steps) STEPS=$2; shift ;;
    --steps=*) STEPS=${1#*=} ;;
    --rows) ROWS=$2; shift ;;
    --rows=*) ROWS=${1#*=} ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "gpu_proof.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

case "$BUDGET_S" in ''|*[!0-9]*) echo "gpu_proof.sh: --budget-s must be a whole number of seconds, got '$BUDGET_S'" >&2; exit 2 ;; esac
for s in ${STEPS//,/ }; do
  case "$s" in gpu|grid|benchmark) ;; *) echo "gpu_proof.sh: --steps: unknown step '$s' (gpu, grid, benchmark)" >&2; exit 2 ;; esac
done
want() { case ",$STEPS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

START=$(date +%s)
DEADLINE=$((START + BUDGET_S))
PY=${PYTHON:-python3}
if [ -z "${OUT:-}" ]; then
  if [ $REHEARSE = 1 ]; then OUT=$(mktemp -d "${TMPDIR:-/tmp}/gpu-proof-rehearsal.XXXXXX")
  else OUT=$ROOT/reports/gpu-proof; fi
fi
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-proof-work.XXXXXX")   # models and reports; only tarballs go to $OUT
exec > >(tee -a "$OUT/gpu-proof.log") 2>&1
say() { echo "[gpu-proof $(date -u +%H:%M:%S) +$(( $(date +%s) - START ))s] $*"; }
left() { echo $((DEADLINE - $(date +%s))); }

if [ $REHEARSE = 1 ]; then DEVICE=cpu-rehearsal
else
  NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
  [ -n "$NAME" ] || NAME=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")' 2>/dev/null)
  DEVICE=$(echo "${NAME:-no-gpu}" | tr 'A-Z' 'a-z' | sed -E 's/[^a-z0-9]+/-/g; s/^-+|-+$//g')
fi
JSON=$OUT/gpu-$DEVICE.json
say "mode $([ $REHEARSE = 1 ] && echo rehearsal || echo device), device $DEVICE, budget ${BUDGET_S}s, OUT=$OUT"

# 1. carried wheels (no network): the same command on the device and in the rehearsal
WHEELS=${GPU_PROOF_WHEELS:-$ROOT/.whl}
SITE=${GPU_PROOF_SITE:-$WORK/site}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
WHEEL_NAMES=
WHEELS_RC=0
T=$(date +%s)
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  WHEEL_NAMES=$(cd "$WHEELS" && ls *.whl | tr '\n' ' ')
  say "installing carried wheels from $WHEELS: $WHEEL_NAMES"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
  WHEELS_RC=$?
  if [ $WHEELS_RC = 0 ]; then
    export PYTHONPATH="$SITE:$PYTHONPATH"
    say "installed in $(( $(date +%s) - T ))s into $SITE (first on PYTHONPATH)"
  else say "WARNING: installing the carried wheels failed (exit $WHEELS_RC); going on with the installed packages"; fi
else
  say "no carried wheels in $WHEELS: using the installed packages (benchmarks/gpu_proof_wheels.sh fetches them)"
fi
WHEELS_S=$(( $(date +%s) - T ))
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
# the rehearsal checks that every step runs, not how fast: one CPU thread avoids oversubscribing a small machine
[ $REHEARSE = 1 ] && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

COMMON=(--json "$JSON" --work "$WORK"); [ $REHEARSE = 1 ] && COMMON+=(--rehearse)
helper() { "$PY" "$ROOT/benchmarks/gpu_proof.py" "$1" "${COMMON[@]}" "${@:2}"; }
# timed_helper LIMIT_S SUBCOMMAND ARGS...: the helper under a time limit (the JSON keeps what it wrote)
timed_helper() { local limit=$1; shift; timeout -k 10 "$limit" "$PY" "$ROOT/benchmarks/gpu_proof.py" "$1" "${COMMON[@]}" "${@:2}"; }

# 2. the monitor, in the background for the whole run (SIGTERM makes it write summary.json and timeline.png)
"$PY" -m kolora_probe monitor --interval "$([ $REHEARSE = 1 ] && echo 0.5 || echo 1)" --output "$OUT/monitor" \
  >"$WORK/monitor.out" 2>&1 &
MONITOR_PID=$!
stop_monitor() {
  if [ -n "${MONITOR_PID:-}" ] && kill -0 "$MONITOR_PID" 2>/dev/null; then
    kill -TERM "$MONITOR_PID"
    for _ in $(seq 1 120); do kill -0 "$MONITOR_PID" 2>/dev/null || break; sleep 0.25; done
    kill -0 "$MONITOR_PID" 2>/dev/null && kill -KILL "$MONITOR_PID"
  fi
  MONITOR_PID=
}
trap 'stop_monitor; rm -rf "$WORK"' EXIT

# 3. versions and the two models (random weights, from config)
T=$(date +%s)
L=$(( $(left) - 60 )); [ $L -gt 120 ] && L=120; [ $L -lt 30 ] && L=30
timed_helper $L prepare --device-name "$DEVICE" --budget-s "$BUDGET_S" \
  --wheels "$WHEEL_NAMES" --wheels-rc $WHEELS_RC --wheels-s $WHEELS_S
RC=$?
if [ $RC != 0 ] || [ ! -f "$WORK/kogpt2/config.json" ]; then
  say "prepare failed (exit $RC): no model to run the checks on"
  [ -f "$JSON" ] && helper record --step prepare --rc "$RC" --wall-s $(( $(date +%s) - T ))
fi
MODEL=$WORK/kogpt2
PLAN_OPTS=(${GPU_PROOF_PLAN:+"--plan=$GPU_PROOF_PLAN"})
# the rehearsal's tiny model has 128 positions: the plan's 8 x 512 batch shrinks with it
[ $REHEARSE = 1 ] && PLAN_OPTS+=(--batch-size=2 --seq-len=64)

# run_pytest NAME MARKER MAX_S RESERVE_S: pytest with the three reports, stopped by SIGINT (reports still written)
run_pytest() {
  local name=$1 marker=$2 max=$3 reserve=$4 t rc limit
  limit=$(( $(left) - reserve )); [ $limit -gt $max ] && limit=$max
  if [ $limit -lt 20 ]; then
    say "$name: not run ($(left) s left)"
    helper record --step "$name" --rc 124 --wall-s 0 --note "not run: $(left) s left in the time budget"; return
  fi
  say "pytest -m $marker (limit ${limit}s)"
  t=$(date +%s)
  mkdir -p "$WORK/reports-$name"
  (cd "$ROOT" && timeout -s INT -k 20 "$limit" "$PY" -m pytest -m "$marker" -p no:cacheprovider -q -rfE \
     "--model=$MODEL" "${PLAN_OPTS[@]}" "--reports-dir=$WORK/reports-$name" \
     "--benchmark-json=$WORK/reports-$name/pytest-benchmark.json")
  rc=$?
  helper record --step "$name" --rc $rc --wall-s $(( $(date +%s) - t )) --reports "$WORK/reports-$name"
  [ -d "$WORK/reports-$name" ] && tar -czf "$OUT/reports-$name.tar.gz" -C "$WORK" "reports-$name"
}

# 4. pytest -m gpu (the CUDA/NVML/bf16/bitsandbytes checks and the plan's measured step)
want gpu && run_pytest gpu gpu 150 150

# 5. the memory + throughput grid: each row checks the time left; the shell stops it at its own limit too
GRID_END=$((DEADLINE - $(want benchmark && echo 75 || echo 15)))
if ! want grid; then :
elif [ $((GRID_END - $(date +%s))) -gt 10 ]; then
  T=$(date +%s)
  say "memory + throughput grid (until +$((GRID_END - START))s)"
  timed_helper $((GRID_END - $(date +%s) + 15)) grid --deadline "$GRID_END" ${ROWS:+--rows "$ROWS"} \
    --first-row-s "$([ $REHEARSE = 1 ] && echo 5 || echo 30)"
  RC=$?
  [ $RC != 0 ] && helper record --step grid --rc $RC --wall-s $(( $(date +%s) - T ))
else say "grid: not run ($(left) s left)"; fi

# 6. throughput benchmarks (pytest-benchmark: tokenization, forward latency, LoRA step tokens/s and MFU)
want benchmark && run_pytest benchmark benchmark 90 15

# 7. stop the monitor, summarise
stop_monitor
helper finish --monitor "$OUT/monitor" --wall-s $(( $(date +%s) - START ))
say "done in $(( $(date +%s) - START ))s; files in $OUT: $(cd "$OUT" && find . -type f | sort | tr '\n' ' ')"
exit 0
}
