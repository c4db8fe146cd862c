"""The dual-timestep LightningDiT of Semantic-First Diffusion.

The composite latent (texture channels first, semantic channels last) is denoised
with two times: ``t_sem`` for the semantic part and ``t_tex`` for the texture part.
Their embeddings (each of width d/2) are concatenated as ``[semantic, texture]``.
With ``delta_t = 0`` the model is the ordinary synchronous LightningDiT with one
full-width ``t_embedder``.

Parameter and buffer names match the released checkpoints (DESIGN.md §2).
"""

from __future__ import annotations

import torch
from torch import nn

from sfd_train.config.schema import ModelConfig
from sfd_train.kernels import REFERENCE_OPS, KernelOps
from sfd_train.models.embeddings import (
    LabelEmbedder,
    PatchEmbed,
    RotaryTables,
    TimestepEmbedder,
    sincos_2d_table,
)
from sfd_train.models.layers import DiTBlock, FinalLayer, repa_projector


class SFDLightningDiT(nn.Module):
    """Dual-timestep LightningDiT.

    Args:
        config: the model section of the job config (validated here).
        ops: kernel implementations to call (from :func:`sfd_train.kernels.build_kernel_ops`).

    ``forward(x, t_tex, t_sem, y, with_projection=...)``: see :meth:`forward`. Nothing in the
    model depends on train/eval mode except which outputs a call without ``with_projection``
    returns (the published convention).
    """

    def __init__(self, config: ModelConfig, ops: KernelOps = REFERENCE_OPS):
        super().__init__()
        config.validate()
        self.config = config
        depth, dim, heads = config.dims()
        self.in_channels = self.out_channels = config.in_channels
        self.semantic_channels = config.semantic_channels
        self.patch_size = config.patch_size
        self.grid_size = config.input_size // config.patch_size
        self.hidden_size = dim
        self.dual_time = config.delta_t > 0

        self.x_embedder = PatchEmbed(config.in_channels, dim, config.patch_size)
        if self.dual_time:
            self.t_embedder_sem = TimestepEmbedder(dim // 2)
            self.t_embedder_tex = TimestepEmbedder(dim - dim // 2)
        else:
            self.t_embedder = TimestepEmbedder(dim)
        self.y_embedder = LabelEmbedder(config.num_classes, dim)
        # Frozen, but a Parameter (not a buffer) so that the published checkpoints load.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size**2, dim), requires_grad=False)
        self.feat_rope = RotaryTables(dim // heads, self.grid_size) if config.use_rope else None
        self.blocks = nn.ModuleList(
            DiTBlock(
                dim, heads, config.mlp_ratio, config.use_qknorm, config.use_swiglu,
                config.use_rmsnorm, config.wo_shift, ops,
            )
            for _ in range(depth)
        )
        self.final_layer = FinalLayer(dim, config.patch_size, self.out_channels, config.use_rmsnorm, ops)
        self.repa_depth = config.repa_depth if config.use_repa else None
        if config.use_repa:
            self.repa_projector = repa_projector(dim, config.repa_projector_dim, config.repa_feature_dim)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """LightningDiT's initialisation; also (re)computes the fixed tables.

        Call again after materialising a model built on the meta device.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif hasattr(module, "reset_parameters") and not isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
                module.reset_parameters()
        self.pos_embed.copy_(sincos_2d_table(self.hidden_size, self.grid_size).float().unsqueeze(0))
        if self.feat_rope is not None:
            self.feat_rope.reset_tables()
        weight = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for embedder in self.time_embedders():
            nn.init.normal_(embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def time_embedders(self) -> list[TimestepEmbedder]:
        return [self.t_embedder_sem, self.t_embedder_tex] if self.dual_time else [self.t_embedder]

    def embed_time(self, t_tex: torch.Tensor, t_sem: torch.Tensor) -> torch.Tensor:
        """``[emb_sem(t_sem), emb_tex(t_tex)]``, or ``emb(t_tex)`` for the synchronous model."""
        if self.dual_time:
            return torch.cat([self.t_embedder_sem(t_sem), self.t_embedder_tex(t_tex)], dim=1)
        return self.t_embedder(t_tex)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, tokens, p*p*C)`` -> ``(B, C, H, W)``."""
        p, g, c = self.patch_size, self.grid_size, self.out_channels
        x = x.reshape(x.shape[0], g, g, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, g * p, g * p)

    def check_input(self, x: torch.Tensor) -> None:
        expected = (self.in_channels, self.grid_size * self.patch_size, self.grid_size * self.patch_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"expected a composite latent of shape (B, {expected[0]}, {expected[1]}, {expected[2]}) "
                f"({self.in_channels - self.semantic_channels} texture + {self.semantic_channels} semantic channels), "
                f"got {tuple(x.shape)}"
            )

    def forward(self, x: torch.Tensor, t_tex: torch.Tensor, t_sem: torch.Tensor, y: torch.Tensor, *,
                with_projection: bool | None = None):
        """The velocity, and the REPA projection when asked for.

        Args:
            x: ``(B, C, H, W)``, the noisy composite latent.
            t_tex, t_sem: ``(B,)`` times in [0, 1].
            y: ``(B,)`` class indices (``num_classes`` is the null class).
            with_projection: True returns ``(velocity, projection)``, False the velocity alone,
                in either mode. None (the default) follows the published model (DESIGN.md §7):
                True in training mode, False in eval mode. Callers in this project say which.

        Returns:
            ``velocity`` ``(B, C, H, W)``, or ``(velocity, projection)`` with the projection
            ``(B, tokens, feature_dim)`` of the stream after block ``repa_depth`` (None without
            a projector). The velocity is the same either way.
        """
        if with_projection is None:
            with_projection = self.training
        self.check_input(x)
        tokens = self.x_embedder(x) + self.pos_embed
        c = self.embed_time(t_tex, t_sem) + self.y_embedder(y)
        rope = (self.feat_rope.freqs_cos, self.feat_rope.freqs_sin) if self.feat_rope is not None else None
        projection = None
        for index, block in enumerate(self.blocks, start=1):
            tokens = block(tokens, c, rope)
            if with_projection and index == self.repa_depth:
                projection = self.repa_projector(tokens)
        velocity = self.unpatchify(self.final_layer(tokens, c))
        return (velocity, projection) if with_projection else velocity
