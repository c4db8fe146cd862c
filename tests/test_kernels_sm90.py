"""Every Triton kernel compiles for an H100 (sm_90) on this GPU-less machine, without register spills.

The interpreter (tests/test_kernels_triton.py) checks what the kernels compute, but it runs them
as numpy and accepts code that the real compiler rejects, and it says nothing of registers.
Here each launcher runs on meta tensors of the XL model's real shapes with a ``launch`` that
records the kernel, its arguments and its constexprs instead of launching. The recorded launch
is compiled ahead of time with Triton's own ptxas for sm_90, and the cubin's resource usage
(read with the cuobjdump that the triton wheel bundles) must show no stack frame, hence no spills,
under the 255-register ceiling. A spilling memory-bound kernel loses a large part of its bandwidth,
so a tile change that spills fails here, before any GPU time is spent on it.
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest
import torch
import triton  # a test extra: missing, the suite fails here rather than skipping
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

H100 = GPUTarget("cuda", 90, 32)
H100_SMS = 132
POINTER_TYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}


class _RecordedLaunch:
    """Stands in for ``wrap_triton`` / the identity: ``launch(kernel)[grid](*args, **kwargs)`` records instead."""

    def __init__(self):
        self.launches: list = []

    def __call__(self, kernel):
        def with_grid(grid):
            return lambda *args, **kwargs: self.launches.append((kernel, args, kwargs))

        return type("Grid", (), {"__getitem__": lambda _, grid: with_grid(grid)})()


def _signature(kernel, args, kwargs):
    """Triton's AOT signature and constexprs for one recorded launch."""
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    signature, constexprs = {}, dict(kwargs)
    for name, value in zip(kernel.arg_names, args):
        if isinstance(value, torch.Tensor):
            signature[name] = POINTER_TYPES[value.dtype]
        elif value is None:
            constexprs[name] = None
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{kernel.fn.__name__}: argument {name}={value!r} has no AOT type here")
    signature.update({name: "constexpr" for name in constexprs})
    return signature, constexprs, options


def _resource_usage(kernel, args, kwargs) -> dict:
    signature, constexprs, options = _signature(kernel, args, dict(kwargs))
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=H100,
                              options=options)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"sfd-{kernel.fn.__name__}-{os.getpid()}.cubin")
    with open(path, "wb") as f:
        f.write(compiled.asm["cubin"])
    try:
        text = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.remove(path)
    return {key: int(value) for key, value in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}


def _meta(shape, dtype=torch.bfloat16):
    return torch.empty(shape, dtype=dtype, device="meta")


