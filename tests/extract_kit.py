"""An image folder and the reference's small tokenizers as released files, for the extraction tests."""

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from sfd_train.data_pipeline.format import SampleLayout
from sfd_train.data_pipeline.manifest import read_manifest
from sfd_train.data_pipeline.writer import read_shard_arrays

IMAGES = 24


def make_kit(root: Path, tokenizer_reference_path: Path, images: int = IMAGES) -> dict:
    """An image folder (3 classes, varied sizes and formats) and the reference networks as released files
    (every size, the image size included, is the reference file's)."""
    reference = torch.load(tokenizer_reference_path, weights_only=False)
    rng = np.random.default_rng(0)
    for i in range(images):
        h, w = (int(v) for v in rng.integers(40, 140, size=2))
        coarse = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
        folder = root / "images" / f"class_{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:03d}.{'png' if i % 2 else 'jpg'}")
    files = {"vae": root / "vae.ckpt", "dino": root / "dino.pth", "semvae": root / "semvae.pt"}
    for name, path in files.items():
        torch.save(reference[name]["checkpoint"], path)
    tokenizers = root / "tokenizers.yaml"
    tokenizers.write_text(yaml.safe_dump({name: reference[name]["config"] for name in files}))
    return {"root": root, "images": root / "images", "files": files, "tokenizers": tokenizers, "reference": reference}


def extract_command(kit, out: Path, *extra: str, semvae: bool = True, nproc: int = 1) -> list[str]:
    args = [str(kit["images"]), "--out", str(out), "--vae", str(kit["files"]["vae"]), "--dino",
            str(kit["files"]["dino"]), "--tokenizers", str(kit["tokenizers"]), "--image-size", str(kit["reference"]["image_size"]),
            "--shard-size", "5", "--batch-size", "4", "--workers", "1", "--quiet", *extra]
    if semvae:
        args += ["--semvae", str(kit["files"]["semvae"])]
    if nproc == 1:
        return [sys.executable, "-m", "sfd_train.data_pipeline.cli", "extract", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m",
            "sfd_train.data_pipeline.cli", "extract", *args]


def run(command: list[str], expect: int = 0) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == expect, result.stderr[-4000:]
    return result


def shard_digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))}


def all_samples(out: Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    manifest = read_manifest(out)
    layout = SampleLayout(manifest.shapes, manifest.storage_dtype)
    parts = [read_shard_arrays(str(out / s.name), layout, s.count) for s in manifest.shards]
    return {k: np.concatenate([p[0][k] for p in parts]) for k in parts[0][0]}, np.concatenate([p[1] for p in parts])
