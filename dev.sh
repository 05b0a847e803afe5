#!/usr/bin/env bash
# dsv3-jax developer entry point: sets up a Python >= 3.12 virtualenv, then runs a job.
#
#   ./dev.sh run  [flags]   set up, then run the main job: pretrain `tiny` on the CPU (--help for flags)
#   ./dev.sh test [pytest args]   set up, then run the test suite (what CI runs; 2 workers,
#                           DSV3_TEST_WORKERS=N for N, 0 for one process)
#   ./dev.sh setup          only set up
#
# The interpreter is found automatically: $PYTHON if set, else python3.12 / python3.13 /
# python3 on PATH (if >= 3.12), else a pyenv-installed 3.12, else a newer pyenv one. The virtualenv lives in .venv (or
# $DSV3_VENV) and is reinstalled whenever pyproject.toml or constraints.txt change.
set -euo pipefail
cd "$(dirname "$0")"
VENV="${DSV3_VENV:-.venv}"

is_py312plus() {
  "$1" -c 'import sys, venv; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1
}

find_python() {
  local cand
  for cand in "${PYTHON:-}" python3.12 python3.13 python3; do
    [ -n "$cand" ] && command -v "$cand" >/dev/null 2>&1 || continue
    # a pyenv shim exists on PATH even when its version is not selected: run it to be sure
    if is_py312plus "$cand"; then command -v "$cand"; return 0; fi
  done
  local root="${PYENV_ROOT:-$HOME/.pyenv}"
  command -v pyenv >/dev/null 2>&1 && root="$(pyenv root)"
  # prefer 3.12 (the GPU image's), newest patch release first
  for cand in $(ls -d "$root"/versions/3.12*/bin/python3 2>/dev/null | sort -rV) \
              $(ls -d "$root"/versions/3.1[3-9]*/bin/python3 2>/dev/null | sort -rV); do
    if is_py312plus "$cand"; then echo "$cand"; return 0; fi
  done
  return 1
}

setup() {
  local stamp="$VENV/.dsv3-installed" want
  want="$(cat pyproject.toml constraints.txt | cksum)"
  if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return 0
  fi
  local py
  if ! py="$(find_python)"; then
    cat >&2 <<'MSG'
dsv3-jax needs Python 3.12 or newer (jax >= 0.11 does), and none was found.
Install one, then run this again, e.g.:
  Debian/Ubuntu:  sudo apt install python3.12 python3.12-venv
  macOS:          brew install python@3.12
  pyenv:          pyenv install 3.12
or point PYTHON at an interpreter:  PYTHON=/path/to/python3.12 ./dev.sh ...
MSG
    exit 1
  fi
  echo "dev.sh: setting up $VENV with $py ($("$py" --version 2>&1))" >&2
  [ -x "$VENV/bin/python" ] && is_py312plus "$VENV/bin/python" || { rm -rf "$VENV"; "$py" -m venv "$VENV"; }
  "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
  "$VENV/bin/python" -m pip install --quiet -c constraints.txt -e '.[test]' >&2
  echo "$want" > "$stamp"
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
  setup) setup ;;
  run)   setup; exec "$VENV/bin/python" experiments/pretrain.py "$@" ;;
  test)  setup
         # two pytest workers (pytest-xdist): the suite is compile-bound and one process
         # keeps about 1.5 of 2 cores busy; one on a GPU machine, whose card they would share
         workers="${DSV3_TEST_WORKERS:-2}"
         [ "${DSV3_TEST_GPU:-}" = 1 ] && workers="${DSV3_TEST_WORKERS:-0}"
         exec "$VENV/bin/python" -m pytest -q -n "$workers" "$@" ;;
  *)     sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
