"""One job per run folder: a second job is refused with the holder's name; SIGKILL frees the folder."""

import errno
import logging
import os
import socket
import subprocess

import pytest

from runs import command, committed, kill_run, start, train, wait_for, write_config
from sfd_train.engine import run_lock
from sfd_train.engine.run import FOLDER_BUSY_EXIT_CODE
from sfd_train.engine.run_lock import RunFolderBusy, RunFolderLock


def test_a_held_folder_is_refused_with_the_holder_named(tmp_path):
    first = RunFolderLock(tmp_path / "run")
    first.acquire()
    # flock locks belong to an open file: a second open conflicts even in the same process.
    with pytest.raises(RunFolderBusy, match=rf"in use by another job \(pid {os.getpid()} on {socket.gethostname()}"):
        RunFolderLock(tmp_path / "run").acquire()
    first.release()
    again = RunFolderLock(tmp_path / "run")
    again.acquire()
    again.release()


def test_a_filesystem_without_locks_warns_and_goes_on(tmp_path, monkeypatch, caplog):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(run_lock.fcntl, "flock", no_locks)
    with caplog.at_level(logging.WARNING, logger="sfd_train"):
        RunFolderLock(tmp_path / "run").acquire()
    assert "has no file locks" in caplog.text and str(tmp_path / "run") in caplog.text


@pytest.mark.slow
def test_a_second_job_is_refused_and_a_killed_job_frees_the_folder(tmp_path):
    config = write_config(tmp_path / "job.yaml", train={"max_steps": 100_000}, checkpoint={"every": 3})
    run_dir = tmp_path / "run"
    first = start(config, [f"run.output_dir={run_dir}"], log=tmp_path / "first.log")
    try:
        wait_for(lambda: committed(run_dir), what="the first job's first checkpoint", proc=first)
        # Two ranks: rank 1 learns of rank 0's failure and stops too, instead of waiting for it.
        second = subprocess.run(command(config, [f"run.output_dir={run_dir}"], nproc=2), capture_output=True, text=True,
                                timeout=180, check=False)
        assert second.returncode != 0
        assert f"{run_dir} is in use by another job (pid " in second.stderr, second.stderr[-3000:]
        single = subprocess.run(command(config, [f"run.output_dir={run_dir}"], nproc=1), capture_output=True, text=True,
                                timeout=180, check=False)
        assert single.returncode == FOLDER_BUSY_EXIT_CODE, single.stderr[-3000:]
        assert first.poll() is None, "the first job must keep running"
    finally:
        kill_run(first)
    killed_at = max(committed(run_dir))
    result = train(config, [f"run.output_dir={run_dir}", f"train.max_steps={killed_at + 2}"])
    assert f"resumed from {run_dir / 'checkpoints'}" in result.stdout + result.stderr
