"""The one place that chooses an implementation for each op.

The model receives a :class:`KernelOps` when it is built and calls its functions;
it never imports a backend. Choosing happens once, here, from the config and the
installed stack, so a forward pass has no per-call branching on the backend.

``auto`` per stack (see docs/kernels.md):

| op        | CUDA                        | Ascend (torch_npu)          | CPU       |
|-----------|-----------------------------|-----------------------------|-----------|
| rms_norm  | triton (apex, reference)    | npu_rms_norm                | reference |
| attention | sdpa (flash/cuDNN/efficient)| npu_fusion_attention (BNSD) | sdpa      |
| rope      | triton                      | reference                   | reference |
| qk_norm_rope | separate (triton: opt-in) | separate                    | separate  |
| swiglu    | reference (triton: opt-in)  | reference                   | reference |
| add_rms_norm | separate (triton: opt-in) | separate                    | separate  |

``qk_norm_rope`` is the attention's input stage (q/k RMSNorm, RoPE, split into heads):
``separate`` composes the rms_norm and rope choices above. ``swiglu`` is the MLP's input stage,
the w12 Linear and the gate ``silu(x1) * x2`` (the fused gate also takes the Linear's bias). ``add_rms_norm`` is, inside each block, the attention's gated residual ``x + gate * attn``
with ``norm2`` and the MLP's modulation (``separate`` composes the rms_norm choice). Their ``triton`` choices are one kernel each way that stays a kernel
inside torch.compile too (``inside_compile`` does not apply: they exist to replace what
Inductor generates between two GEMMs, or a GEMM and the attention).

Inside torch.compile the CUDA norm/RoPE ops trace as the reference expression by
default (``inside_compile: inductor``), so Inductor can fuse them with their neighbours;
eager calls run the Triton kernels. An explicit choice that cannot work on the stack raises a ConfigError naming the key.
Backends (triton, apex, torch_npu) are imported only here, and only when chosen.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from sfd_train.device import detect_device_type
from sfd_train.kernels import reference
from sfd_train.kernels.config import KernelConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KernelOps:
    """The op implementations a model is built with."""

    rms_norm: Callable[..., torch.Tensor] = reference.rms_norm
    rms_norm_modulate: Callable[..., torch.Tensor] = reference.rms_norm_modulate
    attention: Callable[..., torch.Tensor] = reference.attention
    apply_rope: Callable[..., torch.Tensor] = reference.apply_rope
    qk_norm_rope: Callable[..., tuple] | None = None
    """None: composed from this instance's ``rms_norm`` and ``apply_rope`` ('separate')."""
    swiglu: Callable[..., torch.Tensor] = reference.swiglu
    add_rms_norm_modulate: Callable[..., tuple] | None = None
    """None: composed from this instance's ``rms_norm_modulate`` ('separate')."""
    names: dict[str, str] = field(
        default_factory=lambda: {"rms_norm": "reference", "attention": "reference", "rope": "reference",
                                 "qk_norm_rope": "separate", "swiglu": "reference", "add_rms_norm": "separate"}
    )

    def __post_init__(self):
        if self.qk_norm_rope is None:
            composed = functools.partial(reference.qk_norm_rope, norm=self.rms_norm, rotate=self.apply_rope)
            object.__setattr__(self, "qk_norm_rope", composed)
        if self.add_rms_norm_modulate is None:
            composed = functools.partial(reference.add_rms_norm_modulate, norm_modulate=self.rms_norm_modulate)
            object.__setattr__(self, "add_rms_norm_modulate", composed)


REFERENCE_OPS = KernelOps()


def _error(key: str, message: str) -> Exception:
    # Imported here: sfd_train.config imports this package's config module.
    from sfd_train.config.base import ConfigError

    return ConfigError(f"kernels.{key}", message)


def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def _load_apex():
    from sfd_train.kernels.apex import load_apex_norm

    return load_apex_norm()


def _require_cuda(key: str, choice: str, device_type: str) -> None:
    if device_type != "cuda" or not torch.cuda.is_available():
        raise _error(key, f"'{choice}' needs a CUDA device, but the device is '{device_type}'"
                     f"{'' if torch.cuda.is_available() else ' and torch.cuda.is_available() is False'}")


