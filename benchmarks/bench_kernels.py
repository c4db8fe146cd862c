"""Microbenchmarks of the fused kernels against eager PyTorch and torch.compile.

Sections (all forward + backward unless noted, random inputs):
  rms_norm      RMSNorm at (rows x hidden), default 8192 x 1152 bf16 (the design card's case)
  modulate      RMSNorm + adaLN modulation at (batch, tokens, hidden) = (32, 256, 1152)
  qk_norm       the q/k RMSNorm over the head dim on the strided q view, (32, 16, 256, 72)
  rope          rotary embedding on q, same shape, fp32 tables (the result cast to bf16 as the model does)
  qk_norm_rope  the attention's whole input stage from the qkv GEMM's output (32, 256, 3, 16, 72):
                its bias, q/k RMSNorm, RoPE, split into heads, with the gradient back into qkv's layout
                and the bias gradient;
                the reference composition vs the separate Triton kernels vs the fused kernel
                (``--qk-tiles`` times other tiles of the fused kernel)
  add_rms_norm  a block's attention residual x + gate * branch with norm2 + modulation, (32, 256, 1152):
                fp32 stream, bf16 branch, gate and output under autocast, as in the model; the reference
                composition vs the separate Triton norm vs the fused kernel (``--norm-bwd-tiles``
                times other tiles of the norm backward)
  swiglu        SwiGLU's gate silu(x1) * x2 on the w12 output (batch * tokens, 2 * 3072), XL's MLP, with
                the w12 bias gradient (which the reference leaves to a reduction of its own)
  attention     softmax attention, same shape: reference vs SDPA and its pinned backends

Two clocks per variant: "wall ms" is the median of ``triton.testing.do_bench`` (CUDA
events around one call, warm-up, L2 flushed between calls), which includes Python and
launch overhead whenever the CPU cannot keep ahead of the GPU (it often cannot for ops
of tens of microseconds); "GPU ms" is the summed device time of the kernels one call
launches (torch.profiler, L2 warm), i.e. what the op costs inside a GPU-bound training
step. ``--graph`` adds CUDA-graph replay times. ``GB/s`` counts the fewest bytes the op must move
(each input read once, each output written once, forward and backward).

Usage (CUDA machine):  python benchmarks/bench_kernels.py [--json results.json]
CPU smoke run:         python benchmarks/bench_kernels.py --device cpu --tiny
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from sfd_train.kernels import reference

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SECTIONS = ("rms_norm", "modulate", "qk_norm", "rope", "qk_norm_rope", "add_rms_norm", "swiglu", "attention")


def _int_pair(item: str, option: str, form: str) -> tuple[int, int]:
    """``"1024x4"`` -> ``(1024, 4)``; anything else exits naming ``option`` and the ``form`` it takes."""
    first, sep, second = item.partition("x")
    if not sep or not first.isdigit() or not second.isdigit():
        raise SystemExit(f"{option}: {item!r} is not {form}")
    return int(first), int(second)


def parse_qk_tiles(text: str) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """``"2048x8:1024x8,512x4:512x2"`` -> ``[((2048, 8), (1024, 8)), ((512, 4), (512, 2))]``."""
    pairs = []
    for pair in filter(None, text.split(",")):
        fwd, sep, bwd = pair.partition(":")
        if not sep:
            raise SystemExit(f"--qk-tiles: {pair!r} is not FWD:BWD (e.g. 1024x4:512x4)")
        pairs.append(tuple(_int_pair(tile, "--qk-tiles", "VALUESxWARPS (e.g. 1024x4)") for tile in (fwd, bwd)))
    return pairs


def parse_row_tiles(text: str) -> list[tuple[int, int]]:
    """``"2x8,4x16"`` -> ``[(2, 8), (4, 16)]`` (rows per program x warps)."""
    return [_int_pair(item, "--norm-bwd-tiles", "ROWSxWARPS (e.g. 2x8)") for item in filter(None, text.split(","))]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="where to run (cpu: smoke run, no Triton)")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="activation dtype")
    p.add_argument("--weight-dtype", default="same", choices=["same", "fp32"],
                   help="norm weight dtype: the activation's, or fp32 (the model's parameters under autocast)")
    p.add_argument("--rows", type=int, default=8192, help="rows of the plain RMSNorm case")
    p.add_argument("--hidden", type=int, default=1152, help="hidden size")
    p.add_argument("--batch", type=int, default=32, help="batch of the modulate/attention cases")
    p.add_argument("--tokens", type=int, default=256, help="tokens per sample")
    p.add_argument("--heads", type=int, default=16, help="attention heads (head dim = hidden / heads)")
    p.add_argument("--mlp-hidden", type=int, default=3072, help="SwiGLU hidden units (XL: int(2/3 * 4 * 1152))")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated sections, of: {', '.join(SECTIONS)}")
    p.add_argument("--qk-tiles", default="",
                   help="extra tiles of the fused q/k norm + RoPE to time, as FWD:BWD pairs of VALUESxWARPS "
                        "(values per tensor per program), comma-separated, e.g. '2048x8:1024x8,512x4:512x2'")
    p.add_argument("--norm-bwd-tiles", default="",
                   help="extra tiles of the RMSNorm backward to time in the add_rms_norm section, as ROWSxWARPS "
                        "(rows per program, warps), comma-separated, e.g. '1x4,4x16'")
    p.add_argument("--rep-ms", type=int, default=200, help="do_bench repetition time per measurement (ms)")
    p.add_argument("--graph", action="store_true",
                   help="also time CUDA-graph replays (GPU time without launch overhead); off by default "
                        "because a call that cannot be captured may leave the device unusable")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default: inductor on CUDA, aot_eager on CPU)")
    p.add_argument("--tiny", action="store_true", help="small shapes (smoke test)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    args.qk_tiles = parse_qk_tiles(args.qk_tiles)
    args.norm_bwd_tiles = parse_row_tiles(args.norm_bwd_tiles)
    unknown = sorted(set(args.sections.split(",")) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"--sections: unknown {', '.join(unknown)} (choose from {', '.join(SECTIONS)})")
    if args.compile_backend is None:
        args.compile_backend = "inductor" if args.device == "cuda" else "aot_eager"
    if args.tiny:
        args.rows, args.hidden, args.batch, args.tokens, args.heads, args.mlp_hidden = 64, 96, 2, 16, 6, 256
        args.rep_ms = min(args.rep_ms, 20)
    return args


# --------------------------------------------------------------------------- timing


def _gpu_kernel_ms(fn: Callable, iters: int = 10) -> float:
    """Sum of the device time of every kernel one call launches (profiler), launch gaps excluded."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    total_us = sum(getattr(e, "self_device_time_total", 0.0) for e in prof.key_averages())
    return total_us / iters / 1e3


