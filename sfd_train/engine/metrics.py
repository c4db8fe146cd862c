"""Progress lines, a metrics file and Weights & Biases (rank 0 only)."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("sfd_train")

METRICS_FILE = "metrics.jsonl"


class Throughput:
    """Images per second and MFU between two log points."""

    def __init__(self, flops_per_image: float, peak_flops_per_device: float | None, world_size: int):
        self.flops_per_image = flops_per_image
        self.peak_total = peak_flops_per_device * world_size if peak_flops_per_device else None
        self._last_time = time.perf_counter()
        self._images = 0

    def add(self, images: int) -> None:
        self._images += images

    def read(self) -> tuple[float, float | None]:
        """``(images/s, MFU in [0, 1] or None)`` since the last read."""
        now = time.perf_counter()
        rate = self._images / max(now - self._last_time, 1e-9)
        self._last_time, self._images = now, 0
        mfu = rate * self.flops_per_image / self.peak_total if self.peak_total else None
        return rate, mfu


def format_progress(step: int, max_steps: int, values: dict[str, float], loss_terms: tuple[str, ...] = ()) -> str:
    """``step 100/600 | loss 0.812 (mse 0.61 cos 0.19 repa 0.01) | 1234 img/s | MFU 41.2% | ...``.

    Args:
        loss_terms: the names of the task's loss terms in ``values``, shown in this order.
    """
    parts = [f"step {step}/{max_steps}"]
    terms = " ".join(f"{k} {values[k]:.4g}" for k in loss_terms if k in values)
    parts.append(f"loss {values['loss']:.4f}" + (f" ({terms})" if terms else ""))
    parts.append(f"{values['images_per_s']:.1f} img/s")
    mfu = values.get("mfu")
    parts.append(f"MFU {100 * mfu:.1f}%" if mfu is not None else "MFU n/a")
    parts.append(f"mem {values['memory_gib']:.2f} GiB")
    parts.append(f"lr {values['lr']:.2e}")
    if not math.isnan(values.get("grad_norm", math.nan)):
        parts.append(f"grad {values['grad_norm']:.3f}")
    return " | ".join(parts)


class MetricsLogger:
    """Writes progress to the console, ``metrics.jsonl`` and (optionally) Weights & Biases.

    Args:
        run_dir: the run folder.
        enabled: True on rank 0 only.
        wandb_mode: ``offline``, ``online`` or ``disabled``.
        wandb_config: the run's config as plain data (holds no credentials).
    """

    def __init__(self, run_dir: Path, enabled: bool, wandb_mode: str, project: str, name: str,
                 wandb_config: dict[str, Any]):
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        self.wandb = None
        if not enabled:
            return
        if wandb_mode != "disabled":
            try:
                import wandb
            except ImportError:
                logger.warning("wandb is not installed; logging to metrics.jsonl only (pip install wandb)")
            else:
                # The API key, if any, stays in the environment / ~/.netrc; it is never logged.
                os.environ.setdefault("WANDB_SILENT", "true")
                self.wandb = wandb.init(
                    project=project, name=name, mode=wandb_mode, dir=str(run_dir), config=wandb_config,
                    resume="allow", id=_stable_run_id(run_dir),
                )

    def log(self, step: int, values: dict[str, Any], line: str | None = None) -> None:
        if not self.enabled:
            return
        if line:
            logger.info(line)
        record = {"step": step, **{k: v for k, v in values.items() if v is not None}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in values.items() if isinstance(v, (int, float))}, step=step)

    def log_image(self, step: int, path: Path) -> None:
        if self.enabled and self.wandb is not None:
            import wandb

            self.wandb.log({"samples": wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _stable_run_id(run_dir: Path) -> str:
    """A W&B run id derived from the run folder, so a resumed run continues the same curve."""
    import hashlib

    return hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl``, one per step (merged; for a resumed run the later values win)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    by_step: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            # Several records per step (training, evaluation) merge; a resumed run's later one wins.
            by_step.setdefault(record["step"], {}).update(record)
    return [by_step[s] for s in sorted(by_step)]
