#!/usr/bin/env bash
# The GPU suite: every benchmark at its documented CUDA shapes, one ITSELF train step against the global-only step,
# the per-kernel profile, the compiled kernel tests (no interpreter) and a summary of each target against its figure.
# Sized for under 8 minutes on one H100/H200: each step has a time ceiling; a step that fails or runs out of time is
# reported and the suite goes on, so one broken step never costs the others.
#
# Usage: benchmarks/gpu_suite.sh [--dry-run] [--logs DIR] [--only STEP,STEP]
#   --dry-run   list the steps, their ceilings and commands, run nothing (works without a GPU)
#   --logs DIR  one log per step (default benchmarks/results/gpu_suite)
#   --only      run only these steps (names as the dry run lists them; the summary always runs)
# Environment: PYTHON (default python3), ATTNSELECT_BENCH_COMMIT (the commit to record where the tree has no .git).
# Rows go to benchmarks/results/<op>.csv and the plots are redrawn; the summary table is printed last and appended
# to benchmarks/results/gpu_summary.csv.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
ONLY=""
LOGS=benchmarks/results/gpu_suite
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --logs) LOGS="$2"; shift ;;
    --only) ONLY=",$2,summary,"; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "gpu_suite.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # the kernels are compiled for the GPU, never interpreted here
if [ -z "${ATTNSELECT_BENCH_COMMIT:-}" ]; then
  sha=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
  if [ "$sha" != unknown ] && [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
    sha="$sha+working-tree"
  fi
  export ATTNSELECT_BENCH_COMMIT=$sha
fi
XDIST=""
if [ "$DRY" = 0 ] && "$PY" -c "import xdist" 2>/dev/null; then XDIST="-n 8"; fi

# name | ceiling in seconds | command
STEPS=(
  "env|10|nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv; $PY -c 'import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name())'"
  "rollout|70|$PY benchmarks/bench_rollout.py --device cuda --skip-compiled"
  "topk_gather|30|$PY benchmarks/bench_topk_gather.py --device cuda"
  "capture|30|$PY benchmarks/bench_capture.py --device cuda"
  "train_step|60|$PY benchmarks/bench_train_step.py --device cuda"
  "attach|30|$PY benchmarks/bench_attach.py --device cuda"
  "prune|60|$PY benchmarks/bench_prune.py --device cuda --reps 10"
  "profile|30|$PY benchmarks/profile_kernels.py --device cuda"
  "kernel_tests|140|$PY -m pytest -q -p no:cacheprovider -m kernels $XDIST tests/test_kernels.py tests/test_kernels_adversarial.py tests/test_kernels_per_sample.py tests/test_kernel_host.py tests/test_compile.py tests/test_cuda_graphs.py"
  "summary|15|$PY benchmarks/gpu_summary.py"
)

if [ -n "$ONLY" ]; then
  kept=()
  for step in "${STEPS[@]}"; do
    case "$ONLY" in *",${step%%|*},"*) kept+=("$step") ;; esac
  done
  STEPS=("${kept[@]}")
fi
total=0
for step in "${STEPS[@]}"; do total=$((total + $(cut -d'|' -f2 <<<"$step"))); done
echo "gpu suite: ${#STEPS[@]} steps, at most ${total} s, commit $ATTNSELECT_BENCH_COMMIT"

if [ "$DRY" = 1 ]; then
  for step in "${STEPS[@]}"; do
    IFS='|' read -r name ceiling cmd <<<"$step"
    printf '%-13s %4ss  %s\n' "$name" "$ceiling" "$cmd"
  done
  exit 0
fi

mkdir -p "$LOGS"
report=()
failed=0
for step in "${STEPS[@]}"; do
  IFS='|' read -r name ceiling cmd <<<"$step"
  echo "== $name (ceiling ${ceiling} s)"
  start=$(date +%s)
  timeout --kill-after=5 "$ceiling" bash -c "$cmd" >"$LOGS/$name.log" 2>&1
  rc=$?
  secs=$(( $(date +%s) - start ))
  tail -n 4 "$LOGS/$name.log"
  case $rc in
    0) status=ok ;;
    124|137) status="TIMED OUT" ; failed=1 ;;
    *) status="FAILED (exit $rc)" ; failed=1 ;;
  esac
  report+=("$(printf '%-13s %-18s %4s s' "$name" "$status" "$secs")")
done

echo
echo "== steps"
printf '%s\n' "${report[@]}"
echo
echo "== targets"
cat "$LOGS/summary.log"
exit $failed
