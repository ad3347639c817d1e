#!/usr/bin/env bash
# Installs flan-jax with its test extra into .venv (if needed) and runs the suite.
# Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FLAN_JAX_EXTRAS=test source "$ROOT/launch/setup_env.sh"
cd "$ROOT"
export FLAN_JAX_DATA_DIR="${FLAN_JAX_DATA_DIR:-$ROOT/../shared/data}"
export FLAN_JAX_FIXTURES_DIR="${FLAN_JAX_FIXTURES_DIR:-$ROOT/../shared/fixtures}"
set +e
python -m pytest -q tests "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
