#!/usr/bin/env bash
# Create (or reuse) the development environment and link it as .venv at the repo root.
#
# The venv lives outside the clone, keyed by a hash of the dependency list and the Python
# version, so a fresh clone (CI) reuses it and a change to requirements/dev.txt builds a new
# one. It needs Python 3.12 (pyhealth 2.1 requires it): `python3.12` on PATH, or pyenv.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

is_py312() {
    [ -n "$1" ] && [ -x "$1" ] && "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' >/dev/null 2>&1
}

find_python() {
    local cand v
    # a pyenv shim on PATH may exist without working, so every candidate is run once
    for cand in "${CAPTUM_GIM_PYTHON:-}" "$(command -v python3.12 || true)"; do
        if is_py312 "$cand"; then echo "$cand"; return 0; fi
    done
    if command -v pyenv >/dev/null 2>&1; then
        for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.|$)' | sort -V -r); do
            cand="$(pyenv root)/versions/$v/bin/python3.12"
            if is_py312 "$cand"; then echo "$cand"; return 0; fi
        done
    fi
    for cand in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
        if is_py312 "$cand"; then echo "$cand"; return 0; fi
    done
    return 1
}

PY=$(find_python) || {
    echo "error: Python 3.12 not found (pyhealth 2.1 needs it). Install it (e.g. 'pyenv install 3.12')" >&2
    echo "       or point CAPTUM_GIM_PYTHON at a python3.12 executable." >&2
    exit 1
}

KEY=$( (cat requirements/dev.txt requirements/dev-nodeps.txt; "$PY" -c 'import sys; print(sys.version)') | sha256sum | cut -c1-16)
CACHE="${CAPTUM_GIM_VENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/captum-gim/venvs}"
VENV="$CACHE/py312-$KEY"

if [ ! -f "$VENV/.complete" ]; then
    echo ">> building the dev environment in $VENV (a few minutes, once)" >&2
    rm -rf "$VENV"
    mkdir -p "$CACHE"
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip >&2 || true
    "$VENV/bin/python" -m pip install -q -r requirements/dev.txt >&2
    "$VENV/bin/python" -m pip install -q --no-deps -r requirements/dev-nodeps.txt >&2
    touch "$VENV/.complete"
fi

# the package itself, editable, pointing at this clone (cheap; keeps a shared venv honest)
"$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$ROOT" >&2

ln -sfn "$VENV" "$ROOT/.venv"
echo "$ROOT/.venv/bin/python"
