"""Host memory per rank at start-up, for the model's weights (docs/startup.md)."""

from __future__ import annotations

MODEL_BUILT_WHOLE_ON_EVERY_RANK = False
"""How the engine builds the model. False (since issue 28, ``sfd_train/engine/materialize.py``): the
model and its EMA are defined on the meta device, parallelised, materialised on the device with only
the rank's part, and initialised tensor by tensor from whole CPU tensors drawn one at a time. True
(the engine before it): every rank built the whole model in fp32 on the CPU and deep-copied it for
the EMA before sharding or moving anything. :func:`startup_host_bytes` is the only reader."""


def startup_host_bytes(parameters: int, buffers: int, shard_group: int, largest_tensor: int,
                       device_is_cpu: bool = False) -> int:
    """Bytes of model weights one rank holds on the host while it starts (its peak before training).

    Built whole (:data:`MODEL_BUILT_WHOLE_ON_EVERY_RANK`): two fp32 copies -- the model and the EMA
    made from it -- of every parameter and buffer, 8 bytes per parameter whatever the strategy (XXL,
    1,037M parameters: 8.3 GB; the 8.9 GB measured per rank was that plus the Python process).
    Built on the meta device: one whole fp32 tensor at a time on the host (the largest; XXL: 57 MB),
    the rank's part going to the device. On a CPU-only run the device is the host, so the rank's
    part of model and EMA, 8 bytes per parameter over ``shard_group``, is host memory too.

    Args:
        parameters: elements of all parameters of the model.
        buffers: elements of its buffers (RoPE tables).
        shard_group: ranks that share one copy of the parameters at start-up (FSDP2's ``dp_shard``
            x ``tp``; 1 for DDP and ZeRO, whose ranks each materialise the whole model first).
        largest_tensor: elements of its largest parameter.
        device_is_cpu: the job trains on CPUs.
    """
    whole = 2 * 4 * (parameters + buffers)
    if MODEL_BUILT_WHOLE_ON_EVERY_RANK:
        return whole
    if device_is_cpu:
        return -(-whole // max(1, shard_group))
    return 4 * largest_tensor
