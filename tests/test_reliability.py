"""What a run survives: signals through torchrun, a killed launcher, a stopped rank, damaged
or unwritable checkpoints, and resumes that change settings or point at the wrong place.

Each test reproduces a way users lost work or got a silently wrong run (see docs/reliability.md).
"""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from fake_cluster.fakeslurm import descendants, is_running
from runs import command, committed, exported, kill_run, losses, start, train, wait_for, write_config
from sfd_train.engine.preemption import REQUEUE_EXIT_CODE

STEPS = 8


def _assert_same_weights(a: dict, b: dict) -> None:
    for part in ("model", "ema"):
        different = [k for k in a[part] if not torch.equal(a[part][k], b[part][k])]
        assert not different, f"{part}: {len(different)} tensors differ, e.g. {different[:3]}"


def _run(config, overrides, env=None, preexec_fn=None, timeout=300) -> subprocess.CompletedProcess:
    """One process, whatever its exit code."""
    return subprocess.run(command(config, list(overrides), 1), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, preexec_fn=preexec_fn)


def _ranks(launcher_pid: int) -> dict[int, int]:
    """``{rank: pid}`` of torchrun's workers (its direct children; their loader workers are not ranks)."""
    ranks = {}
    for pid in descendants(launcher_pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        variables = dict(item.split(b"=", 1) for item in environ if b"=" in item)
        if ppid == launcher_pid and b"RANK" in variables:
            ranks[int(variables[b"RANK"])] = pid
    return ranks


# ---------------------------------------------------------------------------------- signals and processes
@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A 2-rank run with 2 loader workers per rank, trained to the end without interruption."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    config = write_config(tmp / "job.yaml", data={"num_workers": 2}, train={"max_steps": 60})
    train(config, [f"run.output_dir={tmp / 'run'}"], nproc=2)
    return config, exported(tmp / "run", tmp / "weights.pt")


@pytest.mark.slow
def test_sigterm_to_torchrun_with_loader_workers_checkpoints_and_resumes_exactly(tmp_path, uninterrupted):
    config, reference = uninterrupted
    run_dir = tmp_path / "run"
    proc = start(config, [f"run.output_dir={run_dir}"], nproc=2, log=tmp_path / "first.log")
    wait_for(lambda: len(losses(run_dir)) >= 5, what="five logged steps", proc=proc)
    os.kill(proc.pid, signal.SIGTERM)  # what Kubernetes, scancel without --signal, or `kill` send
    proc.wait(timeout=120)
    log = (tmp_path / "first.log").read_text()
    marker = json.loads((run_dir / "REQUEUE").read_text())
    assert "SIGTERM" in marker["reason"], log[-3000:]
    assert committed(run_dir) == [marker["step"]] and marker["step"] < 60, log[-3000:]
    assert "killed by signal" not in log
    result = train(config, [f"run.output_dir={run_dir}"], nproc=2)
    assert f"at step {marker['step']}" in result.stdout + result.stderr
    _assert_same_weights(reference, exported(run_dir, tmp_path / "resumed.pt"))


@pytest.mark.slow
def test_a_killed_torchrun_takes_its_ranks_and_loader_workers_with_it(tmp_path):
    config = write_config(tmp_path / "job.yaml", data={"num_workers": 2}, train={"max_steps": 100_000},
                          checkpoint={"every": 3})
    run_dir = tmp_path / "run"
    proc = start(config, [f"run.output_dir={run_dir}"], nproc=2, log=tmp_path / "first.log")
    tree: list[int] = []
    try:
        wait_for(lambda: committed(run_dir), what="a first checkpoint", proc=proc)
        # Ranks and their loader workers: orphans once torchrun is gone, so no longer its descendants.
        wait_for(lambda: len(descendants(proc.pid)) >= 6, what="2 ranks with 2 loader workers each", proc=proc)
        tree = descendants(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.time() + 30
        while time.time() < deadline and any(is_running(pid) for pid in tree):
            time.sleep(0.2)
        left = [pid for pid in tree if is_running(pid)]
        assert not left, f"processes of the run still alive 30 s after its launcher died: {left}"
    finally:
        for pid in tree:  # whatever the outcome, no orphan may outlive the test
            if is_running(pid):
                os.kill(pid, signal.SIGKILL)
        kill_run(proc)
    assert "the launcher of this rank" in (tmp_path / "first.log").read_text()
    stopped_at = max(committed(run_dir))
    result = train(config, [f"run.output_dir={run_dir}", f"train.max_steps={stopped_at + 2}"], nproc=2)
    assert f"resumed from {run_dir / 'checkpoints'}" in result.stdout + result.stderr


@pytest.mark.slow
def test_a_stopped_rank_is_named_once_the_collective_timeout_passes(tmp_path):
    config = write_config(tmp_path / "job.yaml", train={"max_steps": 100_000},
                          parallel={"collective_timeout": "8s"})
    run_dir, log = tmp_path / "run", tmp_path / "run.log"
    proc = start(config, [f"run.output_dir={run_dir}"], nproc=2, log=log)
    try:
        wait_for(lambda: len(losses(run_dir)) >= 3, what="three logged steps", proc=proc)
        stopped = _ranks(proc.pid)[1]
        os.kill(stopped, signal.SIGSTOP)  # a hung NIC or a stopped process: it never answers again
        began = time.time()
        # The 8 s timeout, then a few seconds to see whose heartbeat still moves. (torchrun
        # would then take 30 s more to SIGKILL the stopped rank; the test does not wait for it.)
        wait_for(lambda: "waited longer than parallel.collective_timeout" in log.read_text(), timeout=90,
                 what="rank 0 to give up waiting", proc=proc)
        waited = time.time() - began
        wait_for(lambda: "not answering" in log.read_text() or "still answers" in log.read_text(), timeout=30,
                 what="rank 0's verdict", proc=proc)
    finally:
        kill_run(proc)
    text = log.read_text()
    assert "waited longer than parallel.collective_timeout (8s)" in text, text[-4000:]
    assert f"not answering: rank 1 (pid {stopped} on " in text, text[-4000:]
    assert waited < 60


def test_zero_strategies_run_as_one_plain_process(tmp_path):
    config = write_config(tmp_path / "job.yaml", parallel={"strategy": "zero2"}, train={"max_steps": 2})
    result = _run(config, [f"run.output_dir={tmp_path / 'run'}"], env={"DS_ACCELERATOR": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert committed(tmp_path / "run") == [2]


# ---------------------------------------------------------------------------------- damaged checkpoints
@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stopped")
    config = write_config(tmp / "job.yaml", checkpoint={"every": 2, "keep": 2})
    train(config, [f"run.output_dir={tmp / 'run'}", "train.max_steps=4"])
    assert committed(tmp / "run") == [2, 4]
    return config, tmp / "run"


@pytest.fixture
def two_checkpoints(stopped_run, tmp_path):
    """A run folder of its own with checkpoints at steps 2 and 4, as a job stopped at step 4 leaves it."""
    config, run_dir = stopped_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns(".lock"))
    return config, copy


def _distcp(checkpoint: Path) -> Path:
    return next(checkpoint.glob("*.distcp"))


@pytest.mark.parametrize("damage", ["truncated", "same_size", "train_state"])
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_run_finishes(two_checkpoints, damage):
    config, run_dir = two_checkpoints
    newest = run_dir / "checkpoints" / "step_000000004"
    if damage == "truncated":
        data = _distcp(newest)
        data.write_bytes(data.read_bytes()[:-100])
    elif damage == "same_size":
        data = _distcp(newest)
        data.write_bytes(b"\x00" * data.stat().st_size)  # the file's size is right, its content is not
    else:
        state = newest / "train_state.pt"
        state.write_bytes(b"\x13" * state.stat().st_size)
    # keep=2 and 4 more checkpoints: the damaged one must neither block step 4's save
    # nor survive the good ones in pruning.
    result = train(config, [f"run.output_dir={run_dir}", "train.max_steps=8"])
    output = result.stdout + result.stderr
    assert "checkpoint damaged: " in output and "step_000000004" in output
    assert "resumed from" in output and "at step 2" in output
    assert committed(run_dir) == [6, 8]
    rejected = run_dir / "checkpoints" / "rejected" / "step_000000004"
    assert (rejected / "REJECTED.txt").is_file()
    assert sorted(losses(run_dir)) == list(range(1, 9))


def test_when_every_checkpoint_fails_to_load_the_run_stops_then_starts_afresh(two_checkpoints):
    config, run_dir = two_checkpoints
    for step in (2, 4):
        data = _distcp(run_dir / "checkpoints" / f"step_{step:09d}")
        data.write_bytes(b"\x00" * data.stat().st_size)
    result = _run(config, [f"run.output_dir={run_dir}"])
    # The weights may hold part of a damaged checkpoint, so this run must not train on.
    assert result.returncode == 2, result.stderr[-3000:]
    assert "no checkpoint in" in result.stderr and "start from step 0" in result.stderr
    assert committed(run_dir) == [] and len(list((run_dir / "checkpoints" / "rejected").iterdir())) == 2
    train(config, [f"run.output_dir={run_dir}", "train.max_steps=2"])
    assert committed(run_dir) == [2]


def test_damaged_checkpoints_give_way_to_the_uninterrupted_trajectory(two_checkpoints, tmp_path):
    config, run_dir = two_checkpoints
    reference = tmp_path / "reference"
    train(config, [f"run.output_dir={reference}", "train.max_steps=8"])
    data = _distcp(run_dir / "checkpoints" / "step_000000004")
    data.write_bytes(data.read_bytes()[:-100])
    train(config, [f"run.output_dir={run_dir}", "train.max_steps=8"])
    _assert_same_weights(exported(reference, tmp_path / "a.pt"), exported(run_dir, tmp_path / "b.pt"))


def _limit_file_size(limit: int):
    # A file larger than this fails with EFBIG, the way a full disk fails with ENOSPC:
    # in the middle of the big checkpoint write (the small files stay below it).
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@pytest.mark.parametrize("async_save", [True, False])
def test_a_save_that_cannot_be_written_names_the_folder_and_keeps_the_older_ones(two_checkpoints, async_save):
    config, run_dir = two_checkpoints
    result = _run(config, [f"run.output_dir={run_dir}", "train.max_steps=8", f"checkpoint.async_save={async_save}"],
                  preexec_fn=_limit_file_size(1 << 20))
    assert result.returncode == 1, result.stderr[-3000:]
    step_dir = run_dir / "checkpoints" / "step_000000006"
    line = next(line for line in result.stderr.splitlines() if line.startswith("sfd-train: "))
    assert f"saving checkpoint {step_dir} failed (" in line and "MiB free on that filesystem" in line, line
    # The OS's reason, or torch's zip writer's word for a short write, which has no errno.
    assert "File too large" in line or "a write was cut short" in line, line
    assert "Traceback" not in result.stderr
    assert committed(run_dir) == [2, 4] and not step_dir.exists()
    # Once there is room again the same command resumes from step 4 and finishes.
    train(config, [f"run.output_dir={run_dir}", "train.max_steps=8"])
    assert committed(run_dir) == [6, 8]


# ---------------------------------------------------------------------------------- what a resume may change
def test_resume_never_refuses_a_folder_that_holds_another_run(two_checkpoints):
    config, run_dir = two_checkpoints
    saved_config = (run_dir / "config.yaml").read_bytes()
    result = _run(config, [f"run.output_dir={run_dir}", "checkpoint.resume=never"])
    assert result.returncode == 2
    assert "config key 'checkpoint.resume': 'never', but" in result.stderr and "steps 2, 4" in result.stderr
    assert committed(run_dir) == [2, 4] and (run_dir / "config.yaml").read_bytes() == saved_config


def test_a_fresh_folder_with_resume_never_trains(tmp_path):
    config = write_config(tmp_path / "job.yaml", train={"max_steps": 2})
    result = _run(config, [f"run.output_dir={tmp_path / 'run'}", "checkpoint.resume=never"])
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_changed_learning_rate_is_applied_and_recorded(two_checkpoints):
    config, run_dir = two_checkpoints
    result = train(config, [f"run.output_dir={run_dir}", "train.max_steps=6", "optimizer.lr=0.0002"])
    assert "optimizer.lr: 0.001 -> 0.0002" in result.stdout + result.stderr
    records = {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    # The lr logged after step s is the one step s + 1 will use (warm-up is over by then).
    assert records[4]["lr"] == pytest.approx(1e-3) and records[6]["lr"] == pytest.approx(2e-4)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["optimizer"]["lr"] == 2e-4


def test_a_refused_resume_leaves_the_saved_config_alone(two_checkpoints):
    config, run_dir = two_checkpoints
    saved_config = (run_dir / "config.yaml").read_bytes()
    result = _run(config, [f"run.output_dir={run_dir}", "train.max_steps=6", "model.hidden_size=128"])
    assert result.returncode == 2
    assert "incompatible config (model.hidden_size: 64 in the checkpoint, 128 now)" in result.stderr
    assert (run_dir / "config.yaml").read_bytes() == saved_config


def test_max_steps_below_the_checkpoint_is_refused(two_checkpoints):
    config, run_dir = two_checkpoints
    result = _run(config, [f"run.output_dir={run_dir}", "train.max_steps=3"])
    assert result.returncode == 2
    assert "config key 'train.max_steps': 3 is below the step of the newest checkpoint (4" in result.stderr


# ---------------------------------------------------------------------------------- bad input, one line
def test_fewer_model_classes_than_the_data_has_is_refused(tmp_path):
    config = write_config(tmp_path / "job.yaml", model={"num_classes": 9})
    result = _run(config, [f"run.output_dir={tmp_path / 'run'}"])
    assert result.returncode == 2
    assert "config key 'model.num_classes': 9, but the data" in result.stderr and "10 classes" in result.stderr


def test_a_missing_data_folder_is_one_line_and_code_2(tmp_path):
    config = write_config(tmp_path / "job.yaml", data={"path": str(tmp_path / "nowhere")})
    result = _run(config, [f"run.output_dir={tmp_path / 'run'}"])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"config key 'data.path': no manifest.json in '{tmp_path / 'nowhere'}'" in result.stderr


def test_export_and_init_from_name_what_is_wrong_with_the_path(two_checkpoints, tmp_path):
    config, run_dir = two_checkpoints
    # The checkpoints folder itself works like the run folder.
    out = tmp_path / "export.pt"
    result = subprocess.run([sys.executable, "-m", "sfd_train.cli", "export", str(run_dir / "checkpoints"),
                             "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert torch.load(out, weights_only=False)["config"]["train"]["max_steps"] == 4
    missing = tmp_path / "missing.pt"
    result = _run(config, [f"run.output_dir={tmp_path / 'other'}", f"checkpoint.init_from={missing}"])
    assert result.returncode == 2
    assert f"{missing} does not exist" in result.stderr and "COMMITTED" not in result.stderr
