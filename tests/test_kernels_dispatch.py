"""Kernel dispatch (one choice per op from config + stack) and the SDPA attention path."""

from __future__ import annotations

import math

import pytest
import torch

from sfd_train.config.base import ConfigError, from_mapping
from sfd_train.kernels import REFERENCE_OPS, KernelConfig, build_kernel_ops, reference
from sfd_train.kernels.attention import make_sdpa_attention, sdpa_attention

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _qkv(shape, dtype, device="cpu", seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(shape, generator=gen, device=device).to(dtype) for _ in range(3)]


def _check_attention(fn, q, k, v):
    """Forward and all three gradients of ``fn`` vs the reference in float64."""
    tol = TOL[q.dtype]
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    grad = torch.randn(out.shape, generator=torch.Generator(device=q.device).manual_seed(9), device=q.device).to(out.dtype)
    out.backward(grad)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = reference.attention(*ref_leaves)
    ref.backward(grad.double())
    assert out.dtype == q.dtype and out.shape == q.shape
    assert rel_err(out, ref) < tol, rel_err(out, ref)
    for name, a, b in zip("qkv", leaves, ref_leaves):
        assert rel_err(a.grad, b.grad) < 2 * tol, (name, rel_err(a.grad, b.grad))


# --------------------------------------------------------------------------- dispatch


