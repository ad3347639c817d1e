#!/usr/bin/env bash
# Installs flan-jax with its test extra into .venv (if needed) and runs the suite.
# Extra arguments go to pytest; a path among them (a file, a directory, a
# file::test) replaces the default `tests`.
#
#   bash tests/run.sh                    the whole suite
#   bash tests/run.sh -m "not slow"      the fast tier (tests/conftest.py says which are slow)
#   bash tests/run.sh tests/test_cli.py  one file (or file::test), serially
#
# Without a path the tests run on pytest-xdist workers, one per CPU core, at
# most 4 (most of their time is single-threaded XLA compilation and subprocess
# start-up), and the 30 slowest are listed at the end; with a path, serially.
# FLAN_JAX_TEST_WORKERS=N sets the number; 0 or 1 runs serially (an -n of the
# caller's goes to pytest as given). tests/conftest.py keeps the tests that
# share a module-scoped fixture on one worker and hands out the slowest first,
# and gives every test process JAX's compilation cache in .cache/jax.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FLAN_JAX_EXTRAS=test source "$ROOT/launch/setup_env.sh"
cd "$ROOT"
export FLAN_JAX_DATA_DIR="${FLAN_JAX_DATA_DIR:-$ROOT/../shared/data}"
export FLAN_JAX_FIXTURES_DIR="${FLAN_JAX_FIXTURES_DIR:-$ROOT/../shared/fixtures}"

paths=(tests)
caller_workers=""
value_of=""  # the option whose value the next argument is (that value is no path)
for arg in "$@"; do
  if [ -n "$value_of" ]; then
    [ "$value_of" = "-p" ] && [ "$arg" = "no:xdist" ] && caller_workers=1
    value_of=""
    continue
  fi
  case "$arg" in
    -n | --numprocesses) caller_workers=1; value_of="$arg" ;;  # the caller's choice, as given
    -n* | --numprocesses=* | -pno:xdist) caller_workers=1 ;;
    -m | -k | -p | -o | -c | -W | --basetemp | --rootdir | --ignore | --deselect | --durations | --maxfail | --dist \
      | --confcutdir | --junitxml | --import-mode | --tb) value_of="$arg" ;;
    -*) ;;
    *) if [ -e "${arg%%::*}" ]; then paths=(); fi ;;
  esac
done
workers="${FLAN_JAX_TEST_WORKERS:-}"
if [ -n "$caller_workers" ]; then
  workers=1
elif [ -z "$workers" ]; then
  workers=1
  if [ "${#paths[@]}" -gt 0 ]; then  # no path given: the suite, or a selection from it
    workers="$(python -c 'import os; print(min(4, len(os.sched_getaffinity(0))))')"
  fi
fi
xdist=()
if [ "$workers" -gt 1 ]; then
  xdist=(-n "$workers" --dist loadgroup)
fi
durations=()
if [ "${#paths[@]}" -gt 0 ]; then
  durations=(--durations=30)  # before "$@", so that a --durations of the caller's wins
fi

set +e
python -m pytest -q "${paths[@]}" "${xdist[@]}" "${durations[@]}" "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
