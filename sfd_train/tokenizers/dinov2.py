"""DINOv2 patch features (the REPA targets and the SemVAE's input) on timm's ViT.

timm's ``VisionTransformer`` reproduces the torch.hub model exactly when built with
``no_embed_class=True`` (the position table covers the patches only), ``reg_tokens``
and ``dynamic_img_size=True``: it resizes the 37 x 37 table to the input's grid with
bicubic, antialiased interpolation to the exact size, as the hub's registers models do.
The hub adds the class token's position embedding in the forward pass; here it is
added to the class token once, at load (the same float32 sum).

Hub names -> timm names: ``register_tokens`` -> ``reg_token``; ``pos_embed[:, 0]`` is
folded into ``cls_token``, ``pos_embed[:, 1:]`` is timm's ``pos_embed``; ``mask_token``
(used only in DINOv2's own training) is dropped; every other name is the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sfd_train.tokenizers.config import DinoConfig
from sfd_train.tokenizers.weights import load_strict, read_weight_file, tensors_of

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


class DinoFeatures(nn.Module):
    """``x_norm_patchtokens`` of [-1, 1] images, channel-first on the latent grid.

    Args:
        config: the ViT.
    """

    def __init__(self, config: DinoConfig):
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        self.config = config
        self.vit = VisionTransformer(
            img_size=config.img_size, patch_size=config.patch_size, in_chans=config.in_chans, num_classes=0,
            global_pool="", embed_dim=config.embed_dim, depth=config.depth, num_heads=config.num_heads,
            mlp_ratio=config.mlp_ratio, qkv_bias=config.qkv_bias, init_values=config.init_values,
            class_token=True, reg_tokens=config.num_register_tokens, no_embed_class=True, dynamic_img_size=True,
            drop_path_rate=config.drop_path_rate,
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
    """DINOv2 with the weights of a released torch.hub ``.pth`` (e.g. ``dinov2_vitb14_reg4_pretrain.pth``).

    Raises:
        TokenizerWeightsError: the file is not this architecture's weights (names the first bad key).
    """
    config = config or DinoConfig()
    model = DinoFeatures(config)
    state = tensors_of(read_weight_file(path), str(path))
    load_strict(model.vit, from_hub_state_dict(state), str(path), "DINOv2 (torch.hub ViT)")
    return model.eval()
