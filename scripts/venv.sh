#!/usr/bin/env bash
# Run a command inside the project's virtual environment, creating or refreshing it first.
#
#   scripts/venv.sh megacpp pattern nam56r
#
# Megatron-Core 0.19 needs Python >= 3.12. We look for python3.12 on PATH, then under pyenv
# (a machine whose python3 is older often has 3.12 there), and fail naming what is missing.
# The venv (.venv/) is reused; the project is (re)installed when pyproject.toml or the
# constraints change. On a CPU machine torch is pinned by scripts/constraints.txt.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$root/.venv"

usable() {  # a Python that really runs and is >= 3.12 (a pyenv shim may exist but fail)
    "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1
}

find_python() {
    local candidate
    for candidate in python3.12 python3.13; do
        if command -v "$candidate" >/dev/null 2>&1 && usable "$(command -v "$candidate")"; then
            command -v "$candidate"; return 0
        fi
    done
    local pyenv_root="${PYENV_ROOT:-$HOME/.pyenv}"
    if command -v pyenv >/dev/null 2>&1; then pyenv_root=$(pyenv root); fi
    candidate=$(ls -d "$pyenv_root"/versions/3.12.*/bin/python3.12 2>/dev/null | sort -V | tail -n 1 || true)
    if [[ -n "$candidate" ]] && usable "$candidate"; then echo "$candidate"; return 0; fi
    return 1
}

if [[ ! -x "$venv/bin/python" ]]; then
    if ! python=$(find_python); then
        echo "scripts/venv.sh: no Python >= 3.12 found: looked for python3.12/python3.13 on PATH" \
             "and for ${PYENV_ROOT:-$HOME/.pyenv}/versions/3.12.*/bin/python3.12." \
             "Install Python 3.12 (e.g. 'pyenv install 3.12') and run again." >&2
        exit 1
    fi
    echo "scripts/venv.sh: creating .venv with $python" >&2
    "$python" -m venv "$venv"
fi

stamp="$venv/.megacpp-install"
want=$(cat "$root/pyproject.toml" "$root/scripts/constraints.txt" | sha256sum | cut -d' ' -f1)
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    echo "scripts/venv.sh: installing megacpp-mcore and its dependencies into .venv" >&2
    "$venv/bin/python" -m pip install -q --upgrade pip >&2
    "$venv/bin/python" -m pip install -q -c "$root/scripts/constraints.txt" -e "$root[dev]" >&2
    echo "$want" > "$stamp"
fi

export PATH="$venv/bin:$PATH"
cd "$root"
exec "$@"
