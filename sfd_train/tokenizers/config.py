"""Architectures of the three networks that turn images into training latents.

Field names follow the constructors the released weights were made with (the LDM
``AutoencoderKL``, DINOv2's ``DinoVisionTransformer``, the authors' SemVAE factory), so
a dict of those arguments (the reference files carry them) becomes a config through
:func:`~sfd_train.config.base.from_mapping`. Defaults are the released networks.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from sfd_train.config.base import ConfigError


@dataclass
class TextureVAEConfig:
    """The LDM AutoencoderKL behind the texture latent (defaults: SD-VAE f16d32, ``ldm-imagenet256-f16d32-50ep.ckpt``)."""

    embed_dim: int = 32
    """Latent channels (after quant_conv)."""
    z_channels: int = 32
    """Channels of the encoder's output before quant_conv (twice this with double_z)."""
    double_z: bool = True
    """The encoder outputs mean and log-variance (a diagonal Gaussian posterior)."""
    resolution: int = 256
    """Image side the network was built for; attention levels are found from it."""
    in_channels: int = 3
    """Image channels in."""
    out_ch: int = 3
    """Image channels out."""
    ch: int = 128
    """Channels of the first level."""
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    """Channel multiplier per level; the latent is resolution / 2^(levels - 1) on a side."""
    num_res_blocks: int = 2
    """Residual blocks per encoder level (the decoder has one more)."""
    attn_resolutions: list[int] = field(default_factory=lambda: [16])
    """Feature-map sides at which a level also has attention blocks (besides the middle one)."""
    dropout: float = 0.0
    """Dropout in the residual blocks (0 in every released model; only 0 is supported)."""

    def validate(self) -> None:
        if not self.double_z:
            raise ConfigError("double_z", "only the Gaussian (double_z: true) autoencoder is supported")
        if self.dropout != 0.0:
            raise ConfigError("dropout", f"only 0.0 is supported, got {self.dropout}")
        for index, mult in enumerate(self.ch_mult):
            if (self.ch * mult) % 32:
                raise ConfigError(f"ch_mult[{index}]", f"ch x ch_mult = {self.ch * mult} must be a multiple of 32 "
                                                       "(GroupNorm with 32 groups)")

    @property
    def downsampling(self) -> int:
        """Image pixels per latent pixel along a side (16 for f16)."""
        return 2 ** (len(self.ch_mult) - 1)

    def attention_levels(self) -> list[int]:
        """Levels (0 = full resolution) that hold attention blocks."""
        return [level for level in range(len(self.ch_mult)) if self.resolution // 2**level in self.attn_resolutions]


REGISTERS_FAMILY = {"num_register_tokens": 4, "interpolate_antialias": True, "interpolate_offset": 0.0}
"""What the hub passes for its ``dinov2_*_reg`` models (``dinov2/hub/backbones.py``)."""
PLAIN_FAMILY = {"num_register_tokens": 0, "interpolate_antialias": False, "interpolate_offset": 0.1}
"""What the hub passes for ``dinov2_vitb14`` and its siblings without registers (its defaults)."""
_HUB_SIZES = {"vits14": (384, 12, 6), "vitb14": (768, 12, 12), "vitl14": (1024, 24, 16)}
DINO_PRESETS: dict[str, dict[str, Any]] = {
    f"dinov2_{arch}{suffix}": {"embed_dim": width, "depth": depth, "num_heads": heads, **family}
    for arch, (width, depth, heads) in _HUB_SIZES.items()
    for suffix, family in (("", PLAIN_FAMILY), ("_reg", REGISTERS_FAMILY))
}
"""torch.hub DINOv2 models by name: the constructor arguments that set them apart (ViT-g/14, whose MLP is a
SwiGLU, is not supported)."""


@dataclass
class DinoConfig:
    """DINOv2 ViT as torch.hub builds it.

    Fields left null come from ``preset``; without one, from the weight file: ViT-B/14 of the
    family its keys say (``register_tokens`` present: ``dinov2_vitb14_reg``, absent:
    ``dinov2_vitb14``), see :meth:`resolved`.
    """

    preset: str | None = None
    """A torch.hub model (dinov2_vits14, dinov2_vitb14, dinov2_vitl14, each also with _reg) whose arguments fill the
    fields left null; null = ViT-B/14 of the family the weight file's keys say."""
    img_size: int = 518
    """Side the position table was trained for (37 x 37 patches); it is resized to the input's grid."""
    patch_size: int = 14
    """Pixels per patch along a side."""
    in_chans: int = 3
    """Image channels."""
    embed_dim: int | None = None
    """Token width (the feature dimension); null = the preset's (ViT-B: 768)."""
    depth: int | None = None
    """Transformer blocks; null = the preset's (ViT-B: 12)."""
    num_heads: int | None = None
    """Attention heads; null = the preset's (ViT-B: 12)."""
    mlp_ratio: float = 4.0
    """MLP width / token width."""
    qkv_bias: bool = True
    """Bias in the qkv projection."""
    proj_bias: bool = True
    """Bias in the attention output projection."""
    ffn_bias: bool = True
    """Bias in the MLP."""
    init_values: float = 1.0
    """LayerScale's initial value (its presence is what matters: ls1/ls2 weights are loaded)."""
    ffn_layer: str = "mlp"
    """MLP kind; 'mlp' (the SwiGLU of ViT-g is not supported)."""
    block_chunks: int = 0
    """How the hub groups blocks in its state dict; 0 = blocks.N (released weights)."""
    num_register_tokens: int | None = None
    """Register tokens inserted after the class token (no position embedding); 4 in the *_reg models, 0 in the
    others; null = as many as the weight file holds (its register_tokens)."""
    interpolate_antialias: bool | None = None
    """The position table is resized with antialiasing: true for the *_reg models, false for the others;
    null = the family's."""
    interpolate_offset: float | None = None
    """Added to the grid in the resize's scale factor, (grid + offset) / 37, which then sets the sampling positions:
    0.1 for the models without registers; 0.0 = resize to the exact grid (the *_reg models); null = the family's."""
    drop_path_rate: float = 0.0
    """Stochastic depth (inference: unused)."""
    block_fn: str = ""
    """The hub's block class, recorded for information only."""

    def validate(self) -> None:
        if self.preset is not None and self.preset not in DINO_PRESETS:
            raise ConfigError("preset", f"unknown DINOv2 model {self.preset!r}; choose one of {', '.join(DINO_PRESETS)}")
        if self.ffn_layer != "mlp":
            raise ConfigError("ffn_layer", f"only 'mlp' is supported, got {self.ffn_layer!r}")
        if self.block_chunks != 0:
            raise ConfigError("block_chunks", "only 0 (blocks.N, as released) is supported")
        if not (self.qkv_bias and self.proj_bias and self.ffn_bias):
            raise ConfigError("qkv_bias", "only networks with every bias (as released) are supported")
        if self.num_register_tokens is not None and self.num_register_tokens < 0:
            raise ConfigError("num_register_tokens", f"must be 0 or more, got {self.num_register_tokens}")
        if self.interpolate_offset is not None and self.interpolate_offset < 0:
            raise ConfigError("interpolate_offset", f"must be 0 or more, got {self.interpolate_offset}")
        filled = self.resolved()
        for key in ("embed_dim", "depth", "num_heads"):
            if getattr(filled, key) < 1:
                raise ConfigError(key, f"must be positive, got {getattr(filled, key)}")
        if filled.embed_dim % filled.num_heads:
            raise ConfigError("num_heads", f"{filled.num_heads} does not divide embed_dim {filled.embed_dim}")

    def resolved(self, file_registers: int | None = None) -> "DinoConfig":
        """This config with every field set.

        The family (registers or not) is the preset's; else ``num_register_tokens`` when given
        (0 = without); else the weight file's (``file_registers``: how many register tokens it
        holds); else, with no file, the registers family (the published pipeline's). Null fields
        take the preset's values, or those of the family's ViT-B/14.

        Args:
            file_registers: the register tokens in the weight file (0 = none); None = no file.
        """
        if self.preset is not None:
            preset = DINO_PRESETS[self.preset]
        else:
            count = self.num_register_tokens if self.num_register_tokens is not None else file_registers
            registers = count is None or count > 0
            preset = dict(DINO_PRESETS["dinov2_vitb14_reg" if registers else "dinov2_vitb14"])
            if count:
                preset["num_register_tokens"] = count
        return replace(self, **{key: value for key, value in preset.items() if getattr(self, key) is None})

    @property
    def description(self) -> str:
        """A one-line account of the resolved network, e.g. for a manifest's provenance."""
        c = self.resolved()
        table = c.img_size // c.patch_size
        scale = f"by the scale (grid + {c.interpolate_offset:g}) / {table}" if c.interpolate_offset else "to the grid"
        return (f"DINOv2 ViT/{c.patch_size}: width {c.embed_dim}, depth {c.depth}, {c.num_heads} heads, "
                f"{c.num_register_tokens} registers; {table}x{table} position table resized bicubically "
                f"{'with' if c.interpolate_antialias else 'without'} antialias {scale}")


@dataclass
class SemVAEConfig:
    """The authors' Transformer Semantic VAE (defaults: ``transformer_ch16`` over DINOv2-B features)."""

    arch: str = "transformer"
    """Architecture of the authors' factory; only 'transformer'."""
    is_vae: bool = True
    """A variational bottleneck (mean and log-variance); only true."""
    input_dim: int = 768
    """Width of the input features (DINOv2's embed_dim)."""
    bottleneck_dim: int = 16
    """Channels of the semantic latent."""
    hidden_dim: int = 768
    """Token width inside encoder and decoder."""
    transformer_heads: int = 6
    """Attention heads per block."""
    transformer_blocks: int = 4
    """Transformer blocks per side (encoder and decoder)."""

    @property
    def name(self) -> str:
        return f"semvae-{self.arch}-ch{self.bottleneck_dim}-w{self.hidden_dim}x{self.transformer_blocks}"

    def validate(self) -> None:
        if self.arch != "transformer":
            raise ConfigError("arch", f"only 'transformer' is supported, got {self.arch!r}")
        if not self.is_vae:
            raise ConfigError("is_vae", "only the variational SemVAE is supported")
        if self.hidden_dim % self.transformer_heads:
            raise ConfigError("transformer_heads", f"{self.transformer_heads} does not divide hidden_dim {self.hidden_dim}")


@dataclass
class TokenizersConfig:
    """The three networks of an extraction (``sfd-data extract --tokenizers FILE.yaml``); defaults: released."""

    vae: TextureVAEConfig = field(default_factory=TextureVAEConfig)
    """The texture VAE."""
    dino: DinoConfig = field(default_factory=DinoConfig)
    """DINOv2; by default ViT-B/14 of the family its weight file's keys say (with or without registers)."""
    semvae: SemVAEConfig | None = None
    """The SemVAE; null = the architecture its checkpoint records."""
