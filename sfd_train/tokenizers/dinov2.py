"""DINOv2 patch features (the REPA targets and the SemVAE's input) on timm's ViT.

timm's ``VisionTransformer`` holds the torch.hub model when built with
``no_embed_class=True`` (the position table covers the patches only), ``reg_tokens``
and ``dynamic_img_size=True``. The one step done here rather than by timm is the
position table's resize to the input's grid, because the two hub families do it
differently and timm does only one of them (:func:`resize_position_table`):

* ``dinov2_vitb14_reg`` and the other models with registers: bicubic with antialiasing
  to the exact grid size;
* ``dinov2_vitb14`` and its siblings without registers: bicubic without antialiasing,
  with ``scale_factor = (grid + 0.1) / 37`` (a historical offset), and the scale factor,
  not the output size, sets where the table is sampled.

Both use the table as it is at its own size (518 px). The hub adds the class token's
position embedding in the forward pass; here it is added to the class token once, at
load (the same float32 sum). Registers, when there are any, come after the class token
and get no position embedding; otherwise the families are the same network.

Hub names -> timm names: ``register_tokens`` -> ``reg_token``; ``pos_embed[:, 0]`` is
folded into ``cls_token``, ``pos_embed[:, 1:]`` is timm's ``pos_embed``; ``mask_token``
(used only in DINOv2's own training) is dropped; every other name is the same.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sfd_train.tokenizers.config import DinoConfig
from sfd_train.tokenizers.weights import TokenizerWeightsError, load_strict, read_weight_file, tensors_of

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DROPPED_KEYS = ("mask_token",)
"""Tensors of the released file that inference does not use."""


def from_hub_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A torch.hub DINOv2 state dict under timm's names (see the module docstring)."""
    out = {k: v for k, v in state.items() if k not in DROPPED_KEYS and k not in ("pos_embed", "cls_token", "register_tokens")}
    if "pos_embed" in state and "cls_token" in state:
        out["cls_token"] = state["cls_token"] + state["pos_embed"][:, :1]
        out["pos_embed"] = state["pos_embed"][:, 1:]
    else:  # not a hub DINOv2 file: let the strict load name what is missing
        out.update({k: state[k] for k in ("pos_embed", "cls_token") if k in state})
    if "register_tokens" in state:
        out["reg_token"] = state["register_tokens"]
    return out


def resize_position_table(table: torch.Tensor, grid: tuple[int, int], offset: float, antialias: bool) -> torch.Tensor:
    """The patch position table (1, M*M, D) for a (rows, cols) grid, as DINOv2's ``interpolate_pos_encoding``.

    Args:
        offset: 0 = resize to the grid's size; > 0 = resize by the scale factor
            ``(grid + offset) / M``, which also moves the sampling positions (the result is
            still ``grid`` on a side).
        antialias: antialiased bicubic.

    Returns:
        The table (1, rows * cols, D), rows first, in the table's dtype; the table itself at (M, M).
    """
    side = math.isqrt(table.shape[1])
    if side * side != table.shape[1]:
        raise ValueError(f"position table of {table.shape[1]} patches is not square")
    rows, cols = grid
    if (rows, cols) == (side, side):
        return table
    square = table.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
    if offset:
        resized = F.interpolate(square, scale_factor=((rows + offset) / side, (cols + offset) / side), mode="bicubic",
                                antialias=antialias)
    else:
        resized = F.interpolate(square, size=(rows, cols), mode="bicubic", antialias=antialias)
    if tuple(resized.shape[-2:]) != (rows, cols):
        raise ValueError(f"resizing the {side}x{side} position table by ({rows} + {offset}) / {side} gave "
                         f"{tuple(resized.shape[-2:])} patches, not {(rows, cols)}")
    return resized.permute(0, 2, 3, 1).reshape(1, rows * cols, -1).to(table.dtype)


