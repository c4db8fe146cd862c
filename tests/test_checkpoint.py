"""Checkpoints: exact resume after SIGKILL, resharding, preemption, bad checkpoints, export."""

import copy
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from ports import free_port
from runs import committed, exported, kill_run, losses, start, train, wait_for, write_config
from sfd_train.config import build_config
from sfd_train.engine.checkpoint import CheckpointError, newest_complete, verify, write_marker
from sfd_train.engine.preemption import REQUEUE_EXIT_CODE
from sfd_train.engine.weights import load_initial_weights
from sfd_train.models import build_model

STEPS = 10


def _assert_same_weights(a: dict, b: dict) -> None:
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        different = [k for k in a[part] if not torch.equal(a[part][k], b[part][k])]
        assert not different, f"{part}: {len(different)} tensors differ, e.g. {different[:3]}"


@pytest.mark.slow
@pytest.mark.parametrize("strategy,nproc", [("ddp", 2), ("fsdp2", 2), ("zero2", 2)])
def test_sigkill_and_resume_is_bitwise_identical(tmp_path, strategy, nproc):
    config = write_config(
        tmp_path / "job.yaml", parallel={"strategy": strategy}, data={"num_workers": 2},
        train={"max_steps": STEPS}, checkpoint={"every": 2},
    )
    reference_dir, resumed_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    train(config, [f"run.output_dir={reference_dir}"], nproc=nproc)

    proc = start(config, [f"run.output_dir={resumed_dir}"], nproc=nproc, log=tmp_path / "killed.log")
    wait_for(lambda: any(s >= 4 for s in committed(resumed_dir)), what="a checkpoint at step >= 4", proc=proc)
    kill_run(proc)  # SIGKILL to every process: no handler runs, no save completes
    killed_at = max(committed(resumed_dir))
    assert killed_at < STEPS
    result = train(config, [f"run.output_dir={resumed_dir}"], nproc=nproc)
    assert "resumed from" in result.stdout + result.stderr

    _assert_same_weights(exported(reference_dir, tmp_path / "a.pt"), exported(resumed_dir, tmp_path / "b.pt"))
    # The resumed run logged the same losses as the uninterrupted one after the restart.
    ref, res = losses(reference_dir), losses(resumed_dir)
    assert all(ref[s] == res[s] for s in range(killed_at + 1, STEPS + 1))


@pytest.mark.slow
@pytest.mark.parametrize("first,second", [(2, 1), (1, 2)])
def test_resume_on_a_different_number_of_ranks(tmp_path, first, second):
    config = write_config(tmp_path / "job.yaml", train={"max_steps": STEPS}, checkpoint={"every": 5})
    reference_dir, resharded_dir = tmp_path / "reference", tmp_path / "resharded"
    train(config, [f"run.output_dir={reference_dir}"], nproc=first)
    train(config, [f"run.output_dir={resharded_dir}", "train.max_steps=5"], nproc=first)
    result = train(config, [f"run.output_dir={resharded_dir}"], nproc=second)
    assert f"written by {first} ranks" in result.stdout + result.stderr
    ref, res = losses(reference_dir), losses(resharded_dir)
    for step in range(6, STEPS + 1):
        assert res[step] == pytest.approx(ref[step], rel=2e-5), step


