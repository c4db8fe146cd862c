"""The Slurm scripts (job.sbatch, node.sh) run for real with a stand-in torchrun
(tests/fake_cluster/torchrun_bin) whose "workers" follow the trainer's preemption
contract in a fraction of a second, so these check the script mechanics in seconds:

* on the REAL Slurm cluster (fixture ``slurm_cluster``, scripts/slurm_cluster.sh): the
  signal path batch shell -> srun -> node.sh -> workers, the requeue decision, failure
  requeues, set-up errors, a grant that cannot keep the global batch;
* without Slurm: node.sh alone, as Ascend nodes and plain torchrun users run it;
* on the STAND-IN Slurm (tests/fake_cluster/bin) only what the real cluster here cannot
  serve: a job on Ascend NPUs (``--gres=npu:N``; these nodes have no NPUs).

tests/test_slurm_e2e.py runs the real trainer on the real cluster.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import real_slurm as slurm
from fake_cluster import fakeslurm, harness
from ports import free_port
from sfd_train.config import load_config
from sfd_train.launchers.job import build_job
from sfd_train.launchers.node import render_node_script

STAND_IN = [
    "launcher.nodes=2", "launcher.devices_per_node=1", "launcher.accelerator=cpu",
    f"launcher.torchrun={harness.STAND_IN_TORCHRUN}", f"launcher.python={sys.executable}",
]


def launch(tmp_path: Path, *overrides: str, dry_run: bool = False, **env: str) -> tuple[int | None, Path]:
    """`sfd-launch slurm` of a job with the stand-in torchrun on the real cluster; returns
    the job id (None on a dry run) and the run folder, where the stand-in workers write."""
    out = tmp_path / "run"
    out.mkdir(parents=True, exist_ok=True)
    config = harness.write_job_config(tmp_path / "job.yaml")
    job_env = harness.base_env(FAKE_TORCHRUN_OUTPUT=str(out), FAKE_TORCHRUN_RECORD=str(tmp_path / "torchrun.jsonl"), **env)
    result = subprocess.run(
        [sys.executable, "-m", "sfd_train.launchers.cli", "slurm", str(config), f"run.output_dir={out}", *STAND_IN,
         *overrides, *(["--dry-run"] if dry_run else [])],
        cwd=tmp_path, env=job_env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    if dry_run:
        return None, out
    match = re.search(r"Submitted batch job (\d+)", result.stdout)
    assert match, result.stdout
    return int(match.group(1)), out


@pytest.fixture
def jobs(slurm_cluster):
    """Job ids a test submitted; cancelled afterwards, whatever happened."""
    ids: list[int] = []
    yield ids
    for job_id in ids:
        slurm.cancel(job_id)


@pytest.mark.slow
def test_warning_signal_reaches_the_workers_and_the_job_is_requeued(jobs, tmp_path):
    job_id, out = launch(tmp_path, FAKE_TORCHRUN_WORKERS="1", FAKE_TORCHRUN_WORKER_SECONDS="60")
    jobs.append(job_id)
    events = out / "events.jsonl"
    slurm.wait_for(lambda: events.exists() and events.read_text().count('"start"') == 2, 60, "both workers")
    # What --signal=B:USR2@90 does before the time limit: SIGUSR2 to the batch shell only.
    slurm.run("scancel", "--batch", "--signal=USR2", str(job_id))
    info = slurm.wait_finished(job_id, 120)
    log = slurm.logs(out, ".out")
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log

    first = [e for e in harness.read_jsonl(events) if e["restart"] == "0"]
    assert sorted(e["rank"] for e in first if e["event"] == "signal") == [0, 1]
    assert all(e["signum"] == signal.SIGUSR2 for e in first if e["event"] == "signal")
    assert sorted(e["rank"] for e in harness.read_jsonl(events) if e["restart"] == "1" and e["event"] == "done") == [0, 1]

    starts = harness.read_jsonl(tmp_path / "torchrun.jsonl")
    assert len(starts) == 4 and all(s["usr2_ignored"] for s in starts)  # torchrun survived the USR2
    options = starts[0]["options"]
    # The head node's NodeAddr, not its name: n1 does not resolve on this machine.
    assert options["rdzv-backend"] == "c10d" and options["rdzv-endpoint"].startswith("127.0.0.1:")
    assert options["rdzv-id"] == str(job_id) and options["nnodes"] == "2" and options["max-restarts"] == "0"
    assert starts[0]["program"][-4:] == ["parallel.backend=gloo", "run.device=cpu", "parallel.dp_replicate=2",
                                         "parallel.dp_shard=1"]

    assert not (out / "REQUEUE").exists()
    assert '"reason": "SIGUSR2"' in (out / "launch" / f"requeue-{job_id}-0.json").read_text()
    for line in ("rendezvous on n1 (NodeAddr 127.0.0.1)", "received SIGUSR2: passing it to the training step",
                 "requeueing: the trainer saved a checkpoint", "starting (restart 1)",
                 "training finished", "python 3.", "n2 node 1"):
        assert line in log, line


@pytest.mark.slow
def test_failures_are_requeued_a_limited_number_of_times(jobs, tmp_path):
    job_id, out = launch(tmp_path, "launcher.slurm.failure_requeues=2", FAKE_TORCHRUN_EXIT="1")
    jobs.append(job_id)
    info = slurm.wait_finished(job_id, 120)
    log = slurm.logs(out, ".out")
    assert info["JobState"] == "FAILED" and info["Restarts"] == "2", log
    assert "failure 2 of at most 2 in a row" in log and "giving up after 2 requeue(s)" in log


@pytest.mark.slow
def test_broken_node_set_up_is_not_requeued(jobs, tmp_path):
    job_id, out = launch(tmp_path, "launcher.accelerator=npu", "launcher.slurm.gres=none",
                         f"launcher.ascend.cann_set_env={tmp_path / 'no-cann' / 'set_env.sh'}")
    jobs.append(job_id)
    info = slurm.wait_finished(job_id, 60, release_holds=False)
    log = slurm.logs(out, ".out")
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", log
    assert "node set-up failed, a retry would fail the same way" in log and "no CANN environment" in log
    assert not (tmp_path / "torchrun.jsonl").exists()


@pytest.mark.slow
def test_a_grant_that_cannot_keep_the_global_batch_is_refused(jobs, tmp_path):
    # sfd-launch checks every node count the job asks for; a batch script submitted by hand
    # with another count is refused on the nodes, naming the numbers, and not retried.
    _, out = launch(tmp_path, "launcher.nodes=1", "train.global_batch_size=3", dry_run=True)
    (out / "logs").mkdir()
    submitted = slurm.run("sbatch", "--parsable", "--nodes=2", str(out / "launch" / "job.sbatch"))
    job_id = int(submitted.strip().split(";")[0])
    jobs.append(job_id)
    info = slurm.wait_finished(job_id, 60, release_holds=False)
    log = slurm.logs(out, ".out")
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", log
    reason = (out / "launch" / "SETUP_ERROR").read_text()
    assert "the job cannot run on the nodes it was given" in reason
    assert "2 node(s) x 1 rank(s) = 2 ranks: 3 is not divisible by the 2 ranks" in reason, reason
    assert "train.global_batch_size" in reason and "node set-up failed" in log
    assert not (tmp_path / "torchrun.jsonl").exists()


def node_script(tmp_path: Path, out: Path, *overrides: str) -> Path:
    config = load_config(None, [f"run.output_dir={out}", "launcher.accelerator=cpu", "launcher.devices_per_node=2",
                                f"launcher.torchrun={harness.STAND_IN_TORCHRUN}", f"launcher.python={sys.executable}",
                                *overrides])
    job = build_job(config, "slurm", workdir=tmp_path)
    job.freeze_config()
    node = tmp_path / "node.sh"
    node.write_text(render_node_script(job))
    return node


@pytest.mark.parametrize("sig, handler_delay", [(signal.SIGTERM, "0"), (signal.SIGUSR2, "0"), (signal.SIGUSR2, "2")])
def test_node_script_turns_signals_into_a_checkpoint_request(sig, handler_delay, tmp_path):
    """Without Slurm: the signal reaches only node.sh, which must pass USR2 to the workers,
    also to workers that do not catch it yet (a trainer still starting) once they do."""
    out = tmp_path / "run"
    out.mkdir()
    node = node_script(tmp_path, out)
    record = tmp_path / "torchrun.jsonl"
    env = harness.base_env(FAKE_TORCHRUN_WORKERS="1", FAKE_TORCHRUN_WORKER_SECONDS="30", FAKE_TORCHRUN_OUTPUT=str(out),
                           FAKE_TORCHRUN_RECORD=str(record), FAKE_TORCHRUN_HANDLER_DELAY=handler_delay,
                           SFD_NNODES="1", SFD_MASTER_ADDR="127.0.0.1", SFD_MASTER_PORT=str(free_port()))
    proc = subprocess.Popen(["bash", str(node)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    events = out / "events.jsonl"
    if handler_delay == "0":
        started = fakeslurm.wait_for(lambda: events.exists() and events.read_text().count('"start"') == 2, timeout=20)
        assert started, "the stand-in workers did not start"
    else:  # torchrun has started (node.sh traps the signals by then); its workers are not ready
        assert fakeslurm.wait_for(record.exists, timeout=20), "torchrun did not start"
        assert not events.exists()
    time.sleep(0.2)
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output
    signals = [e["signum"] for e in harness.read_jsonl(events) if e["event"] == "signal"]
    assert signals == [signal.SIGUSR2, signal.SIGUSR2], output
    assert f"received SIG{signal.Signals(sig).name[3:]}" in output
    assert "run the same sfd-launch command again to resume" in output


@pytest.mark.parametrize("sig", [signal.SIGUSR2, signal.SIGTERM])
def test_a_signal_during_the_node_set_up(sig, tmp_path):
    """Slurm's warning may come while env_setup still runs: SIGUSR2 is kept and handed to the
    workers once they run; SIGTERM ends the node at once (nothing to save yet)."""
    out = tmp_path / "run"
    out.mkdir()
    marker, go = tmp_path / "in-set-up", tmp_path / "go"
    node = node_script(tmp_path, out, f"launcher.env_setup=['touch {marker}; until [ -e {go} ]; do sleep 0.1 || true; done']")
    record = tmp_path / "torchrun.jsonl"
    env = harness.base_env(FAKE_TORCHRUN_WORKERS="1", FAKE_TORCHRUN_WORKER_SECONDS="30", FAKE_TORCHRUN_OUTPUT=str(out),
                           FAKE_TORCHRUN_RECORD=str(record), SFD_NNODES="1", SFD_MASTER_ADDR="127.0.0.1",
                           SFD_MASTER_PORT=str(free_port()))
    proc = subprocess.Popen(["bash", str(node)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert fakeslurm.wait_for(marker.exists, timeout=20), "env_setup did not start"
    proc.send_signal(sig)
    time.sleep(0.3)
    go.touch()
    output, _ = proc.communicate(timeout=30)
    if sig == signal.SIGTERM:
        assert proc.returncode == 143 and "received SIGTERM before training started: stopping" in output, output
        assert not record.exists()
        return
    assert proc.returncode == 0, output
    assert "SIGUSR2 came before training started" in output, output
    signals = [e["signum"] for e in harness.read_jsonl(out / "events.jsonl") if e["event"] == "signal"]
    assert signals == [signal.SIGUSR2, signal.SIGUSR2], output


# ---- the stand-in Slurm: only for what the real cluster here cannot serve ----

def test_scontrol_show_hostnames_expands_host_lists(tmp_path):
    assert fakeslurm.expand_hostlist("node[01-02]") == ["node01", "node02"]
    assert fakeslurm.expand_hostlist("gpu[1-3,7],cpu1") == ["gpu1", "gpu2", "gpu3", "gpu7", "cpu1"]
    assert fakeslurm.expand_hostlist("r[1-2]n[08-09]") == ["r1n08", "r1n09", "r2n08", "r2n09"]
    env = harness.cluster_env(tmp_path, SLURM_JOB_NODELIST="a[9-10]")
    scontrol = str(harness.SLURM_BIN / "scontrol")
    shown = subprocess.run([scontrol, "show", "hostnames", "node[01-02]"], env=env, capture_output=True, text=True)
    assert shown.stdout.split() == ["node01", "node02"]
    default = subprocess.run([scontrol, "show", "hostnames"], env=env, capture_output=True, text=True)
    assert default.stdout.split() == ["a9", "a10"]
    bad = subprocess.run([scontrol, "show", "hostnames", "node[01-"], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "invalid host list" in bad.stderr


@pytest.mark.parametrize(
    "header, message",
    [
        ("#SBATCH --gpus-per-nod=8\n", "unrecognized option '--gpus-per-nod'"),
        ("#SBATCH --signal=USR2@soon\n", "invalid --signal"),
        ("#SBATCH --open-mode=keep\n", "invalid --open-mode"),
        ("#SBATCH --output=/no/such/folder/%j.out\n", "does not exist"),
        ("echo hi\n#SBATCH --nodes=2\n", "after the first command"),
    ],
)
def test_stand_in_sbatch_rejects_what_slurm_would_not_do(header, message, tmp_path):
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\n" + header + "true\n")
    env = harness.cluster_env(tmp_path)
    result = subprocess.run([str(harness.SLURM_BIN / "sbatch"), str(script)], env=env, cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode != 0 and message in result.stderr


SET_ENV = """# stand-in CANN set_env.sh
export ASCEND_TOOLKIT_HOME={root}/ascend-toolkit/latest
export FAKE_CANN_SOURCED=1
"""


def test_slurm_job_on_ascend_npus_runs_on_the_stand_in(tmp_path, monkeypatch):
    """STAND-IN Slurm: --gres=npu:2 needs NPU nodes, which the real cluster here lacks."""
    cann = tmp_path / "Ascend" / "set_env.sh"
    cann.parent.mkdir()
    cann.write_text(SET_ENV.format(root=cann.parent))
    out = tmp_path / "run"
    out.mkdir()
    env = harness.cluster_env(tmp_path, FAKE_TORCHRUN_OUTPUT=str(out), FAKE_TORCHRUN_RECORD=str(tmp_path / "torchrun.jsonl"),
                              FAKE_TORCHRUN_WORKERS="1", FAKE_TORCHRUN_WORKER_SECONDS="0.2")
    config = harness.write_job_config(tmp_path / "job.yaml")
    result = harness.sfd_launch(
        ["slurm", str(config), f"run.output_dir={out}", *STAND_IN, "launcher.accelerator=npu",
         "launcher.devices_per_node=2", f"launcher.ascend.cann_set_env={cann}", f"launcher.port={free_port()}"],
        env, tmp_path, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    record = harness.job_record(env)
    assert record["state"] == "COMPLETED" and record["options"]["gres"] == "npu:2", record
    starts = harness.read_jsonl(tmp_path / "torchrun.jsonl")
    assert len(starts) == 2
    for start in starts:
        assert start["program"][-4:] == ["parallel.backend=hccl", "run.device=npu", "parallel.dp_replicate=2",
                                         "parallel.dp_shard=2"]
        assert start["env"]["FAKE_CANN_SOURCED"] == "1" and start["env"]["ASCEND_RT_VISIBLE_DEVICES"] == "0,1"
        assert start["env"]["HCCL_CONNECT_TIMEOUT"] == "1200" and start["options"]["nproc-per-node"] == "2"
    log = (out / "logs" / "slurm-1000.out").read_text()
    assert "layout: 2 node(s) x 2 rank(s): fsdp2 (2 replica(s) x 2 shard(s))" in log and "training finished" in log


def test_cancelling_the_stand_in_sbatch_kills_the_whole_job(tmp_path):
    """What a stand-in test relies on to leave nothing behind when it gives up."""
    (tmp_path / "logs").mkdir()
    script = tmp_path / "sleepy.sh"
    script.write_text(f"#!/bin/bash\n#SBATCH --nodes=2\n#SBATCH --output={tmp_path}/logs/%j.out\n"
                      "srun --nodes=2 --ntasks-per-node=1 bash -c 'sleep 60 & wait'\n")
    env = harness.cluster_env(tmp_path)
    proc = subprocess.Popen([str(harness.SLURM_BIN / "sbatch"), str(script)], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, text=True)
    assert fakeslurm.wait_for(lambda: len(fakeslurm.descendants(proc.pid)) >= 6, timeout=20)
    job_processes = fakeslurm.descendants(proc.pid)
    proc.terminate()
    proc.wait(timeout=10)
    assert fakeslurm.wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in job_processes), timeout=5)
    assert harness.job_record(env)["state"] == "CANCELLED"
