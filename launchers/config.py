"""Cluster settings used by sfd-launch."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LauncherConfig:
    """Cluster settings for sfd-launch (ignored by sfd-train itself)."""

    nodes: int = 1
    """Number of nodes."""
    devices_per_node: int = 8
    """Processes (GPUs or NPUs) per node."""
    env_setup: list[str] = field(default_factory=list)
    """Shell lines run before training on every node (module loads, conda activate, ...)."""
