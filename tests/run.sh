#!/usr/bin/env bash
# Installs flan-jax with its test extra into .venv (if needed) and runs the suite.
# Extra arguments go to pytest; a path among them (a file, a directory, a
# file::test) replaces the default `tests`.
#
# With no arguments the suite runs on pytest-xdist workers, one per CPU core,
# at most 4 (most of its time is single-threaded XLA compilation and subprocess
# start-up). FLAN_JAX_TEST_WORKERS=N sets the number; 0 or 1 runs serially.
# With arguments it runs serially unless FLAN_JAX_TEST_WORKERS is set (an -n of
# their own goes to pytest as given). tests/conftest.py keeps the tests that
# share a module-scoped fixture on one worker and hands out the slowest first.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FLAN_JAX_EXTRAS=test source "$ROOT/launch/setup_env.sh"
cd "$ROOT"
export FLAN_JAX_DATA_DIR="${FLAN_JAX_DATA_DIR:-$ROOT/../shared/data}"
export FLAN_JAX_FIXTURES_DIR="${FLAN_JAX_FIXTURES_DIR:-$ROOT/../shared/fixtures}"

paths=(tests)
workers="${FLAN_JAX_TEST_WORKERS:-}"
if [ -z "$workers" ]; then
  workers=1
  if [ "$#" -eq 0 ]; then
    workers="$(python -c 'import os; print(min(4, len(os.sched_getaffinity(0))))')"
  fi
fi
for arg in "$@"; do
  if [[ "$arg" != -* && -e "${arg%%::*}" ]]; then
    paths=()
  fi
  case "$arg" in
    -n | -n* | --numprocesses | --numprocesses=* | no:xdist | -pno:xdist) workers=1 ;;  # the caller's choice
  esac
done
xdist=()
if [ "$workers" -gt 1 ]; then
  xdist=(-n "$workers" --dist loadgroup)
fi

set +e
python -m pytest -q "${paths[@]}" "${xdist[@]}" "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
