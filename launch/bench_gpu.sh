#!/usr/bin/env bash
# The GPU training benchmark in one go: `flan-jax bench train` in bf16 on
# packed 1024/256 rows for flan_t5_base (batch 32), flan_t5_large (16) and
# flan_t5_xl (8), with transformers' step beside base and large. Each run
# prints compile time, step time, tokens/s, MFU and peak memory, and writes
# its figures to OUT_DIR/<model>.json (and its log to OUT_DIR/<model>.log).
#
#   bash launch/bench_gpu.sh [OUT_DIR] [extra bench-train flags, e.g. --gin.T5Config.remat_policy="'dots'"]
#   bash launch/bench_gpu.sh --matrix OUT_DIR   (every variant of issue 19, within 8 minutes:
#                                                see launch/bench_matrix.py)
#
# Needs jax with CUDA, flax, optax, orbax and gin-config; TensorFlow, SeqIO
# and t5 are not needed (run from a checkout with PYTHONPATH=. if flan-jax is
# not installed). transformers and torch only for the comparison; without
# them (or with COMPARE_HF=0) it is skipped. Each model gets at most
# TIMEOUT_S seconds (default 240), so one slow compile cannot eat the rest.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# python3 where there is no `python` (a bare GPU image); PYTHON overrides.
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
if [ "${1:-}" = --matrix ]; then
  export PYTHONUNBUFFERED=1
  exec "$PYTHON" "$ROOT/launch/bench_matrix.py" "${2:?usage: bench_gpu.sh --matrix OUT_DIR}"
fi
OUT_DIR="${1:-$ROOT/runs/bench_gpu}"
shift || true
mkdir -p "$OUT_DIR"
cd "$ROOT"
export PYTHONUNBUFFERED=1
# Models and batches of the issue that set the targets (docs: README "Benchmarks").
RUNS="${RUNS:-flan_t5_base:32 flan_t5_large:16 flan_t5_xl:8}"
if [ "${COMPARE_HF:-1}" = 1 ] && "$PYTHON" -c "import torch, transformers" 2>/dev/null; then
  compare=1
else
  compare=0
fi
if command -v flan-jax >/dev/null; then cli=(flan-jax); else cli=("$PYTHON" -m flan_jax.cli); fi
status=0
for run in $RUNS; do
  model="${run%%:*}"
  batch="${run##*:}"
  flags=(--gin_file="models/$model.gin" --batch_size="$batch" --lengths=1024,256 --steps=10
         --json_out="$OUT_DIR/$model.json")
  if [ "$compare" = 1 ] && [ "$model" != flan_t5_xl ]; then
    flags+=(--compare_hf)
  fi
  echo "== $model, batch $batch"
  timeout "${TIMEOUT_S:-240}" "${cli[@]}" bench train "${flags[@]}" "$@" 2>&1 | tee "$OUT_DIR/$model.log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    echo "== $model: exit $rc$([ "$rc" -eq 124 ] && echo ' (timed out)')"
    status=1
  fi
done
exit "$status"
