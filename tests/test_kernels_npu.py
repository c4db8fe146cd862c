"""The Ascend (torch_npu) and NVIDIA apex paths, tested without either installed.

Stand-in modules replace ``torch_npu`` and ``apex``. Each stand-in enforces the
documented signature (argument names, required arguments, layout string, head count,
dtypes) and computes the reference result with the scale it was given, so a wrong or
missing argument either raises or produces a result the comparison with the reference
rejects. Documented signatures (Ascend's torch_npu API reference; apex's
``apex/normalization/fused_layer_norm.py``):

- ``torch_npu.npu_rms_norm(Tensor self, Tensor gamma, float epsilon=1e-06) -> (Tensor, Tensor)``;
  fp16/bf16/fp32; gamma has self's dtype; returns ``(y, rstd)``.
- ``torch_npu.npu_fusion_attention(query, key, value, head_num, input_layout, pse=None,
  padding_mask=None, atten_mask=None, scale=1., keep_prob=1., pre_tockens=2147483647,
  next_tockens=2147483647, inner_precise=0, prefix=None, actual_seq_qlen=None,
  actual_seq_kvlen=None, sparse_mode=0, gen_mask_parallel=True, sync=False)`` -> 7-tuple,
  the first element the attention output.
- ``apex.normalization.fused_layer_norm.fused_rms_norm_affine(input, weight,
  normalized_shape, eps=1e-6, memory_efficient=False)`` and ``fused_rms_norm(input,
  normalized_shape, eps=1e-6, memory_efficient=False)``.
"""

from __future__ import annotations

import importlib.machinery
import math
import subprocess
import sys
import types

import pytest
import torch

from sfd_train.config.base import ConfigError
from sfd_train.kernels import KernelConfig, build_kernel_ops, detect_device_type, reference

NPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Relative L2 error allowed against the float64 reference, per dtype.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# --------------------------------------------------------------------------- stand-in torch_npu


def _module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    # A spec, so importlib.util.find_spec finds it as it would an installed package.
    module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
    return module


def _check_tensor(name: str, t, dtypes=NPU_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: dtype {t.dtype} not supported (documented: {dtypes})")


def make_fake_torch_npu(calls: list) -> types.ModuleType:
    npu = _module("torch_npu")

    def npu_rms_norm(self, gamma, epsilon=1e-06):
        _check_tensor("self", self)
        _check_tensor("gamma", gamma)
        if gamma.dtype != self.dtype:
            raise TypeError(f"gamma dtype {gamma.dtype} must equal self dtype {self.dtype}")
        if tuple(gamma.shape) != tuple(self.shape[self.dim() - gamma.dim():]):
            raise ValueError(f"gamma {tuple(gamma.shape)} must match the last dims of self {tuple(self.shape)}")
        if not isinstance(epsilon, float):
            raise TypeError("epsilon must be a float")
        calls.append("npu_rms_norm")
        x32 = self.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + epsilon)
        return (x32 * rstd * gamma.float()).to(self.dtype), rstd

    def npu_fusion_attention(
        query, key, value, head_num, input_layout, pse=None, padding_mask=None, atten_mask=None,
        scale=1.0, keep_prob=1.0, pre_tockens=2147483647, next_tockens=2147483647, inner_precise=0,
        prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0,
        gen_mask_parallel=True, sync=False,
    ):
        for name, t in (("query", query), ("key", key), ("value", value)):
            _check_tensor(name, t)
        if not query.dtype == key.dtype == value.dtype:
            raise TypeError(f"query/key/value dtypes differ: {query.dtype}, {key.dtype}, {value.dtype}")
        if input_layout not in ("BSH", "SBH", "BSND", "BNSD", "TND"):
            raise ValueError(f"unknown input_layout {input_layout!r}")
        if input_layout != "BNSD":
            raise NotImplementedError("the stand-in implements BNSD only")
        if query.dim() != 4 or key.shape != query.shape or value.shape != query.shape:
            raise ValueError("BNSD expects 4-D query/key/value of one shape")
        if not isinstance(head_num, int) or head_num != query.shape[1]:
            raise ValueError(f"head_num={head_num!r} must be the N of BNSD ({query.shape[1]})")
        if padding_mask is not None:
            raise ValueError("padding_mask is not supported")
        if not isinstance(scale, float) or not isinstance(keep_prob, float):
            raise TypeError("scale and keep_prob are host-side doubles")
        if keep_prob != 1.0:
            raise ValueError("the stand-in has no dropout: keep_prob must be 1.0")
        if pse is not None or atten_mask is not None or sparse_mode != 0 or prefix is not None:
            raise ValueError("the stand-in computes dense, unmasked attention only")
        calls.append("npu_fusion_attention")
        scores = torch.matmul(query.float(), key.float().transpose(-2, -1)) * scale
        out = torch.matmul(scores.softmax(-1), value.float()).to(query.dtype)
        empty = query.new_empty(0)
        return out, empty, empty, empty, 0, 0, 0

    npu.npu_rms_norm = npu_rms_norm
    npu.npu_fusion_attention = npu_fusion_attention
    return npu