def _time_cuda(fn: Callable, rep_ms: int, graph: bool) -> tuple[float, float, float]:
    import triton.testing

    for _ in range(3):  # compile, autotune, allocate
        fn()
    torch.cuda.synchronize()
    t = triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")
    t_gpu = _gpu_kernel_ms(fn)
    t_graph = math.nan
    if graph:
        try:
            t_graph = triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")
        except Exception:  # some calls cannot be captured
            torch.cuda.synchronize()
    return t, t_gpu, t_graph


def _time_cpu(fn: Callable, rep_ms: int) -> tuple[float, float, float]:
    fn()
    times = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while time.perf_counter() < deadline or len(times) < 3:
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), math.nan, math.nan


class Bench:
    def __init__(self, args):
        self.args = args
        self.cuda = args.device == "cuda"
        self.results: dict[str, list[dict]] = {}

    def time(self, fn: Callable) -> tuple[float, float, float]:
        if self.cuda:
            return _time_cuda(fn, self.args.rep_ms, self.args.graph)
        return _time_cpu(fn, self.args.rep_ms)

    def section(self, title: str, nbytes: float, variants: dict[str, Callable], baselines=("eager", "compile")):
        """Times each variant; prints wall and GPU ms, GB/s and speed-ups over the baselines (both clocks)."""
        rows = []
        for name, fn in variants.items():
            if fn is None:
                continue
            try:
                t, t_gpu, t_graph = self.time(fn)
            except Exception as err:  # a backend missing here: report it, keep going
                print(f"  {name}: skipped ({type(err).__name__}: {str(err).splitlines()[0][:120]})")
                continue
            rows.append({"variant": name, "ms": t, "gpu_ms": t_gpu, "graph_ms": t_graph,
                         "GBps": nbytes / (t * 1e-3) / 1e9, "GBps_gpu": nbytes / (t_gpu * 1e-3) / 1e9})
        base = {b: next((r for r in rows if r["variant"].startswith(b)), None) for b in baselines}
        print(f"\n## {title}")
        header = f"{'variant':<40}{'wall ms':>9}{'GPU ms':>9}{'GB/s':>7}{'GPU GB/s':>9}"
        header += "".join(f"{'x ' + b:>10}{'(GPU)':>7}" for b in baselines)
        print(header + (f"{'graph ms':>9}" if self.args.graph else ""))
        for r in rows:
            line = f"{r['variant']:<40}{r['ms']:>9.4f}{r['gpu_ms']:>9.4f}{r['GBps']:>7.0f}{r['GBps_gpu']:>9.0f}"
            for b in baselines:
                ref = base[b]
                r[f"speedup_vs_{b}"] = ref["ms"] / r["ms"] if ref else math.nan
                r[f"gpu_speedup_vs_{b}"] = ref["gpu_ms"] / r["gpu_ms"] if ref else math.nan
                line += f"{r[f'speedup_vs_{b}']:>10.2f}{r[f'gpu_speedup_vs_{b}']:>7.2f}"
            print(line + (f"{r['graph_ms']:>9.4f}" if self.args.graph else ""))
        self.results[title] = rows