def _require_triton(key: str, device_type: str) -> None:
    _require_cuda(key, "triton", device_type)
    if not _triton_importable():
        raise _error(key, "'triton' needs the triton package, which is not installed")


def _require_npu(key: str, device_type: str) -> object:
    from sfd_train.kernels.npu import load_torch_npu

    if importlib.util.find_spec("torch_npu") is None:
        raise _error(key, "'npu' needs torch_npu (Ascend's PyTorch adapter), which is not installed")
    if device_type != "npu":
        raise _error(key, f"'npu' needs an Ascend device, but the device is '{device_type}'")
    try:
        torch_npu = load_torch_npu()
    except ImportError as err:
        raise _error(key, f"'npu' needs torch_npu, which cannot be imported here ({err})") from err
    if not torch.npu.is_available():  # type: ignore[attr-defined]
        raise _error(key, "'npu' needs an Ascend device, but torch.npu.is_available() is False")
    return torch_npu


def _choose_rms_norm(choice: str, device_type: str) -> tuple[str, Callable, Callable]:
    if choice == "auto":
        if device_type == "cuda":
            if _triton_importable():
                choice = "triton"
            else:
                try:
                    _load_apex()
                    choice = "apex"
                except ImportError:
                    warnings.warn("neither triton nor apex is importable: RMSNorm falls back to the PyTorch reference")
                    choice = "reference"
        elif device_type == "npu":
            choice = "npu"
        else:
            choice = "reference"
    if choice == "reference":
        return choice, reference.rms_norm, reference.rms_norm_modulate
    if choice == "triton":
        _require_triton("rms_norm", device_type)
        from sfd_train.kernels import triton_rms_norm

        return choice, triton_rms_norm.rms_norm, triton_rms_norm.rms_norm_modulate
    if choice == "apex":
        _require_cuda("rms_norm", choice, device_type)
        try:
            apex_norm = _load_apex()
        except ImportError as err:
            raise _error("rms_norm", f"'apex' needs NVIDIA apex with its CUDA extensions ({err})") from err
        from sfd_train.kernels.apex import make_apex_ops

        return (choice, *make_apex_ops(apex_norm))
    if choice == "npu":
        from sfd_train.kernels.npu import make_npu_ops

        rms_norm, rms_norm_modulate, _ = make_npu_ops(_require_npu("rms_norm", device_type))
        return choice, rms_norm, rms_norm_modulate
    raise _error("rms_norm", f"unknown choice {choice!r}")


def _choose_attention(choice: str, device_type: str, sdpa_backends: list[str]) -> tuple[str, Callable]:
    if choice == "auto":
        choice = "npu" if device_type == "npu" else "sdpa"
    if choice == "reference":
        return choice, reference.attention
    if choice == "sdpa":
        from sfd_train.kernels.attention import make_sdpa_attention

        try:
            return choice, make_sdpa_attention(sdpa_backends)
        except ValueError as err:
            raise _error("sdpa_backends", str(err)) from err
    if choice == "npu":
        from sfd_train.kernels.npu import make_npu_ops

        return choice, make_npu_ops(_require_npu("attention", device_type))[2]
    raise _error("attention", f"unknown choice {choice!r}")


def _choose_rope(choice: str, device_type: str) -> tuple[str, Callable]:
    if choice == "auto":
        choice = "triton" if device_type == "cuda" and _triton_importable() else "reference"
    if choice == "reference":
        return choice, reference.apply_rope
    if choice == "triton":
        _require_triton("rope", device_type)
        from sfd_train.kernels import rope

        return choice, rope.apply_rope
    raise _error("rope", f"unknown choice {choice!r}")


def _choose_opt_in(key: str, choice: str, device_type: str, default: tuple[str, Callable | None],
                   load_kernel: Callable[[], Callable]) -> tuple[str, Callable | None]:
    """An op whose Triton kernel is opt-in: ``default`` for auto, the kernel for 'triton'.

    auto stays the default until a GPU measurement of the compiled step shows the kernel ahead.
    """
    if choice in ("auto", default[0]):
        return default
    if choice == "triton":
        _require_triton(key, device_type)
        return choice, load_kernel()
    raise _error(key, f"unknown choice {choice!r}")


