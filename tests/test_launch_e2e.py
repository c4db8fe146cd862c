"""End to end on this machine: `sfd-launch slurm` on the stand-in cluster with 2 "nodes"
(two real torchrun agents on loopback, gloo). Before the time limit the job gets
SIGUSR2, the trainer checkpoints, the script requeues the job, the job resumes and
finishes with the weights of an uninterrupted run.

* the stand-in trainer (tests/fake_cluster/fake_trainer.py) checks the launcher's side
  with real torchrun agents: signals through torchrun, requeue, resume;
* the real trainer (`python -m sfd_train.train tiny`) checks the whole contract.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from fake_cluster import harness


def slurm_job(tmp_path: Path, name: str, config: str, *overrides: str, warn_when: str | None = None) -> tuple[dict, Path]:
    """Submits a 2-node CPU job to the stand-in cluster and waits for it; returns its record and run folder."""
    work = tmp_path / name
    work.mkdir()
    out = work / "run"
    # Safety nets: a run that hangs is ended as a time limit would end it.
    env = harness.cluster_env(work, FAKE_SLURM_KILL_AFTER="60", FAKE_SLURM_TIME_LIMIT="100")
    if warn_when:
        env["FAKE_SLURM_WARN_WHEN"] = warn_when
    result = harness.sfd_launch(
        [
            "slurm", config, f"run.output_dir={out}", "launcher.nodes=2", "launcher.devices_per_node=1",
            "launcher.accelerator=cpu", "launcher.socket_ifname=lo", f"launcher.port={harness.free_port()}",
            f"launcher.env_setup=['source {harness.VENV_BIN / 'activate'}']", *overrides,
        ],
        env, work, timeout=150,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Submitted batch job 1000" in result.stdout
    return harness.job_record(env), out


def logs(out: Path) -> str:
    return "\n".join(p.read_text() for p in sorted((out / "logs").glob("slurm-*")))


@pytest.mark.slow
def test_requeue_round_trip_with_the_stand_in_trainer(tmp_path):
    from fake_cluster.fake_trainer import step_update

    config = harness.write_job_config(tmp_path / "job.yaml", train={"max_steps": 30}, checkpoint={"every": 5})
    record, out = slurm_job(
        tmp_path, "preempted", str(config), f"launcher.entrypoint={harness.FAKE_TRAINER}",
        warn_when=r"log:fake trainer step 8\b",
    )
    assert [(run["restart"], run["warned"], run["timed_out"]) for run in record["runs"]] == [(0, True, False), (1, False, False)], logs(out)
    assert record["state"] == "COMPLETED"

    events = harness.read_jsonl(out / "events.jsonl")
    starts = [e for e in events if e["event"] == "start"]
    assert all(e["usr2_ignored_at_start"] and e["world"] == 2 for e in starts)
    preempts = [e for e in events if e["event"] == "preempt"]
    # Both ranks stop at the same step: one may vote to stop before its own signal arrives.
    assert len(preempts) == 2 and all(e["restart"] == 0 for e in preempts)
    assert any(12 in e["signals"] for e in preempts)
    stopped_at = preempts[0]["step"]
    assert preempts[1]["step"] == stopped_at
    assert 8 <= stopped_at < 30
    assert sorted(e["step"] for e in starts if e["restart"] == 1) == [stopped_at, stopped_at]
    assert f'"step": {stopped_at}' in (out / "launch" / "requeue-1000-0.json").read_text()

    expected = torch.zeros(4, dtype=torch.float64)
    for step in range(30):
        expected = step_update(expected, step, world=2)
    final = torch.load(out / "final.pt")
    assert final["step"] == 30 and torch.equal(final["w"], expected)
    text = logs(out)
    assert "received SIGUSR2: passing it to the training step" in text and "training finished" in text


def _newest_checkpoint(out: Path, scratch: Path) -> dict[str, torch.Tensor]:
    """Tensors of the newest complete DCP checkpoint under <out>/checkpoints, flattened to dotted keys.

    The trainer's export command (`sfd-train export <run> --out FILE.pt`) may replace this."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    folders = [p.parent for p in (out / "checkpoints").rglob(".metadata")]
    assert folders, f"no complete checkpoint in {out / 'checkpoints'}"
    newest = max(folders, key=lambda p: [int(n) for n in re.findall(r"\d+", p.name)] or [0])
    target = scratch / f"{out.parent.name}.pt"
    dcp_to_torch_save(newest, target)
    flat: dict[str, torch.Tensor] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        elif isinstance(value, torch.Tensor):
            flat[prefix] = value

    walk("", torch.load(target, weights_only=False))
    return flat


@pytest.mark.slow
def test_requeued_real_training_matches_an_uninterrupted_run(tmp_path):
    common = [
        "train.max_steps=30", "train.global_batch_size=16", "checkpoint.every=5", "train.log_every=1",
        "train.sample_every=0", "eval.every=0", "run.wandb_mode=disabled",
    ]
    baseline_record, baseline = slurm_job(tmp_path, "uninterrupted", "tiny", *common)
    assert baseline_record["state"] == "COMPLETED" and len(baseline_record["runs"]) == 1, logs(baseline)

    # SIGUSR2 as soon as the first checkpoint appears, 25 steps before the end.
    record, preempted = slurm_job(tmp_path, "preempted", "tiny", *common, warn_when="file:" + str(tmp_path / "preempted" / "run" / "checkpoints" / "*"))
    assert record["state"] == "COMPLETED", logs(preempted)
    assert [(run["restart"], run["warned"]) for run in record["runs"]] == [(0, True), (1, False)], logs(preempted)
    assert list((preempted / "launch").glob("requeue-1000-0.json")), logs(preempted)

    expected = _newest_checkpoint(baseline, tmp_path)
    actual = _newest_checkpoint(preempted, tmp_path)
    weights = [k for k in expected if k.split(".")[0] in ("model", "ema")] or list(expected)
    assert weights
    for key in weights:
        assert torch.equal(actual[key], expected[key]), key


@pytest.mark.slow
def test_two_nodes_of_two_ranks_train_with_hybrid_sharding_by_default(tmp_path):
    record, out = slurm_job(tmp_path, "hsdp", "tiny", "launcher.devices_per_node=2", "train.max_steps=4",
                            "train.global_batch_size=16", "checkpoint.every=0", "train.sample_every=0",
                            "eval.every=0", "run.wandb_mode=disabled")
    assert record["state"] == "COMPLETED", logs(out)
    assert "fsdp2 (HSDP: 2 replicas x 2 shards) on 4 x" in logs(out), logs(out)
    assert (out / "checkpoints" / "step_000000004" / "COMMITTED").is_file()
