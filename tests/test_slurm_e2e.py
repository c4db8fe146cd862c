"""End to end on a REAL Slurm cluster: `sfd-launch slurm` with the real trainer.

The cluster is Debian's slurm-wlm 22.05 run by scripts/slurm_cluster.sh (fixture
``slurm_cluster``): slurmctld, munged and two `slurmd -N n1|n2` on this machine. Jobs
are the tiny preset on 2 nodes x 1 CPU rank (gloo). Signals, requeues, requeue holds,
node failure handling and allocation sizes are slurmctld's own. The harness only does
what an operator or a dying node would (tests/real_slurm.py): it lets a requeued job
start without its ~2-minute hold (``scontrol update jobid=J StartTime=now``, never done
by the product), sets a node DOWN and kills that node's processes, and in the time-limit
test holds the first start's trainer until the warning has come (a test-only env_setup
line) and lifts the 2-minute limit once the job has been requeued, so the resumed run
can finish.

Which is which: everything here is real Slurm. tests/test_launch_slurm.py runs the same
scripts on this cluster with a stand-in torchrun, and keeps the stand-in Slurm of
tests/fake_cluster only for a job on Ascend NPUs (--gres=npu), which these nodes lack.

One uninterrupted run (``reference``) serves every comparison: the interrupted runs
must end with its final weights bit for bit; the run that shrinks to one node must stay
near its losses.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import real_slurm as slurm
from fake_cluster import harness

pytestmark = pytest.mark.slow

STEPS = 24
EVERY = 6
COMMON = [
    "launcher.nodes=2", "launcher.devices_per_node=1", "launcher.accelerator=cpu",
    f"launcher.env_setup=['source {slurm.VENV_BIN / 'activate'}']", "launcher.env={OMP_NUM_THREADS: 1}",
    f"train.max_steps={STEPS}", "train.global_batch_size=16", "train.micro_batch_size=8", f"checkpoint.every={EVERY}",
    "checkpoint.keep=10", "train.log_every=1", "train.sample_every=0", "eval.every=0", "run.wandb_mode=disabled",
    "data.num_workers=0",
]
# Seconds a whole job may take here (2 shared cores): generous, a hang still ends the test.
JOB_TIMEOUT = 420


def submit(work: Path, *overrides: str, config: str = "tiny") -> tuple[int, Path]:
    """Runs `sfd-launch slurm` (which calls the real sbatch); returns the job id and the run folder."""
    work.mkdir(parents=True, exist_ok=True)
    out = work / "run"
    env = harness.base_env()
    result = subprocess.run(
        [sys.executable, "-m", "sfd_train.launchers.cli", "slurm", config, f"run.output_dir={out}", *COMMON, *overrides],
        cwd=work, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"Submitted batch job (\d+)", result.stdout)
    assert match, result.stdout
    return int(match.group(1)), out


@pytest.fixture
def jobs(slurm_cluster):
    """Job ids a test submitted; whatever is still queued or running is cancelled afterwards,
    and every node is made usable again, so that one failing test does not block the next."""
    slurm.wait_idle()  # a resizable job takes what is free: all of it
    ids: list[int] = []
    yield ids
    for job_id in ids:
        slurm.cancel(job_id)
    for node in slurm.NODES:
        slurm.resume_node(node)


def final_state(out: Path, scratch: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the run's final checkpoint (model, EMA, optimizer), flattened to dotted keys."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    folder = out / "checkpoints" / f"step_{STEPS:09d}"
    assert (folder / "COMMITTED").is_file(), f"no complete final checkpoint in {folder}"
    target = scratch / f"{out.parent.name}-final.pt"
    dcp_to_torch_save(folder, target)
    flat: dict[str, torch.Tensor] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        elif isinstance(value, torch.Tensor):
            flat[prefix] = value

    walk("", torch.load(target, weights_only=False))
    return flat


def assert_bitwise_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    weights = [k for k in expected if k.split(".")[0] in ("model", "ema", "optimizer")]
    assert weights and any(k.startswith("model.") for k in weights), sorted(expected)[:10]
    assert set(weights) <= set(actual)
    different = [k for k in weights if not torch.equal(actual[k], expected[k])]
    assert not different, f"{len(different)} of {len(weights)} tensors differ, e.g. {different[:3]}"


def resumed_line(out: Path, step: int) -> str:
    """What the trainer logs when it resumes from the checkpoint of ``step``."""
    return f"resumed from {out / 'checkpoints' / f'step_{step:09d}'} at step {step}"


def losses(out: Path) -> dict[int, float]:
    """Loss per step from metrics.jsonl; a step logged again after a resume keeps its last value."""
    values = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record and "step" in record:
            values[int(record["step"])] = float(record["loss"])
    return values


@pytest.fixture(scope="module")
def reference(slurm_cluster, tmp_path_factory):
    """The uninterrupted 2-node run every other run is compared with."""
    work = tmp_path_factory.mktemp("reference")
    job_id, out = submit(work)
    try:
        info = slurm.wait_finished(job_id, JOB_TIMEOUT, release_holds=False)
    finally:
        slurm.cancel(job_id)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", slurm.logs(out)
    return {"out": out, "state": final_state(out, work), "losses": losses(out)}


def test_time_limit_warning_leads_to_an_agreed_checkpoint_a_requeue_and_a_bitwise_resume(reference, jobs, tmp_path):
    # A 2-minute limit with the default 90 s lead: slurmctld's warning (SIGUSR2) is due at
    # once and comes at its next time-limit check, within 30 s. So that the test does not
    # depend on where in that cycle the job started (a fast first run could end before),
    # the first start holds the trainer until the batch shell has the warning (a test-only
    # env_setup line): the warning then meets workers that are still starting, which is
    # what a short limit does, and node.sh must hand it over once they catch it.
    gate = tmp_path / "wait_for_the_warning.sh"
    # (The warning reaches every process of the step, so the gate's own commands may die of it.)
    gate.write_text(
        'if [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then\n'
        "  for _ in $(seq 240); do\n"
        f'    grep -qs "received SIGUSR2" {tmp_path}/run/logs/slurm-"$SLURM_JOB_ID".out && break\n'
        "    sleep 0.25 || true\n"
        "  done\n"
        "fi\n"
    )
    job_id, out = submit(tmp_path, "launcher.slurm.time='2'",
                         f"launcher.env_setup=['source {slurm.VENV_BIN / 'activate'}', 'source {gate}']")
    jobs.append(job_id)
    slurm.wait_requeued(job_id, 1, JOB_TIMEOUT)
    # The harness lifts the limit (a real job would just be requeued again each time).
    slurm.run("scontrol", "update", f"jobid={job_id}", "TimeLimit=15")
    info = slurm.wait_finished(job_id, JOB_TIMEOUT)
    text = slurm.logs(out)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text

    note = json.loads((out / "launch" / f"requeue-{job_id}-0.json").read_text())
    assert note["reason"] == "signal SIGUSR2" and 1 <= note["step"] < STEPS, note
    for line in ("received SIGUSR2: passing it to the training step", "asking worker",
                 "requeueing: the trainer saved a checkpoint and asked for it", "starting (restart 1)",
                 resumed_line(out, note["step"]),
                 "training finished"):
        assert line in text, line
    assert_bitwise_equal(final_state(out, tmp_path), reference["state"])


def test_lost_node_is_requeued_by_slurm_and_resumes_from_the_newest_checkpoint(reference, jobs, tmp_path):
    job_id, out = submit(tmp_path)
    jobs.append(job_id)
    slurm.wait_for(lambda: EVERY in slurm.committed(out), JOB_TIMEOUT, "the first periodic checkpoint")
    killed = slurm.lose_node(job_id, "n2")
    assert killed, "no process of the job found on n2"
    # Slurm requeues the job itself (JobRequeue=1, --requeue); it waits for both nodes.
    info = slurm.wait_requeued(job_id, 1, 120)
    newest = slurm.committed(out)[-1]
    assert "down" in slurm.node_state("n2"), "a lost node must not come back by itself"
    slurm.resume_node("n2")
    info = slurm.wait_finished(job_id, JOB_TIMEOUT)
    text = slurm.logs(out)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text
    assert not list((out / "launch").glob(f"requeue-{job_id}-*.json")), "the trainer could not have saved alone"
    assert resumed_line(out, newest) in text, text
    assert_bitwise_equal(final_state(out, tmp_path), reference["state"])


def test_scancel_saves_without_a_requeue_and_a_new_launch_resumes(reference, jobs, tmp_path):
    job_id, out = submit(tmp_path)
    jobs.append(job_id)
    slurm.wait_for(lambda: EVERY in slurm.committed(out), JOB_TIMEOUT, "the first periodic checkpoint")
    slurm.cancel(job_id)
    info = slurm.wait_finished(job_id, 120, release_holds=False)
    text = slurm.logs(out)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", text
    # Slurm sends SIGTERM to every process of the job; node.sh turns it into SIGUSR2 for the
    # workers (whichever reaches a worker last is the reason it records).
    note = json.loads((out / "launch" / f"requeue-{job_id}-0.json").read_text())
    assert note["reason"] in ("signal SIGTERM", "signal SIGUSR2") and EVERY <= note["step"] < STEPS, note
    assert "received SIGTERM: passing it to the training step" in text, text
    assert "checkpoint saved after SIGTERM" in text and "not requeueing" in text, text

    second, same_out = submit(tmp_path)
    jobs.append(second)
    assert same_out == out and second != job_id
    info = slurm.wait_finished(second, JOB_TIMEOUT, release_holds=False)
    text = slurm.logs(out)
    assert info["JobState"] == "COMPLETED", text
    assert resumed_line(out, note["step"]) in text, text
    assert_bitwise_equal(final_state(out, tmp_path), reference["state"])


def test_broken_env_setup_fails_once_with_the_reason(jobs, tmp_path):
    job_id, out = submit(tmp_path, "launcher.env_setup=['source /no/such/venv/bin/activate']")
    jobs.append(job_id)
    info = slurm.wait_finished(job_id, 120, release_holds=False)
    text = slurm.logs(out)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", text
    reason = (out / "launch" / "SETUP_ERROR").read_text()
    assert "launcher.env_setup failed" in reason and "n1 node 0" in reason and "n2 node 1" in reason, reason
    assert "node set-up failed, a retry would fail the same way" in text and "/no/such/venv/bin/activate" in text
    assert "requeueing" not in text and not (out / "checkpoints").exists()


# One rank accumulating 2 micro-batches of 8 against two ranks of 8 each: another reduction
# order, so float32 losses and weights may drift apart slowly after the resume. (Measured
# here: equal to the bit, since halving is exact; with the per-rank batch going 8 -> 16
# instead, 1.2e-7 in the loss and 2.3e-6 in the weights over 18 steps.)
LOSS_RTOL = 1e-4


def test_resizable_job_loses_a_node_for_good_and_finishes_on_one(reference, jobs, tmp_path):
    job_id, out = submit(tmp_path, "launcher.slurm.min_nodes=1")
    jobs.append(job_id)
    assert slurm.job_info(job_id).get("NumNodes", "").startswith(("1-2", "2")), slurm.job_info(job_id)
    slurm.wait_for(lambda: EVERY in slurm.committed(out), JOB_TIMEOUT, "the first periodic checkpoint")
    assert slurm.job_info(job_id)["NodeList"] == "n[1-2]"
    slurm.lose_node(job_id, "n2")  # and it stays down
    slurm.wait_requeued(job_id, 1, 120)
    resumed_at = slurm.committed(out)[-1]
    info = slurm.wait_finished(job_id, JOB_TIMEOUT)
    text = slurm.logs(out)
    assert info["JobState"] == "COMPLETED" and info["NodeList"] == "n1", text
    assert "down" in slurm.node_state("n2")

    two = "2 node(s) x 1 rank(s): fsdp2 (2 replica(s) x 1 shard(s)), global batch 16 = 8 per rank x 2 data-parallel rank(s) x 1 accumulation step(s)"
    one = "1 node(s) x 1 rank(s): fsdp2 (1 shard(s)), global batch 16 = 8 per rank x 1 data-parallel rank(s) x 2 accumulation step(s)"
    assert f"layout: {two}" in text and f"layout: {one}" in text, text
    assert f"the layout changed since the last start, which ran {two}" in text, text
    assert "fsdp2 (HSDP: 2 replicas x 1 shards) on 2 x cpu: global batch 16 = 8 x 2 data-parallel ranks x 1 accumulation" in text
    assert "fsdp2 on 1 x cpu: global batch 16 = 8 x 1 data-parallel ranks x 2 accumulation" in text
    assert resumed_line(out, resumed_at) in text, text

    expected, actual = reference["losses"], losses(out)
    after = [step for step in range(resumed_at + 1, STEPS + 1)]
    assert set(after) <= set(actual) and set(after) <= set(expected)
    worst = max(abs(actual[s] - expected[s]) / abs(expected[s]) for s in after)
    print(f"resized run: {len(after)} steps after the resume at step {resumed_at}, "
          f"largest relative loss difference to the 2-node run {worst:.2e} (tolerance {LOSS_RTOL:g})")
    assert worst <= LOSS_RTOL, {s: (actual[s], expected[s]) for s in after}
    assert all(math.isfinite(actual[s]) for s in after)
    # The weights it ends with stay as close to the 2-node run's.
    state, ref = final_state(out, tmp_path), reference["state"]
    drift = max(float((state[k] - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-12))
                for k in ref if k.startswith("model."))
    print(f"resized run: largest relative weight difference to the 2-node run {drift:.2e}")
    assert drift <= LOSS_RTOL
