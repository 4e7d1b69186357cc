#!/usr/bin/env bash
# The GPU checks in one go (under 5 minutes on one H100/H200), for whenever a GPU is available:
#   1. correctness on CUDA (bench/gpu_checks.py): no host sync in fixed-iteration CG, the
#      natural step, the batched line search, the whole policy step and the critic loop
#      (torch.cuda.set_sync_debug_mode("error")); CUDA == CPU; CUDA-graph step/fit == eager;
#      trpo.train on CUDA;
#   2. the benchmark suites on CUDA (natgrad, whole updates vs sb3-contrib's train()), then a
#      few CPU cases for the CPU-vs-GPU rows;
#   3. a short table of everything, printed last.
# Usage: bash bench/gpu_check.sh            (results and logs in $OUT or /tmp/gpu_check)
# Env: PYTHON (interpreter), GPU_CHECK_CPU=0 (skip the CPU rows), GPU_CHECK_CASES (CUDA cases),
#      CHECK_TIMEOUT / NATGRAD_TIMEOUT / UPDATE_TIMEOUT / CPU_TIMEOUT (seconds per stage; each
#      stage keeps its own JSON, so a stage cut short only loses its own rows),
#      BENCH_TARGET_S (seconds of timed rounds per benchmark, default 0.5 here),
#      GPU_CHECK_DRY=1 (run the stages without a GPU: tests the script itself).
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${OUT:-/tmp/gpu_check}
mkdir -p "$RESULTS"
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
CASES=${GPU_CHECK_CASES:-hopper@2k,cheetah@25k,humanoid@50k,huge@200k}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export BENCH_THREADS=${BENCH_THREADS:-1}
export BENCH_TARGET_S=${BENCH_TARGET_S:-0.5}
start=$(date +%s)
stage() { echo; echo "=== [$(( $(date +%s) - start ))s] $*"; }

stage "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: n/a"
if ! "$PY" -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); sys.exit(0 if torch.cuda.is_available() else 3)"; then
  if [ "${GPU_CHECK_DRY:-0}" = 1 ]; then
    echo "GPU_CHECK_DRY=1: no CUDA device, running the script's stages anyway (CUDA rows skip)"
  else
    echo "no usable CUDA device: nothing to check"; exit 3
  fi
fi

stage "correctness checks on CUDA"
timeout "${CHECK_TIMEOUT:-60}" "$PY" bench/gpu_checks.py --json "$RESULTS/checks.json" 2>&1 | tee "$RESULTS/checks.log"
checks_rc=${PIPESTATUS[0]}

run_bench() {  # name timeout pytest-args...
  local name=$1 limit=$2; shift 2
  rm -f "$RESULTS/$name.json"
  timeout "$limit" "$PY" -m pytest --benchmark-only --benchmark-group-by=param -q \
    -p no:cacheprovider --benchmark-json "$RESULTS/$name.json" "$@" 2>&1 | tee "$RESULTS/$name.log" | tail -40
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 124 ] && echo "(stage $name hit its time limit: its results are missing from the table)"
  return 0
}

stage "natgrad benchmarks on CUDA ($CASES)"
run_bench cuda_natgrad "${NATGRAD_TIMEOUT:-80}" bench/test_bench_natgrad.py -k cuda --bench-cases "$CASES"

stage "whole-update benchmarks on CUDA, ours vs sb3-contrib ($CASES)"
run_bench cuda_update "${UPDATE_TIMEOUT:-100}" bench/test_bench_update.py -k cuda --bench-cases "$CASES"

if [ "${GPU_CHECK_CPU:-1}" != 0 ]; then
  stage "benchmarks on CPU for the CPU-vs-GPU rows ($BENCH_THREADS thread(s))"
  run_bench cpu_natgrad "${CPU_TIMEOUT:-40}" bench/test_bench_natgrad.py -k cpu \
    --bench-cases hopper@2k,cheetah@25k
  run_bench cpu_update "${CPU_TIMEOUT:-40}" bench/test_bench_update.py -k cpu --bench-cases hopper@2k
fi

stage "summary"
"$PY" bench/gpu_checks.py --summary "$RESULTS/checks.json" "$RESULTS/cuda_natgrad.json" \
  "$RESULTS/cuda_update.json" "$RESULTS/cpu_natgrad.json" "$RESULTS/cpu_update.json"
echo "checks exit code: $checks_rc; total $(( $(date +%s) - start )) s; logs and JSON in $RESULTS"
exit "$checks_rc"