def _launches_at_xl_shapes(monkeypatch) -> dict:
    """Every kernel launch of the XL/1 step at batch 32 (1152 channels, 16 heads of 72), recorded."""
    from sfd_train.kernels import qk_norm_rope, rope, swiglu, triton_rms_norm

    monkeypatch.setattr(triton_rms_norm, "_target_programs", lambda device: 4 * H100_SMS)
    monkeypatch.setattr(qk_norm_rope, "_target_programs", lambda device: 4 * H100_SMS)
    monkeypatch.setattr(swiglu, "_target_programs", lambda device: 4 * H100_SMS)
    recorded: dict = {}

    def record(name, fn, *args, **kwargs):
        launch = _RecordedLaunch()
        fn(*args, launch=launch, **kwargs)
        (recorded[name],) = launch.launches

    batch, tokens, dim = 32, 256, 1152
    weight, modulation = _meta((dim,), torch.float32), _meta((batch, dim))
    residual = _meta((batch, tokens, dim), torch.float32)  # the fp32 residual stream
    record("rms_norm_modulate fwd", triton_rms_norm._fwd, residual, weight, modulation, modulation, 1e-6,
           torch.bfloat16)
    rstd = _meta((batch, tokens), torch.float32)
    record("rms_norm_modulate bwd", triton_rms_norm._bwd, _meta((batch, tokens, dim)), residual, weight, True,
           modulation, rstd)
    branch = _meta((batch, tokens, dim))  # the attention's or MLP's bf16 output, and its bf16 gate
    record("add_rms_norm fwd", triton_rms_norm._fwd, residual, weight, modulation, modulation, 1e-6, torch.bfloat16,
           residual=(branch, modulation))
    record("add_rms_norm bwd", triton_rms_norm._bwd, _meta((batch, tokens, dim)), residual, weight, True,
           modulation, rstd, residual=(branch, modulation), dx_out=residual)
    for head_dim in (64, 72, 96):
        heads = dim // head_dim
        qkv = _meta((batch, tokens, 3, heads, head_dim))
        q_view = qkv.permute(2, 0, 3, 1, 4)[0]
        head_weight, tables = _meta((head_dim,), torch.float32), _meta((tokens, head_dim), torch.float32)
        record(f"q/k rms_norm fwd, head {head_dim}", triton_rms_norm._fwd, q_view, head_weight, None, None, 1e-6,
               torch.bfloat16)
        record(f"q/k rms_norm bwd, head {head_dim}", triton_rms_norm._bwd, _meta(q_view.shape), q_view, head_weight,
               False, None, _meta(q_view.shape[:-1], torch.float32))
        record(f"rope, head {head_dim}", rope._launch, _meta(q_view.shape), tables, tables, False)
        for with_rope in (True, False):
            cos = sin = tables if with_rope else None
            tag = f"head {head_dim}{'' if with_rope else ', no rope'}"
            qkv_bias = _meta((3 * dim,), torch.float32)
            record(f"qk_norm_rope fwd, {tag}", qk_norm_rope._fwd, qkv, qkv_bias, head_weight, head_weight, cos, sin,
                   1e-6)
            heads_shape = (batch, heads, tokens, head_dim)
            record(f"qk_norm_rope bwd, {tag}", qk_norm_rope._bwd, _meta(heads_shape), _meta(heads_shape),
                   _meta(heads_shape), qkv, qkv_bias, head_weight, head_weight, cos, sin, 1e-6)
    x12 = _meta((batch, tokens, 2 * 3072))  # XL's SwiGLU: int(2/3 * 4 * 1152) = 3072 hidden units
    w12_bias = _meta((2 * 3072,), torch.float32)
    record("swiglu fwd", swiglu._fwd, x12, w12_bias)
    record("swiglu bwd", swiglu._bwd, _meta((batch, tokens, 3072)), x12, w12_bias)
    return recorded


@pytest.fixture(scope="module")
def resource_usage() -> dict:
    with pytest.MonkeyPatch.context() as monkeypatch:
        launches = _launches_at_xl_shapes(monkeypatch)
    return {name: dict(_resource_usage(*launch), WARPS=launch[2]["num_warps"], BLOCK_ROWS=launch[2].get("BLOCK_ROWS"))
            for name, launch in launches.items()}


