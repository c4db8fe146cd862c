"""Everything that depends on the accelerator, in one place (kernels and engine ask here).

CUDA, Ascend NPU (through ``torch_npu``, imported lazily and only here) and CPU.
The rest of the engine asks this module for the device, the collective backend,
memory figures and the peak FLOP rate, and never branches on the device itself.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import resource
import sys

import torch

# Collective backend per device type (torch's own default map, plus Ascend).
BACKENDS = {"cuda": "nccl", "npu": "hccl", "cpu": "gloo"}

# Dense bf16 peak FLOP/s of one device, by a substring of its name (first match wins).
PEAK_BF16_FLOPS = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("H20", 148e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("Ascend910B1", 414e12),
    ("Ascend910B2", 376e12),
    ("Ascend910B3", 313e12),
    ("Ascend910B4", 280e12),
]


def npu_available() -> bool:
    """torch_npu imports and sees an Ascend device (torch_npu is imported only if installed)."""
    try:
        if importlib.util.find_spec("torch_npu") is None:
            return False
        importlib.import_module("torch_npu")  # registers torch.npu
    except Exception:  # a broken CANN install: treat as no NPU, the caller reports it
        return False
    npu = getattr(torch, "npu", None)
    return bool(npu is not None and npu.is_available())


def detect_device_type(requested: str = "auto") -> str:
    """The device type to train on: the requested one, or the accelerator the stack has.

    Raises:
        RuntimeError: the requested device is not usable here.
    """
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if npu_available():
            return "npu"
        return "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device=cuda but torch sees no CUDA device")
    if requested == "npu" and not npu_available():
        raise RuntimeError("run.device=npu but torch_npu is not importable or sees no NPU (is CANN sourced?)")
    return requested


def collective_backend(device_type: str, requested: str = "auto") -> str:
    """The process-group backend string; accelerators also get gloo for CPU tensors.

    The CPU part is needed by asynchronous checkpointing and the preemption vote.
    """
    backend = BACKENDS[device_type] if requested == "auto" else requested
    if device_type == "cpu" or backend == "gloo":
        return "gloo"
    return f"cpu:gloo,{device_type}:{backend}"


def local_device(device_type: str, local_rank: int) -> torch.device:
    """This process's device; also makes it current for the accelerator runtime."""
    if device_type == "cpu":
        return torch.device("cpu")
    module = getattr(torch, device_type)
    module.set_device(local_rank)
    return torch.device(device_type, local_rank)


def enable_mindspeed_if_requested() -> None:
    """Imports MindSpeed's adaptor when SFD_ENABLE_MINDSPEED=1 (set by the Ascend launcher)."""
    from sfd_train.launchers.contract import MINDSPEED_ENV

    if os.environ.get(MINDSPEED_ENV) == "1":
        try:
            importlib.import_module("mindspeed.megatron_adaptor")
        except ImportError as err:
            raise RuntimeError(
                "SFD_ENABLE_MINDSPEED=1 but MindSpeed is not installed; install it from source on the Ascend "
                "system or set launcher.mindspeed=false"
            ) from err


def synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        getattr(torch, device.type).synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cpu":
        return "cpu"
    return getattr(torch, device.type).get_device_name(device)


def peak_flops(device: torch.device, override_tflops: float = 0.0) -> float | None:
    """Dense bf16 peak FLOP/s for MFU, or None when unknown (e.g. CPUs)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    name = device_name(device).replace(" ", "")
    for key, value in PEAK_BF16_FLOPS:
        if key.replace(" ", "") in name:
            return value
    return None


def max_memory_gib(device: torch.device) -> float:
    """Peak memory of this process: the allocator's peak on accelerators, peak RSS on CPU."""
    if device.type == "cpu":
        rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss_kib / (1024**3 if sys.platform == "darwin" else 1024**2)
    return getattr(torch, device.type).max_memory_allocated(device) / 1024**3


def has_fused_adamw(device: torch.device) -> bool:
    """Whether torch's fused AdamW kernel exists for this device type."""
    return device.type in ("cuda", "npu")


def deepspeed_accelerator(device_type: str) -> str:
    """DeepSpeed's accelerator name (DS_ACCELERATOR) for our device type."""
    return {"cuda": "cuda", "npu": "npu", "cpu": "cpu"}[device_type]
