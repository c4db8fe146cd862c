"""Shared pytest fixtures."""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


# The project's shared reference data sits beside the checkout; a copy travels with the
# repository (tests/reference/) for machines that have only the clone.
SHARED_REFERENCE = REPO_ROOT.parent / "shared" / "reference"
REFERENCE_DIR = SHARED_REFERENCE if SHARED_REFERENCE.is_dir() else REPO_ROOT / "tests" / "reference"


@pytest.fixture(scope="session")
def reference_path() -> Path:
    """The reference file of the published model: $SFD_REFERENCE, by default
    ../shared/reference/sfd_reference_public.pt (or the copy in tests/reference/)."""
    return Path(os.environ.get("SFD_REFERENCE", REFERENCE_DIR / "sfd_reference_public.pt"))


@pytest.fixture(scope="session")
def tokenizer_reference_path() -> Path:
    """The tokenizers' reference file: $SFD_TOKENIZER_REFERENCE, by default
    ../shared/reference/tokenizer_reference_public.pt (or the copy in tests/reference/)."""
    return Path(os.environ.get("SFD_TOKENIZER_REFERENCE", REFERENCE_DIR / "tokenizer_reference_public.pt"))


def _tokenizer_references() -> list[Path]:
    """$SFD_TOKENIZER_REFERENCE alone; by default the public file and the one whose DINOv2 has no
    registers (tests/reference/tokenizer_reference_noreg.pt)."""
    if os.environ.get("SFD_TOKENIZER_REFERENCE"):
        return [Path(os.environ["SFD_TOKENIZER_REFERENCE"])]
    return [REFERENCE_DIR / "tokenizer_reference_public.pt", REPO_ROOT / "tests" / "reference" / "tokenizer_reference_noreg.pt"]


@pytest.fixture(scope="session", params=_tokenizer_references(), ids=lambda p: p.stem.removeprefix("tokenizer_reference_"))
def tokenizer_reference_each(request) -> Path:
    """Each tokenizer reference file in turn (the tokenizer tests run on every one)."""
    return request.param


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The folder with the state-dict layout and the authors' config files."""
    return REFERENCE_DIR


@pytest.fixture(scope="session", autouse=True)
def synthetic_cache(tmp_path_factory):
    """One synthetic dataset for the whole session (training runs read data.path=synthetic)."""
    path = tmp_path_factory.mktemp("synthetic")
    os.environ["SFD_SYNTHETIC_DIR"] = str(path)
    os.environ.setdefault("WANDB_MODE", "disabled")
    return path


@pytest.fixture(scope="session")
def slurm_cluster():
    """The real Slurm cluster of scripts/slurm_cluster.sh (2 emulated nodes on this machine),
    started if it is not running and then stopped again at the end of the session. A cluster
    that cannot start fails the tests that need it; they are never skipped."""
    import real_slurm

    try:
        started = real_slurm.start_cluster()
    except RuntimeError as err:
        pytest.fail(str(err), pytrace=False)
    yield real_slurm
    if started:
        real_slurm.stop_cluster()
