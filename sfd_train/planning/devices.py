"""The devices a job can be planned for: memory, and the cluster figures behind the step time.

``sfd-launch plan --device`` and the config key ``launcher.device`` take a name from
:data:`DEVICES` or a memory size in GiB (``"75"``, ``"75GiB"``); a bare size is a CUDA GPU
(an Ascend NPU when the launcher's accelerator is ``npu``) with the compute and links of the
H100 (or 910B) row. This module imports nothing heavy: the launcher's config validation reads it.

Memory is what the runtime reports as the device's total (``nvidia-smi``'s MiB, ``npu-smi``'s
MB), in GiB; the vendors' "80 GB" is a little more than 80 GiB for the H100 and a little less
for the A100 40GB. A job cannot use all of it: :data:`RUNTIME_RESERVE_GIB` stays with the CUDA
or CANN context, the collective libraries' buffers and the libraries' workspaces (none of which
``torch.cuda.max_memory_allocated`` counts), and :data:`ALLOCATOR_MARGIN` covers the caching
allocator's fragmentation over what the tensors themselves hold.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

RUNTIME_RESERVE_GIB = 2.0
"""Device memory outside PyTorch's allocator: the CUDA/CANN context (~0.5 GiB), NCCL/HCCL
communicator buffers (a few hundred MiB per communicator; HSDP has three), cuBLAS/cuDNN workspaces."""
ALLOCATOR_MARGIN = 0.05
"""The caching allocator reserves more than it hands out (block rounding, fragmentation): the
planned tensors must fit in the rest with this share to spare."""


@dataclass(frozen=True)
class DeviceSpec:
    """One accelerator model.

    Attributes:
        key: the name ``--device`` and ``launcher.device`` take.
        name: what it is.
        memory_gib: total device memory as the runtime reports it, in GiB.
        accelerator: ``cuda`` or ``npu`` (which attention kernel and optimizer the device runs).
        cluster: the :data:`sfd_train.planning.scaling.CLUSTERS` row with its FLOP rate and links.
        source: where the memory figure comes from.
    """

    key: str
    name: str
    memory_gib: float
    accelerator: str
    cluster: str
    source: str

    @property
    def usable_gib(self) -> float:
        """What the job's tensors may take, allocator margin included (see the module docstring)."""
        return self.memory_gib - RUNTIME_RESERVE_GIB


_H100 = "https://www.nvidia.com/en-us/data-center/h100/"
_H200 = "https://www.nvidia.com/en-us/data-center/h200/"
_A100 = "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf"
_A100_40_QUERY = "https://upb-pc2.atlassian.net/wiki/spaces/PC2DOK/pages/1900609/NVIDIA+A100+40GB+with+NVLINK"
_ATLAS = "https://support.huawei.com/enterprise/zh/doc/EDDOC1100317202/f3dba488"

DEVICES: dict[str, DeviceSpec] = {
    "h100": DeviceSpec(
        "h100", "NVIDIA H100 SXM 80GB", 81559 / 1024, "cuda", "h100",
        f"80 GB HBM3 ({_H100}); nvidia-smi shows 81559 MiB on the H100 80GB HBM3 lent to this project"),
    "h200": DeviceSpec(
        "h200", "NVIDIA H200 SXM 141GB", 143771 / 1024, "cuda", "h200",
        f"141 GB HBM3e ({_H200}); nvidia-smi shows 143771 MiB on the H200 lent to this project"),
    "a100-40g": DeviceSpec(
        "a100-40g", "NVIDIA A100 SXM4 40GB", 40441 / 1024, "cuda", "a100-40g",
        f"40 GB HBM2 ({_A100}); CUDA's deviceQuery reports 40441 MiB ({_A100_40_QUERY})"),
    "a100-80g": DeviceSpec(
        "a100-80g", "NVIDIA A100 SXM4 80GB", 81559 / 1024, "cuda", "a100-80g",
        f"80 GB HBM2e ({_A100}); taken as the H100 80GB's 81559 MiB (the same five 16 GiB stacks)"),
    "910b": DeviceSpec(
        "910b", "Huawei Ascend 910B (Atlas 800T A2)", 64.0, "npu", "910b",
        f"64 GB HBM2e per NPU ({_ATLAS}); npu-smi shows 65536 MB"),
}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:gib|g|gb)?\s*$", re.IGNORECASE)


def resolve_device(value: str | int | float, accelerator: str = "cuda") -> DeviceSpec:
    """The device a name or a size in GiB stands for.

    Args:
        value: a key of :data:`DEVICES` (case-insensitive) or a size such as ``75``, ``"75GiB"``.
        accelerator: ``cuda`` or ``npu``, for a bare size (which compute and links it gets).

    Raises:
        ValueError: neither a known name nor a positive size; the message lists the names.
    """
    text = str(value).strip()
    spec = DEVICES.get(text.lower())
    if spec is not None:
        return spec
    match = _SIZE.match(text)
    if match and float(match.group(1)) > RUNTIME_RESERVE_GIB:
        size = float(match.group(1))
        like = DEVICES["910b" if accelerator == "npu" else "h100"]
        return DeviceSpec(f"{size:g}gib", f"a {size:g} GiB {like.accelerator} device (compute and links as {like.key})",
                          size, like.accelerator, like.cluster, "given as a size")
    raise ValueError(f"{text!r} is neither a device ({', '.join(DEVICES)}) nor a memory size in GiB above "
                     f"{RUNTIME_RESERVE_GIB:g} (e.g. 75 or 75GiB)")
