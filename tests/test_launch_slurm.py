"""The Slurm scripts run for real on stand-in sbatch/srun/scontrol (tests/fake_cluster/bin),
with a stand-in torchrun whose "workers" follow the trainer's preemption contract.

These check the script mechanics in seconds (no torch in the job): signal path
batch shell -> srun -> node.sh -> workers, the requeue decision, failure requeues,
set-up errors. tests/test_launch_e2e.py runs real torchrun agents and trainers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fake_cluster import fakeslurm, harness
from sfd_train.launchers import cli
from sfd_train.launchers.job import build_job
from sfd_train.launchers.node import render_node_script
from sfd_train.config import load_config

TWO_READY_WORKERS = "log:(?s)fake worker ready.*fake worker ready"


def launch(tmp_path: Path, monkeypatch, *overrides: str, **env: str) -> tuple[dict, Path]:
    """Runs `sfd-launch slurm` in this process on the stand-in cluster (the stand-in sbatch
    runs the whole job before returning). Returns the job's record and the run folder."""
    out = tmp_path / "run"
    cluster = harness.cluster_env(
        tmp_path, FAKE_TORCHRUN_OUTPUT=str(out), FAKE_TORCHRUN_RECORD=str(tmp_path / "torchrun.jsonl"), **env
    )
    for name in [k for k in os.environ if k.startswith(("SLURM_", "FAKE_", "SFD_"))]:
        monkeypatch.delenv(name)
    for name, value in cluster.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    config = harness.write_job_config(tmp_path / "job.yaml")
    code = cli.main([
        "slurm", str(config), f"run.output_dir={out}", "launcher.nodes=2", "launcher.devices_per_node=1",
        "launcher.accelerator=cpu", f"launcher.torchrun={harness.STAND_IN_TORCHRUN}",
        f"launcher.python={sys.executable}", f"launcher.port={harness.free_port()}", *overrides,
    ])
    assert code == 0
    return harness.job_record(cluster), out


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


