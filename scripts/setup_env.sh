#!/usr/bin/env bash
# Creates .venv at the repository root when it is missing, installs torch 2.14.1 and
# torchvision 0.29.1 when they are not importable, then installs this package (editable).
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

# torchvision is needed by timm (DINOv2) and torch-fidelity (Inception). Its x86_64 builds
# on PyPI are CUDA builds, and they run on a CPU-only machine too (the README's "Set up and
# run" has the numbers behind this choice). An explicit, matching pair: a bare "torch"
# requirement, or a package that depends on torch, could pull another build.
if ! "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
    spec="${SFD_TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
    echo "[setup] installing $spec"
    # shellcheck disable=SC2086  # a list of requirements
    "$venv/bin/python" -m pip install --quiet $spec
elif ! "$venv/bin/python" -c "import torchvision" >/dev/null 2>&1; then
    # The user's own torch (a cluster's CUDA or NPU build): the torchvision made for it.
    pin="$(mktemp)"
    "$venv/bin/python" -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" >"$pin"
    echo "[setup] installing torchvision for $(cat "$pin")"
    "$venv/bin/python" -m pip install --quiet -c "$pin" torchvision
    rm -f "$pin"
fi
if ! "$venv/bin/python" -c "import torchvision.ops" >/dev/null 2>&1; then
    echo "[setup] torch and torchvision in $venv do not work together:" >&2
    "$venv/bin/python" -c "import torchvision.ops" 2>&1 | tail -1 >&2
    echo "[setup] delete $venv to get the default pair, or set SFD_TORCH_SPEC to a matching pair" >&2
    exit 1
fi

# Pin whatever torch is installed so that no dependency can replace it (its distribution
# version: torch.__version__ may carry a local label such as +cu130 that the wheel lacks).
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
"$venv/bin/python" -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" >"$constraints"

stamp="$venv/.sfd-installed-$extras"
if [ ! -f "$stamp" ] || [ "$repo_root/setup.py" -nt "$stamp" ]; then
    echo "[setup] installing sfd-train[$extras] (editable)"
    "$venv/bin/python" -m pip install --quiet -c "$constraints" -e "$repo_root[$extras]"
    touch "$stamp"
fi
