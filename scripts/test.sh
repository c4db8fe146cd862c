#!/usr/bin/env bash
# Sets up .venv if needed and runs the whole test suite (extra arguments go to pytest).
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo_root/scripts/setup_env.sh"
cd "$repo_root"
exec "$repo_root/.venv/bin/python" -m pytest "$@"
