#!/usr/bin/env bash
# The one prepared command for a bare, freshly started GPU machine (one H100
# 80 GB or H200; python3 with jax[cuda], flax, optax, orbax; no TensorFlow,
# SeqIO or t5; nothing reachable): the most telling GPU checks first, all
# within DEADLINE_S (default 540) seconds of its start, by construction.
#
#   bash launch/gpu_check.sh OUT          on the GPU
#   bash launch/gpu_check.sh --cpu OUT    the same steps on the tiny model on this CPU (a dry run)
#
# In order, each step only with the time left (less RESERVE_S, default 25,
# for the archive and the summary), each under a time limit no longer than that:
#   0. gin-config importable (else installed from the wheel in .whl/, else one
#      line saying how to bring it, and exit 2: see launch/gin_check.sh);
#   1. OUT/env.txt: GPU, driver, Python, jax/flax/optax versions, devices and
#      the memory XLA may use (exit 3 if JAX sees no GPU, without --cpu);
#   2. OUT/attention_check.json: `flan-jax bench attention_check` for Pallas
#      and cuDNN attention (those of VARIANTS) at flan_t5_base's shapes (batch
#      32, 1024/256), each at most CHECK_S (default 120) seconds;
#   3. OUT/matrix.json: launch/bench_matrix.py (base and large, their best
#      combinations and XL, as far as its BUDGET_S, set to the time left,
#      allows; it reuses step 2's checks and never runs past that budget).
# OUT/logs.tar.gz holds every log and per-run JSON (rewritten after each
# matrix run, so a kill leaves the runs that finished) and OUT/summary.md the
# environment, the checks and the matrix's table. Nothing else is written to OUT.
#
# XLA_PYTHON_CLIENT_MEM_FRACTION defaults to 0.92 (XLA's own cap is 75%:
# flan_t5_xl's ~67 GiB peak would not fit an 80 GB card); preallocation
# stays as `flan-jax bench train` sets it. The matrix's environment (MODELS,
# XL, LENGTHS, STEPS, VARIANTS, RUN_TIMEOUT_S) passes through; --cpu sets
# JAX_PLATFORMS=cpu, MODELS=tiny:2, XL="", LENGTHS=64,32, STEPS=2,
# VARIANTS="pallas cudnn_packed" and DEADLINE_S=240 unless they are set.
set -uo pipefail
START=$SECONDS
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cpu=0
if [ "${1:-}" = --cpu ]; then cpu=1; shift; fi
OUT_ARG="${1:?usage: bash launch/gpu_check.sh [--cpu] OUT}"
mkdir -p "$OUT_ARG" && OUT="$(cd "$OUT_ARG" && pwd)" || exit 1
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHON PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
if [ "$cpu" = 1 ]; then
  export JAX_PLATFORMS=cpu MODELS="${MODELS-tiny:2}" XL="${XL-}" LENGTHS="${LENGTHS:-64,32}" STEPS="${STEPS:-2}"
  export VARIANTS="${VARIANTS:-pallas cudnn_packed}"
  DEADLINE_S="${DEADLINE_S:-240}"
  check_model=tiny check_batch=2
else
  DEADLINE_S="${DEADLINE_S:-540}"
  check_model=flan_t5_base check_batch=32
fi
check_lengths="${LENGTHS:-1024,256}"
RESERVE_S="${RESERVE_S:-25}"
CHECK_S="${CHECK_S:-120}"
SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"  # logs and per-run files, archived into OUT
SITE="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_site.XXXXXX")"  # gin-config, if installed from the wheel
exec > >(tee "$SCRATCH/gpu_check.log") 2>&1
cd "$ROOT" || exit 1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

left() { echo $(( DEADLINE_S - (SECONDS - START) - RESERVE_S )); }  # seconds a step may still take
say() { echo "== [$(( SECONDS - START )) s] $*"; }

archive() {  # every log into OUT/logs.tar.gz, replaced in one step
  (cd "$SCRATCH" && tar -czf "$OUT/.logs.tar.gz.partial" -- *) && mv -f "$OUT/.logs.tar.gz.partial" "$OUT/logs.tar.gz"
}

summary() {
  "$PYTHON" - "$OUT" "$(( SECONDS - START ))" "$DEADLINE_S" <<'EOF'
import importlib.util, json, sys
from pathlib import Path
out, elapsed, deadline = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
lines = [f"# gpu_check: {elapsed} s of {deadline}", ""]
if (out / "env.txt").exists():
    lines += ["## Environment", "", "```", (out / "env.txt").read_text().strip(), "```", ""]
if (out / "attention_check.json").exists():
    lines += ["## Attention gradients against the einsum reference", ""]
    for variant, check in json.loads((out / "attention_check.json").read_text()).items():
        if "cases" not in check:
            lines.append(f"- {variant}: {check.get('status')}: {check.get('error', '')}")
            continue
        worst = max((max(c["errors"].values(), default=0.0) for c in check["cases"]), default=0.0)
        routes = "; ".join(sorted({c["route"] for c in check["cases"]}))
        lines.append(f"- {variant}: {'agree' if check['passed'] else 'DIFFER'} (largest relative error "
                     f"{worst:.1e}; ran as {routes})")
    lines.append("")
if (out / "matrix.json").exists():
    spec = importlib.util.spec_from_file_location("bench_matrix", Path.cwd() / "launch" / "bench_matrix.py")
    matrix = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(matrix)
    lines += ["## Matrix", "", matrix.table(json.loads((out / "matrix.json").read_text())), ""]
(out / "summary.md").write_text("\n".join(lines))
EOF
}

