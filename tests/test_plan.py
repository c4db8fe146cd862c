"""sfd-launch plan (issue 29): the traced step against a real one and against closed-form byte counts,
the depth extrapolation against a full trace, the CLI's JSON contract, the refusal before a launch."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from ports import free_port
from sfd_train.config import ConfigError, load_config
from sfd_train.launchers import cli
from sfd_train.launchers.layout import plan as launcher_layout
from sfd_train.planning import DEVICES, resolve_device

REPO = Path(__file__).resolve().parents[1]
CONTRACT = {"memory_gib", "device_memory_gib", "fits", "max_micro_batch", "step_seconds", "images_per_second",
            "data_mb_per_s_per_node", "data_mb_per_s_total", "host_memory_gib_per_rank"}
CATEGORIES = {"parameters", "gradients", "optimizer", "ema", "activations", "buffers", "total"}

# Small enough for 4 CPU ranks in seconds; bf16 autocast and bf16 FSDP2 parameters as on a GPU.
SMALL = {
    "model": {"size": "custom", "depth": 3, "hidden_size": 64, "num_heads": 4, "input_size": 8, "in_channels": 16,
              "semantic_channels": 4, "num_classes": 10, "repa_projector_dim": 32, "repa_feature_dim": 32},
    "data": {"path": "synthetic", "num_workers": 0},
    "train": {"global_batch_size": 16, "mixed_precision": "bf16"},
    "parallel": {"strategy": "fsdp2", "param_dtype": "bf16"},
    "run": {"device": "cpu", "wandb_mode": "disabled"},
}
LAYOUTS = {
    "ddp": ["parallel.strategy=ddp"],
    "fsdp2": [],
    "hsdp": ["parallel.dp_replicate=2", "parallel.dp_shard=2"],
}


@pytest.fixture(scope="module")
def small_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("plan") / "small.yaml"
    path.write_text(yaml.safe_dump(SMALL))
    return path


def _trace(config, world: int, micro_batches: tuple[int, ...], target: str = "cpu"):
    """The plan's trace of one step of ``config`` on a fake group of ``world`` ranks, phase by phase."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from sfd_train.planning.memory import StepTracer, fake_world

    layout = launcher_layout(config, 1, world)
    config = replace(config, parallel=layout.parallel)
    with fake_world(world):
        tracer = StepTracer(config, world, layout.accumulation, target, FakeTensorMode())
        return tracer, tracer.measure(micro_batches)


# ------------------------------------------------------------------ devices and the config key
def test_devices_by_name_and_by_size():
    assert {"h100", "h200", "a100-40g", "a100-80g", "910b"} <= set(DEVICES)
    assert resolve_device("H100") is DEVICES["h100"]
    assert 79 < DEVICES["h100"].memory_gib < 80 and 140 < DEVICES["h200"].memory_gib < 141
    assert DEVICES["910b"].memory_gib == 64 and DEVICES["910b"].accelerator == "npu"
    custom = resolve_device("75GiB", accelerator="npu")
    assert custom.memory_gib == 75 and custom.cluster == "910b"
    assert resolve_device(40).memory_gib == 40
    for bad in ("h1000", "1", "-5"):
        with pytest.raises(ValueError, match="neither a device"):
            resolve_device(bad)
    for spec in DEVICES.values():
        assert "http" in spec.source  # every memory size cites where it comes from


def test_launcher_device_key_is_validated():
    assert load_config("tiny", ["launcher.device=h200"]).launcher.device == "h200"
    assert load_config("tiny", ["launcher.device=70"]).launcher.device == "70"  # a size in GiB
    with pytest.raises(ConfigError, match="launcher.device"):
        load_config("tiny", ["launcher.device=tpu"])


# ------------------------------------------------------------------ static categories, exactly
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_static_categories_are_the_closed_form_byte_counts(small_config, layout):
    """Parameters, optimizer state, EMA and DDP's buckets at every phase's peak are the bytes the
    parameter shapes give: FSDP2's dim-0 shard padded to the shard count, AdamW's two moments plus
    a 4-byte step counter per parameter, the EMA sharded like the model, DDP's bucket = gradients.
    (Planned for a GPU: fused AdamW, which allocates nothing else during its step.)"""
    from sfd_train.planning.scaling import inventory_of

    config = load_config(str(small_config), LAYOUTS[layout])
    tracer, [phases] = _trace(config, 4, (4,), target="cuda")
    inv = inventory_of(config.model)
    shards = {"ddp": 1, "fsdp2": 4, "hsdp": 2}[layout]

    def local(shape):  # this rank's (rank 0's) padded rows x the rest, as FSDP2 stores it
        return math.ceil(shape[0] / shards) * math.prod(shape[1:]) if shards > 1 else math.prod(shape)

    params = sum(local(p.shape) for p in inv.params) * 4 + inv.buffer_numel * 4
    trainable = [p for p in inv.params if p.trainable]
    optimizer = sum(2 * local(p.shape) * 4 + 4 for p in trainable)
    buckets = sum(p.numel for p in trainable) * 4 if layout == "ddp" else 0
    assert tracer.ema_bytes == params and tracer.bucket_bytes == buckets
    for name, memory in phases.items():
        assert (memory.parameters, memory.optimizer, memory.ema) == (params, optimizer, params), name
        assert memory.buffers >= buckets, name


