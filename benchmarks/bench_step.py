"""One full SFD training step (forward, loss, backward, AdamW): ours vs eager vs compile vs the authors' style.

Variants (bf16 autocast, fp32 parameters, random data, REPA projector on):
  ours                 our model with the kernels build_kernel_ops picks ('auto' on CUDA: SDPA
                       attention; RMSNorm, norm+modulation and RoPE as Triton kernels in eager
                       mode and, inside torch.compile, as the reference expression that Inductor
                       fuses with its neighbours), torch.compile per block, fused AdamW: the
                       trainer with parallel.compile=true
  ours-step            the same with parallel.compile_scope=step: noising, the whole network and the
                       loss terms in one compiled graph
  ours-step-autotune   ours-step with compile_mode=max-autotune-no-cudagraphs (Triton GEMM
                       templates, epilogue fusion)
  ours-graphs          ours-step with compile_mode=reduce-overhead: the step replays CUDA graphs
  ours-kernels         ours with kernels.inside_compile=kernels: the Triton kernels stay opaque
                       custom ops inside the compiled blocks (shows what the fusion is worth)
  eager                the reference ops (fp32 math attention), no compile, AdamW (foreach)
  compile              the reference ops, torch.compile per block, AdamW (foreach)
  authors              benchmarks/authors_style.py: the authors' module style, every block compiled,
                       SDPA attention, AdamW (foreach)
  authors+fused-adamw  the authors' model with fused AdamW (separates the optimizer's share)

The "ours" variants get their compiled pieces from sfd_train.engine.compile and the SFD task's
loss function (sfd_train.diffusion.training.build_loss_fn), as the trainer does.
An "ours" variant may carry kernel choices after a '+', as the config's kernels section spells
them: 'ours-graphs+qk_norm_rope=triton' is ours-graphs with the fused q/k norm + RoPE kernel
('+' again for more keys).

Reported: median step time (CUDA events), images/s, achieved TFLOP/s and MFU with the
project's convention: FLOPs per image per step = 3 x 2 x forward multiply-adds (no
recomputation counted), against the device's dense bf16 peak (H100 SXM / H200: 989 TFLOP/s).
The XL/1 forward at 256 tokens with the REPA projector is ~120.7 G multiply-adds.

Usage (CUDA machine):  python benchmarks/bench_step.py [--model XL --batch 32] [--json step.json]
CPU smoke run:         python benchmarks/bench_step.py --device cpu --tiny
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from sfd_train.config.schema import ModelConfig, ObjectiveConfig  # noqa: E402
from sfd_train.device import PEAK_BF16_FLOPS  # noqa: E402
from sfd_train.kernels import REFERENCE_OPS, KernelConfig, build_kernel_ops  # noqa: E402
from sfd_train.models.flops import forward_macs_per_image, training_flops_per_image  # noqa: E402

# eager first: it compiles nothing and brings the GPU to its clocks before the timed comparisons.
ALL_VARIANTS = ("eager", "authors", "ours", "ours-step", "ours-step-autotune", "ours-graphs", "ours-kernels",
                "authors+fused-adamw", "compile")
# parallel.compile_scope and compile_mode of each "ours" variant.
OURS_COMPILE = {
    "ours": ("blocks", "default"),
    "ours-kernels": ("blocks", "default"),
    "ours-step": ("step", "default"),
    "ours-step-autotune": ("step", "max-autotune-no-cudagraphs"),
    "ours-graphs": ("step", "reduce-overhead"),
}


# --------------------------------------------------------------------------- FLOPs
# One convention for the whole project: sfd_train.models.flops and sfd_train.device.
forward_macs = forward_macs_per_image
train_step_flops = training_flops_per_image


# --------------------------------------------------------------------------- profile

PROFILED_STEPS = 2
# Device kernels by family, matched on lower-cased kernel names (first match wins).
KERNEL_FAMILIES = (
    ("ours (sfd kernels)", ("_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel", "_rope_kernel", "_qk_norm_rope_",
                            "_swiglu_")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "triton_tem_")),
    ("attention", ("flash", "fmha", "sdpa", "attn", "cudnn")),
    ("optimizer", ("adam", "multi_tensor")),
    ("inductor fused", ("triton_",)),
    ("copy / cast", ("copy", "memcpy", "memset", "cat", "transpose")),
)


def kernel_family(kernel_name: str) -> str:
    lowered = kernel_name.lower()
    return next((family for family, keys in KERNEL_FAMILIES if any(k in lowered for k in keys)), "other")


def device_kernels(prof) -> list[tuple[str, float]]:
    """``(name, microseconds)`` of every kernel, memset and copy a profile saw on the device.

    Read from the device-side events themselves: in ``key_averages()`` a kernel's time shows
    both on its own row and on the op or annotation that launched it, so summing that table's
    self device times counts the step about twice.
    """
    from torch.autograd import DeviceType

    return [(evt.name, evt.time_range.elapsed_us()) for evt in prof.events()
            if evt.device_type == DeviceType.CUDA and not getattr(evt, "is_user_annotation", False)]


def kernel_time_by_family(kernels: list[tuple[str, float]], steps: int) -> list[tuple[str, float, int]]:
    """``(family, ms per step, kernels per step)``, largest first, for ``kernels`` from ``steps`` steps."""
    families: dict[str, list] = {}
    for name, us in kernels:
        entry = families.setdefault(kernel_family(name), [0.0, 0])
        entry[0] += us / 1e3 / steps
        entry[1] += 1
    return sorted(((f, ms, count // steps) for f, (ms, count) in families.items()), key=lambda row: -row[1])


def print_profile(name: str, prof, cuda: bool, table_path: str | None) -> None:
    """Prints the device time per kernel family and the top ops of a profiled run.

    Args:
        name: the variant profiled.
        prof: a finished ``torch.profiler.profile`` of ``PROFILED_STEPS`` steps.
        cuda: whether device kernels were recorded (else CPU op times are shown).
        table_path: if given, the full per-op table is also written there.
    """
    averages = prof.key_averages()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    table = averages.table(sort_by=sort, row_limit=400, max_name_column_width=110)
    if table_path:
        with open(table_path, "w") as f:
            f.write(table)
    print(f"\n## profile of {PROFILED_STEPS} steps of '{name}'")
    if cuda:
        rows = kernel_time_by_family(device_kernels(prof), PROFILED_STEPS)
        print(f"{'kernel family':<18}{'ms/step':>9}{'kernels/step':>14}")
        for family, ms, count in rows:
            print(f"{family:<18}{ms:>9.2f}{count:>14}")
        print(f"{'all kernels':<18}{sum(ms for _, ms, _ in rows):>9.2f}")
    print("\n".join(table.splitlines()[:45]))


# --------------------------------------------------------------------------- variants


def parse_variant(spec: str) -> tuple[str, dict[str, str]]:
    """``"ours-graphs+qk_norm_rope=triton"`` -> ``("ours-graphs", {"qk_norm_rope": "triton"})``, checked."""
    from sfd_train.config.base import ConfigError, from_mapping

    if spec in ALL_VARIANTS:  # names with a '+' of their own (authors+fused-adamw) included
        return spec, {}
    name, *items = spec.split("+")
    if name not in ALL_VARIANTS:
        raise SystemExit(f"unknown variant {name!r} in {spec!r}; choose from {ALL_VARIANTS}")
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"variant {spec!r}: {item!r} is not KEY=VALUE")
        overrides[key] = value
    if overrides and name not in OURS_COMPILE:
        raise SystemExit(f"variant {spec!r}: kernel choices apply to the 'ours' variants only")
    try:
        from_mapping(KernelConfig, overrides, prefix="kernels")
    except ConfigError as err:
        raise SystemExit(f"variant {spec!r}: {err}") from None
    return name, overrides


def build_variant(spec: str, cfg: ModelConfig, args, device: str):
    """Returns ``(loss_fn, model, optimizer, kernel names)`` for one variant (see :func:`parse_variant`)."""
    name, kernel_overrides = parse_variant(spec)
    fused = device == "cuda" and not args.no_fused_adam
    if name.startswith("authors"):
        import authors_style

        depth, d, heads = cfg.dims()
        model = authors_style.SFDLightningDiT(
            input_size=cfg.input_size, patch_size=cfg.patch_size, in_channels=cfg.in_channels, hidden=d,
            depth=depth, heads=heads, num_classes=cfg.num_classes, repa_depth=cfg.repa_depth,
            projector_dim=cfg.repa_projector_dim, z_dim=cfg.repa_feature_dim, compile_blocks=False,
        ).to(device)
        if not args.no_compile:
            for block in model.blocks:
                block.compile(backend=args.compile_backend)
        use_fused = fused and name == "authors+fused-adamw"
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, **({"fused": True} if use_fused else {}))
        return (lambda x1, y, dino: authors_style.sfd_transport_loss(model, x1, y, dino)), model, opt, name

    from sfd_train.config.schema import Config, ParallelConfig
    from sfd_train.diffusion.objective import draw_loss_inputs, sfd_loss
    from sfd_train.diffusion.training import build_loss_fn
    from sfd_train.engine.compile import begin_micro_batch, compile_blocks
    from sfd_train.engine.parallelize import prepare_blocks
    from sfd_train.models import build_model

    objective = ObjectiveConfig()
    if name in OURS_COMPILE:
        from sfd_train.config.base import from_mapping

        choices = {"sdpa_backends": args.sdpa_backends,
                   "inside_compile": "kernels" if name == "ours-kernels" else "inductor", **kernel_overrides}
        ops = build_kernel_ops(from_mapping(KernelConfig, choices, prefix="kernels"), device)
        scope, mode = OURS_COMPILE[name]
        if args.compile_backend != "inductor":
            mode = "default"  # the modes are Inductor's
        parallel = ParallelConfig(strategy="ddp", compile=not args.no_compile, compile_scope=scope,
                                  compile_mode=mode, compile_backend=args.compile_backend)
        parallel.validate()
        config = Config(model=cfg, objective=objective, parallel=parallel)
        model = build_model(cfg, ops).to(device).train()
        prepare_blocks(model, config)
        training_loss = build_loss_fn(config)

        def loss_fn(x1, y, dino):
            begin_micro_batch(parallel)
            # Drawn eagerly, as the trainer draws them, outside the compiled function.
            inputs = draw_loss_inputs(x1, y, cfg, objective)
            return training_loss(model, x1, inputs, dino)["loss"]
    else:
        ops = REFERENCE_OPS
        model = build_model(cfg, ops).to(device).train()
        if name != "eager" and not args.no_compile:
            compile_blocks(model, ParallelConfig(compile=True, compile_backend=args.compile_backend))

        def loss_fn(x1, y, dino):
            return sfd_loss(model, x1, y, dino, cfg, objective)["loss"]

    use_fused = fused and name.startswith("ours")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0,
                            **({"fused": True} if use_fused else {}))
    names = ",".join(f"{k}={v}" for k, v in ops.names.items()) + (",fused-adamw" if use_fused else "")
    if name in OURS_COMPILE and not args.no_compile:
        names += f",compile={parallel.compile_scope}/{parallel.compile_mode}"
    return loss_fn, model, opt, names


def run_variant(name: str, cfg: ModelConfig, args, device: str, profile: bool = False) -> dict:
    from torch._dynamo.utils import counters

    counters.clear()
    torch.manual_seed(0)
    loss_fn, model, opt, names = build_variant(name, cfg, args, device)
    batch = args.batch
    x1 = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, device=device)
    y = torch.randint(0, cfg.num_classes, (batch,), device=device)
    dino = torch.randn(batch, cfg.repa_feature_dim, cfg.input_size // cfg.patch_size, cfg.input_size // cfg.patch_size,
                       device=device)
    amp_dtype = torch.bfloat16

    def step():
        with torch.autocast(device, dtype=amp_dtype):
            loss = loss_fn(x1, y, dino)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    cuda = device == "cuda"
    start_compile = time.perf_counter()
    for _ in range(args.warmup):
        loss = step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    warmup_s = time.perf_counter() - start_compile
    times = []
    for _ in range(args.steps):
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            loss = step()
            end.record()
            times.append((begin, end))
        else:
            t0 = time.perf_counter()
            loss = step()
            times.append((time.perf_counter() - t0) * 1e3)
    if cuda:
        torch.cuda.synchronize()
        times = [b.elapsed_time(e) for b, e in times]
    step_ms = statistics.median(times)
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with torch_profile(activities=activities) as prof:
            for _ in range(PROFILED_STEPS):
                step()
            if cuda:
                torch.cuda.synchronize()
        print_profile(name, prof, cuda, args.profile_out)
    result = {
        "variant": name,
        "kernels": names,
        "step_ms": step_ms,
        "step_ms_min": min(times),
        "images_per_s": batch / (step_ms * 1e-3),
        "loss": float(loss.detach()),
        "warmup_s": warmup_s,
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else math.nan,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "graph_breaks": sum(counters["graph_break"].values()),
    }
    model = opt = loss_fn = None  # drop the references (the step closure holds them too) before freeing memory
    gc.collect()
    torch._dynamo.reset()
    if cuda:
        torch.cuda.empty_cache()
    return result


def parse_inductor_setting(item: str) -> tuple[str, object]:
    """``"triton.enable_pdl=True"`` -> ``("triton.enable_pdl", True)``, checked against Inductor's config."""
    import ast

    import torch._inductor.config as inductor_config

    key, sep, text = item.partition("=")
    if not sep:
        raise SystemExit(f"--inductor {item!r}: expected KEY=VALUE")
    if key not in inductor_config.get_config_copy():
        raise SystemExit(f"--inductor {item!r}: torch {torch.__version__} has no Inductor setting {key!r}")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # a bare word, e.g. a backend name
    return key, value


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--model", default="XL", help="named size (S, B, L, XL, XXL, 1p6B)")
    p.add_argument("--depth", type=int, default=None,
                   help="override the size's number of blocks (a quicker compile when comparing settings; "
                        "the per-block kernels are those of the full model)")
    p.add_argument("--batch", type=int, default=32, help="images per step")
    p.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (includes compilation)")
    p.add_argument("--variants", default=",".join(ALL_VARIANTS),
                   help=f"comma-separated subset of {ALL_VARIANTS}; an 'ours' variant may add kernel choices, "
                        "e.g. ours-graphs+qk_norm_rope=triton")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default: inductor on CUDA, aot_eager on CPU)")
    p.add_argument("--no-compile", action="store_true", help="run every variant uncompiled")
    p.add_argument("--no-fused-adam", action="store_true", help="ours with the default (foreach) AdamW")
    p.add_argument("--sdpa-backends", default="", help="pin ours' SDPA backends, e.g. 'cudnn' or 'flash,cudnn'")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU (default: from the device name)")
    p.add_argument("--profile", default=None,
                   help="profile 2 steps of this variant after timing it (device time per kernel family, top kernels)")
    p.add_argument("--profile-out", default=None, help="write the profiled variant's full per-op table to this file")
    p.add_argument("--tiny", action="store_true", help="a tiny model, 2 images, 2 steps (smoke test)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                   help="set torch._inductor.config.KEY (dotted, e.g. triton.enable_pdl=True) for every "
                        "variant; repeatable")
    args = p.parse_args(argv)
    args.inductor = dict(parse_inductor_setting(item) for item in args.inductor)
    args.sdpa_backends = [b for b in args.sdpa_backends.split(",") if b]
    if args.compile_backend is None:
        args.compile_backend = "inductor" if args.device == "cuda" else "aot_eager"
    if args.tiny:
        args.batch, args.steps, args.warmup = 2, 2, 1
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch._inductor.config as inductor_config

    with inductor_config.patch(args.inductor):  # every variant compiles under these settings
        return run_benchmark(args)


