"""Pictures of a run: sample grids and the loss curve."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

Decoder = Callable[[torch.Tensor], torch.Tensor]


def latent_preview(texture: torch.Tensor) -> torch.Tensor:
    """Without a decoder: the first three texture channels, each stretched to [0, 1]."""
    rgb = texture[:, :3].float()
    if rgb.shape[1] < 3:
        rgb = rgb[:, :1].expand(-1, 3, -1, -1)
    low = rgb.amin(dim=(0, 2, 3), keepdim=True)
    high = rgb.amax(dim=(0, 2, 3), keepdim=True)
    return (rgb - low) / (high - low).clamp_min(1e-6)


def make_grid(images: torch.Tensor, columns: int, scale: int = 1, pad: int = 1) -> np.ndarray:
    """``(N, 3, H, W)`` in [0, 1] -> one uint8 ``(rows*(H+pad), cols*(W+pad), 3)`` image."""
    images = images.clamp(0, 1).cpu()
    if scale > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest")
    n, _, h, w = images.shape
    rows = (n + columns - 1) // columns
    grid = torch.ones(3, rows * (h + pad) + pad, columns * (w + pad) + pad)
    for i in range(n):
        r, c = divmod(i, columns)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = images[i]
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def save_sample_grid(latents: torch.Tensor, texture_channels: int, path: Path, columns: int,
                     decoder: Decoder | None = None) -> Path:
    """Decodes the texture part of sampled composite latents and writes a PNG grid.

    Args:
        latents: sampled composite latents ``(N, C, H, W)`` (as the model sees them).
        texture_channels: how many leading channels are texture.
        decoder: maps the texture part to images in [0, 1] (the synthetic dataset has
            one); without it the latent channels themselves are shown.
    """
    texture = latents[:, :texture_channels].float().cpu()
    images = decoder(texture) if decoder is not None else latent_preview(texture)
    scale = max(1, 128 // images.shape[-1])
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(make_grid(images, columns, scale=scale)).save(path)
    return path


def save_loss_plot(records: list[dict], path: Path) -> Path | None:
    """Plots every loss term over steps (log scale) into a PNG; None without records."""
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for key in ("loss", "mse", "cos", "repa"):
        values = [r.get(key) for r in records]
        if any(v is not None for v in values):
            ax.plot(steps, [v if v is not None else float("nan") for v in values], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


EVAL_PANELS = (("fid_synthetic", "FID (synthetic features)"), ("fid", "FID"), ("class_accuracy", "class accuracy"),
               ("val_loss", "validation loss"))


def save_eval_plot(records: list[dict], path: Path) -> Path | None:
    """One panel per evaluation metric present (FID, class accuracy, validation loss) against step."""
    panels = [(key, title) for key, title in EVAL_PANELS if any(r.get(key) is not None for r in records)]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), dpi=120, squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        ax.plot([s for s, _ in points], [v for _, v in points], marker="o")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