# ------------------------------------------------------------------ fake trace vs a real step
@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_fake_trace_matches_a_real_step_per_category(small_config, tmp_path, layout):
    """The same step on 4 real gloo ranks with real tensors, measured with the same tracker: the step's
    peak and every category of it within 5% (goal of issue 29), and every category of every other phase
    within 5%, or within 10% of the peak: on gloo FSDP2's gradient collectives finish on gloo's own
    thread, so their buffers are sometimes still held at the end of the backward (0.13-0.27 MiB here,
    3-5% of the 5.2 MiB peak; timing, which a fake group cannot have)."""
    out = tmp_path / "real.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--master-port", str(free_port()),
           "-m", "sfd_train.planning.check", str(small_config), *LAYOUTS[layout], "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    real = json.loads(out.read_text())["phases"]
    _, [fake] = _trace(load_config(str(small_config), LAYOUTS[layout]), 4, (4,))
    assert set(real) == set(fake)
    peak_phase = max(real, key=lambda phase: real[phase]["total"])
    peak = real[peak_phase]["total"]
    for category in CATEGORIES:
        assert fake[peak_phase].gib()[category] == pytest.approx(real[peak_phase][category], rel=0.05, abs=1e-6), category
    for phase, memory in fake.items():
        planned = memory.gib()
        for category in CATEGORIES:
            measured = real[phase][category]
            assert planned[category] == pytest.approx(measured, rel=0.05, abs=0.1 * peak), (phase, category)


# ------------------------------------------------------------------ depth extrapolation
def test_depth_extrapolation_matches_a_full_trace(small_config, monkeypatch):
    """Traced at 5 and 6 blocks and extrapolated to 10, each phase is the 10-block trace's."""
    from sfd_train.planning import plan as plan_module

    config = load_config(str(small_config), ["model.depth=10"])
    layout = launcher_layout(config, 1, 4)
    job = replace(config, parallel=layout.parallel)
    extrapolated = plan_module.trace_memory(job, 4, layout.accumulation, "cuda", (2, 4))
    assert extrapolated.traced_depths == (5, 6)
    monkeypatch.setattr(plan_module, "TRACE_DEPTHS", (20, 21))
    full = plan_module.trace_memory(job, 4, layout.accumulation, "cuda", (2, 4))
    assert full.traced_depths == (10,)
    for micro_batch in (2, 3, 4):
        for phase, memory in full.phases(micro_batch).items():
            assert extrapolated.phases(micro_batch)[phase].total == pytest.approx(memory.total, rel=0.01), phase


def test_memory_grows_with_the_micro_batch_and_compile_keeps_less(small_config):
    from sfd_train.planning.plan import trace_memory

    config = load_config(str(small_config), ["parallel.compile=true"])
    layout = launcher_layout(config, 1, 4)
    job = replace(config, parallel=layout.parallel)
    compiled = trace_memory(job, 4, 1, "cuda", (2, 4))
    eager = trace_memory(replace(job, parallel=replace(job.parallel, compile=False)), 4, 1, "cuda", (2, 4))
    assert compiled.compile_savings[0] > 0 and eager.compile_savings == (0.0, 0.0)
    assert compiled.predict(4).activations < eager.predict(4).activations
    assert eager.predict(8).total > eager.predict(4).total > eager.predict(2).total


