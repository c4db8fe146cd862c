"""Shared pytest fixtures."""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def reference_path() -> Path:
    """The reference file of the published model; override with SFD_REFERENCE."""
    default = REPO_ROOT.parent / "shared" / "reference" / "sfd_reference_public.pt"
    return Path(os.environ.get("SFD_REFERENCE", default))


@pytest.fixture(scope="session", autouse=True)
def synthetic_cache(tmp_path_factory):
    """One synthetic dataset for the whole session (training runs read data.path=synthetic)."""
    path = tmp_path_factory.mktemp("synthetic")
    os.environ["SFD_SYNTHETIC_DIR"] = str(path)
    os.environ.setdefault("WANDB_MODE", "disabled")
    return path
