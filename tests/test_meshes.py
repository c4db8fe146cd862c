"""Device meshes from config: hybrid sharding (HSDP) on a 2-D FSDP2 mesh."""

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
     ({"strategy": "ddp", "dp_replicate": 2}, "parallel.dp_replicate")],
)
def test_bad_degrees_are_refused(parallel, key):
    with pytest.raises(ConfigError) as err:
        build_config({"parallel": parallel})
    assert key in str(err.value)


@pytest.mark.slow
def test_hsdp_2x2_follows_the_single_process_trajectory(tmp_path):
    single = write_config(tmp_path / "single.yaml", parallel={"strategy": "ddp"})
    train(single, [f"run.output_dir={tmp_path / 'single'}"])
    hsdp = write_config(tmp_path / "hsdp.yaml", parallel={"strategy": "fsdp2", "dp_replicate": 2})
    run = train(hsdp, [f"run.output_dir={tmp_path / 'hsdp'}"], nproc=4)
    assert "fsdp2 (HSDP: 2 replicas x 2 shards) on 4 x" in run.stdout + run.stderr
    expected, mine = losses(tmp_path / "single"), losses(tmp_path / "hsdp")
    assert sorted(mine) == sorted(expected) == list(range(1, TINY["train"]["max_steps"] + 1))
    for step, value in expected.items():
        assert mine[step] == pytest.approx(value, rel=2e-5, abs=1e-6), f"step {step}"


STEPS = 10


@pytest.mark.slow
def test_hsdp_killed_and_resumed_is_bitwise_identical(tmp_path):
    config = write_config(tmp_path / "job.yaml", parallel={"strategy": "fsdp2", "dp_replicate": 2},
                          train={"max_steps": STEPS}, checkpoint={"every": 2})
    reference_dir, resumed_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    train(config, [f"run.output_dir={reference_dir}"], nproc=4)
    proc = start(config, [f"run.output_dir={resumed_dir}"], nproc=4, log=tmp_path / "killed.log")
    wait_for(lambda: any(s >= 4 for s in committed(resumed_dir)), what="a checkpoint at step >= 4", proc=proc)
    kill_run(proc)
    killed_at = max(committed(resumed_dir))
    assert killed_at < STEPS
    result = train(config, [f"run.output_dir={resumed_dir}"], nproc=4)
    assert "resumed from" in result.stdout + result.stderr
    expected = exported(reference_dir, tmp_path / "a.pt")
    actual = exported(resumed_dir, tmp_path / "b.pt")
    for part in ("model", "ema"):
        different = [k for k in expected[part] if not torch.equal(expected[part][k], actual[part][k])]
        assert not different, f"{part}: {len(different)} tensors differ, e.g. {different[:3]}"


@pytest.mark.slow
def test_a_hsdp_checkpoint_resumes_on_a_flat_mesh(tmp_path):
    """Saved on (dp_replicate 2, dp_shard 2), resumed on dp_shard 2: the same losses after."""
    config = write_config(tmp_path / "job.yaml", train={"max_steps": STEPS}, checkpoint={"every": 5})
    reference_dir, resharded_dir = tmp_path / "reference", tmp_path / "resharded"
    train(config, [f"run.output_dir={reference_dir}", "parallel.dp_replicate=2"], nproc=4)
    train(config, [f"run.output_dir={resharded_dir}", "parallel.dp_replicate=2", "train.max_steps=5"], nproc=4)
    result = train(config, [f"run.output_dir={resharded_dir}", "parallel.dp_shard=2"], nproc=2)
    assert "written by 4 ranks" in result.stdout + result.stderr
    ref, res = losses(reference_dir), losses(resharded_dir)
    for step in range(6, STEPS + 1):
        assert res[step] == pytest.approx(ref[step], rel=2e-5), step
