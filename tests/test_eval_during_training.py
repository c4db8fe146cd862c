"""Evaluation during training: numbers in metrics.jsonl and a plot, and the trajectory left untouched."""

import json
import os

import pytest
import torch

from runs import exported, losses, train, write_config

EVAL = {"every": 2, "num_samples": 24, "sampling_steps": 3, "batch_size": 8, "val_samples": 16}


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def with_and_without(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    config = write_config(tmp / "job.yaml", train={"max_steps": 6}, checkpoint={"every": 2})
    train(config, [f"run.output_dir={tmp / 'plain'}"])
    train(config, [f"run.output_dir={tmp / 'evaluated'}", *(f"eval.{k}={v}" for k, v in EVAL.items())])
    return config, tmp


def test_evaluations_are_logged_and_plotted(with_and_without):
    _, tmp = with_and_without
    evaluations = [r for r in _records(tmp / "evaluated") if "fid_synthetic" in r]
    assert [r["step"] for r in evaluations] == [2, 4, 6]
    for record in evaluations:
        assert record["fid_synthetic"] > 0 and 0 <= record["class_accuracy"] <= 1 and record["val_loss"] > 0
    assert (tmp / "evaluated" / "eval.png").is_file()


def test_evaluation_does_not_change_the_trajectory(with_and_without):
    _, tmp = with_and_without
    assert losses(tmp / "plain") == losses(tmp / "evaluated")
    a, b = exported(tmp / "plain", tmp / "a.pt"), exported(tmp / "evaluated", tmp / "b.pt")
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])


def test_a_resumed_evaluated_run_matches_the_uninterrupted_one(with_and_without):
    config, tmp = with_and_without
    run_dir = tmp / "resumed"
    overrides = [f"run.output_dir={run_dir}", *(f"eval.{k}={v}" for k, v in EVAL.items())]
    train(config, [*overrides, "train.max_steps=4"])
    train(config, overrides)
    a, b = exported(tmp / "evaluated", tmp / "c.pt"), exported(run_dir, tmp / "d.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    # The same evaluation numbers too: the samples' noise does not depend on the run's history.
    first = {r["step"]: r["fid_synthetic"] for r in _records(tmp / "evaluated") if "fid_synthetic" in r}
    again = {r["step"]: r["fid_synthetic"] for r in _records(run_dir) if "fid_synthetic" in r}
    assert again[6] == pytest.approx(first[6], rel=1e-9)


def test_the_synthetic_feature_network_recognises_held_out_pictures():
    from sfd_train.data_pipeline.synthetic import ensure_synthetic_dataset
    from sfd_train.evaluation.synthetic import SyntheticEvaluator

    evaluator = SyntheticEvaluator(ensure_synthetic_dataset(os.environ.get("SFD_SYNTHETIC_DIR")))
    assert evaluator.held_out_accuracy >= 0.95
