"""Sampled composite latents -> pictures: the texture part de-normalised with the dataset's
statistics and decoded by the texture VAE (or, for the synthetic set, its own decoder).

A decoder maps the texture channels as the model samples them (normalised) to images in
[0, 1], (B, 3, H, W); :func:`to_uint8` makes the evaluators' uint8 NHWC from them. Only the
texture part is decoded: the semantic latent guides sampling and is then dropped, as in the
authors' inference.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np
import torch

from sfd_train.config.base import ConfigError

Decoder = Callable[[torch.Tensor], torch.Tensor]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images in [0, 1] (B, 3, H, W) -> uint8 (B, H, W, 3), rounded to nearest (as DiT's
    ``clamp(127.5 * x + 128, 0, 255)`` does for [-1, 1] images)."""
    x = torch.clamp(255.0 * images.float() + 0.5, 0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def texture_statistics(path: str) -> dict[str, dict[str, list[float]]]:
    """``{"texture": {"mean", "std"}}`` from a dataset (folder or manifest.json of ours) or the
    authors' ``latents_stats.pt``.

    Raises:
        ConfigError: none of these at ``path``.
    """
    from sfd_train.data_pipeline.errors import DataError
    from sfd_train.data_pipeline.manifest import read_manifest

    try:
        if str(path).endswith(".pt"):
            from sfd_train.data_pipeline.convert import load_published_stats

            return {"texture": load_published_stats(path)}
        manifest = read_manifest(path)
    except (DataError, OSError) as err:
        raise ConfigError("", f"texture statistics: {err}") from None
    if not manifest.stats:
        raise ConfigError("", f"{path}: its manifest records no statistics (run `sfd-data stats --write`)")
    return {"texture": manifest.stats["texture"]}


def vae_decoder(vae: Any, stats: dict[str, Any], device: torch.device) -> Decoder:
    """De-normalise with ``stats``, decode with ``vae`` (a :class:`~sfd_train.tokenizers.texture_vae.TextureVAE`)."""
    from sfd_train.data_pipeline.stats import denormalize

    def decode(texture: torch.Tensor) -> torch.Tensor:
        latents = denormalize(texture.float().to(device), stats)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type != "cpu"):
            images = vae.decode(latents)
        return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    return decode


def synthetic_decoder(synthetic_dir: str | None = None) -> Decoder:
    """The synthetic dataset's decoder (its texture latents are pictures at a quarter of the size)."""
    from sfd_train.data_pipeline import synthetic
    from sfd_train.data_pipeline.manifest import read_manifest

    manifest = read_manifest(synthetic.ensure_synthetic_dataset(synthetic_dir or None))
    return lambda texture: synthetic.decode_texture(texture, manifest)


def is_synthetic(data_path: str) -> bool:
    return data_path == "synthetic"


def build_decoder(config: Any, *, vae: str | None = None, tokenizers: str | None = None, stats: str | None = None,
                  device: torch.device | str = "cpu") -> Decoder:
    """The decoder for a model trained with ``config``: the synthetic set's own, or the texture VAE.

    Args:
        vae: the texture VAE's weights (LDM .ckpt); required unless the model is the synthetic set's.
        tokenizers: a YAML with a ``vae`` section for a non-default VAE architecture.
        stats: where the texture statistics are (a dataset folder, its manifest.json, or
            ``latents_stats.pt``); default: the model's training data (``data.path``).

    Raises:
        ConfigError: what is missing, and how to give it.
    """
    if is_synthetic(config.data.path) and vae is None:
        return synthetic_decoder(config.data.synthetic_dir or None)
    if vae is None:
        raise ConfigError("", "decoding a model's samples needs its texture VAE: pass --vae (e.g. "
                              "ldm-imagenet256-f16d32-50ep.ckpt)")
    from sfd_train.config.base import from_mapping
    from sfd_train.config.loader import read_yaml
    from sfd_train.tokenizers.config import TextureVAEConfig
    from sfd_train.tokenizers.texture_vae import load_texture_vae

    vae_config = from_mapping(TextureVAEConfig, read_yaml(tokenizers).get("vae") or {}) if tokenizers else TextureVAEConfig()
    if vae_config.embed_dim != config.model.texture_channels:
        raise ConfigError("", f"the VAE's latent has {vae_config.embed_dim} channels, the model's texture part "
                              f"{config.model.texture_channels}")
    source = stats or config.data.path
    if not source or not (os.path.exists(source) or "://" in source):
        raise ConfigError("", f"texture statistics: the training data {config.data.path!r} is not here; pass --stats "
                              "(the dataset folder, its manifest.json, or latents_stats.pt)")
    device = torch.device(device)
    return vae_decoder(load_texture_vae(vae, vae_config).to(device), texture_statistics(source), device)