def fwd_bwd(fn: Callable, inputs: list[torch.Tensor], grad: torch.Tensor) -> Callable:
    """One forward and backward; ``autograd.grad`` so no gradient accumulates between runs."""
    leaves = [t for t in inputs if t is not None and t.requires_grad]

    def run():
        out = fn(*inputs)
        torch.autograd.grad(out, leaves, grad)

    return run


_COMPILE_BACKEND = "inductor"


def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=False, backend=_COMPILE_BACKEND)


# --------------------------------------------------------------------------- sections


def bench_rms_norm(b: Bench, dtype, wdtype, ours_available: bool):
    a = b.args
    dev = a.device
    x = torch.randn(a.rows, a.hidden, device=dev, dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(a.hidden, device=dev)).to(wdtype).requires_grad_()
    dy = torch.randn(a.rows, a.hidden, device=dev, dtype=dtype)
    variants: dict[str, Callable | None] = {
        "eager reference": fwd_bwd(reference.rms_norm, [x, w], dy),
        "compile(reference)": fwd_bwd(_compiled(reference.rms_norm), [x, w], dy),
    }
    if hasattr(F, "rms_norm"):
        variants["F.rms_norm (PyTorch native, eager)"] = fwd_bwd(lambda x, w: F.rms_norm(x, (a.hidden,), w, 1e-6), [x, w], dy)
    if ours_available:
        from sfd_train.kernels import triton_rms_norm

        variants["triton (ours, eager call)"] = fwd_bwd(triton_rms_norm.rms_norm, [x, w], dy)
        variants["triton (ours, custom op)"] = fwd_bwd(
            lambda x, w: torch.ops.sfd_kernels.rms_norm_fwd(x, w, None, None, 1e-6, x.dtype)[0], [x, w], dy)
        variants["compile(triton ours)"] = fwd_bwd(_compiled(triton_rms_norm.rms_norm), [x, w], dy)
    try:
        from sfd_train.kernels.apex import load_apex_norm, make_apex_ops

        variants["apex fused_rms_norm_affine"] = fwd_bwd(make_apex_ops(load_apex_norm())[0], [x, w], dy)
    except ImportError:
        pass
    nbytes = 5 * x.numel() * x.element_size()
    b.section(f"RMSNorm fwd+bwd ({a.rows} x {a.hidden}, {a.dtype}, weight {wdtype})", nbytes, variants)