def run_benchmark(args) -> dict:
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu --tiny for a smoke test")
    if args.tiny:
        cfg = ModelConfig(size="custom", depth=args.depth or 2, hidden_size=96, num_heads=6, input_size=8,
                          num_classes=10, repa_projector_dim=64)
    else:
        cfg = ModelConfig(size=args.model, depth=args.depth)
    cfg.validate()
    if args.inductor:
        print(f"# Inductor settings: {args.inductor}")
    variants = [v for v in args.variants.split(",") if v]
    for spec in variants + ([args.profile] if args.profile else []):
        parse_variant(spec)  # every name and kernel choice checked before anything is compiled
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        device_name = torch.cuda.get_device_name()
    else:
        device_name = platform.processor() or "cpu"
    peak = args.peak_tflops * 1e12 if args.peak_tflops else next(
        (v for k, v in PEAK_BF16_FLOPS if k in device_name), None)
    flops_img = train_step_flops(cfg)
    print(f"# SFD training step: {cfg.name}, batch {args.batch}, {(cfg.input_size // cfg.patch_size) ** 2} tokens, "
          f"bf16 autocast | {device_name} | torch {torch.__version__}")
    print(f"# forward {forward_macs(cfg) / 1e9:.1f} G multiply-adds/image; {flops_img / 1e9:.0f} GFLOP/image/step; "
          f"peak {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s; compile backend {args.compile_backend}")
    results = []
    out = {"device": device_name, "torch": torch.__version__, "model": cfg.name, "batch": args.batch,
           "forward_macs": forward_macs(cfg), "flops_per_image": flops_img, "peak_flops": peak,
           "inductor": {k: repr(v) for k, v in args.inductor.items()}, "results": results}
    width = max([22] + [len(v) + 2 for v in variants])
    header = f"{'variant':<{width}}{'step ms':>9}{'img/s':>9}{'TFLOP/s':>9}{'MFU':>7}{'x authors':>10}{'mem GB':>8}  kernels"

    def row(r):
        return (f"{r['variant']:<{width}}{r['step_ms']:>9.1f}{r['images_per_s']:>9.1f}{r['tflops']:>9.1f}"
                f"{100 * r['mfu']:>6.1f}%{r.get('speedup_vs_authors', math.nan):>10.2f}{r['peak_mem_gb']:>8.1f}  {r['kernels']}")

    print(header)
    for name in variants:
        try:
            r = run_variant(name, cfg, args, device, profile=name == args.profile)
        except Exception as err:  # e.g. out of memory in eager: report, keep going
            print(f"  {name}: failed ({type(err).__name__}: {str(err).splitlines()[0][:160]})")
            gc.collect()
            torch._dynamo.reset()
            if device == "cuda":
                torch.cuda.empty_cache()
            continue
        r["tflops"] = flops_img * r["images_per_s"] / 1e12
        r["mfu"] = flops_img * r["images_per_s"] / peak if peak else math.nan
        results.append(r)
        print(row(r) + f"  (warm-up {r['warmup_s']:.0f} s, graph breaks {r['graph_breaks']})", flush=True)
        if args.json:  # written after every variant, so a run cut short keeps what it measured
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1, default=str)
    authors = next((r["step_ms"] for r in results if r["variant"] == "authors"), math.nan)
    print("\n" + header)
    for r in results:
        r["speedup_vs_authors"] = authors / r["step_ms"]
        print(row(r))
    if args.profile and args.profile not in variants:
        run_variant(args.profile, cfg, args, device, profile=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
    return out


if __name__ == "__main__":
    main()