@pytest.fixture
def fake_npu(monkeypatch):
    """An 'Ascend' stack: torch_npu importable, torch.npu.is_available() True, no CUDA."""
    calls: list = []
    monkeypatch.setitem(sys.modules, "torch_npu", make_fake_torch_npu(calls))
    monkeypatch.setattr(torch, "npu", types.SimpleNamespace(is_available=lambda: True), raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return calls


# --------------------------------------------------------------------------- stand-in apex


def make_fake_apex(calls: list) -> dict[str, types.ModuleType]:
    apex, normalization, fused = _module("apex"), _module("apex.normalization"), _module("apex.normalization.fused_layer_norm")

    def _check_shape(input, normalized_shape):
        if not isinstance(normalized_shape, (tuple, list, torch.Size)):
            raise TypeError("normalized_shape must be a tuple/list/torch.Size")
        if tuple(input.shape[input.dim() - len(normalized_shape):]) != tuple(normalized_shape):
            raise ValueError(f"normalized_shape {tuple(normalized_shape)} does not end input {tuple(input.shape)}")

    def _norm(input, normalized_shape, eps):
        dims = tuple(range(-len(normalized_shape), 0))
        x32 = input.float()
        return x32 * torch.rsqrt(x32.pow(2).mean(dims, keepdim=True) + eps)

    def fused_rms_norm_affine(input, weight, normalized_shape, eps=1e-6, memory_efficient=False):
        _check_tensor("input", input)
        _check_tensor("weight", weight)
        _check_shape(input, normalized_shape)
        if tuple(weight.shape) != tuple(normalized_shape):
            raise ValueError(f"weight {tuple(weight.shape)} must have normalized_shape {tuple(normalized_shape)}")
        if weight.dtype != input.dtype:
            raise TypeError("the non-mixed apex kernel needs weight.dtype == input.dtype")
        calls.append("fused_rms_norm_affine")
        return (_norm(input, normalized_shape, eps) * weight.float()).to(input.dtype)

    def fused_rms_norm(input, normalized_shape, eps=1e-6, memory_efficient=False):
        _check_tensor("input", input)
        _check_shape(input, normalized_shape)
        calls.append("fused_rms_norm")
        return _norm(input, normalized_shape, eps).to(input.dtype)

    class FusedRMSNorm(torch.nn.Module):
        def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, memory_efficient=False):
            super().__init__()
            self.normalized_shape = torch.Size((normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape)
            self.eps = eps
            self.weight = torch.nn.Parameter(torch.ones(self.normalized_shape)) if elementwise_affine else None

        def forward(self, input):
            if self.weight is None:
                return fused_rms_norm(input, self.normalized_shape, self.eps)
            return fused_rms_norm_affine(input, self.weight, self.normalized_shape, self.eps)

    fused.fused_rms_norm_affine = fused_rms_norm_affine
    fused.fused_rms_norm = fused_rms_norm
    fused.FusedRMSNorm = FusedRMSNorm
    normalization.FusedRMSNorm = FusedRMSNorm
    normalization.fused_layer_norm = fused
    apex.normalization = normalization
    return {"apex": apex, "apex.normalization": normalization, "apex.normalization.fused_layer_norm": fused}


@pytest.fixture
def fake_apex(monkeypatch):
    """A CUDA stack with apex installed (the ops themselves run on CPU tensors)."""
    calls: list = []
    for name, module in make_fake_apex(calls).items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return calls


# --------------------------------------------------------------------------- helpers


def _norm_inputs(dtype, batch=2, tokens=5, dim=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, dim, generator=g).to(dtype)
    weight = (1 + 0.2 * torch.randn(dim, generator=g))  # fp32 parameter, as in the model
    shift = torch.randn(batch, dim, generator=g).to(dtype)
    scale = (0.3 * torch.randn(batch, dim, generator=g)).to(dtype)
    return x, weight, shift, scale


def _check_against_reference(fn, ref_fn, inputs, dtype, tol=None):
    """Forward and backward of ``fn`` vs ``ref_fn`` in float64 on the same inputs."""
    tol = tol or TOL[dtype]
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    out = fn(*leaves)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    out.backward(grad_out)
    ref_leaves = [t.detach().double().requires_grad_() if t is not None else None for t in inputs]
    ref_out = ref_fn(*ref_leaves)
    ref_out.backward(grad_out.double())
    assert rel_err(out, ref_out) < tol, f"forward error {rel_err(out, ref_out):.2e}"
    for i, (a, b) in enumerate(zip(leaves, ref_leaves)):
        if a is not None:
            # Gradients of low-precision inputs carry two roundings; allow twice the tolerance.
            assert rel_err(a.grad, b.grad) < 2 * tol, f"grad of input {i}: error {rel_err(a.grad, b.grad):.2e}"


# --------------------------------------------------------------------------- Ascend


def test_ascend_stack_is_detected_and_npu_ops_chosen(fake_npu):
    assert detect_device_type() == "npu"
    ops = build_kernel_ops(KernelConfig())
    assert ops.names == {"rms_norm": "npu", "attention": "npu", "rope": "reference",
                         "qk_norm_rope": "separate", "swiglu": "reference",
                         "add_rms_norm": "separate"}


@pytest.mark.parametrize("dtype", NPU_DTYPES)
def test_npu_rms_norm_matches_reference(fake_npu, dtype):
    ops = build_kernel_ops(KernelConfig(rms_norm="npu"), "npu")
    x, weight, shift, scale = _norm_inputs(dtype)
    _check_against_reference(ops.rms_norm, reference.rms_norm, (x, weight), dtype)
    _check_against_reference(ops.rms_norm_modulate, reference.rms_norm_modulate, (x, weight, shift, scale), dtype)
    _check_against_reference(
        lambda x, w, s: ops.rms_norm_modulate(x, w, None, s), lambda x, w, s: reference.rms_norm_modulate(x, w, None, s),
        (x, weight, scale), dtype,
    )
    assert fake_npu.count("npu_rms_norm") == 3  # one forward per check; the reference never calls it
    # A strided q view (heads split from qkv) and no weight.
    q = torch.randn(2, 7, 3, 4, 16).to(dtype).permute(2, 0, 3, 1, 4)[0]
    assert rel_err(ops.rms_norm(q, None), reference.rms_norm(q.double(), None)) < TOL[dtype]


@pytest.mark.parametrize("dtype", NPU_DTYPES)
@pytest.mark.parametrize("head_dim", [16, 64, 72, 96])
def test_npu_fusion_attention_matches_reference(fake_npu, dtype, head_dim):
    ops = build_kernel_ops(KernelConfig(attention="npu"), "npu")
    g = torch.Generator().manual_seed(head_dim)
    q, k, v = (torch.randn(2, 3, 10, head_dim, generator=g).to(dtype) for _ in range(3))
    _check_against_reference(ops.attention, reference.attention, (q, k, v), dtype)
    assert "npu_fusion_attention" in fake_npu


def test_npu_attention_casts_to_autocast_dtype(fake_npu):
    ops = build_kernel_ops(KernelConfig(attention="npu"), "npu")
    q, k = torch.randn(2, 2, 4, 16), torch.randn(2, 2, 4, 16)
    v = torch.randn(2, 2, 4, 16).bfloat16()
    # The kernel takes one dtype: without autocast the wrapper unifies to q's dtype.
    assert ops.attention(q, k, v).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):  # on Ascend this is autocast("npu")
        out = ops.attention(q, k, v)
    assert out.dtype == torch.bfloat16