def bench_modulate(b: Bench, dtype, wdtype, ours_available: bool):
    a = b.args
    dev = a.device
    x = torch.randn(a.batch, a.tokens, a.hidden, device=dev, dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(a.hidden, device=dev)).to(wdtype).requires_grad_()
    shift = torch.randn(a.batch, a.hidden, device=dev, dtype=dtype, requires_grad=True)
    scale = (0.1 * torch.randn(a.batch, a.hidden, device=dev)).to(dtype).requires_grad_()
    dy = torch.randn(a.batch, a.tokens, a.hidden, device=dev, dtype=dtype)
    inputs = [x, w, shift, scale]
    variants: dict[str, Callable | None] = {
        "eager reference": fwd_bwd(reference.rms_norm_modulate, inputs, dy),
        "compile(reference)": fwd_bwd(_compiled(reference.rms_norm_modulate), inputs, dy),
    }
    if ours_available:
        from sfd_train.kernels import triton_rms_norm

        variants["triton fused norm+modulate (ours)"] = fwd_bwd(triton_rms_norm.rms_norm_modulate, inputs, dy)
        variants["triton norm, then torch modulate"] = fwd_bwd(
            lambda x, w, s, c: reference.modulate(triton_rms_norm.rms_norm(x, w), s, c), inputs, dy)
        variants["compile(triton fused, ours)"] = fwd_bwd(_compiled(triton_rms_norm.rms_norm_modulate), inputs, dy)
    nbytes = 5 * x.numel() * x.element_size()
    b.section(f"RMSNorm + modulate fwd+bwd ({a.batch} x {a.tokens} x {a.hidden}, {a.dtype})", nbytes, variants)


def bench_qk_norm(b: Bench, dtype, ours_available: bool):
    a = b.args
    head_dim = a.hidden // a.heads
    qkv = torch.randn(a.batch, a.tokens, 3, a.heads, head_dim, device=a.device, dtype=dtype)
    # The strided q view as a leaf: gradients land on it directly, so the timing is the
    # norm's, not autograd scattering dq back into a (B, N, 3, H, D_h) buffer.
    q = qkv.permute(2, 0, 3, 1, 4)[0].detach().requires_grad_()
    w = torch.ones(head_dim, device=a.device, requires_grad=True)  # fp32 parameter, as in the model
    dy = torch.randn(a.batch, a.heads, a.tokens, head_dim, device=a.device, dtype=dtype)

    def cast(fn):
        return lambda q, w: fn(q, w).to(dtype)

    variants: dict[str, Callable | None] = {
        "eager reference": fwd_bwd(cast(reference.rms_norm), [q, w], dy),
        "compile(reference)": fwd_bwd(_compiled(cast(reference.rms_norm)), [q, w], dy),
    }
    if ours_available:
        from sfd_train.kernels import triton_rms_norm

        variants["triton on the strided view (ours)"] = fwd_bwd(cast(triton_rms_norm.rms_norm), [q, w], dy)
        variants["compile(triton ours)"] = fwd_bwd(_compiled(cast(triton_rms_norm.rms_norm)), [q, w], dy)
    nbytes = 5 * dy.numel() * dy.element_size()
    b.section(f"q/k RMSNorm fwd+bwd over head dim ({a.batch},{a.heads},{a.tokens},{head_dim}) strided, {a.dtype}",
              nbytes, variants)


