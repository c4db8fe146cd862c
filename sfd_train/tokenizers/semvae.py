"""The Semantic VAE: DINOv2 patch features (D channels per token) <-> a small semantic latent.

The authors' Transformer design, with their parameter names (so their checkpoints
load strictly): per token ``encoder.0`` Linear(D, H), ``encoder.1..N`` pre-norm blocks
(torch ``MultiheadAttention``, GELU MLP of width 4H), ``encoder.N+1`` LayerNorm,
``encoder.N+2`` Linear(H, 2C); the decoder mirrors it from C to D. No position
embedding. The encoder's (B, tokens, 2C) output, read channel-first on the g x g grid
(tokens row-major), holds the posterior: first C channels the mean, last C the
log-variance (clamped to [-30, 20]).
"""

from __future__ import annotations

import os
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from sfd_train.config.base import from_mapping, to_dict
from sfd_train.tokenizers.config import SemVAEConfig
from sfd_train.safe_load import is_safetensors, safetensors_metadata
from sfd_train.tokenizers.weights import TokenizerWeightsError, load_strict, read_weight_file, tensors_of


class SemVAEBlock(nn.Module):
    """Pre-norm Transformer block: attention, then a GELU MLP, each added to the stream."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


def _tower(width_in: int, width: int, width_out: int, heads: int, blocks: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width_in, width), *[SemVAEBlock(width, heads) for _ in range(blocks)],
                         nn.LayerNorm(width), nn.Linear(width, width_out))


class SemVAE(nn.Module):
    """Encoder and decoder of the semantic latent.

    Args:
        config: the architecture.
    """

    def __init__(self, config: SemVAEConfig):
        super().__init__()
        self.config = config
        c = config
        self.encoder = _tower(c.input_dim, c.hidden_dim, 2 * c.bottleneck_dim, c.transformer_heads, c.transformer_blocks)
        self.decoder = _tower(c.bottleneck_dim, c.hidden_dim, c.input_dim, c.transformer_heads, c.transformer_blocks)

    @property
    def blocks(self) -> list[nn.Module]:
        """The Transformer blocks of both towers (the units the engine shards and checkpoints)."""
        return [m for m in self.modules() if isinstance(m, SemVAEBlock)]

    def posterior(self, tokens: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, logvar)``, each (B, C, grid, grid), of features ``tokens`` (B, grid * grid, D)."""
        moments = self.encoder(tokens).transpose(1, 2).reshape(tokens.shape[0], -1, grid, grid)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Features (B, tokens, D) of a latent (B, C, g, g)."""
        return self.decoder(latent.flatten(2).transpose(1, 2))

    def forward(self, tokens: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(mean, logvar, reconstruction)`` of features ``tokens`` (B, tokens, D), the latent drawn
        with reparameterisation ``noise`` (B, C, g, g)."""
        mean, logvar = self.posterior(tokens, noise.shape[-1])
        return mean, logvar, self.decode(mean + torch.exp(0.5 * logvar) * noise)

    @torch.no_grad()
    def encode_grid(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, std)`` of channel-first features (B, D, g, g), as extraction stores them."""
        grid = features.shape[-1]
        mean, logvar = self.posterior(features.flatten(2).transpose(1, 2), grid)
        return mean, torch.exp(0.5 * logvar)


CosineAxis = Literal["tokens", "features"]


def semvae_loss(model: nn.Module, features: torch.Tensor, noise: torch.Tensor, *, mse_weight: float = 1.0,
                cos_weight: float = 1.0, l1_weight: float = 0.0, kl_weight: float = 1e-7,
                cos_axis: CosineAxis = "tokens") -> dict[str, torch.Tensor]:
    """The SemVAE training loss on features (B, tokens, D) with reparameterisation ``noise`` (B, C, g, g).

    Args:
        model: a :class:`SemVAE`, or a parallel wrapper around one.

    ``cos_axis="tokens"`` reproduces the authors' term: ``F.cosine_similarity`` with its
    default dim 1 of (B, tokens, D), i.e. across tokens, per sample and channel;
    ``"features"`` takes it per token across channels (what their evaluation reports).
    The KL is summed over the latent and averaged over the batch.

    Returns:
        ``{"loss", "mse", "l1", "cos", "kl"}``; ``loss`` is the weighted sum.
    """
    mean, logvar, recon = model(features, noise)  # through the wrapper's forward (DDP, FSDP2)
    recon, target = recon.float(), features.float()
    terms = {
        "mse": F.mse_loss(recon, target),
        "l1": F.l1_loss(recon, target),
        "cos": 1.0 - F.cosine_similarity(recon, target, dim=1 if cos_axis == "tokens" else 2).mean(),
        "kl": 0.5 * torch.sum(mean.float() ** 2 + logvar.float().exp() - 1.0 - logvar.float(), dim=(1, 2, 3)).mean(),
    }
    terms["loss"] = (mse_weight * terms["mse"] + l1_weight * terms["l1"] + cos_weight * terms["cos"]
                     + kl_weight * terms["kl"])
    return terms


# ------------------------------------------------------------------ the authors' checkpoint format
def _config_from_checkpoint(blob: dict[str, Any], path: str) -> SemVAEConfig:
    """The architecture recorded in an authors' SemVAE checkpoint (its YAML text and widths)."""
    from omegaconf import OmegaConf

    try:
        recorded = OmegaConf.to_container(OmegaConf.create(blob["config"]), resolve=True)
        model = recorded["model"]
        return from_mapping(SemVAEConfig, {
            "arch": model.get("arch", "transformer"), "is_vae": bool(model.get("variational", True)),
            "input_dim": int(blob["input_dim"]), "bottleneck_dim": int(blob.get("bottleneck_dim", model["bottleneck_dim"])),
            **{k: v for k, v in (model.get("params") or {}).items()
               if k in ("hidden_dim", "transformer_heads", "transformer_blocks")},
        })
    except (KeyError, TypeError, ValueError) as err:
        raise TokenizerWeightsError(f"{path}: its recorded config does not describe a SemVAE ({err}); "
                                    "give the architecture explicitly") from None


