# Sourced by launch/gpu_check.sh (bash): `ensure_gin SITE_DIR` makes gin-config
# importable for "$PYTHON" run from the repository root, or says in one line
# how to bring it (also in GIN_PROBLEM). gin-config is pure Python: where it is not installed, a
# wheel in GIN_WHEEL_DIR (default .whl/ in the repository root) is installed
# into SITE_DIR, which joins PYTHONPATH. Bring the wheel from a machine with
# pip, into the checkout's .whl/ (ignored by git, so a copy of the working
# tree to a GPU machine must name it, e.g. the device tool's carry: [".whl"]):
#   python3 -m pip download --no-deps -d .whl gin-config==0.5.0
# (gin_config-0.5.0-py3-none-any.whl: any Python 3, any platform).
#
# Beware: the repository's gin/ folder (config files) makes `import gin` from
# the root succeed as an empty namespace package when gin-config is missing;
# the check is therefore `gin.configurable`, not the import.

GIN_FETCH='python3 -m pip download --no-deps -d .whl gin-config==0.5.0'

_gin_probe() {  # prints why gin-config is unusable, nothing if it is usable
  "$PYTHON" - <<'EOF' 2>&1
try:
    import gin
    gin.configurable
except AttributeError:
    print(f"`import gin` found {list(getattr(gin, '__path__', []))[:1]} (a namespace package, e.g. the repository's "
          "gin/ config folder), not gin-config")
except ImportError as e:
    print(f"{type(e).__name__}: {e}")
EOF
}

ensure_gin() {
  local site="$1" why wheels
  why="$(cd "$ROOT" && _gin_probe)"
  [ -z "$why" ] && return 0
  wheels=("${GIN_WHEEL_DIR:-$ROOT/.whl}"/gin_config-*.whl)
  if [ -f "${wheels[0]}" ]; then
    mkdir -p "$site"
    # pip if this Python has it, else the wheel unzipped (a pure-Python wheel is its files).
    "$PYTHON" -m pip install -q --no-index --no-deps --target "$site" "${wheels[0]}" >/dev/null 2>&1 \
      || "$PYTHON" -m zipfile -e "${wheels[0]}" "$site"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    why="$(cd "$ROOT" && _gin_probe)"
    [ -z "$why" ] && { echo "gin-config installed from ${wheels[0]} into $site"; return 0; }
  fi
  GIN_PROBLEM="gin-config is missing ($why) and no wheel is in ${GIN_WHEEL_DIR:-$ROOT/.whl}: run \`$GIN_FETCH\` in the checkout on a machine with pip, and bring .whl/ along (git ignores it)"
  echo "$GIN_PROBLEM" >&2
  return 1
}