def test_fake_torch_npu_rejects_wrong_arguments(fake_npu):
    """The stand-in is strict enough that a wrong call in our wrapper would fail."""
    import torch_npu

    q = torch.randn(2, 4, 8, 16)
    with pytest.raises(ValueError, match="head_num"):
        torch_npu.npu_fusion_attention(q, q, q, 2, "BNSD", scale=0.25)
    with pytest.raises(NotImplementedError):
        torch_npu.npu_fusion_attention(q, q, q, 4, "BSND", scale=0.25)
    with pytest.raises(ValueError, match="keep_prob"):
        torch_npu.npu_fusion_attention(q, q, q, 4, "BNSD", scale=0.25, keep_prob=0.9)
    with pytest.raises(TypeError):
        torch_npu.npu_fusion_attention(q, q, q, 4, "BNSD", scale=0.25, keep_probability=1.0)
    with pytest.raises(TypeError, match="dtype"):
        torch_npu.npu_fusion_attention(q.double(), q.double(), q.double(), 4, "BNSD", scale=0.25)
    # Without the explicit scale the kernel uses 1.0, which the reference comparison catches.
    unscaled = torch_npu.npu_fusion_attention(q, q, q, 4, "BNSD")[0]
    assert rel_err(unscaled, reference.attention(q, q, q)) > 1e-3
    x, w = torch.randn(3, 16), torch.randn(16)
    with pytest.raises(TypeError):
        torch_npu.npu_rms_norm(x, w, eps=1e-6)  # the keyword is 'epsilon'
    with pytest.raises(TypeError, match="gamma dtype"):
        torch_npu.npu_rms_norm(x.bfloat16(), w, epsilon=1e-6)