def bench_rope(b: Bench, dtype, ours_available: bool):
    a = b.args
    head_dim = a.hidden // a.heads
    q = torch.randn(a.batch, a.heads, a.tokens, head_dim, device=a.device, dtype=dtype, requires_grad=True)
    cos, sin = torch.randn(a.tokens, head_dim, device=a.device), torch.randn(a.tokens, head_dim, device=a.device)
    dy = torch.randn_like(q)

    def as_model(fn):  # the model casts the rotated q back to the activation dtype
        return lambda q: fn(q, cos, sin).to(dtype)

    variants: dict[str, Callable | None] = {
        "eager reference": fwd_bwd(as_model(reference.apply_rope), [q], dy),
        "compile(reference)": fwd_bwd(_compiled(as_model(reference.apply_rope)), [q], dy),
    }
    if ours_available:
        from sfd_train.kernels import rope

        variants["triton rope (ours)"] = fwd_bwd(as_model(rope.apply_rope), [q], dy)
        variants["compile(triton rope ours)"] = fwd_bwd(_compiled(as_model(rope.apply_rope)), [q], dy)
    nbytes = 4 * q.numel() * q.element_size()
    b.section(f"RoPE fwd+bwd ({a.batch},{a.heads},{a.tokens},{head_dim}), {a.dtype}", nbytes, variants)


def bench_qk_norm_rope(b: Bench, dtype, ours_available: bool):
    a = b.args
    head_dim = a.hidden // a.heads
    qkv = torch.randn(a.batch, a.tokens, 3, a.heads, head_dim, device=a.device, dtype=dtype, requires_grad=True)
    bias = torch.randn(3 * a.hidden, device=a.device, requires_grad=True)  # the qkv bias: an fp32 parameter
    q_weight, k_weight = (torch.ones(head_dim, device=a.device, requires_grad=True) for _ in range(2))  # fp32
    rope = (torch.randn(a.tokens, head_dim, device=a.device), torch.randn(a.tokens, head_dim, device=a.device))
    grads = tuple(torch.randn(a.batch, a.heads, a.tokens, head_dim, device=a.device, dtype=dtype) for _ in range(3))
    inputs = [qkv, bias, q_weight, k_weight]

    def composed(**ops):
        """What Inductor sees: the GEMM's output with its bias (the bias gradient is reduced from d(qkv))."""
        def stage(qkv, bias, qw, kw):
            return reference.qk_norm_rope_heads(qkv + bias.to(dtype).view(3, a.heads, head_dim), qw, kw, rope, 1e-6,
                                                **ops)
        return stage

    variants: dict[str, Callable | None] = {
        "eager reference": fwd_bwd(composed(), inputs, grads),
        "compile(reference)": fwd_bwd(_compiled(composed()), inputs, grads),
    }
    if ours_available:
        from sfd_train.kernels import qk_norm_rope, rope as triton_rope, triton_rms_norm

        # The 'separate' composition: the reference stage with the Triton norm and RoPE.
        separate = composed(norm=triton_rms_norm.rms_norm, rotate=triton_rope.apply_rope)
        variants["separate triton norm + rope"] = fwd_bwd(separate, inputs, grads)

        def fused_stage(qkv, bias, qw, kw):
            return qk_norm_rope.qk_norm_rope_heads(qkv, bias, qw, kw, rope, 1e-6)

        variants["fused triton, bias gradient included (ours)"] = fwd_bwd(fused_stage, inputs, grads)
        variants["compile(fused triton ours)"] = fwd_bwd(_compiled(fused_stage), inputs, grads)
        fused = variants["fused triton, bias gradient included (ours)"]
        for tiles in a.qk_tiles:
            # fwd_bwd runs forward and backward inside one call, so the tiles hold for both.
            def with_tiles(run=fused, tiles=tiles):
                saved = qk_norm_rope.FWD_TILE, qk_norm_rope.BWD_TILE
                qk_norm_rope.FWD_TILE, qk_norm_rope.BWD_TILE = tiles
                try:
                    run()
                finally:
                    qk_norm_rope.FWD_TILE, qk_norm_rope.BWD_TILE = saved

            (fv, fw), (bv, bw) = tiles
            variants[f"fused, tiles {fv}x{fw}:{bv}x{bw}"] = with_tiles
    # Forward reads q, k, v from qkv and writes them; backward reads dq, dk, dv and q, k, writes d(qkv).
    nbytes = 14 * grads[0].numel() * grads[0].element_size()
    b.section(f"q/k norm + RoPE + heads fwd+bwd, qkv ({a.batch},{a.tokens},3,{a.heads},{head_dim}), {a.dtype}",
              nbytes, variants)


