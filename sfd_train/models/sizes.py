"""Named sizes of the LightningDiT family used by SFD."""

from __future__ import annotations

from typing import NamedTuple


class ModelSize(NamedTuple):
    depth: int
    hidden_size: int
    num_heads: int


# The published family (LightningDiT's names). "XXL" is the SFD paper's name for 1p0B.
MODEL_SIZES: dict[str, ModelSize] = {
    "S": ModelSize(12, 384, 6),
    "B": ModelSize(12, 768, 12),
    "L": ModelSize(24, 1024, 16),
    "XL": ModelSize(28, 1152, 16),
    "1p0B": ModelSize(24, 1536, 24),
    "XXL": ModelSize(24, 1536, 24),
    "1p6B": ModelSize(28, 1792, 28),
}


def parse_model_type(model_type: str) -> tuple[str, int]:
    """Splits a published model name such as ``LightningDiT-XL/1`` into ``("XL", 1)``.

    Raises:
        ValueError: the name is not of that form or the size is unknown.
    """
    name = model_type.strip()
    if name.startswith("LightningDiT-"):
        name = name[len("LightningDiT-"):]
    size, _, patch = name.partition("/")
    if size not in MODEL_SIZES or not patch.isdigit():
        raise ValueError(
            f"unknown model type {model_type!r}; expected 'LightningDiT-<size>/<patch>' with size one of "
            f"{', '.join(MODEL_SIZES)}"
        )
    return size, int(patch)