finish() {  # $1: exit status
  say "done (exit $1); files in $OUT"
  summary
  archive
  exit "$1"
}

# 0. gin-config.
say "gin-config"
source "$ROOT/launch/gin_check.sh"
if ! ensure_gin "$SITE"; then
  echo "nothing run: $GIN_PROBLEM" > "$OUT/env.txt"
  finish 2
fi

# 1. The environment.
limit=$(( $(left) < 90 ? $(left) : 90 ))
if [ "$limit" -lt 5 ]; then say "DEADLINE_S=$DEADLINE_S leaves no time"; finish 1; fi  # (timeout 0 would not limit)
say "environment -> env.txt"
{
  date -u +"%Y-%m-%d %H:%M:%S UTC"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  timeout -k 5 "$limit" "$PYTHON" - <<'EOF' 2>"$SCRATCH/env.log"
import os, platform
import flax, jax, jaxlib, optax
devices = jax.devices()
stats = devices[0].memory_stats() or {}
print(f"python {platform.python_version()}, jax {jax.__version__}, jaxlib {jaxlib.__version__}, "
      f"flax {flax.__version__}, optax {optax.__version__}")
print(f"backend {jax.default_backend()}: {len(devices)} x {devices[0].device_kind}; "
      f"XLA may use {stats.get('bytes_limit', 0) / 2**30:.1f} GiB of device 0")
print(" ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith(("XLA_", "JAX_"))))
EOF
} > "$OUT/env.txt"
cat "$OUT/env.txt"
if ! grep -q "^backend " "$OUT/env.txt"; then
  say "JAX did not start: $(tail -n 1 "$SCRATCH/env.log")"
  finish 3
fi
if [ "$cpu" = 0 ] && ! grep -q "^backend gpu" "$OUT/env.txt"; then
  say "JAX sees no GPU (use --cpu for a dry run on the CPU)"
  finish 3
fi

# 2. The attention gradient checks, named as the matrix names its own (it reuses them).
checked=()
for pair in pallas:pallas cudnn_packed:cudnn; do
  variant="${pair%%:*}" kernel="${pair##*:}"
  [[ " ${VARIANTS:-pallas cudnn_packed} " == *" $variant "* ]] || continue  # only those the matrix times
  checked+=("$variant")
  name="${check_model}_${variant}_check"
  limit=$(( $(left) < CHECK_S ? $(left) : CHECK_S ))
  if [ "$limit" -lt 5 ]; then say "$variant check skipped: $(left) s left"; continue; fi
  say "$variant: gradients against the reference (at most $limit s)"
  timeout -k 5 "$limit" "$PYTHON" -m flan_jax.cli bench attention_check --gin_file="models/$check_model.gin" \
    --batch_size="$check_batch" --lengths="$check_lengths" --gin.T5Config.attention_kernel="'$kernel'" \
    --json_out="$SCRATCH/$name.json" > "$SCRATCH/$name.log" 2>&1
  rc=$?
  tail -n 8 "$SCRATCH/$name.log"
  echo "$rc" > "$SCRATCH/$name.rc"
done
"$PYTHON" - "$SCRATCH" "$check_model" "${checked[@]}" > "$OUT/attention_check.json" <<'EOF'
import json, sys
from pathlib import Path
scratch, model = Path(sys.argv[1]), sys.argv[2]
checks = {}
for variant in sys.argv[3:]:
    name = f"{model}_{variant}_check"
    result, rc = scratch / f"{name}.json", scratch / f"{name}.rc"
    if result.exists():
        checks[variant] = json.loads(result.read_text())
    elif rc.exists():
        log = (scratch / f"{name}.log").read_text(errors="replace").strip().splitlines() or [""]
        code = rc.read_text().strip()
        checks[variant] = {"passed": False, "status": f"failed ({'timeout' if code == '124' else code})",
                           "error": log[-1][:500]}
    else:
        checks[variant] = {"passed": False, "status": "not run: deadline"}
print(json.dumps(checks, indent=1))
EOF
archive

# 3. The matrix, within what is left.
budget=$(( $(left) ))
if [ "$budget" -lt 30 ]; then
  say "matrix skipped: $budget s left"
  finish 1
fi
say "matrix: BUDGET_S=$budget"
BUDGET_S="$budget" RUNS_DIR="$SCRATCH" LOGS_TAR="$OUT/logs.tar.gz" REUSE_CHECKS=1 \
  timeout -k 5 "$(( budget + 10 ))" "$PYTHON" launch/bench_matrix.py "$OUT"
rc=$?
[ -f "$OUT/matrix.json" ] || rc=1
finish "$rc"
