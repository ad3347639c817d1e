# Sourced by launch/local.sh and tests/run.sh: creates .venv (if absent) and
# installs flan-jax into it, with the extras named in $FLAN_JAX_EXTRAS.
#
# `t5` depends on `seqio-nightly`, which installs into the same `seqio/`
# directory as the pinned `seqio`. Whichever pip writes last wins, so after
# every install we reinstall the pinned `seqio` (no deps) and check its version.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
VENV="$ROOT/.venv"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[flan-jax] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
spec="."
[ -n "${FLAN_JAX_EXTRAS:-}" ] && spec=".[${FLAN_JAX_EXTRAS}]"
# Re-install only when setup.py or the extras changed since the last install.
stamp="$VENV/.flan_jax_install_$(cat "$ROOT/setup.py" <(echo "$spec") | sha1sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "[flan-jax] installing $spec into $VENV (first time: several minutes)"
  "${PIP[@]}" install --upgrade pip
  (cd "$ROOT" && "${PIP[@]}" install -e "$spec")
  seqio_version=$("$VENV/bin/python" -c "import re; print(re.search(r'SEQIO_VERSION = \"(.+)\"', open('$ROOT/setup.py').read()).group(1))")
  "${PIP[@]}" install --no-deps --force-reinstall "seqio==$seqio_version"
  "$VENV/bin/python" - "$seqio_version" <<'PY'
import sys
from seqio import version
if version.__version__ != sys.argv[1]:
    sys.exit(f"installed seqio is {version.__version__}, expected {sys.argv[1]}")
PY
  touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