def test_cpu_auto_choice(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ops = build_kernel_ops()
    assert ops.names == {"rms_norm": "reference", "attention": "sdpa", "rope": "reference",
                         "qk_norm_rope": "separate", "swiglu": "reference",
                         "add_rms_norm": "separate"}
    assert ops.rms_norm is reference.rms_norm and ops.rms_norm_modulate is reference.rms_norm_modulate
    assert ops.apply_rope is reference.apply_rope and ops.attention is sdpa_attention
    assert build_kernel_ops(KernelConfig(attention="reference"), "cpu").attention is reference.attention


def test_reference_ops_are_the_default():
    assert REFERENCE_OPS.rms_norm is reference.rms_norm and REFERENCE_OPS.attention is reference.attention


def test_cuda_auto_choice_without_cuda_hardware(monkeypatch):
    """The CUDA column of the table is chosen from the stack, without touching a GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    from sfd_train.kernels import rope, triton_rms_norm

    ops = build_kernel_ops(KernelConfig(sdpa_backends=["cudnn", "flash"], inside_compile="kernels"), "cuda")
    assert ops.names == {"rms_norm": "triton", "attention": "sdpa[cudnn,flash]", "rope": "triton",
                         "qk_norm_rope": "separate", "swiglu": "reference",
                         "add_rms_norm": "separate"}
    assert ops.rms_norm is triton_rms_norm.rms_norm and ops.apply_rope is rope.apply_rope
    ops = build_kernel_ops(device_type="cuda")
    assert ops.names == {"rms_norm": "triton(compiled: inductor)", "attention": "sdpa",
                         "rope": "triton(compiled: inductor)", "qk_norm_rope": "separate", "swiglu": "reference",
                         "add_rms_norm": "separate"}
    assert ops.rms_norm.__wrapped__ is triton_rms_norm.rms_norm
    assert ops.rms_norm_modulate.__wrapped__ is triton_rms_norm.rms_norm_modulate
    assert ops.apply_rope.__wrapped__ is rope.apply_rope


def test_separate_qk_norm_rope_composes_the_chosen_ops(monkeypatch):
    """'separate' is the reference composition of whatever rms_norm and rope were chosen (auto: separate)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    from sfd_train.kernels import qk_norm_rope, rope, triton_rms_norm

    ops = build_kernel_ops(KernelConfig(inside_compile="kernels"), "cuda")
    assert ops.qk_norm_rope.func is reference.qk_norm_rope
    assert ops.qk_norm_rope.keywords == {"norm": triton_rms_norm.rms_norm, "rotate": rope.apply_rope}
    assert REFERENCE_OPS.qk_norm_rope.keywords == {"norm": reference.rms_norm, "rotate": reference.apply_rope}
    fused = build_kernel_ops(KernelConfig(qk_norm_rope="triton"), "cuda")
    assert fused.qk_norm_rope is qk_norm_rope.qk_norm_rope and fused.names["qk_norm_rope"] == "triton"


def test_swiglu_choice(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    from sfd_train.kernels import swiglu

    assert build_kernel_ops(device_type="cuda").swiglu is reference.swiglu  # auto: the reference, for now
    ops = build_kernel_ops(KernelConfig(swiglu="triton"), "cuda")
    assert ops.swiglu is swiglu.swiglu and ops.names["swiglu"] == "triton"


def test_add_rms_norm_choice(monkeypatch):
    """'separate' (auto) adds, then calls the chosen norm + modulation; 'triton' is the fused kernel."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    from sfd_train.kernels import triton_rms_norm

    ops = build_kernel_ops(KernelConfig(inside_compile="kernels"), "cuda")
    assert ops.add_rms_norm_modulate.func is reference.add_rms_norm_modulate
    assert ops.add_rms_norm_modulate.keywords == {"norm_modulate": triton_rms_norm.rms_norm_modulate}
    fused = build_kernel_ops(KernelConfig(add_rms_norm="triton"), "cuda")
    assert fused.add_rms_norm_modulate is triton_rms_norm.add_rms_norm_modulate
    assert fused.names["add_rms_norm"] == "triton"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="kernels.add_rms_norm.*needs a CUDA device"):
        build_kernel_ops(KernelConfig(add_rms_norm="triton"), "cpu")


def test_reference_add_rms_norm_is_the_block_expression():
    """The composed op computes what the block computed before the fusion: the add, then the norm of the sum."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 16, generator=g)
    branch, gate = torch.randn(2, 5, 16, generator=g).bfloat16(), torch.randn(2, 16, generator=g).bfloat16()
    w, shift, scale = torch.randn(16, generator=g), torch.randn(2, 16, generator=g), torch.randn(2, 16, generator=g)
    x_new, y = reference.add_rms_norm_modulate(x, branch, gate, w, shift, scale, 1e-6)
    expected = x + gate.unsqueeze(1) * branch
    assert x_new.dtype == torch.float32 and torch.equal(x_new, expected)
    assert torch.equal(y, reference.rms_norm_modulate(expected, w, shift, scale, 1e-6))


def test_reference_swiglu_is_the_model_expression():
    g = torch.Generator().manual_seed(0)
    x, weight, bias = torch.randn(2, 5, 8, generator=g), torch.randn(12, 8, generator=g), torch.randn(12, generator=g)
    x12 = torch.nn.functional.linear(x, weight, bias)
    assert torch.equal(reference.swiglu(x, weight, bias), torch.nn.functional.silu(x12[..., :6]) * x12[..., 6:])


def test_reference_qk_norm_rope_is_the_model_expression():
    """The reference op is exactly what the published model computes: Linear, permute, unbind, norm, RoPE, cast."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 64, generator=g).bfloat16()
    weight, bias = torch.randn(192, 64, generator=g).bfloat16(), torch.randn(192, generator=g).bfloat16()
    qw, kw = torch.randn(16, generator=g), torch.randn(16, generator=g)
    cos, sin = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    q, k, v = reference.qk_norm_rope(x, weight, bias, 4, qw, kw, (cos, sin), 1e-6)
    heads = torch.nn.functional.linear(x, weight, bias).reshape(2, 6, 3, 4, 16).permute(2, 0, 3, 1, 4)
    assert torch.equal(v, heads[2])
    expected_q = reference.apply_rope(reference.rms_norm(heads[0], qw, 1e-6), cos, sin).to(torch.bfloat16)
    assert q.dtype == torch.bfloat16 and torch.equal(q, expected_q)
    expected_k = reference.rms_norm(heads[1], kw, 1e-6)
    assert torch.equal(reference.qk_norm_rope(x, weight, bias, 4, qw, kw, None)[1], expected_k)


class _GraphRecorder:
    """A torch.compile backend that keeps the FX code and runs the graph (or refuses to)."""

    def __init__(self, run: bool):
        self.code, self.run = [], run

    def __call__(self, gm, example_inputs):
        self.code.append(gm.code)
        if not self.run:
            raise RuntimeError("recorded, not run")
        return gm.forward


def _norm_rope_block(ops):
    def block(x, w, qw, shift, scale, cos, sin):
        h = ops.rms_norm_modulate(x, w, shift, scale)
        q = ops.rms_norm(h.unflatten(-1, (2, -1)).transpose(1, 2), qw)
        return ops.apply_rope(q, cos, sin)

    g = torch.Generator().manual_seed(0)
    args = [torch.randn(s, generator=g) for s in ((2, 6, 32), (32,), (16,), (2, 32), (2, 32), (6, 16), (6, 16))]
    return block, args


def _cuda_ops(monkeypatch, config=None):
    """The ops 'cuda' gets, built on this machine (CUDA pretended only while building)."""
    with monkeypatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: True)
        return build_kernel_ops(config, "cuda")


def test_compiled_cuda_ops_trace_the_reference_by_default(monkeypatch):
    """Inside torch.compile the default CUDA ops are the reference expression (a trace-time choice):
    the graph holds no custom op, and it even runs on CPU tensors, matching the reference."""
    torch._dynamo.reset()
    block, args = _norm_rope_block(_cuda_ops(monkeypatch))
    recorder = _GraphRecorder(run=True)
    out = torch.compile(block, backend=recorder, fullgraph=True)(*args)
    assert recorder.code and "sfd_kernels" not in recorder.code[0]
    ref_block, _ = _norm_rope_block(REFERENCE_OPS)
    assert rel_err(out, ref_block(*args)) < 1e-6


def test_compiled_cuda_ops_call_the_kernels_when_asked(monkeypatch):
    torch._dynamo.reset()
    block, args = _norm_rope_block(_cuda_ops(monkeypatch, KernelConfig(inside_compile="kernels")))
    recorder = _GraphRecorder(run=False)
    with pytest.raises(Exception, match="recorded, not run"):
        torch.compile(block, backend=recorder, fullgraph=True)(*args)
    code = recorder.code[0]
    assert code.count("sfd_kernels.rms_norm_fwd") == 2 and "sfd_kernels.rope" in code


@pytest.mark.parametrize(
    "config, key, reason",
    [
        (KernelConfig(rms_norm="triton"), "kernels.rms_norm", "CUDA"),
        (KernelConfig(rms_norm="apex"), "kernels.rms_norm", "CUDA"),
        (KernelConfig(rms_norm="npu"), "kernels.rms_norm", "torch_npu"),
        (KernelConfig(attention="npu"), "kernels.attention", "torch_npu"),
        (KernelConfig(rope="triton"), "kernels.rope", "CUDA"),
        (KernelConfig(qk_norm_rope="triton"), "kernels.qk_norm_rope", "CUDA"),
        (KernelConfig(qk_norm_rope="fused"), "kernels.qk_norm_rope", "unknown"),
        (KernelConfig(swiglu="triton"), "kernels.swiglu", "CUDA"),
        (KernelConfig(swiglu="fused"), "kernels.swiglu", "unknown"),
        (KernelConfig(sdpa_backends=["fast"]), "kernels.sdpa_backends", "unknown"),
        (KernelConfig(inside_compile="never"), "kernels.inside_compile", "unknown"),
    ],
)
def test_impossible_explicit_choice_is_a_config_error(monkeypatch, config, key, reason):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=reason) as info:
        build_kernel_ops(config, "cpu")
    assert info.value.key == key


def test_config_section_parses_and_rejects():
    cfg = from_mapping(KernelConfig, {"rms_norm": "triton", "attention": "sdpa", "sdpa_backends": ["cudnn", "flash"]})
    assert cfg.sdpa_backends == ["cudnn", "flash"] and cfg.rope == "auto"
    with pytest.raises(ConfigError, match="rms_norm"):
        from_mapping(KernelConfig, {"rms_norm": "cuda"})
    with pytest.raises(ConfigError, match=r"sdpa_backends\[0\]"):
        from_mapping(KernelConfig, {"sdpa_backends": ["fast"]})


def test_kernel_ops_is_frozen():
    with pytest.raises(Exception):
        REFERENCE_OPS.rms_norm = None  # type: ignore[misc]


# --------------------------------------------------------------------------- SDPA on the CPU


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 6, 16, 16), (1, 2, 33, 64), (2, 2, 16, 72), (1, 3, 20, 96)])
def test_sdpa_matches_reference_cpu(dtype, shape):
    _check_attention(sdpa_attention, *_qkv(shape, dtype))


def test_pinned_math_backend_cpu():
    _check_attention(make_sdpa_attention(["math"]), *_qkv((2, 2, 8, 16), torch.float32))


def test_sdpa_scale_is_one_over_sqrt_head_dim():
    q, k, v = _qkv((1, 1, 4, 16), torch.float64)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(16)
    torch.testing.assert_close(sdpa_attention(q, k, v), scores.softmax(-1) @ v)


def test_model_with_cpu_auto_ops_matches_reference_ops(monkeypatch):
    """The ops 'auto' picks on a CPU change the model's output only by fp32 rounding."""
    from sfd_train.config.schema import ModelConfig
    from sfd_train.models import build_model

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = ModelConfig(size="custom", depth=2, hidden_size=96, num_heads=6, input_size=4, num_classes=10,
                      repa_projector_dim=32, repa_depth=1)
    torch.manual_seed(0)
    ref_model = build_model(cfg, REFERENCE_OPS).eval()
    auto_model = build_model(cfg, build_kernel_ops()).eval()
    auto_model.load_state_dict(ref_model.state_dict())
    with torch.no_grad():
        for p, q in zip(ref_model.parameters(), auto_model.parameters()):
            noise = 0.05 * torch.randn_like(p)
            p.add_(noise)
            q.add_(noise)
    x, t, y = torch.randn(2, 48, 4, 4), torch.rand(2), torch.tensor([1, 10])
    with torch.no_grad():
        assert rel_err(auto_model(x, t, t, y), ref_model(x, t, t, y)) < 1e-5


# --------------------------------------------------------------------------- SDPA on CUDA

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 72, 96])
@pytest.mark.parametrize("backend", [None, "flash", "cudnn", "efficient"])
def test_sdpa_cuda(dtype, head_dim, backend):
    if dtype == torch.float32 and backend in ("flash", "cudnn"):
        pytest.skip("flash and cuDNN attention take fp16/bf16 only")
    fn = make_sdpa_attention([backend] if backend else [])
    q, k, v = _qkv((4, 1152 // head_dim, 256, head_dim), dtype, "cuda")
    try:
        _check_attention(fn, q, k, v)
    except RuntimeError as err:
        if "No available kernel" in str(err):
            pytest.skip(f"SDPA backend {backend} is not available here: {str(err)[:200]}")
        raise


@pytest.mark.cuda
@requires_cuda
def test_sdpa_cuda_under_autocast_and_compile():
    q, k, v = _qkv((4, 16, 256, 72), torch.float32, "cuda")
    fn = torch.compile(sdpa_attention, fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = fn(q, k, v)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, reference.attention(q.double(), k.double(), v.double())) < TOL[torch.bfloat16]
