#!/usr/bin/env bash
# Creates .venv at the repository root when it is missing, installs the CPU build of
# torch 2.13.0 when no torch is importable, then installs this package (editable).
# Sourced by the other scripts; safe to run again (it only installs what is missing).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SFD_VENV:-$repo_root/.venv}"
extras="${SFD_EXTRAS:-test}"

if [ ! -x "$venv/bin/python" ]; then
    echo "[setup] creating $venv"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
fi

if ! "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
    # Explicit CPU wheel: a bare "torch" requirement could pull a multi-GB CUDA build.
    echo "[setup] installing torch 2.13.0 (CPU)"
    "$venv/bin/python" -m pip install --quiet "torch==2.13.0"
fi

# Pin whatever torch is installed so that no dependency can replace it.
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
"$venv/bin/python" -c "import torch; print('torch==' + torch.__version__)" >"$constraints"

stamp="$venv/.sfd-installed-$extras"
if [ ! -f "$stamp" ] || [ "$repo_root/setup.py" -nt "$stamp" ]; then
    echo "[setup] installing sfd-train[$extras] (editable)"
    "$venv/bin/python" -m pip install --quiet -c "$constraints" -e "$repo_root[$extras]"
    touch "$stamp"
fi