def _spawn_ranks(config, run_dir, world_size, extra=()):
    """Two ranks started by hand (no torchrun), so each one's own exit code is visible."""
    port = str(free_port())
    procs = []
    for rank in range(world_size):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        procs.append(subprocess.Popen([sys.executable, "-m", "sfd_train.train", str(config), f"run.output_dir={run_dir}", *extra],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


@pytest.mark.slow
def test_sigusr2_checkpoints_once_and_exits_for_requeue(tmp_path):
    config = write_config(tmp_path / "job.yaml", train={"max_steps": 10_000})
    run_dir = tmp_path / "run"
    procs = _spawn_ranks(config, run_dir, 2)
    wait_for(lambda: len(losses(run_dir)) >= 3, what="three logged steps", proc=procs[0])
    procs[1].send_signal(signal.SIGUSR2)  # one rank hears it; both must stop at the same step
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [REQUEUE_EXIT_CODE] * 2, outputs
    marker = json.loads((run_dir / "REQUEUE").read_text())
    assert committed(run_dir) == [marker["step"]] and "SIGUSR2" in marker["reason"]
    verify(run_dir / "checkpoints" / f"step_{marker['step']:09d}")


@pytest.mark.slow
def test_time_limit_takes_the_same_path(tmp_path):
    config = write_config(tmp_path / "job.yaml", train={"max_steps": 10_000})
    result = subprocess.run([sys.executable, "-m", "sfd_train.train", str(config), f"run.output_dir={tmp_path / 'run'}",
                             "run.time_limit=8s"], capture_output=True, text=True, timeout=180)
    assert result.returncode == REQUEUE_EXIT_CODE, result.stderr[-2000:]
    assert "time limit" in json.loads((tmp_path / "run" / "REQUEUE").read_text())["reason"]
    assert len(committed(tmp_path / "run")) == 1


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finished")
    config = write_config(tmp / "job.yaml", train={"max_steps": 4}, checkpoint={"every": 2})
    train(config, [f"run.output_dir={tmp / 'run'}"])
    return config, tmp / "run"


def test_incomplete_and_truncated_checkpoints_are_skipped_with_a_reason(finished_run, tmp_path):
    import shutil

    _, run_dir = finished_run
    root = tmp_path / "checkpoints"
    shutil.copytree(run_dir / "checkpoints", root)
    assert [p.name for p in sorted(root.iterdir())] == ["step_000000002", "step_000000004"]
    reasons = []
    (root / "step_000000004" / "COMMITTED").unlink()
    assert newest_complete(root, log=reasons.append).name == "step_000000002"
    assert "step_000000004: no COMMITTED marker" in reasons[0]
    write_marker(root / "step_000000004", 4)
    data_file = next(p for p in (root / "step_000000004").iterdir() if p.suffix == ".distcp")
    data_file.write_bytes(data_file.read_bytes()[:-10])
    reasons.clear()
    assert newest_complete(root, log=reasons.append).name == "step_000000002"
    assert f"file {data_file.name} is truncated" in reasons[0]
    with pytest.raises(CheckpointError, match="truncated"):
        verify(root / "step_000000004")


def test_incompatible_config_is_refused(finished_run, tmp_path):
    import shutil

    config, run_dir = finished_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    result = subprocess.run([sys.executable, "-m", "sfd_train.train", str(config), f"run.output_dir={copy}",
                             "train.max_steps=6", "model.depth=3"], capture_output=True, text=True, timeout=180)
    assert result.returncode != 0
    assert "incompatible config (model.depth: 2 in the checkpoint, 3 now)" in result.stderr


def test_export_writes_the_published_form_and_init_from_loads_it(finished_run, tmp_path):
    config_path, run_dir = finished_run
    out = tmp_path / "export.pt"
    result = subprocess.run([sys.executable, "-m", "sfd_train.cli", "export", str(run_dir), "--out", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    blob = torch.load(out, weights_only=False)
    assert set(blob) == {"model", "ema", "config"}
    model_config = build_config({"model": blob["config"]["model"]}).model
    model = build_model(model_config)
    model.load_state_dict(blob["model"], strict=True)  # as the authors' inference code would
    assert any(not torch.equal(blob["model"][k], blob["ema"][k]) for k in blob["model"])
    fresh, ema = build_model(model_config), build_model(model_config)
    load_initial_weights(fresh, ema, str(out))
    assert all(torch.equal(v, blob["model"][k]) for k, v in fresh.state_dict().items())
    assert torch.equal(ema.state_dict()["final_layer.linear.weight"], blob["ema"]["final_layer.linear.weight"])
    # Fine-tuning from it: the first loss is that of the trained weights, not of a fresh model.
    scratch, tuned = tmp_path / "scratch", tmp_path / "tuned"
    train(config_path, [f"run.output_dir={scratch}", "train.max_steps=1"])
    train(config_path, [f"run.output_dir={tuned}", "train.max_steps=1", f"checkpoint.init_from={out}"])
    assert losses(tuned)[1] < losses(scratch)[1]
    wrong = build_model(build_config({"model": {**blob["config"]["model"], "depth": 3}}).model)
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_initial_weights(wrong, copy.deepcopy(wrong), str(out))
