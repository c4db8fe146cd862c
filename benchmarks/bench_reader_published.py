"""The published approach, for comparison: per-sample reads from safetensors files.

This mirrors how the published SFD / LightningDiT training reads its latents: a
torch ``Dataset`` whose ``__getitem__`` opens the sample's safetensors file,
slices one row of each tensor (picking the flipped variant at random),
normalises, and a ``DataLoader`` with ``shuffle=True`` batches them.
"""

from __future__ import annotations

import glob
import os
import random

import torch
from safetensors import safe_open
from torch.utils.data import Dataset


class PublishedLatentDataset(Dataset):
    """One sample per index, read on demand from the published layout."""

    def __init__(self, folder: str, use_repa_features: bool = True):
        self.files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
        self.index = []
        for path in self.files:
            with safe_open(path, framework="pt", device="cpu") as f:
                n = f.get_slice("labels").get_shape()[0]
                self.has_dino_flip = "feats_dino_flip" in f.keys()
            self.index.extend((path, row) for row in range(n))
        self.use_repa_features = use_repa_features
        tex = torch.load(os.path.join(folder, "latents_stats.pt"), weights_only=True)
        sem = torch.load(os.path.join(folder, "latents_sv_stats.pt"), weights_only=True)
        self.mean = torch.cat([tex["mean"].reshape(-1, 1, 1), sem["mean"].reshape(-1, 1, 1)])
        self.std = torch.cat([tex["std"].reshape(-1, 1, 1), sem["std"].reshape(-1, 1, 1)])

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        path, row = self.index[idx]
        flip = random.random() < 0.5
        with safe_open(path, framework="pt", device="cpu") as f:
            tex = f.get_slice("latents_flip" if flip else "latents")[row : row + 1][0]
            sem = f.get_slice("latents_sv_flip" if flip else "latents_sv")[row : row + 1][0]
            label = f.get_slice("labels")[row : row + 1][0]
            dino = None
            if self.use_repa_features:
                if flip and self.has_dino_flip:
                    dino = f.get_slice("feats_dino_flip")[row : row + 1][0]
                else:
                    dino = f.get_slice("feats_dino")[row : row + 1][0]
                    if flip:
                        dino = dino.flip(-1)
        x = (torch.cat([tex, sem]).float() - self.mean) / self.std
        out = {"x": x, "y": label.long(), "index": torch.tensor(idx)}
        if dino is not None:
            out["dino"] = dino.float()
        return out


def write_published_folder(folder: str, num_samples: int, per_file: int = 256, tex_channels: int = 32,
                           sem_channels: int = 16, feature_dim: int = 768, size: int = 16, seed: int = 0) -> None:
    """A published-layout folder of real SFD sizes (float16; no ``feats_dino_flip``, so ~430 KiB per sample)."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    sums = {"latents": [0.0, 0.0, 0], "latents_sv": [0.0, 0.0, 0]}
    for i, lo in enumerate(range(0, num_samples, per_file)):
        n = min(per_file, num_samples - lo)
        path = os.path.join(folder, f"latents_rank00_shard{i:03d}.safetensors")
        tensors = {
            "latents": (torch.randn(n, tex_channels, size, size, generator=g) * 3 + 1).half(),
            "latents_flip": (torch.randn(n, tex_channels, size, size, generator=g) * 3 + 1).half(),
            "latents_sv": torch.randn(n, sem_channels, size, size, generator=g).half(),
            "latents_sv_flip": torch.randn(n, sem_channels, size, size, generator=g).half(),
            "feats_dino": torch.randn(n, feature_dim, size, size, generator=g).half(),
            "labels": torch.randint(0, 1000, (n,), generator=g),
        }
        for key, acc in sums.items():
            x = tensors[key].float()
            acc[0] = acc[0] + x.sum(dim=(0, 2, 3))
            acc[1] = acc[1] + (x * x).sum(dim=(0, 2, 3))
            acc[2] += x.shape[0] * size * size
        save_file(tensors, path, metadata={"total_size": str(n)})
    for key, (s, ss, count) in sums.items():
        mean = s / count
        std = (ss / count - mean**2).clamp_min(0).sqrt()
        name = "latents_stats.pt" if key == "latents" else "latents_sv_stats.pt"
        torch.save({"mean": mean.view(1, -1, 1, 1), "std": std.view(1, -1, 1, 1)}, os.path.join(folder, name))
