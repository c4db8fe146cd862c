"""Device meshes from config: hybrid sharding (HSDP, ZeRO++ hpZ) and tensor parallel composed with FSDP2."""

import json
import shutil
from pathlib import Path

import pytest

from sfd_train.config import ConfigError, build_config
import torch

from runs import TINY, committed, exported, kill_run, losses, start, train, wait_for, write_config


@pytest.mark.parametrize(
    "parallel,world,shape",
    [({}, 4, (1, 4, 1)), ({"dp_replicate": 2}, 4, (2, 2, 1)), ({"dp_replicate": 2, "dp_shard": 2}, 4, (2, 2, 1))],
)
def test_mesh_shape_resolves_the_rest(parallel, world, shape):
    assert build_config({"parallel": parallel}).parallel.mesh_shape(world) == shape


@pytest.mark.parametrize(
    "parallel,world,key,message",
    [
        ({"dp_replicate": 3}, 4, "parallel.dp_replicate", "does not make the 4 ranks"),
        ({"dp_replicate": 2, "dp_shard": 4}, 4, "parallel.dp_replicate", "does not make the 4 ranks"),
    ],
)
def test_a_mesh_that_does_not_fit_the_world_is_named(parallel, world, key, message):
    with pytest.raises(ConfigError, match=message) as err:
        build_config({"parallel": parallel}).parallel.mesh_shape(world)
    assert key in str(err.value)


@pytest.mark.parametrize(
    "parallel,key",
    [({"dp_replicate": 0}, "parallel.dp_replicate"), ({"dp_shard": 0}, "parallel.dp_shard"),
     ({"strategy": "ddp", "dp_replicate": 2}, "parallel.dp_replicate"),
     ({"strategy": "zero2", "dp_replicate": 2}, "parallel.dp_replicate"), ({"tp": 0}, "parallel.tp"),
     ({"strategy": "ddp", "tp": 2}, "parallel.tp"), ({"tp": 2, "compile": True}, "parallel.tp")],
)
def test_bad_degrees_are_refused(parallel, key):
    with pytest.raises(ConfigError) as err:
        build_config({"parallel": parallel})
    assert key in str(err.value)


STEPS = 10


def layout_run(tmp_path: Path, name: str, overrides: list[str], nproc: int = 4) -> Path:
    """A STEPS-step run (checkpoint every 2 steps) on ``nproc`` ranks; returns its folder."""
    config = write_config(tmp_path / f"{name}.yaml", train={"max_steps": STEPS}, checkpoint={"every": 2})
    train(config, [f"run.output_dir={tmp_path / name}", *overrides], nproc=nproc)
    return tmp_path / name


@pytest.fixture(scope="module")
def hsdp_reference(tmp_path_factory):
    return layout_run(tmp_path_factory.mktemp("hsdp"), "reference", ["parallel.dp_replicate=2"])


@pytest.mark.slow
def test_hsdp_killed_and_resumed_is_bitwise_identical(tmp_path, hsdp_reference):
    config = write_config(tmp_path / "job.yaml", parallel={"strategy": "fsdp2", "dp_replicate": 2},
                          train={"max_steps": STEPS}, checkpoint={"every": 2})
    resumed_dir = tmp_path / "killed"
    proc = start(config, [f"run.output_dir={resumed_dir}"], nproc=4, log=tmp_path / "killed.log")
    wait_for(lambda: any(s >= 4 for s in committed(resumed_dir)), what="a checkpoint at step >= 4", proc=proc)
    kill_run(proc)
    killed_at = max(committed(resumed_dir))
    assert killed_at < STEPS
    result = train(config, [f"run.output_dir={resumed_dir}"], nproc=4)
    assert "resumed from" in result.stdout + result.stderr
    expected = exported(hsdp_reference, tmp_path / "a.pt")
    actual = exported(resumed_dir, tmp_path / "b.pt")
    for part in ("model", "ema"):
        different = [k for k in expected[part] if not torch.equal(expected[part][k], actual[part][k])]
        assert not different, f"{part}: {len(different)} tensors differ, e.g. {different[:3]}"