def resident_programs(registers: int, warps: int) -> int:
    """Programs of ``warps`` warps one sm_90 multiprocessor holds at once, as its registers allow.

    64K 32-bit registers per multiprocessor, allocated per warp in units of 256 (8 per thread);
    at most 64 warps.
    """
    per_warp = -(-registers // 8) * 8 * 32
    return min(65536 // (per_warp * warps), 64 // warps)


CASES = [
    "rms_norm_modulate fwd", "rms_norm_modulate bwd", "add_rms_norm fwd", "add_rms_norm bwd",
    *(f"{op}, head {d}" for d in (64, 72, 96) for op in ("q/k rms_norm fwd", "q/k rms_norm bwd", "rope")),
    *(f"qk_norm_rope {way}, head {d}{tag}" for d in (64, 72, 96) for way in ("fwd", "bwd") for tag in ("", ", no rope")),
    "swiglu fwd", "swiglu bwd",
]


@pytest.mark.parametrize("kernel", CASES)
def test_compiles_for_sm90_without_spills(kernel, resource_usage):
    usage = resource_usage[kernel]
    assert usage["STACK"] == 0 and usage["LOCAL"] == 0, f"{kernel} spills registers on sm_90: {usage}"
    assert usage["REG"] < 255, usage


def loads_in_flight_kib(usage: dict, rows_per_program: int, bytes_per_row: int) -> float:
    """KiB of loads that the resident programs of one multiprocessor have outstanding in one step of their loop."""
    return resident_programs(usage["REG"], usage["WARPS"]) * rows_per_program * bytes_per_row / 1024


# The memory-bound row kernels hold their tile (and the backwards their sums) in registers; the
# multiprocessor needs enough bytes in flight, from all its resident programs together, to
# cover the memory latency (an H100 at 3.35 TB/s with about 1.5 us: about 38 KB per SM; an
# H200 more). Bytes per row loaded, and the floor in KiB. These tiles also meet the floors with
# triton 3.5 and 3.6, whose register counts are higher (checked by hand, 2026-12-01).
LOADS_IN_FLIGHT = {
    "add_rms_norm fwd": (1152 * (4 + 2), 48),  # the stream, branch
    "rms_norm_modulate fwd": (1152 * 4, 32),
    "q/k rms_norm fwd, head 72": (72 * 2, 16),
    "add_rms_norm bwd": (1152 * (2 + 4 + 4 + 2), 48),  # dy, x_new, the stream's gradient, branch
    "rms_norm_modulate bwd": (1152 * (2 + 4), 24),
    "q/k rms_norm bwd, head 72": (72 * (2 + 2), 16),
    "swiglu bwd": (1024 * (2 + 2 + 2), 32),  # x1, x2, dh for one column block
    # The q/k stage is bound by registers (see FWD_TILE in kernels/qk_norm_rope.py): lower floors.
    "qk_norm_rope fwd, head 72": (72 * 3 * 2, 12),  # q, k, v
    "qk_norm_rope bwd, head 72": (72 * 5 * 2, 12),  # dq, dk, dv, q, k
}


@pytest.mark.parametrize("kernel", list(LOADS_IN_FLIGHT))
def test_row_kernels_keep_enough_loads_in_flight(kernel, resource_usage):
    usage = resource_usage[kernel]
    bytes_per_row, floor_kib = LOADS_IN_FLIGHT[kernel]
    in_flight = loads_in_flight_kib(usage, usage["BLOCK_ROWS"], bytes_per_row)
    assert in_flight >= floor_kib, (kernel, usage, f"{in_flight:.0f} KiB")


def test_a_padded_row_would_fall_short(monkeypatch):
    """The check can fail: 1152 channels padded to one 2048-lane piece (2 rows, 8 warps) hold one program per SM."""
    from sfd_train.kernels import triton_rms_norm

    monkeypatch.setattr(triton_rms_norm, "_row_tile", lambda D, values: (2048, 16, 2, 8))
    monkeypatch.setattr(triton_rms_norm, "_target_programs", lambda device: 4 * H100_SMS)
    launch = _RecordedLaunch()
    stream, modulation = _meta((32, 256, 1152), torch.float32), _meta((32, 1152))
    triton_rms_norm._bwd(_meta((32, 256, 1152)), stream, _meta((1152,), torch.float32), True, modulation,
                         _meta((32, 256), torch.float32), launch=launch,
                         residual=(_meta((32, 256, 1152)), modulation), dx_out=stream)
    usage = dict(_resource_usage(*launch.launches[0]), WARPS=8)
    bytes_per_row, floor_kib = LOADS_IN_FLIGHT["add_rms_norm bwd"]
    assert resident_programs(usage["REG"], 8) == 1, usage
    assert loads_in_flight_kib(usage, 2, bytes_per_row) < floor_kib


def test_every_recorded_launch_is_checked(resource_usage):
    assert sorted(resource_usage) == sorted(CASES)


def test_a_spilling_tile_is_caught(monkeypatch):
    """The check can fail: the fused backward at 2048 values per program (4 warps) spills on sm_90."""
    from sfd_train.kernels import qk_norm_rope

    monkeypatch.setattr(qk_norm_rope, "BWD_TILE", (2048, 4))
    monkeypatch.setattr(qk_norm_rope, "_target_programs", lambda device: 4 * H100_SMS)
    launch = _RecordedLaunch()
    shape = (32, 16, 256, 72)
    tables = _meta((256, 72), torch.float32)
    qk_norm_rope._bwd(_meta(shape), _meta(shape), _meta(shape), _meta((32, 256, 3, 16, 72)),
                      _meta((3 * 1152,), torch.float32), _meta((72,), torch.float32), _meta((72,), torch.float32),
                      tables, tables, 1e-6, launch=launch)
    usage = _resource_usage(*launch.launches[0])
    assert usage["STACK"] > 0 or usage["REG"] == 255, usage