def _hub_vit_class():
    from timm.models.vision_transformer import VisionTransformer

    class HubViT(VisionTransformer):
        """timm's ViT with the hub's position-table resize (``_pos_embed`` is timm's hook for it, as in DeiT)."""

        def __init__(self, *, interpolate_offset: float, interpolate_antialias: bool, **kwargs):
            super().__init__(**kwargs)
            self.interpolate_offset = interpolate_offset
            self.interpolate_antialias = interpolate_antialias

        def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
            batch, rows, cols, width = x.shape  # dynamic_img_size: patches arrive as (B, H, W, C)
            table = resize_position_table(self.pos_embed, (rows, cols), self.interpolate_offset,
                                          self.interpolate_antialias)
            prefix = [self.cls_token.expand(batch, -1, -1)]
            if self.reg_token is not None:
                prefix.append(self.reg_token.expand(batch, -1, -1))
            return self.pos_drop(torch.cat(prefix + [x.reshape(batch, -1, width) + table], dim=1))

    return HubViT


class DinoFeatures(nn.Module):
    """``x_norm_patchtokens`` of [-1, 1] images, channel-first on the latent grid.

    Args:
        config: the ViT; fields it leaves open are resolved without a weight file
            (:meth:`DinoConfig.resolved`), so :func:`load_dinov2` is the way to follow a file's family.
    """

    def __init__(self, config: DinoConfig):
        super().__init__()
        config = config.resolved()
        self.config = config
        self.vit = _hub_vit_class()(
            img_size=config.img_size, patch_size=config.patch_size, in_chans=config.in_chans, num_classes=0,
            global_pool="", embed_dim=config.embed_dim, depth=config.depth, num_heads=config.num_heads,
            mlp_ratio=config.mlp_ratio, qkv_bias=config.qkv_bias, init_values=config.init_values,
            class_token=True, reg_tokens=config.num_register_tokens, no_embed_class=True, dynamic_img_size=True,
            drop_path_rate=config.drop_path_rate, interpolate_offset=config.interpolate_offset,
            interpolate_antialias=config.interpolate_antialias,
        )
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.eval()

    def preprocess(self, pixels: torch.Tensor, grid: int) -> torch.Tensor:
        """The network's input for ``grid`` x ``grid`` patches: (x + 1) / 2, ImageNet-normalised,
        then bicubically resized (no antialias) to grid * patch_size, in that order (as the authors do)."""
        x = ((pixels + 1.0) / 2.0 - self.mean) / self.std
        side = grid * self.config.patch_size
        return F.interpolate(x, size=(side, side), mode="bicubic", align_corners=False)

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor, grid: int) -> torch.Tensor:
        """Features (B, embed_dim, grid, grid) of ``pixels`` (B, 3, S, S) in [-1, 1]; token k at (k // grid, k % grid)."""
        tokens = self.vit.forward_features(self.preprocess(pixels, grid))
        patches = tokens[:, self.vit.num_prefix_tokens:]
        return patches.transpose(1, 2).reshape(pixels.shape[0], -1, grid, grid)


def load_dinov2(path: str, config: DinoConfig | None = None) -> DinoFeatures:
    """DINOv2 with the weights of a released torch.hub ``.pth``, with registers
    (``dinov2_vitb14_reg4_pretrain.pth``) or without (``dinov2_vitb14_pretrain.pth``).

    Args:
        config: the architecture; fields it leaves open follow the file (its ``register_tokens``,
            or their absence, say the family), see :meth:`DinoConfig.resolved`.

    Raises:
        TokenizerWeightsError: the file is not this architecture's weights (names the first bad key).
    """
    state = tensors_of(read_weight_file(path), str(path))
    registers = state["register_tokens"].shape[1] if "register_tokens" in state else 0
    config = (config or DinoConfig()).resolved(file_registers=registers if "cls_token" in state else None)
    if "cls_token" in state and config.num_register_tokens != registers:
        held = f"{registers} register tokens" if registers else "no 'register_tokens' (a model without registers)"
        raise TokenizerWeightsError(f"{path}: not the weights of DINOv2 (torch.hub ViT) as configured: the file has "
                                    f"{held}, the network {config.num_register_tokens}")
    model = DinoFeatures(config)
    load_strict(model.vit, from_hub_state_dict(state), str(path), "DINOv2 (torch.hub ViT)")
    return model.eval()
