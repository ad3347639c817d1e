#!/usr/bin/env bash
# The CPU smoke run: install, finetune a tiny T5 on the built-in Flan-style
# mixture, then ask the trained model a question. Extra flags go to
# `flan-jax train`, e.g. --gin.TrainConfig.num_steps=100.
# Re-running resumes from the last checkpoint (or reports the run complete).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/setup_env.sh"
cd "$ROOT"
MODEL_DIR="${MODEL_DIR:-$ROOT/runs/smoke}"
flan-jax train --gin_file=runs/smoke.gin --gin.TrainConfig.model_dir="'$MODEL_DIR'" "$@"
DEFAULT_PROMPT="Q: I have two apples, a drum and three pears. How many fruits do I have?
Let's think step by step."
PROMPT="${PROMPT:-$DEFAULT_PROMPT}"
flan-jax infer --model_dir="$MODEL_DIR" "$PROMPT"