def bench_add_rms_norm(b: Bench, dtype, ours_available: bool):
    a = b.args
    dev = a.device
    shape = (a.batch, a.tokens, a.hidden)
    x = torch.randn(shape, device=dev, requires_grad=True)  # the fp32 residual stream
    branch = torch.randn(shape, device=dev, dtype=dtype, requires_grad=True)
    gate, shift = (torch.randn(a.batch, a.hidden, device=dev, dtype=dtype, requires_grad=True) for _ in range(2))
    scale = (0.1 * torch.randn(a.batch, a.hidden, device=dev)).to(dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(a.hidden, device=dev)).requires_grad_()  # an fp32 parameter
    grads = (torch.randn(shape, device=dev), torch.randn(shape, device=dev, dtype=dtype))
    inputs = [x, branch, gate, w, shift, scale]

    def as_model(fn):  # under autocast, as in the training step; the next Linear reads h in bf16
        def run(*args):
            with torch.autocast(dev, dtype=dtype, enabled=dtype != torch.float32):
                x_new, h = fn(*args)
            return x_new, h.to(dtype)
        return run

    variants: dict[str, Callable | None] = {
        "eager reference": fwd_bwd(as_model(reference.add_rms_norm_modulate), inputs, grads),
        "compile(reference)": fwd_bwd(_compiled(as_model(reference.add_rms_norm_modulate)), inputs, grads),
    }
    if ours_available:
        from sfd_train.kernels import KernelOps, triton_rms_norm

        separate = KernelOps(rms_norm_modulate=triton_rms_norm.rms_norm_modulate).add_rms_norm_modulate
        variants["torch add, triton norm+modulate"] = fwd_bwd(as_model(separate), inputs, grads)
        variants["fused triton (ours)"] = fwd_bwd(as_model(triton_rms_norm.add_rms_norm_modulate), inputs, grads)
        variants["compile(fused triton ours)"] = fwd_bwd(
            _compiled(as_model(triton_rms_norm.add_rms_norm_modulate)), inputs, grads)
        fused = variants["fused triton (ours)"]
        for rows, warps in a.norm_bwd_tiles:
            def with_tile(run=fused, rows=rows, warps=warps):
                chosen, backward = triton_rms_norm._row_tile, triton_rms_norm.BWD_VALUES

                def tile(D, values):  # the backward's tile only
                    return (*chosen(D, values)[:2], rows, warps) if values == backward else chosen(D, values)

                triton_rms_norm._row_tile = tile
                try:
                    run()
                finally:
                    triton_rms_norm._row_tile = chosen

            variants[f"fused, backward tile {rows}x{warps}"] = with_tile
    # Forward reads x (4 B), branch (2 B), writes x_new (4 B), h (2 B); backward reads dh, d(x_new), x_new,
    # branch and writes dx, d(branch): 30 bytes per element.
    nbytes = 30 * x.numel()
    b.section(f"gated residual + RMSNorm + modulate fwd+bwd ({a.batch} x {a.tokens} x {a.hidden}), fp32 stream, "
              f"{a.dtype}", nbytes, variants)


def bench_swiglu(b: Bench, dtype, ours_available: bool):
    a = b.args
    x12 = torch.randn(a.batch * a.tokens, 2 * a.mlp_hidden, device=a.device, dtype=dtype, requires_grad=True)
    bias = torch.randn(2 * a.mlp_hidden, device=a.device, requires_grad=True)  # the w12 bias: an fp32 parameter
    dh = torch.randn(a.batch * a.tokens, a.mlp_hidden, device=a.device, dtype=dtype)

    def gate(x12, bias):  # what Inductor sees: the GEMM's output (bias added there), split and gated
        x1, x2 = x12.chunk(2, dim=-1)
        return F.silu(x1) * x2

    def gate_and_bias_grad(x12, bias):  # the same, and the w12 bias gradient as autograd would reduce it
        return gate(x12 + bias.to(x12.dtype), None)

    variants: dict[str, Callable | None] = {
        "eager reference": fwd_bwd(gate_and_bias_grad, [x12, bias], dh),
        "compile(reference)": fwd_bwd(_compiled(gate_and_bias_grad), [x12, bias], dh),
        "compile(gate only, no bias gradient)": fwd_bwd(_compiled(gate), [x12, None], dh),
    }
    if ours_available:
        from sfd_train.kernels import swiglu

        variants["triton gate + bias gradient (ours)"] = fwd_bwd(swiglu.swiglu_gate, [x12, bias], dh)
        variants["compile(triton ours)"] = fwd_bwd(_compiled(swiglu.swiglu_gate), [x12, bias], dh)
    # Forward reads x12, writes h; backward reads dh and x12, writes d(x12).
    nbytes = 8 * dh.numel() * dh.element_size()
    b.section(f"SwiGLU gate + w12 bias gradient fwd+bwd ({a.batch * a.tokens} x 2*{a.mlp_hidden}), {a.dtype}",
              nbytes, variants)


