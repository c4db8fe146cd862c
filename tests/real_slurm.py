"""Helpers for the tests that run on the real Slurm cluster of scripts/slurm_cluster.sh
(slurm-wlm from Debian: slurmctld, one `slurmd -N nK` per emulated node, munged).

Everything here talks to Slurm through its own commands (sbatch via sfd-launch, squeue,
scontrol, scancel). What the harness does that neither Slurm nor sfd-launch would do by
itself is named where it happens:

* :func:`release_hold`: a requeued job is held about two minutes (its EligibleTime);
  ``scontrol update jobid=J StartTime=now`` lets it start at once. The product never
  does this; the tests would otherwise wait two minutes per requeue.
* :func:`lose_node`: ``scontrol update nodename=N state=down`` as an administrator (or
  Slurm, for a node that stops answering) does, then SIGKILL to the job's processes on
  that node: all the emulated nodes share this machine, so the "lost" node's processes
  would otherwise live on, which a dead node's do not.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SCRIPT = REPO / "scripts" / "slurm_cluster.sh"
VENV_BIN = Path(sys.executable).parent
NODES = ("n1", "n2")
FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED")


def start_cluster() -> bool:
    """Starts the cluster unless it is running; returns whether this call started it.

    Raises:
        RuntimeError: it could not start (with the script's output). The suite fails then:
            the tests that need it are not skipped.
    """
    if subprocess.run(["bash", str(CLUSTER_SCRIPT), "status"], capture_output=True).returncode == 0:
        return False
    result = subprocess.run(["bash", str(CLUSTER_SCRIPT), "start"], capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"scripts/slurm_cluster.sh start failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return True


def stop_cluster() -> None:
    subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop"], capture_output=True, timeout=300)


def run(*cmd: str, check: bool = True) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stdout}{result.stderr}")
    return result.stdout


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.2):
    """Polls ``predicate`` until it returns something true; returns that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def job_info(job_id: int) -> dict[str, str]:
    """``scontrol show job -o`` as a dict (JobState, Reason, Restarts, NodeList, NumNodes, ...)."""
    text = run("scontrol", "show", "job", "-o", str(job_id))
    return dict(re.findall(r"(\w+)=(\S*)", text))


def node_state(node: str) -> str:
    """The node's State as scontrol shows it, lower case: idle, mixed, allocated, down,
    down+completing (a lost node whose job is still being cleaned up), ..."""
    return dict(re.findall(r"(\w+)=(\S*)", run("scontrol", "show", "node", "-o", node)))["State"].lower()


# Seconds a requeued job stays held by the harness: slurmd refuses to launch a job id
# again within the second its previous run's credential was revoked ("Job credential
# revoked"), which Slurm's own two-minute hold never runs into.
MIN_HOLD_S = 3


def release_hold(job_id: int) -> bool:
    """Starts a requeued job now instead of after Slurm's hold (harness only; see the module doc)."""
    info = job_info(job_id)
    if info.get("JobState") != "PENDING" or info.get("Reason") != "BeginTime":
        return False
    requeued = datetime.strptime(info["SubmitTime"], "%Y-%m-%dT%H:%M:%S")  # a requeue resets it
    if (datetime.now() - requeued).total_seconds() < MIN_HOLD_S:
        return False
    run("scontrol", "update", f"jobid={job_id}", "StartTime=now", check=False)
    return True


def wait_finished(job_id: int, timeout: float, release_holds: bool = True) -> dict[str, str]:
    """Waits until the job has ended for good (requeues included); returns its last record."""

    def finished():
        info = job_info(job_id)
        if info.get("JobState") in FINISHED:
            return info
        if release_holds:
            release_hold(job_id)
        return None

    return wait_for(finished, timeout, f"job {job_id} to finish")


def wait_requeued(job_id: int, restarts: int, timeout: float) -> dict[str, str]:
    """Waits until the job is pending again after its ``restarts``-th requeue."""

    def requeued():
        info = job_info(job_id)
        if info.get("JobState") in FINISHED:
            raise AssertionError(f"job {job_id} ended ({info['JobState']}, {info.get('Restarts')} restarts) "
                                 f"instead of being requeued")
        return info if info.get("JobState") == "PENDING" and int(info.get("Restarts", 0)) >= restarts else None

    return wait_for(requeued, timeout, f"job {job_id} to be requeued ({restarts})")


def committed(out: Path) -> list[int]:
    """Steps of the complete checkpoints in a run folder."""
    return sorted(int(p.parent.name.split("_")[-1]) for p in (out / "checkpoints").glob("step_*/COMMITTED"))


def job_processes(job_id: int, node: str) -> list[int]:
    """Every process of ``job_id``'s steps on emulated node ``node`` (its tasks and their children)."""
    found = []
    wanted = {f"SLURM_JOB_ID={job_id}".encode(), f"SLURMD_NODENAME={node}".encode()}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = set(Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        if wanted <= environ:
            found.append(int(entry))
    return found


def lose_node(job_id: int, node: str) -> list[int]:
    """Sets ``node`` DOWN and kills the job's processes there, as a node that dies would."""
    run("scontrol", "update", f"nodename={node}", "state=down", "reason=sfd-test-lost-node")
    pids = job_processes(job_id, node)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def resume_node(node: str) -> None:
    """Makes a node that was set DOWN (or drained) usable again and waits until it is."""
    if any(word in node_state(node) for word in ("down", "drain", "fail")):
        run("scontrol", "update", f"nodename={node}", "state=resume", check=False)
    wait_for(lambda: re.fullmatch(r"(idle|mixed|allocated)", node_state(node)), 60, f"{node} to be back in service")


def wait_idle(timeout: float = 120) -> None:
    """Waits until every node is idle (an earlier job may still be completing)."""
    wait_for(lambda: all(node_state(node) == "idle" for node in NODES), timeout, "every node to be idle")


def cancel(job_id: int) -> None:
    run("scancel", str(job_id), check=False)


def logs(out: Path, suffix: str = "") -> str:
    """The Slurm logs of a run folder (every job), .out and .err, or only ``suffix``."""
    files = sorted((out / "logs").glob(f"slurm-*{suffix}"))
    return "\n".join(f"===== {p.name}\n{p.read_text(errors='replace')}" for p in files)
