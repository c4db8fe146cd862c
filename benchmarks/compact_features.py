"""Compact REPA features: what int8 storage costs in REPA loss and gradient, and what it saves in bytes.

Compares each way of storing the DINOv2 features with float16 storage (the reference; float16
against float32 is shown for scale):

* ``int8`` -- what ``dino_storage: int8`` stores (``sfd_train.data_pipeline.compact``): a scale per
  channel (on unit-length tokens) and a scale per token;
* ``int8/token`` -- one float16 scale per token (the simplest choice);
* ``int8/channel`` -- one scale per channel of each image;
* ``int8/rotated`` -- a fixed orthonormal (Hadamard) rotation of the channels, then one scale per
  token (the usual remedy for outlier channels in LLM quantisation), rotated back on reading.

on three kinds of data:

1. **reference**: the public reference data (``sfd_reference_public.pt``: REPA ``cos``;
   ``sfd_reference_repa_cos_mse.pt``: the 80-epoch recipe's ``cos_mse`` at weight 0.5) with the
   reference model and its loss inputs: 3 images of 4x4 tokens, features drawn as N(0, 1);
2. **DINOv2-like**: ``testing.dinov2_like_features`` (768 x 16 x 16, outlier channels and high-norm
   tokens, see its docstring), through a model of the reference family built for 16x16 latents
   (the reference weights, position tables for 16x16) -- 8 images, 2048 tokens;
3. **projection sweep**: the same features against projections of chosen alignment with them
   (cosine 0, 0.7, 0.95: untrained to well trained), the gradient taken on the projection itself:
   the worst case, with nothing averaged.

For each: the relative difference of the REPA term (``|L_q - L_16| / |L_16|``) and of its gradient
(``||g_q - g_16|| / ||g_16||``) over all model parameters (or the projection). It also prints the
bytes of the feature field and of a sample at the published sizes, and the bytes per image the
reader fetches (``reader.bytes_per_image``) with the data bandwidth that gives at the ~410 images/s
per H100 of an XL run.

    python benchmarks/compact_features.py            # tables on stdout
    python benchmarks/compact_features.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from sfd_train.config import build_config
from sfd_train.config.published import model_mapping_from_hparams
from sfd_train.data_pipeline import compact
from sfd_train.data_pipeline.format import SampleLayout
from sfd_train.data_pipeline.reader import bytes_per_image
from sfd_train.data_pipeline.testing import dinov2_like_features
from sfd_train.diffusion.objective import LossInputs, loss_terms
from sfd_train.models import build_model

ROOT = Path(__file__).resolve().parents[1]
SHARED_REFERENCE = ROOT.parent / "shared" / "reference"
REFERENCE_DIR = SHARED_REFERENCE if SHARED_REFERENCE.is_dir() else ROOT / "tests" / "reference"
REFERENCE_FILES = {"cos": "sfd_reference_public.pt", "cos_mse": "sfd_reference_repa_cos_mse.pt"}
IMAGES_PER_S_PER_GPU = 410  # XL/1 on one H100 (README, issue 29)
GPUS_PER_NODE = 8


# ------------------------------------------------------------------ ways of storing features
def float16(x: torch.Tensor) -> torch.Tensor:
    return x.half().float()


def int8(x: torch.Tensor) -> torch.Tensor:
    """What ``dino_storage: int8`` stores and the reader returns."""
    return compact.dequantize(*compact.quantize(x))


def _round(y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.round(y / torch.where(scale == 0, 1, scale)).clamp(-127, 127) * scale


def int8_per_token(x: torch.Tensor) -> torch.Tensor:
    t = x.flatten(2)
    scale = (t.abs().amax(1, keepdim=True) / 127).half().float()
    return _round(t, scale).view_as(x)


def int8_per_channel(x: torch.Tensor) -> torch.Tensor:
    t = x.flatten(2)
    scale = (t.abs().amax(2, keepdim=True) / 127).half().float()
    return _round(t, scale).view_as(x)


def _hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def int8_rotated(x: torch.Tensor) -> torch.Tensor:
    """Channels rotated in blocks of the largest power of two dividing D, per-token scale, rotated back."""
    b, d = x.shape[:2]
    block = d & -d
    h = _hadamard(block)
    t = x.flatten(2).view(b, d // block, block, -1)
    rotated = torch.einsum("ij,bkjt->bkit", h, t).reshape(b, d, -1)
    q = int8_per_token(rotated.view_as(x)).flatten(2).view(b, d // block, block, -1)
    return torch.einsum("ij,bkit->bkjt", h, q).reshape_as(x)


STORAGES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "int8": int8, "int8/token": int8_per_token, "int8/channel": int8_per_channel, "int8/rotated": int8_rotated,
}


# ------------------------------------------------------------------ REPA term and gradient
def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def model_repa(model: torch.nn.Module, batch: dict, mode: str, features: torch.Tensor) -> tuple[float, torch.Tensor]:
    """The batch mean of the REPA term and its gradient over all model parameters (one flat vector)."""
    model.zero_grad(set_to_none=True)
    cfg = batch["config"]
    terms = loss_terms(model, batch["x1"], LossInputs(noise=batch["x0"], tau=batch["t"], labels=batch["y"]), features,
                       semantic_channels=cfg.semantic_channels, delta_t=cfg.delta_t,
                       semantic_weight=2.0, repa_mode=mode)
    loss = terms["repa"].mean()
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return float(loss.detach()), grad


def compare_on_model(model, batch, features: torch.Tensor, mode: str, storages=STORAGES,
                     against_float32: bool = True) -> dict[str, dict]:
    """``{storage: {"loss", "grad"}}`` relative differences against float16 storage (and, with
    ``against_float32``, float16 against float32)."""
    loss16, grad16 = model_repa(model, batch, mode, float16(features))
    out = {"repa_float16": loss16}
    if against_float32:
        loss32, grad32 = model_repa(model, batch, mode, features)
        out["float16 vs float32"] = {"loss": abs(loss16 - loss32) / abs(loss32), "grad": _relative(grad16, grad32)}
    for name, store in storages.items():
        loss, grad = model_repa(model, batch, mode, store(features))
        out[name] = {"loss": abs(loss - loss16) / abs(loss16), "grad": _relative(grad, grad16)}
    return out


def _model(hparams: dict, state_dict: dict, input_size: int | None = None):
    hparams = dict(hparams)
    if input_size is not None:
        hparams["input_size"] = input_size
    config = build_config({"model": model_mapping_from_hparams(hparams)}).model
    torch.manual_seed(0)
    model = build_model(config)
    # Position tables depend on the input size and are built by the model itself.
    tables = {"pos_embed", "feat_rope.freqs_cos", "feat_rope.freqs_sin"}
    missing, unexpected = model.load_state_dict({k: v for k, v in state_dict.items()
                                                 if input_size is None or k not in tables}, strict=False)
    assert not unexpected and set(missing) <= tables, (missing, unexpected)
    return model.train(), config


def reference_batch(mode: str) -> tuple[torch.nn.Module, dict, torch.Tensor]:
    """The reference model, its loss inputs and features for REPA ``mode``."""
    ref = torch.load(REFERENCE_DIR / REFERENCE_FILES[mode], map_location="cpu", weights_only=False)
    model, config = _model(ref["hparams"], ref["main_state_dict"])
    loss = ref["loss"]
    batch = {"x1": loss["x1"], "x0": loss["x0"], "t": loss["t"], "y": loss["y"], "config": config}
    return model, batch, loss["feat_dino"].float()


def measure_reference(storages=STORAGES) -> dict[str, dict]:
    """Loss and parameter-gradient differences on the reference data, per REPA mode."""
    out = {}
    for mode in REFERENCE_FILES:
        model, batch, features = reference_batch(mode)
        out[mode] = compare_on_model(model, batch, features, mode, storages)
    return out


def dinov2_like_batch(images: int = 8, seed: int = 0, **feature_options) -> tuple[torch.nn.Module, dict, torch.Tensor]:
    """A reference-family model for 16x16 latents, a batch of inputs and DINOv2-like features."""
    ref = torch.load(REFERENCE_DIR / REFERENCE_FILES["cos"], map_location="cpu", weights_only=False)
    model, config = _model(ref["hparams"], ref["main_state_dict"], input_size=16)
    g = torch.Generator().manual_seed(seed)
    shape = (images, config.in_channels, 16, 16)
    batch = {"x1": torch.randn(shape, generator=g), "x0": torch.randn(shape, generator=g),
             "t": torch.rand(images, generator=g), "y": torch.randint(0, config.num_classes, (images,), generator=g),
             "config": config}
    return model, batch, dinov2_like_features(images, seed=seed + 1, **feature_options)


def measure_dinov2_like(cases: dict[str, dict], storages=STORAGES, images: int = 8,
                        against_float32: bool = True) -> dict[str, dict]:
    """``{case: {mode: differences}}`` on a 16x16 model for each DINOv2-like feature setting."""
    out = {}
    for case, options in cases.items():
        model, batch, features = dinov2_like_batch(images, **options)
        out[case] = {mode: compare_on_model(model, batch, features, mode, storages, against_float32)
                     for mode in REFERENCE_FILES}
    return out


def _projection_repa(projection: torch.Tensor, features: torch.Tensor, mode: str) -> tuple[float, torch.Tensor]:
    p = projection.clone().requires_grad_(True)
    targets = features.flatten(2).transpose(1, 2)
    cos = (1 - torch.nn.functional.cosine_similarity(p, targets, dim=-1)).mean(1)
    mse = ((p - targets) ** 2).mean(dim=(1, 2))
    loss = (cos if mode == "cos" else 0.5 * (cos + mse)).mean()
    (grad,) = torch.autograd.grad(loss, p)
    return float(loss.detach()), grad


def measure_projection_sweep(features: torch.Tensor, alignments=(0.0, 0.7, 0.95), storages=STORAGES) -> dict:
    """``{alignment: {mode: {storage: {"loss", "grad"}}}}``, the gradient taken on the projection."""
    g = torch.Generator().manual_seed(7)
    targets = features.flatten(2).transpose(1, 2)
    noise = torch.randn(targets.shape, generator=g) * targets.pow(2).mean().sqrt()
    stored = {name: store(features) for name, store in storages.items()}
    out = {}
    for a in alignments:
        projection = a * targets + math.sqrt(1 - a * a) * noise
        out[a] = {}
        for mode in REFERENCE_FILES:
            loss16, grad16 = _projection_repa(projection, float16(features), mode)
            row = {}
            for name, values in stored.items():
                loss, grad = _projection_repa(projection, values, mode)
                row[name] = {"loss": abs(loss - loss16) / abs(loss16), "grad": _relative(grad, grad16)}
            out[a][mode] = row
    return out


def element_error(features: torch.Tensor, storages=STORAGES) -> dict[str, float]:
    """RMS of the stored-minus-true features over their RMS."""
    rms = features.pow(2).mean().sqrt()
    out = {"float16": float((float16(features) - features).pow(2).mean().sqrt() / rms)}
    out.update({name: float((store(features) - features).pow(2).mean().sqrt() / rms) for name, store in storages.items()})
    return out


# ------------------------------------------------------------------ bytes
def byte_table() -> dict:
    """Bytes of the feature field, of a sample and per image read, at the published sizes."""
    rows = {}
    for flips in (True, False):
        for storage in ("float16", "int8"):
            layout = SampleLayout.for_sizes(32, 16, 16, 768, flipped_features=flips, dino_storage=storage)
            start, stop = layout.feature_span("dino.npy")
            local = bytes_per_image(layout)
            remote = bytes_per_image(layout, remote=True)
            rows[f"{storage}, dino_flip {'stored' if flips else 'mirrored'}"] = {
                "feature_bytes": stop - start, "sample_bytes": layout.stride, "read_per_image": local,
                "read_per_image_s3": remote,
                "mb_per_s_per_node": local * IMAGES_PER_S_PER_GPU * GPUS_PER_NODE / 1e6,
                "mb_per_s_per_node_s3": remote * IMAGES_PER_S_PER_GPU * GPUS_PER_NODE / 1e6,
            }
    return rows


# ------------------------------------------------------------------ report
def _fmt_row(name: str, diffs: dict) -> str:
    return f"| {name} | {diffs['loss']:.1e} | {diffs['grad']:.1e} |"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="", help="also write every number to this file")
    parser.add_argument("--images", type=int, default=8, help="images in the DINOv2-like batch (default 8)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    results = {"bytes": byte_table()}
    print("## Bytes at the published sizes (texture 32, semantic 16, DINOv2 768, 16x16, float16 latents)\n")
    print("| features | feature field | sample | read per image (local) | (S3) | MB/s per 8-GPU node at 410 img/s/GPU (local) | (S3) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results["bytes"].items():
        print(f"| {name} | {r['feature_bytes']:,} | {r['sample_bytes']:,} | {r['read_per_image']:,.0f} | "
              f"{r['read_per_image_s3']:,.0f} | {r['mb_per_s_per_node']:,.0f} | {r['mb_per_s_per_node_s3']:,.0f} |")

    results["reference"] = measure_reference()
    _, _, reference_features = reference_batch("cos")
    results["reference_element_error"] = element_error(reference_features)
    cases = {"no outliers": {"outlier_channels": 0, "high_norm_tokens": 0.0},
             "8 outlier channels": {"outlier_channels": 8, "high_norm_tokens": 0.0},
             "8 outlier channels, 1% high-norm tokens": {"outlier_channels": 8, "high_norm_tokens": 0.01}}
    results["dinov2_like"] = measure_dinov2_like(cases, images=args.images)
    print("\n## Per-element error on the reference features (N(0, 1); relative RMS)\n")
    print("| storage | relative RMS error |")
    print("|---|---|")
    for name, value in results["reference_element_error"].items():
        print(f"| {name} | {value:.2e} |")
    print(f"| (no code of 8 bits per value can beat, for Gaussian values: 2^-8) | {2**-8:.2e} |")
    for title, table in [("reference data (3 images x 16 tokens)", results["reference"])] + [
            (f"DINOv2-like, {case} ({args.images} images x 256 tokens)", modes)
            for case, modes in results["dinov2_like"].items()]:
        print(f"\n## REPA term against float16 storage: {title}\n")
        for mode, diffs in table.items():
            print(f"{mode} (REPA term {diffs['repa_float16']:.4f}; model-parameter gradient)\n")
            print("| storage | loss, relative | gradient, relative |")
            print("|---|---|---|")
            for name in ["float16 vs float32", *STORAGES]:
                print(_fmt_row(name, diffs[name]))
            print()

    features = dinov2_like_features(args.images, seed=1)
    results["element_error"] = element_error(features)
    results["projection_sweep"] = {str(a): v for a, v in measure_projection_sweep(features).items()}
    print("## Per-element error (RMS of the error over the RMS of the features), DINOv2-like, 8 outlier channels, 1% high-norm tokens\n")
    print("| storage | relative RMS error |")
    print("|---|---|")
    for name, value in results["element_error"].items():
        print(f"| {name} | {value:.2e} |")
    print("\n## Gradient on the projection itself (worst case): DINOv2-like features, projections of given cosine\n")
    print("| cosine | mode | " + " | ".join(f"{n} loss / grad" for n in STORAGES) + " |")
    print("|---|---|" + "---|" * len(STORAGES))
    for a, modes in results["projection_sweep"].items():
        for mode, row in modes.items():
            print(f"| {a} | {mode} | " + " | ".join(f"{row[n]['loss']:.1e} / {row[n]['grad']:.1e}" for n in STORAGES) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
