"""The texture VAE: the LDM ``AutoencoderKL`` on diffusers' implementation.

diffusers' ``AutoencoderKL`` holds this architecture when the lowest level's blocks
are the attention variants (``AttnDownEncoderBlock2D`` / ``AttnUpDecoderBlock2D``).
Its own LDM single-file converter does not map those attention blocks (it only warns),
so the key map here is explicit, and loading checks that it covers every tensor.

LDM names -> diffusers names:

==============================================  ================================================
``{enc,dec}oder.conv_in|conv_out``              same
``{enc,dec}oder.norm_out``                      ``conv_norm_out``
``encoder.down.L.block.J``                      ``encoder.down_blocks.L.resnets.J``
``encoder.down.L.downsample.conv``              ``encoder.down_blocks.L.downsamplers.0.conv``
``decoder.up.L.block.J``                        ``decoder.up_blocks.(n-1-L).resnets.J`` (reversed)
``decoder.up.L.upsample.conv``                  ``decoder.up_blocks.(n-1-L).upsamplers.0.conv``
``*.attn.J.{norm,q,k,v,proj_out}``              ``*.attentions.J.{group_norm,to_q,to_k,to_v,to_out.0}``
                                                (1x1 conv weights become linear weights)
``{enc,dec}oder.mid.block_1|attn_1|block_2``    ``mid_block.resnets.0|attentions.0|resnets.1``
``*.nin_shortcut``                              ``*.conv_shortcut``
``quant_conv``, ``post_quant_conv``             same
``loss.*`` (the training loss module)           dropped
==============================================  ================================================
"""

from __future__ import annotations

import re

import torch
from torch import nn

from sfd_train.tokenizers.config import TextureVAEConfig
from sfd_train.tokenizers.weights import TokenizerWeightsError, load_strict, read_weight_file, tensors_of

_ATTENTION_PARTS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_LEVEL_KEY = re.compile(r"^(encoder|decoder)\.(down|up)\.(\d+)\.(block|attn|downsample|upsample)\.(.+)$")
_MID_KEY = re.compile(r"^(encoder|decoder)\.mid\.(block_1|attn_1|block_2)\.(.+)$")
DROPPED_PREFIXES = ("loss.",)
"""Tensors of the released checkpoint that belong to training, not to the autoencoder."""


def diffusers_name(ldm_name: str, levels: int) -> str:
    """The diffusers name of an LDM autoencoder tensor (names of other files pass through unchanged)."""
    match = _LEVEL_KEY.match(ldm_name)
    if match:
        part, direction, level, kind, rest = match.groups()
        index = int(level) if direction == "down" else levels - 1 - int(level)
        prefix = f"{part}.{direction}_blocks.{index}"
        if kind == "block":
            number, _, tail = rest.partition(".")
            return f"{prefix}.resnets.{number}.{tail.replace('nin_shortcut', 'conv_shortcut')}"
        if kind == "attn":
            number, _, tail = rest.partition(".")
            module, _, param = tail.partition(".")
            return f"{prefix}.attentions.{number}.{_ATTENTION_PARTS.get(module, module)}.{param}"
        return f"{prefix}.{kind}rs.0.{rest}"  # downsample.conv.* -> downsamplers.0.conv.*
    match = _MID_KEY.match(ldm_name)
    if match:
        part, module, rest = match.groups()
        if module == "attn_1":
            sub, _, param = rest.partition(".")
            return f"{part}.mid_block.attentions.0.{_ATTENTION_PARTS.get(sub, sub)}.{param}"
        return f"{part}.mid_block.resnets.{int(module[-1]) - 1}.{rest.replace('nin_shortcut', 'conv_shortcut')}"
    return re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", ldm_name)


def from_ldm_state_dict(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """An LDM autoencoder state dict under diffusers' names (training-only tensors dropped)."""
    out = {}
    for name, tensor in state.items():
        if name.startswith(DROPPED_PREFIXES):
            continue
        new = diffusers_name(name, levels)
        if ".attentions." in new and tensor.dim() == 4:
            tensor = tensor[:, :, 0, 0]  # LDM's 1x1 conv projections are diffusers' linear layers
        out[new] = tensor
    return out


class TextureVAE(nn.Module):
    """Encodes [-1, 1] images to texture latents and decodes latents to images.

    Args:
        config: the architecture.
    """

    def __init__(self, config: TextureVAEConfig):
        super().__init__()
        from diffusers import AutoencoderKL

        self.config = config
        levels = len(config.ch_mult)
        attention = set(config.attention_levels())
        self.autoencoder = AutoencoderKL(
            in_channels=config.in_channels,
            out_channels=config.out_ch,
            down_block_types=tuple("AttnDownEncoderBlock2D" if level in attention else "DownEncoderBlock2D"
                                   for level in range(levels)),
            up_block_types=tuple("AttnUpDecoderBlock2D" if levels - 1 - i in attention else "UpDecoderBlock2D"
                                 for i in range(levels)),
            block_out_channels=tuple(config.ch * m for m in config.ch_mult),
            layers_per_block=config.num_res_blocks,
            latent_channels=config.embed_dim,
            norm_num_groups=32,
            sample_size=config.resolution,
            scaling_factor=1.0,  # our latents are normalised with the dataset's statistics instead
            mid_block_add_attention=True,
            use_quant_conv=True,
            use_post_quant_conv=True,
        )
        if config.z_channels != config.embed_dim:
            # diffusers ties the encoder's output to latent_channels; every released LDM f*d* model has them equal.
            raise TokenizerWeightsError(f"z_channels {config.z_channels} != embed_dim {config.embed_dim} is not supported")
        self.eval()

    @torch.no_grad()
    def posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, std)`` of the diagonal-Gaussian posterior of ``pixels`` ((B, 3, S, S) in [-1, 1])."""
        moments = self.autoencoder.quant_conv(self.autoencoder.encoder(pixels))
        mean, logvar = moments.chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        return mean, torch.exp(0.5 * logvar)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in about [-1, 1] (not clamped) from texture latents (B, embed_dim, S/16, S/16)."""
        return self.autoencoder.decoder(self.autoencoder.post_quant_conv(latents))


def load_texture_vae(path: str, config: TextureVAEConfig | None = None) -> TextureVAE:
    """The texture VAE with the weights of an LDM ``.ckpt`` (``{'state_dict': ...}``), a bare state dict
    under LDM names, or one saved from diffusers.

    Raises:
        TokenizerWeightsError: the file is not this architecture's weights (names the first bad key).
    """
    config = config or TextureVAEConfig()
    vae = TextureVAE(config)
    state = tensors_of(read_weight_file(path), str(path))
    if not any(name.startswith("autoencoder.") for name in state):
        state = {f"autoencoder.{k}": v for k, v in from_ldm_state_dict(state, len(config.ch_mult)).items()}
    load_strict(vae, state, str(path), "the texture VAE (LDM AutoencoderKL)")
    return vae.eval()
