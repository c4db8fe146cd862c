"""Architectures of the three networks that turn images into training latents.

Field names follow the constructors the released weights were made with (the LDM
``AutoencoderKL``, DINOv2's ``DinoVisionTransformer``, the authors' SemVAE factory), so
a dict of those arguments (the reference files carry them) becomes a config through
:func:`~sfd_train.config.base.from_mapping`. Defaults are the released networks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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


@dataclass
class DinoConfig:
    """DINOv2 ViT as torch.hub builds it (defaults: ``dinov2_vitb14_reg``, ViT-B/14 with 4 registers)."""

    img_size: int = 518
    """Side the position table was trained for (37 x 37 patches); it is resized to the input's grid."""
    patch_size: int = 14
    """Pixels per patch along a side."""
    in_chans: int = 3
    """Image channels."""
    embed_dim: int = 768
    """Token width (the feature dimension)."""
    depth: int = 12
    """Transformer blocks."""
    num_heads: int = 12
    """Attention heads."""
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
    num_register_tokens: int = 4
    """Register tokens inserted after the class token (they get no position embedding)."""
    interpolate_antialias: bool = True
    """The position table is resized with antialiasing (true for the *_reg models)."""
    interpolate_offset: float = 0.0
    """Offset of the resize factor; 0.0 = resize to the exact grid (the *_reg models)."""
    drop_path_rate: float = 0.0
    """Stochastic depth (inference: unused)."""
    block_fn: str = ""
    """The hub's block class, recorded for information only."""

    def validate(self) -> None:
        if self.ffn_layer != "mlp":
            raise ConfigError("ffn_layer", f"only 'mlp' is supported, got {self.ffn_layer!r}")
        if self.block_chunks != 0:
            raise ConfigError("block_chunks", "only 0 (blocks.N, as released) is supported")
        if self.interpolate_offset != 0.0 or not self.interpolate_antialias:
            raise ConfigError("interpolate_offset", "only the registers models' resize (offset 0.0, antialias true) "
                                                    "is supported")
        if not (self.qkv_bias and self.proj_bias and self.ffn_bias):
            raise ConfigError("qkv_bias", "only networks with every bias (as released) are supported")
        if self.embed_dim % self.num_heads:
            raise ConfigError("num_heads", f"{self.num_heads} does not divide embed_dim {self.embed_dim}")


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
    """DINOv2."""
    semvae: SemVAEConfig | None = None
    """The SemVAE; null = the architecture its checkpoint records."""