def test_model_runs_on_npu_ops(fake_npu):
    """A tiny model built with the NPU ops matches the reference ops, forward and backward."""
    from sfd_train.config.schema import ModelConfig
    from sfd_train.kernels import REFERENCE_OPS
    from sfd_train.models import build_model

    cfg = ModelConfig(size="custom", depth=2, hidden_size=96, num_heads=6, input_size=4, num_classes=10,
                      repa_projector_dim=32, repa_depth=1)
    torch.manual_seed(0)
    ref_model = build_model(cfg, REFERENCE_OPS).train()
    npu_model = build_model(cfg, build_kernel_ops(KernelConfig(), "npu")).train()
    npu_model.load_state_dict(ref_model.state_dict())
    _perturb(ref_model, npu_model)
    x, t_tex, t_sem, y = torch.randn(2, 48, 4, 4), torch.rand(2), torch.rand(2), torch.tensor([1, 10])
    outs = []
    for model in (ref_model, npu_model):
        torch.manual_seed(1)  # label dropout draws the same mask
        velocity, repa = model(x, t_tex, t_sem, y)
        (velocity.square().mean() + repa.square().mean()).backward()
        outs.append((velocity, repa, model.blocks[0].attn.qkv.weight.grad, model.blocks[1].norm1.weight.grad))
    for a, b in zip(*outs):
        assert rel_err(b, a) < 1e-5
    assert "npu_rms_norm" in fake_npu and "npu_fusion_attention" in fake_npu