# ------------------------------------------------------------------ the command line
def test_plan_json_carries_the_contract(small_config, capsys):
    assert cli.main(["plan", str(small_config), "--nodes", "1", "--devices-per-node", "2", "--device", "h100",
                     "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert CONTRACT <= set(plan)
    assert set(plan["memory_gib"]) == CATEGORIES
    memory = plan["memory_gib"]
    assert memory["total"] == pytest.approx(sum(v for k, v in memory.items() if k != "total"))
    assert plan["fits"] is True and plan["device_memory_gib"] == DEVICES["h100"].memory_gib
    assert plan["max_micro_batch"] == 8  # 16 images over 2 ranks: all of them fit in one micro-batch
    assert plan["step_seconds"] > 0 and plan["images_per_second"] == pytest.approx(16 / plan["step_seconds"])
    per_image = plan["details"]["data_bytes_per_image"]
    assert plan["data_mb_per_s_total"] == pytest.approx(per_image * plan["images_per_second"] / 1e6)
    assert plan["data_mb_per_s_per_node"] == plan["data_mb_per_s_total"]  # one node
    assert plan["host_memory_gib_per_rank"] > 0


def test_plan_needs_a_device_and_names_layouts_that_cannot_split(small_config, capsys):
    assert cli.main(["plan", str(small_config)]) == 2
    assert "launcher.device" in capsys.readouterr().err
    # 16 images on 32 ranks: the launcher's mesh splits each sample over 2 ranks
    assert cli.main(["plan", str(small_config), "--nodes", "4", "--device", "h100", "--json"]) == 0
    assert "tensor parallel 2" in json.loads(capsys.readouterr().out)["details"]["layout"]
    # 10 images on 32 ranks: no degree inside a node leaves a data world that divides 10
    assert cli.main(["plan", str(small_config), "--nodes", "4", "--device", "h100", "train.global_batch_size=10"]) == 2
    assert "train.global_batch_size=32" in capsys.readouterr().err


def test_a_job_that_cannot_fit_is_refused_before_anything_is_written(small_config, tmp_path, capsys):
    """A 2.5 GiB device leaves 0.5 GiB to the job: 4,096 images per rank do not fit; the refusal names
    the largest micro-batch that fits and the accumulation that keeps the global batch."""
    out = tmp_path / "run"
    args = ["slurm", str(small_config), "--nodes", "1", "--devices-per-node", "2", "--device", "2.5",
            "train.global_batch_size=8192", f"run.output_dir={out}", "--dry-run"]
    assert cli.main(args) == 2
    captured = capsys.readouterr()
    assert "refused, nothing submitted" in captured.err and "largest micro-batch that fits is" in captured.err
    largest = int(captured.err.split("largest micro-batch that fits is ")[1].split(".")[0])
    assert 1 <= largest < 4096 and f"train.micro_batch_size={largest}" in captured.err
    assert "# verdict: does not fit" in captured.out
    assert not out.exists()  # nothing written, nothing submitted
    assert cli.main([*args, "--no-plan"]) == 0  # the user who knows better
    assert (out / "launch" / "job.sbatch").is_file()


# ------------------------------------------------------------------ host memory and data
def test_host_memory_at_start_up():
    from sfd_train.planning import host

    # Defined on the meta device (the engine since issue 28): one whole fp32 tensor at a time on the host,
    # or, on a CPU-only run, the rank's part of model and EMA.
    assert host.startup_host_bytes(1_000, 10, shard_group=8, largest_tensor=300) == 4 * 300
    assert host.startup_host_bytes(1_000, 10, shard_group=8, largest_tensor=300, device_is_cpu=True) == 1_010
    before = host.MODEL_BUILT_WHOLE_ON_EVERY_RANK
    try:
        host.MODEL_BUILT_WHOLE_ON_EVERY_RANK = True  # the engine before: model + EMA copy whole on every rank
        assert host.startup_host_bytes(1_000, 10, shard_group=8, largest_tensor=300) == 8 * 1_010
    finally:
        host.MODEL_BUILT_WHOLE_ON_EVERY_RANK = before


def test_data_bytes_per_image_from_the_format():
    from sfd_train.planning.data import data_bytes_per_image

    config = load_config("sfd_xl")
    half = data_bytes_per_image(config)
    compact = data_bytes_per_image(config, dino_storage="int8")
    features = 768 * 16 * 16
    assert half.dino_storage == "float16" and compact.dino_storage == "int8"
    # float16: 32+16 channels x 2 flips x 2 bytes of latents, one feature variant, plus headers
    assert 2 * (2 * 48 * 256) + 2 * features < half.bytes_per_image < 2 * (2 * 48 * 256) + 2 * features + 8192
    assert half.bytes_per_image - compact.bytes_per_image > 0.45 * 2 * features  # compact halves the features
    no_repa = data_bytes_per_image(load_config("sfd_xl", ["model.use_repa=false"]))
    assert no_repa.dino_storage == "none" and no_repa.bytes_per_image < 2 * (2 * 48 * 256) + 8192  # latents alone


# ------------------------------------------------------------------ benchmarks/gpu_suite.sh plan
def test_gpu_suite_plan_mode_parses_and_dispatches(tmp_path):
    from sfd_train.planning import check

    script = (REPO / "benchmarks" / "gpu_suite.sh").read_text().replace("\\\n", " ")
    cases = [line.split("plan_case", 1)[1].split() for line in script.splitlines()
             if line.strip().startswith("plan_case ") and "()" not in line]
    assert len(cases) == 3
    for name, *arguments in cases:
        args = check._parser().parse_args([*arguments, "--device", "cuda", "--compare", "--out", f"{name}.json"])
        load_config(args.config, args.overrides)  # every configuration is a valid config
    run = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "plan"], capture_output=True, text=True,
                         cwd=REPO, env={**os.environ, "OUT": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""})
    assert run.returncode == 1 and "no CUDA device" in run.stderr  # dispatched, stopped at the device check
    unknown = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "plans"], capture_output=True,
                             text=True, cwd=REPO)
    assert unknown.returncode == 2 and "| plan" in unknown.stderr
