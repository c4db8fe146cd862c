"""Smoke tests of the kernel and step benchmarks (tiny, on the CPU)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def test_flop_count_of_xl_matches_the_design():
    from sfd_train.config.schema import ModelConfig

    bench_step = _load("bench_step")
    macs = bench_step.forward_macs(ModelConfig(size="XL"))
    assert abs(macs / 1e9 - 120.7) < 0.1  # DESIGN.md §4: ~120.7 G multiply-adds, ~724 GFLOP per step
    assert abs(bench_step.train_step_flops(ModelConfig(size="XL")) / 1e9 - 724.3) < 0.5


@pytest.mark.parametrize("name", ["bench_step", "bench_kernels"])
def test_help(name, capsys):
    with pytest.raises(SystemExit) as info:
        _load(name).main(["--help"])
    assert info.value.code == 0 and "usage" in capsys.readouterr().out


def test_step_benchmark_runs_tiny_on_cpu(tmp_path):
    variants = "ours,eager,authors,ours-step+rope=reference+qk_norm_rope=separate"
    out = _load("bench_step").main(["--device", "cpu", "--tiny", "--variants", variants, "--depth", "3",
                                    "--inductor", "max_autotune=False", "--json", str(tmp_path / "step.json")])
    results = {r["variant"]: r for r in out["results"]}
    assert set(results) == set(variants.split(","))
    for r in results.values():
        assert r["step_ms"] > 0 and r["loss"] == r["loss"]  # finite time, loss not NaN
    assert "compile=step/" in results["ours-step+rope=reference+qk_norm_rope=separate"]["kernels"]
    assert out["model"].startswith("custom-d3") and out["inductor"] == {"max_autotune": "False"}
    assert (tmp_path / "step.json").exists()


def test_step_benchmark_variant_specs():
    bench_step = _load("bench_step")
    assert bench_step.parse_variant("authors+fused-adamw") == ("authors+fused-adamw", {})
    assert bench_step.parse_variant("ours-graphs+qk_norm_rope=triton+swiglu=triton") == (
        "ours-graphs", {"qk_norm_rope": "triton", "swiglu": "triton"})
    for spec, message in (("ours+swiglu=fast", "kernels.swiglu"), ("eager+swiglu=triton", "'ours' variants"),
                          ("ours+swiglu", "KEY=VALUE"), ("mine", "unknown variant"), ("ours+nokey=1", "nokey")):
        with pytest.raises(SystemExit, match=message):
            bench_step.parse_variant(spec)
    assert bench_step.parse_inductor_setting("triton.cudagraphs=True") == ("triton.cudagraphs", True)
    with pytest.raises(SystemExit, match="no Inductor setting"):
        bench_step.parse_inductor_setting("no_such_setting=1")


def test_kernel_benchmark_runs_tiny_on_cpu():
    out = _load("bench_kernels").main(["--device", "cpu", "--tiny", "--sections",
                                       "rms_norm,qk_norm_rope,add_rms_norm,swiglu,attention", "--rep-ms", "5"])
    assert len(out["results"]) == 5 and all(r["ms"] > 0 for rows in out["results"].values() for r in rows)


def test_kernel_benchmark_tile_option():
    bench_kernels = _load("bench_kernels")
    assert bench_kernels.parse_qk_tiles("2048x8:1024x8,512x4:512x2") == [((2048, 8), (1024, 8)), ((512, 4), (512, 2))]
    for text in ("512x4", "512:512x4", "ax4:512x4"):
        with pytest.raises(SystemExit, match="--qk-tiles"):
            bench_kernels.parse_qk_tiles(text)
    assert bench_kernels.parse_row_tiles("2x8,4x16") == [(2, 8), (4, 16)]
    for text in ("2", "2x", "x8"):
        with pytest.raises(SystemExit, match="--norm-bwd-tiles"):
            bench_kernels.parse_row_tiles(text)


def test_kernel_families_of_a_profile():
    bench_step = _load("bench_step")
    # Kernel names as an H100 profile of the step printed them; 2 steps of each.
    kernels = [
        ("nvjet_sm90_tst_192x192_64x3_2x1_v_bz_coopB_NNN", 85.0),
        ("triton_tem_fused_mm_3", 40.0),
        ("triton_poi_fused__to_copy_add_mul_silu_split_38", 48.0),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7", 50.0),
        ("void at::native::multi_tensor_apply_kernel<FusedOptimizerTensorListMetadata>", 210.0),
        ("Memset (Device)", 1.0),
        ("void at::native::reduce_kernel<128, 4>", 8.0),
        ("_qk_norm_rope_bwd_kernel", 30.0),
    ] * 2
    rows = {family: (ms, count) for family, ms, count in bench_step.kernel_time_by_family(kernels, steps=2)}
    assert rows["gemm"] == (0.125, 2)
    assert rows["inductor fused"] == (0.048, 1)
    assert rows["attention"] == (0.05, 1)
    assert rows["optimizer"] == (0.21, 1)
    assert rows["copy / cast"] == (0.001, 1) and rows["other"] == (0.008, 1)
    assert rows["ours (sfd kernels)"] == (0.03, 1)
    assert [f for f, _, _ in bench_step.kernel_time_by_family(kernels, 2)][0] == "optimizer"  # largest first


def test_gpu_suite_arguments_are_valid():
    """Every variant, section and tile the GPU suite passes parses here, so a typo cannot cost a lease."""
    import re
    import shlex

    script = (BENCH / "gpu_suite.sh").read_text().replace("\\\n", " ")  # join continued lines
    bench_step, bench_kernels = _load("bench_step"), _load("bench_kernels")
    defaults = re.findall(r"variants=\$\{2:-([^}]+)\}", script)
    assert len(defaults) == 2, defaults  # the 'fused' and 'step' parts
    for spec in ",".join(defaults).split(","):
        bench_step.parse_variant(spec)
    calls = [line.split("benchmarks/bench_kernels.py", 1)[1].split("2>&1")[0]
             for line in script.splitlines() if "benchmarks/bench_kernels.py " in line and "$python" in line]
    assert calls, "no bench_kernels.py call in gpu_suite.sh"
    for call in calls:
        words = shlex.split(call)
        options = [w for i, w in enumerate(words) if w != "--json" and (i == 0 or words[i - 1] != "--json")]
        bench_kernels.parse_args([*options, "--device", "cpu"])
    with pytest.raises(SystemExit, match="unknown modulat"):
        bench_kernels.parse_args(["--sections", "modulat"])