def _perturb(*models):
    """Moves zero-initialised weights (adaLN, final layer) off zero, identically in each model."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        noise = [0.05 * torch.randn(p.shape, generator=g) for p in models[0].parameters()]
        for model in models:
            for p, n in zip(model.parameters(), noise):
                if p.requires_grad:
                    p.add_(n)


def test_explicit_npu_without_torch_npu_is_a_config_error():
    with pytest.raises(ConfigError, match=r"kernels\.rms_norm.*torch_npu"):
        build_kernel_ops(KernelConfig(rms_norm="npu"), "npu")
    with pytest.raises(ConfigError, match=r"kernels\.attention.*torch_npu"):
        build_kernel_ops(KernelConfig(rms_norm="reference", attention="npu"), "npu")


def test_explicit_npu_without_device_is_a_config_error(fake_npu, monkeypatch):
    monkeypatch.setattr(torch, "npu", types.SimpleNamespace(is_available=lambda: False), raising=False)
    with pytest.raises(ConfigError, match=r"kernels\.rms_norm.*is_available"):
        build_kernel_ops(KernelConfig(rms_norm="npu"), "npu")
    assert detect_device_type() == "cpu"


def test_backends_are_imported_lazily():
    """Importing our modules and building ops for the CPU imports no backend."""
    code = (
        "import sys; import sfd_train.kernels as k; import sfd_train.kernels.npu, sfd_train.kernels.apex, "
        "sfd_train.kernels.attention; k.build_kernel_ops(device_type='cpu'); k.detect_device_type(); "
        "bad = [m for m in ('torch_npu', 'apex', 'sfd_train.kernels.triton_rms_norm', 'sfd_train.kernels.rope') "
        "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- apex


@pytest.mark.parametrize("dtype", NPU_DTYPES)
def test_apex_rms_norm_matches_reference(fake_apex, dtype):
    ops = build_kernel_ops(KernelConfig(rms_norm="apex", rope="reference"), "cuda")
    assert ops.names["rms_norm"].startswith("apex")
    x, weight, shift, scale = _norm_inputs(dtype, dim=1152)
    _check_against_reference(ops.rms_norm, reference.rms_norm, (x, weight), dtype)
    _check_against_reference(ops.rms_norm_modulate, reference.rms_norm_modulate, (x, weight, shift, scale), dtype)
    _check_against_reference(lambda x: ops.rms_norm(x, None), lambda x: reference.rms_norm(x, None), (x,), dtype)
    assert fake_apex.count("fused_rms_norm_affine") == 2 and fake_apex.count("fused_rms_norm") == 1


def test_auto_on_cuda_falls_back_to_apex_then_reference(fake_apex, monkeypatch):
    from sfd_train.kernels import dispatch

    monkeypatch.setattr(dispatch, "_triton_importable", lambda: False)
    assert build_kernel_ops(KernelConfig(), "cuda").names["rms_norm"] == "apex(compiled: inductor)"
    for name in ("apex", "apex.normalization", "apex.normalization.fused_layer_norm"):
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: "import apex" raises ImportError
    with pytest.warns(UserWarning, match="falls back"):
        assert build_kernel_ops(KernelConfig(), "cuda").names["rms_norm"] == "reference"
    with pytest.raises(ConfigError, match=r"kernels\.rms_norm.*apex"):
        build_kernel_ops(KernelConfig(rms_norm="apex"), "cuda")


def test_fake_apex_rejects_wrong_arguments(fake_apex):
    from apex.normalization.fused_layer_norm import fused_rms_norm_affine

    x, w = torch.randn(4, 8), torch.randn(8)
    with pytest.raises(ValueError):
        fused_rms_norm_affine(x, w, (4,))
    with pytest.raises(TypeError):
        fused_rms_norm_affine(x, w, 8)  # normalized_shape must be a shape
    with pytest.raises(TypeError):
        fused_rms_norm_affine(x.half(), w, (8,))
    assert math.isclose(fused_rms_norm_affine(x, w, (8,)).norm().item(), reference.rms_norm(x, w).norm().item(), rel_tol=1e-6)