def bench_attention(b: Bench, dtype):
    from sfd_train.kernels.attention import make_sdpa_attention, sdpa_attention

    a = b.args
    head_dim = a.hidden // a.heads
    q, k, v = (torch.randn(a.batch, a.heads, a.tokens, head_dim, device=a.device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    dy = torch.randn_like(q)
    variants: dict[str, Callable | None] = {
        "eager reference (fp32 softmax)": fwd_bwd(reference.attention, [q, k, v], dy),
        "compile(reference)": fwd_bwd(_compiled(reference.attention), [q, k, v], dy),
        "sdpa (PyTorch's choice)": fwd_bwd(sdpa_attention, [q, k, v], dy),
    }
    for backend in ("flash", "cudnn", "efficient"):
        if b.cuda:
            variants[f"sdpa[{backend}]"] = fwd_bwd(make_sdpa_attention([backend]), [q, k, v], dy)
    # FLOPs instead of bytes would be the natural unit here; GB/s counts q, k, v, out, dout, dq, dk, dv.
    nbytes = 8 * q.numel() * q.element_size()
    b.section(f"attention fwd+bwd ({a.batch},{a.heads},{a.tokens},{head_dim}), {a.dtype}", nbytes, variants)
    flops = 4 * a.batch * a.heads * a.tokens**2 * head_dim * 3.5  # fwd 2 matmuls, bwd 5 (2.5x)
    for r in b.results[next(reversed(b.results))]:
        r["TFLOPs"] = flops / (r["ms"] * 1e-3) / 1e12
        print(f"  {r['variant']:<42} {r['TFLOPs']:7.1f} TFLOP/s")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu --tiny for a smoke test")
    global _COMPILE_BACKEND
    _COMPILE_BACKEND = args.compile_backend
    dtype = DTYPES[args.dtype]
    wdtype = dtype if args.weight_dtype == "same" else torch.float32
    torch.manual_seed(0)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    ours_available = args.device == "cuda" and triton_version is not None
    print(f"# sfd-train kernel benchmark on {device_name} | torch {torch.__version__} | triton {triton_version}")
    if not ours_available:
        print("# (no CUDA/Triton: only the PyTorch variants run)")
    bench = Bench(args)
    sections = args.sections.split(",")
    if "rms_norm" in sections:
        bench_rms_norm(bench, dtype, wdtype, ours_available)
    if "modulate" in sections:
        bench_modulate(bench, dtype, wdtype, ours_available)
    if "qk_norm" in sections:
        bench_qk_norm(bench, dtype, ours_available)
    if "rope" in sections:
        bench_rope(bench, dtype, ours_available)
    if "qk_norm_rope" in sections:
        bench_qk_norm_rope(bench, dtype, ours_available)
    if "add_rms_norm" in sections:
        bench_add_rms_norm(bench, dtype, ours_available)
    if "swiglu" in sections:
        bench_swiglu(bench, dtype, ours_available)
    if "attention" in sections:
        bench_attention(bench, dtype)
    out = {"device": device_name, "torch": torch.__version__, "triton": triton_version, "args": vars(args),
           "results": bench.results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
    return out


if __name__ == "__main__":
    main()
