"""Host memory per rank at start-up, before the weights move to the device."""

from __future__ import annotations

MODEL_BUILT_WHOLE_ON_EVERY_RANK = True
"""How the engine builds the model. True (the engine as of issue 29): every rank builds the whole
model in fp32 on the CPU and deep-copies it for the EMA before sharding or moving anything, so a
rank holds two full fp32 copies whatever the strategy. False (meta-device definition, then
sharding, then per-shard materialisation): a rank holds only its share of the shard group.
Flip it when the engine changes; :func:`startup_host_bytes` is the only reader."""


def startup_host_bytes(parameters: int, buffers: int, shard_group: int) -> int:
    """Bytes of model weights one rank holds on the host at start-up (its peak before training).

    Two fp32 copies -- the model and the EMA made from it -- at 4 bytes per parameter and per
    buffer element each: 8 bytes per parameter. With :data:`MODEL_BUILT_WHOLE_ON_EVERY_RANK` that
    is the whole model on every rank (XXL, 1,037M parameters: 8.3 GB; the 8.9 GB measured per rank
    is that plus the Python/PyTorch process itself); without it, the rank's share of its shard
    group (``shard_group`` = FSDP2's ``dp_shard`` x ``tp``, DeepSpeed ZeRO-3's ranks, 1 for DDP and
    ZeRO-1/2, which replicate the parameters).

    Args:
        parameters: elements of all parameters of the model.
        buffers: elements of its buffers (RoPE tables).
        shard_group: ranks that share one copy of the parameters.
    """
    whole = 2 * 4 * (parameters + buffers)
    if MODEL_BUILT_WHOLE_ON_EVERY_RANK:
        return whole
    return -(-whole // max(1, shard_group))