def _load_qk_norm_rope() -> Callable:
    from sfd_train.kernels import qk_norm_rope

    return qk_norm_rope.qk_norm_rope


def _load_add_rms_norm() -> Callable:
    from sfd_train.kernels import triton_rms_norm

    return triton_rms_norm.add_rms_norm_modulate


def _load_swiglu() -> Callable:
    from sfd_train.kernels import swiglu

    return swiglu.swiglu


def _inductor_when_compiled(kernel_fn: Callable, reference_fn: Callable) -> Callable:
    """``kernel_fn`` in eager mode; ``reference_fn`` while torch.compile traces.

    The test runs at trace time, not per call: a compiled graph contains only the
    reference expression, which Inductor fuses with its neighbours (an opaque kernel
    would stop that fusion; in the compiled XL step the fused graph is faster).
    """

    def op(*args, **kwargs):
        if torch.compiler.is_compiling():
            return reference_fn(*args, **kwargs)
        return kernel_fn(*args, **kwargs)

    op.__name__ = getattr(kernel_fn, "__name__", "op")
    op.__doc__ = kernel_fn.__doc__
    op.__wrapped__ = kernel_fn  # type: ignore[attr-defined]
    return op


def build_kernel_ops(config: KernelConfig | None = None, device_type: str | None = None) -> KernelOps:
    """Chooses each op's implementation for ``device_type`` from ``config``.

    Args:
        config: the ``kernels`` section; None means all 'auto'.
        device_type: ``cuda``, ``npu`` or ``cpu`` (the device the model runs on);
            None detects it from the installed stack.

    Returns:
        The ops to build the model with; ``names`` records what was chosen.

    Raises:
        ConfigError: an explicit choice that cannot work here (the message names the key).
    """
    config = config or KernelConfig()
    device_type = device_type or detect_device_type()
    rms_name, rms_norm, rms_norm_modulate = _choose_rms_norm(config.rms_norm, device_type)
    attn_name, attention = _choose_attention(config.attention, device_type, list(config.sdpa_backends))
    rope_name, apply_rope = _choose_rope(config.rope, device_type)
    # None stands for 'separate': KernelOps composes the op from the rms_norm (and rope) chosen above.
    qk_name, qk_norm_rope = _choose_opt_in("qk_norm_rope", config.qk_norm_rope, device_type, ("separate", None),
                                           _load_qk_norm_rope)
    swiglu_name, swiglu = _choose_opt_in("swiglu", config.swiglu, device_type, ("reference", reference.swiglu),
                                         _load_swiglu)
    add_name, add_rms_norm_modulate = _choose_opt_in("add_rms_norm", config.add_rms_norm, device_type,
                                                     ("separate", None), _load_add_rms_norm)
    if attn_name == "sdpa" and config.sdpa_backends:
        attn_name = f"sdpa[{','.join(config.sdpa_backends)}]"
    names = {"rms_norm": rms_name, "attention": attn_name, "rope": rope_name, "qk_norm_rope": qk_name,
             "swiglu": swiglu_name, "add_rms_norm": add_name}
    if config.inside_compile == "inductor":
        if rms_name in ("triton", "apex"):
            rms_norm = _inductor_when_compiled(rms_norm, reference.rms_norm)
            rms_norm_modulate = _inductor_when_compiled(rms_norm_modulate, reference.rms_norm_modulate)
            names["rms_norm"] += "(compiled: inductor)"
        if rope_name == "triton":
            apply_rope = _inductor_when_compiled(apply_rope, reference.apply_rope)
            names["rope"] += "(compiled: inductor)"
    elif config.inside_compile != "kernels":
        raise _error("inside_compile", f"unknown choice {config.inside_compile!r}")
    logger.info("kernels on %s: %s", device_type, names)
    return KernelOps(
        rms_norm=rms_norm,
        rms_norm_modulate=rms_norm_modulate,
        attention=attention,
        apply_rope=apply_rope,
        qk_norm_rope=qk_norm_rope,
        swiglu=swiglu,
        add_rms_norm_modulate=add_rms_norm_modulate,
        names=names,
    )
