#!/usr/bin/env bash
# The GPU checks in one go (under 5 minutes on one H100/H200), for whenever a GPU is available:
#   1. correctness on CUDA (bench/gpu_checks.py): no host sync in fixed-iteration CG, the
#      natural step, the batched line search, the whole policy step and the critic loop
#      (torch.cuda.set_sync_debug_mode("error")); CUDA == CPU; CUDA-graph step/fit == eager;
#      trpo.train on CUDA;
#   2. the benchmark suites on CUDA (natgrad, whole updates vs sb3-contrib's train()), then the
#      two default CPU cases for the CPU-vs-GPU table;
#   3. a short table of everything, printed last.
# Usage: bash bench/gpu_check.sh            (results and logs in $OUT or /tmp/gpu_check)
# Env: PYTHON (interpreter), GPU_CHECK_CPU=0 (skip the CPU rows), GPU_CHECK_CASES (CUDA cases),
#      CHECK_TIMEOUT / BENCH_TIMEOUT / CPU_TIMEOUT (seconds per stage).
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
start=$(date +%s)
stage() { echo; echo "=== [$(( $(date +%s) - start ))s] $*"; }

stage "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: n/a"
if ! "$PY" -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); sys.exit(0 if torch.cuda.is_available() else 3)"; then
  echo "no usable CUDA device: nothing to check"; exit 3
fi

stage "correctness checks on CUDA"
timeout "${CHECK_TIMEOUT:-100}" "$PY" bench/gpu_checks.py --json "$RESULTS/checks.json" 2>&1 | tee "$RESULTS/checks.log"
checks_rc=${PIPESTATUS[0]}

run_bench() {  # name timeout pytest-args...
  local name=$1 limit=$2; shift 2
  timeout "$limit" "$PY" -m pytest bench/ --benchmark-only --benchmark-group-by=param -q \
    -p no:cacheprovider --benchmark-json "$RESULTS/$name.json" "$@" 2>&1 | tee "$RESULTS/$name.log" | tail -40
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 124 ] && echo "(stage $name hit its time limit: its results are missing from the table)"
  return 0
}

stage "benchmarks on CUDA ($CASES)"
run_bench cuda "${BENCH_TIMEOUT:-150}" -k cuda --bench-cases "$CASES"

if [ "${GPU_CHECK_CPU:-1}" != 0 ]; then
  stage "benchmarks on CPU (hopper@2k, cheetah@25k; $BENCH_THREADS thread(s))"
  run_bench cpu "${CPU_TIMEOUT:-90}" -k cpu --bench-cases hopper@2k,cheetah@25k
fi

stage "summary"
"$PY" bench/gpu_checks.py --summary "$RESULTS/checks.json" "$RESULTS/cuda.json" "$RESULTS/cpu.json"
echo "checks exit code: $checks_rc; total $(( $(date +%s) - start )) s; logs and JSON in $RESULTS"
exit "$checks_rc"