def test_stand_in_sbatch_runs_steps_and_requeues(tmp_path):
    (tmp_path / "logs").mkdir()
    script = tmp_path / "probe.sh"
    script.write_text(
        "#!/bin/bash\n#SBATCH --job-name=probe\n#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=1\n#SBATCH --requeue\n"
        f"#SBATCH --open-mode=append\n#SBATCH --output={tmp_path}/logs/%x-%j.out\n"
        "srun --nodes=2 --ntasks-per-node=1 bash -c 'echo task $SLURM_PROCID node $SLURM_NODEID on $SLURMD_NODENAME'\n"
        'if [ -z "${SLURM_RESTART_COUNT:-}" ]; then scontrol requeue "$SLURM_JOB_ID"; fi\n'
        'echo "restart ${SLURM_RESTART_COUNT:-0}"\n'
    )
    env = harness.cluster_env(tmp_path)
    result = subprocess.run([str(harness.SLURM_BIN / "sbatch"), str(script)], env=env, cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "Submitted batch job 1000", result.stderr
    log = (tmp_path / "logs" / "probe-1000.out").read_text()
    for line in ("task 0 node 0 on 127.0.0.1", "task 1 node 1 on 127.0.0.2", "restart 0", "restart 1"):
        assert line in log
    assert log.count("task 1 node 1") == 2  # appended across the requeue
    record = harness.job_record(env)
    assert [run["restart"] for run in record["runs"]] == [0, 1] and record["state"] == "COMPLETED"


def test_preemption_signal_reaches_the_workers_and_the_job_is_requeued(tmp_path, monkeypatch):
    record, out = launch(
        tmp_path, monkeypatch, FAKE_TORCHRUN_WORKERS="1", FAKE_TORCHRUN_WORKER_SECONDS="30",
        FAKE_SLURM_WARN_WHEN=TWO_READY_WORKERS, FAKE_SLURM_KILL_AFTER="30",
    )
    assert record["state"] == "COMPLETED"
    assert [(run["restart"], run["warned"], run["timed_out"]) for run in record["runs"]] == [(0, True, False), (1, False, False)]

    events = harness.read_jsonl(out / "events.jsonl")
    first = [e for e in events if e["restart"] == "0"]
    assert sorted(e["rank"] for e in first if e["event"] == "signal") == [0, 1]
    assert all(e["signum"] == signal.SIGUSR2 for e in first if e["event"] == "signal")
    assert sorted(e["rank"] for e in events if e["restart"] == "1" and e["event"] == "done") == [0, 1]

    starts = harness.read_jsonl(tmp_path / "torchrun.jsonl")
    assert len(starts) == 4 and all(s["usr2_ignored"] for s in starts)  # torchrun survived the USR2
    options = starts[0]["options"]
    assert options["rdzv-backend"] == "c10d" and options["rdzv-endpoint"].startswith("127.0.0.1:")
    assert options["rdzv-id"] == "1000" and options["nnodes"] == "2" and options["max-restarts"] == "0"
    assert starts[0]["program"][-2:] == ["parallel.backend=gloo", "run.device=cpu"]

    assert not (out / "REQUEUE").exists()
    assert '"reason": "SIGUSR2"' in (out / "launch" / "requeue-1000-0.json").read_text()
    log = (out / "logs" / "slurm-1000.out").read_text()
    for line in ("received SIGUSR2: passing it to the training step", "worker(s) to checkpoint and stop",
                 "requeueing: the trainer saved a checkpoint", "starting (restart 1)", "training finished",
                 "python 3."):
        assert line in log, line


def test_failures_are_requeued_a_limited_number_of_times(tmp_path, monkeypatch):
    record, out = launch(tmp_path, monkeypatch, "launcher.slurm.failure_requeues=2", FAKE_TORCHRUN_EXIT="1")
    assert [run["restart"] for run in record["runs"]] == [0, 1, 2] and record["state"] == "FAILED"
    log = (out / "logs" / "slurm-1000.out").read_text()
    assert "failure 2 of at most 2 in a row" in log and "giving up after 2 requeue(s)" in log


def test_broken_node_set_up_is_not_requeued(tmp_path, monkeypatch):
    record, out = launch(
        tmp_path, monkeypatch, "launcher.accelerator=npu", "launcher.slurm.gres=none",
        f"launcher.ascend.cann_set_env={tmp_path / 'no-cann' / 'set_env.sh'}",
    )
    assert len(record["runs"]) == 1 and record["state"] == "FAILED"
    log = (out / "logs" / "slurm-1000.out").read_text()
    assert "node set-up failed, a retry would fail the same way" in log and "no CANN environment" in log
    assert not (tmp_path / "torchrun.jsonl").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR2])
def test_node_script_turns_signals_into_a_checkpoint_request(sig, tmp_path):
    """Without Slurm: the signal reaches only node.sh, which must pass USR2 to the workers."""
    out = tmp_path / "run"
    out.mkdir()
    config = load_config(None, [f"run.output_dir={out}", "launcher.accelerator=cpu", "launcher.devices_per_node=2",
                                f"launcher.torchrun={harness.STAND_IN_TORCHRUN}", f"launcher.python={sys.executable}"])
    job = build_job(config, "slurm", workdir=tmp_path)
    node = tmp_path / "node.sh"
    node.write_text(render_node_script(job))
    env = harness.base_env(FAKE_TORCHRUN_WORKERS="1", FAKE_TORCHRUN_WORKER_SECONDS="30", FAKE_TORCHRUN_OUTPUT=str(out),
                           SFD_NNODES="1", SFD_MASTER_ADDR="127.0.0.1", SFD_MASTER_PORT=str(harness.free_port()))
    proc = subprocess.Popen(["bash", str(node)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    events = out / "events.jsonl"
    started = fakeslurm.wait_for(lambda: events.exists() and events.read_text().count('"start"') == 2, timeout=20)
    assert started, "the stand-in workers did not start"
    time.sleep(0.2)
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output
    signals = [e["signum"] for e in harness.read_jsonl(events) if e["event"] == "signal"]
    assert signals == [signal.SIGUSR2, signal.SIGUSR2]
    assert f"received SIG{signal.Signals(sig).name[3:]}" in output
    assert "run the same sfd-launch command again to resume" in output


def test_cancelling_the_stand_in_sbatch_kills_the_whole_job(tmp_path):
    """What the test harness relies on to leave nothing behind when a test gives up."""
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
