"""Throughput of ``sfd-data extract``: image decoding, the networks, and the whole pipeline.

Three numbers, in images per second (an image is encoded twice: as is and mirrored):

* ``decode``   -- DataLoader workers reading JPEGs and making the ADM crop pair, no networks;
* ``networks`` -- texture VAE posterior + DINOv2 (+ SemVAE) on ready crops, no decoding;
* ``pipeline`` -- ``extract_dataset`` end to end on one rank (decode workers + networks + shards).

The pipeline is limited by the slower of the first two; the report says which, and what share
of the pipeline's time the decode workers would need on their own.

    python benchmarks/bench_extract.py                       # this machine: the reference's small networks
    python benchmarks/bench_extract.py --size released --device cuda --batch-size 64 --images 2048
    python benchmarks/bench_extract.py --json out.json       # also write the numbers

``--size small`` uses the tokenizer reference's networks (64 px crops); ``released`` builds
the published architectures (256 px: SD-VAE f16d32, DINOv2-B/14-reg, SemVAE ch16) with random
weights written in the released file formats. The source images are synthetic JPEGs of
ImageNet's typical size (500 x 375, quality 90).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference" / "tokenizer_reference_public.pt"
if not REFERENCE.is_file():
    REFERENCE = REPO / "tests" / "reference" / "tokenizer_reference_public.pt"


def make_images(folder: Path, count: int, seed: int = 0) -> None:
    """``count`` JPEGs of 500 x 375 in 10 class folders (smooth random content)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(count):
        coarse = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((500, 375), Image.BICUBIC)
        target = folder / f"class_{i % 10:02d}"
        target.mkdir(parents=True, exist_ok=True)
        image.save(target / f"{i:06d}.jpg", quality=90)


def weight_files(size: str, folder: Path) -> tuple[dict[str, Path], "object", int]:
    """``({network: file}, TokenizersConfig, image size)`` in the released formats."""
    from sfd_train.config.base import from_mapping
    from sfd_train.tokenizers.config import DinoConfig, SemVAEConfig, TextureVAEConfig, TokenizersConfig

    files = {"vae": folder / "vae.ckpt", "dino": folder / "dino.pth", "semvae": folder / "semvae.pt"}
    if size == "small":
        reference = torch.load(REFERENCE, weights_only=False)
        for name, path in files.items():
            torch.save(reference[name]["checkpoint"], path)
        config = TokenizersConfig(vae=from_mapping(TextureVAEConfig, reference["vae"]["config"]),
                                  dino=from_mapping(DinoConfig, reference["dino"]["config"]),
                                  semvae=from_mapping(SemVAEConfig, reference["semvae"]["config"]))
        return files, config, reference["image_size"]
    from sfd_train.tokenizers.dinov2 import DinoFeatures
    from sfd_train.tokenizers.semvae import SemVAE, export_semvae
    from sfd_train.tokenizers.texture_vae import TextureVAE

    config = TokenizersConfig(semvae=SemVAEConfig())
    torch.save({"state_dict": TextureVAE(config.vae).state_dict()}, files["vae"])
    vit = DinoFeatures(config.dino).vit.state_dict()
    # The hub's names: the class token's position slot in pos_embed, register_tokens, mask_token.
    hub = {k: v for k, v in vit.items() if k not in ("cls_token", "pos_embed", "reg_token")}
    hub.update(cls_token=vit["cls_token"], register_tokens=vit["reg_token"],
               pos_embed=torch.cat([torch.zeros_like(vit["cls_token"]), vit["pos_embed"]], dim=1),
               mask_token=torch.zeros(1, config.dino.embed_dim))
    torch.save(hub, files["dino"])
    export_semvae(SemVAE(config.semvae), files["semvae"], iteration=0)
    return files, config, 256


def bench_decode(source: Path, size: int, workers: int, batch: int) -> float:
    from sfd_train.data_pipeline.extract import _Crops
    from sfd_train.data_pipeline.images import list_images

    listing = list_images(str(source))
    loader = torch.utils.data.DataLoader(_Crops(listing.items, listing.storage(), size), batch_size=batch,
                                         num_workers=workers, multiprocessing_context="fork" if workers else None)
    start, count = time.perf_counter(), 0
    for crops, _ in loader:
        count += len(crops)
    return count / (time.perf_counter() - start)


def bench_networks(options, device: torch.device, batch: int, repeats: int) -> float:
    from sfd_train.data_pipeline.extract import encode_batch, load_networks

    nets = load_networks(options, device, need_images=True)
    grid = options.image_size // nets.vae.config.downsampling
    crops = torch.randint(0, 256, (batch, 2, options.image_size, options.image_size, 3), dtype=torch.uint8)
    encode_batch(nets, crops, np.arange(batch), options, grid, device)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        encode_batch(nets, crops, np.arange(batch), options, grid, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * repeats / (time.perf_counter() - start)


def bench_pipeline(options) -> float:
    from sfd_train.data_pipeline.extract import extract_dataset

    start = time.perf_counter()
    manifest = extract_dataset(options, progress=False)
    return manifest.num_samples / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["small", "released"], default="small", help="networks (default small)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--images", type=int, default=256, help="source JPEGs (default 256)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="decode workers")
    parser.add_argument("--repeats", type=int, default=4, help="timed batches of the network-only run")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    from sfd_train.data_pipeline.extract import ExtractOptions

    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="sfd-bench-extract-") as tmp:
        root = Path(tmp)
        make_images(root / "images", args.images)
        files, tokenizers, image_size = weight_files(args.size, root)
        options = ExtractOptions(source=str(root / "images"), out=str(root / "out"), vae=str(files["vae"]),
                                 dino=str(files["dino"]), semvae=str(files["semvae"]), tokenizers=tokenizers,
                                 image_size=image_size, batch_size=args.batch_size, workers=args.workers,
                                 device=args.device, shard_size=1000)
        decode = bench_decode(root / "images", image_size, args.workers, args.batch_size)
        networks = bench_networks(options, device, args.batch_size, args.repeats)
        pipeline = bench_pipeline(options)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    limit = "decoding" if decode < networks else "the networks"
    result = {"device": name, "size": args.size, "image_size": image_size, "batch_size": args.batch_size,
              "decode_workers": args.workers, "images": args.images, "decode_images_per_s": round(decode, 1),
              "networks_images_per_s": round(networks, 1), "pipeline_images_per_s": round(pipeline, 1),
              "limit": limit, "decode_share_of_pipeline": round(pipeline / decode, 3),
              "torch": torch.__version__}
    print(f"{name}, {args.size} networks at {image_size} px, batch {args.batch_size}, {args.workers} decode workers")
    print(f"  decode only   {decode:8.1f} images/s")
    print(f"  networks only {networks:8.1f} images/s")
    print(f"  pipeline      {pipeline:8.1f} images/s  (limited by {limit}; decoding alone would take "
          f"{100 * pipeline / decode:.0f}% of the pipeline's time)")
    if args.size == "released":
        per_node = 8 * pipeline
        print(f"  ImageNet train (1,281,167 images, flips, features) on one 8-device node: "
              f"{1_281_167 / per_node / 60:.1f} min at {per_node:.0f} images/s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()