def rewound_copy(run_dir: Path, step: int, to: Path) -> Path:
    """A copy of a finished run as it was at ``step``: later checkpoints and metrics removed (so a
    resume must write them again)."""
    shutil.copytree(run_dir, to)
    for folder in (to / "checkpoints").glob("step_*"):
        if int(folder.name.split("_")[1]) > step:
            shutil.rmtree(folder)
    metrics = to / "metrics.jsonl"
    kept = [line for line in metrics.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    metrics.write_text("".join(line + "\n" for line in kept))
    return to


def resumes_on_another_layout(tmp_path: Path, reference: Path, resumed_with: list[str], nproc: int) -> None:
    """A copy of the 4-rank ``reference`` rewound to step 4 resumes on ``nproc`` ranks with
    ``resumed_with``: steps 5.. must have the reference's losses."""
    resharded_dir = rewound_copy(reference, 4, tmp_path / "resharded")
    assert max(losses(resharded_dir)) == 4
    config = write_config(tmp_path / "job.yaml", train={"max_steps": STEPS}, checkpoint={"every": 2})
    result = train(config, [f"run.output_dir={resharded_dir}", *resumed_with], nproc=nproc)
    assert "written by 4 ranks" in result.stdout + result.stderr
    ref, res = losses(reference), losses(resharded_dir)
    assert sorted(res) == list(range(1, STEPS + 1))
    for step in range(5, STEPS + 1):
        assert res[step] == pytest.approx(ref[step], rel=2e-5), step


@pytest.mark.slow
def test_a_hsdp_checkpoint_resumes_on_a_flat_mesh(tmp_path, hsdp_reference):
    """Saved on (dp_replicate 2, dp_shard 2), resumed on dp_shard 2: the same losses after."""
    resumes_on_another_layout(tmp_path, hsdp_reference, ["parallel.dp_shard=2"], nproc=2)


@pytest.mark.slow
def test_a_tp2_checkpoint_resumes_with_tp1(tmp_path):
    """Saved with tp 2 x dp_shard 2, resumed with tp 1 on dp_shard 2: the same losses after."""
    reference = layout_run(tmp_path, "reference", ["parallel.tp=2"])
    resumes_on_another_layout(tmp_path, reference, [], nproc=2)


def test_tensor_parallel_groups_share_their_samples():
    parallel = build_config({"parallel": {"tp": 2, "dp_replicate": 2}}).parallel
    assert parallel.mesh_shape(8) == (2, 2, 2)
    assert parallel.data_world(8) == 4
    assert [parallel.data_rank(rank, 8) for rank in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_zero3_on_two_replicas_asks_deepspeed_for_hpz():
    from sfd_train.engine.zero import deepspeed_config

    config = build_config({"parallel": {"strategy": "zero3", "dp_replicate": 2}, "train": {"global_batch_size": 16}})
    assert deepspeed_config(config, 8, "cpu")["zero_optimization"]["zero_hpz_partition_size"] == 4
    flat = build_config({"parallel": {"strategy": "zero3"}, "train": {"global_batch_size": 16}})
    assert "zero_hpz_partition_size" not in deepspeed_config(flat, 8, "cpu")["zero_optimization"]


CLIP = {"grad_clip": 0.5}  # clipping on: the gradient norm must be right across meshes


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """The 1-process run every layout must follow (with gradient clipping)."""
    root = tmp_path_factory.mktemp("single")
    train(write_config(root / "single.yaml", parallel={"strategy": "ddp"}, train=CLIP), [f"run.output_dir={root / 'run'}"])
    return root / "run"


def _grad_norms(run_dir):
    from sfd_train.engine.metrics import read_metrics

    return {r["step"]: r["grad_norm"] for r in read_metrics(run_dir)}


@pytest.mark.slow
@pytest.mark.parametrize(
    "parallel,nproc,layout",
    [({"dp_replicate": 2}, 4, "fsdp2 (HSDP: 2 replicas x 2 shards)"),
     ({"tp": 2}, 2, "fsdp2 (1 shards, tensor parallel 2)"),
     ({"tp": 2}, 4, "fsdp2 (2 shards, tensor parallel 2)"),
     ({"strategy": "zero3", "dp_replicate": 2}, 4, "zero3 (ZeRO++ hpZ: 2 replicas x 2 shards)")],
    ids=["hsdp-2x2", "tp2", "tp2-x-fsdp2", "zero3-hpz"],
)
def test_layout_follows_the_single_process_trajectory(tmp_path, single_process, parallel, nproc, layout):
    config = write_config(tmp_path / "job.yaml", parallel=parallel, train=CLIP)
    run = train(config, [f"run.output_dir={tmp_path / 'run'}"], nproc=nproc)
    assert f"with {layout} on {nproc} x" in run.stdout + run.stderr
    expected, mine = losses(single_process), losses(tmp_path / "run")
    assert sorted(mine) == sorted(expected) == list(range(1, TINY["train"]["max_steps"] + 1))
    for step, value in expected.items():
        assert mine[step] == pytest.approx(value, rel=2e-5, abs=1e-6), f"step {step}"
    for step, value in _grad_norms(single_process).items():
        assert _grad_norms(tmp_path / "run")[step] == pytest.approx(value, rel=2e-5), f"grad norm, step {step}"
    if "tp" in parallel:  # the checkpoint holds the plain global layout of the split weights
        ref, mine = exported(single_process, tmp_path / "a.pt"), exported(tmp_path / "run", tmp_path / "b.pt")
        for part in ("model", "ema"):
            for key, value in ref[part].items():
                torch.testing.assert_close(mine[part][key], value, rtol=1e-4, atol=1e-6, msg=f"{part} {key}")