def load_semvae(path: str, config: SemVAEConfig | None = None) -> SemVAE:
    """A SemVAE from the authors' checkpoint (``model_state_dict`` plus their config) or ours.

    Args:
        config: the architecture; None = the one the checkpoint records.

    Raises:
        TokenizerWeightsError: the file is not this architecture's weights (names the first bad key).
    """
    blob = _read_semvae_file(path)
    if config is None:
        if not (isinstance(blob, dict) and "config" in blob and "input_dim" in blob):
            raise TokenizerWeightsError(f"{path}: records no SemVAE architecture; give its config")
        config = _config_from_checkpoint(blob, str(path))
    model = SemVAE(config)
    load_strict(model, tensors_of(blob, str(path)), str(path), "the SemVAE")
    return model.eval()


SAFETENSORS_FORMAT = "sfd-train semvae"


def _read_semvae_file(path: str) -> Any:
    """The authors' checkpoint dict, or the same keys from a ``.safetensors`` export (its metadata)."""
    if not is_safetensors(path):
        return read_weight_file(path)
    tensors = read_weight_file(path)  # the same checks and messages as for any weight file
    return {"model_state_dict": tensors, **safetensors_metadata(path)}


def export_semvae(model: SemVAE, path: str | os.PathLike, iteration: int, extra: dict[str, Any] | None = None,
                  format: str = "pt") -> str:
    """Writes ``model`` as the authors' training script saves it, so their code loads it.

    Keys: ``iteration``, ``model_state_dict``, ``config`` (YAML text with ``model.arch``,
    ``variational``, ``bottleneck_dim`` and ``params``), ``input_dim``, ``bottleneck_dim``,
    plus ``extra`` (e.g. ``loss``). ``format="safetensors"`` writes the state dict as tensors and
    the other keys as the file's metadata (text).
    """
    import yaml

    c = model.config
    recorded = {"model": {"variational": c.is_vae, "bottleneck_dim": c.bottleneck_dim, "arch": c.arch,
                          "params": {"hidden_dim": c.hidden_dim, "transformer_heads": c.transformer_heads,
                                     "transformer_blocks": c.transformer_blocks}},
                "sfd_train": {"semvae": to_dict(c)}}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    info = {"iteration": int(iteration), "config": yaml.safe_dump(recorded, sort_keys=False), "input_dim": c.input_dim,
            "bottleneck_dim": c.bottleneck_dim, **(extra or {})}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if format == "safetensors":
        from safetensors.torch import save_file

        save_file(state, os.fspath(path), metadata={"format": SAFETENSORS_FORMAT, **{k: str(v) for k, v in info.items()}})
    else:
        torch.save({"iteration": info["iteration"], "model_state_dict": state, **info}, path)
    return os.fspath(path)
