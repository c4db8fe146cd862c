#!/usr/bin/env bash
# The main job on a CPU machine: sets up .venv if needed, then trains a tiny SFD on the
# built-in synthetic dataset with 2 processes (FSDP2, gloo) and leaves a checkpoint,
# sample grids and a loss plot in outputs/tiny/. Extra arguments are config overrides.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Only what training needs (plus wandb for the offline run log); the tests add their extras.
SFD_EXTRAS="${SFD_EXTRAS:-wandb}" bash "$repo_root/scripts/setup_env.sh"
cd "$repo_root"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$repo_root/.venv/bin/torchrun" --standalone --nproc-per-node 2 -m sfd_train.train tiny "$@"
