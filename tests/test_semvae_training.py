"""SemVAE training on the engine: the published recipe, exact resume on 2 ranks, export in the
authors' format, and the two-pass path from images to a trainable dataset."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from extract_kit import all_samples, extract_command, make_kit, run
from runs import committed, exported, kill_run, losses, start, train, wait_for
from sfd_train.config import load_config
from sfd_train.data_pipeline.manifest import read_manifest
from sfd_train.engine.optim import lr_factor
from sfd_train.tokenizers.semvae import SemVAE, load_semvae


def test_the_preset_is_the_published_recipe():
    config = load_config("semvae_ch16", ["data.path=somewhere"])
    assert type(config).__name__ == "SemVAEJobConfig"
    assert (config.model.input_dim, config.model.bottleneck_dim, config.model.transformer_blocks) == (768, 16, 4)
    assert sum(p.numel() for p in SemVAE(config.model).parameters()) / 1e6 == pytest.approx(57.9, abs=0.05)
    assert (config.train.global_batch_size, config.train.max_steps, config.optimizer.lr) == (64, 1_000_000, 5e-5)
    o = config.objective
    assert (o.mse_weight, o.cos_weight, o.l1_weight, o.kl_weight, o.cos_axis) == (1.0, 1.0, 0.0, 1e-7, "tokens")

    # The authors' LinearLR(0.01 -> 1, 500) + ConstantLR + CosineAnnealingLR(T_max=199500, eta_min=5e-6).
    def authors(step: int) -> float:
        if step < 500:
            return 5e-5 * (0.01 + 0.99 * step / 500)
        if step < 800_500:
            return 5e-5
        return 5e-6 + (5e-5 - 5e-6) * (1 + math.cos(math.pi * (step - 800_500) / 199_500)) / 2

    ours = lambda step: config.optimizer.lr * lr_factor(step, config.optimizer, config.train.max_steps)  # noqa: E731
    for step in (500, 1000, 800_000, 800_500, 850_000, 900_000, 999_999):
        assert ours(step) == pytest.approx(authors(step), rel=1e-4), step
    # Warm-up: ours reaches each value one step earlier ((step + 1) / 500 where they have step / 500).
    assert ours(0) == pytest.approx(authors(1), rel=1e-6)


@pytest.fixture(scope="module")
def features(tmp_path_factory, tokenizer_reference_path):
    """A first-pass dataset (texture latents and DINOv2 features, no semantic part) of 40 images."""
    kit = make_kit(tmp_path_factory.mktemp("semvae"), tokenizer_reference_path, images=40)
    out = kit["root"] / "features"
    run(extract_command(kit, out, "--shard-size", "8", semvae=False))
    return kit, out


def _job(kit, dataset, tmp_path, **sections) -> Path:
    reference = kit["reference"]["semvae"]["config"]
    job = {
        "task": "semvae",
        "model": {k: reference[k] for k in ("input_dim", "bottleneck_dim", "hidden_dim", "transformer_heads",
                                            "transformer_blocks")},
        "data": {"path": str(dataset), "num_workers": 2},
        "train": {"max_steps": 10, "global_batch_size": 8, "log_every": 1, "mixed_precision": "fp32"},
        "optimizer": {"warmup_steps": 2, "decay_start": 4},
        "eval": {"every": 5, "holdout_shards": 1, "max_samples": 8, "batch_size": 4},
        "checkpoint": {"every": 2},
        "run": {"device": "cpu", "wandb_mode": "disabled"},
    }
    for section, values in sections.items():
        job.setdefault(section, {}).update(values)
    path = tmp_path / "semvae.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


@pytest.mark.slow
def test_two_ranks_killed_and_resumed_end_bitwise_equal(features, tmp_path):
    kit, data = features
    job = _job(kit, data, tmp_path)
    reference_dir, resumed_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    train(job, [f"run.output_dir={reference_dir}"], nproc=2)
    proc = start(job, [f"run.output_dir={resumed_dir}"], nproc=2, log=tmp_path / "killed.log")
    wait_for(lambda: any(s >= 4 for s in committed(resumed_dir)), what="a checkpoint at step >= 4", proc=proc)
    kill_run(proc)
    assert max(committed(resumed_dir)) < 10
    result = train(job, [f"run.output_dir={resumed_dir}"], nproc=2)
    assert "resumed from" in result.stdout + result.stderr
    a, b = exported(reference_dir, tmp_path / "a.pt"), exported(resumed_dir, tmp_path / "b.pt")
    for key, value in a["model_state_dict"].items():
        assert torch.equal(value, b["model_state_dict"][key]), key
    # Held-out evaluation was logged, and the loss went down.
    records = {r["step"]: r for r in map(json.loads, (reference_dir / "metrics.jsonl").read_text().splitlines())}
    assert "eval_mse" in records[5] and "eval_cos" in records[10]
    assert losses(reference_dir)[10] < losses(reference_dir)[1]


def test_export_is_the_authors_checkpoint_and_fills_in_the_dataset(features, tmp_path):
    kit, data = features
    run_dir = tmp_path / "run"
    train(_job(kit, data, tmp_path, data={"num_workers": 0}), [f"run.output_dir={run_dir}", "train.max_steps=3"])
    out = tmp_path / "semvae_export.pt"
    result = subprocess.run([sys.executable, "-m", "sfd_train.cli", "export", str(run_dir), "--out", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    blob = torch.load(out, weights_only=False)
    authors = kit["reference"]["semvae"]["checkpoint"]["model_state_dict"]
    # The authors' layout: the same names and shapes as their own checkpoint (their loader is strict).
    assert {k: tuple(v.shape) for k, v in blob["model_state_dict"].items()} == {k: tuple(v.shape) for k, v in authors.items()}
    assert blob["iteration"] == 3 and blob["input_dim"] == authors["encoder.0.weight"].shape[1]
    load_semvae(str(out))
    # The second pass of the extraction with this SemVAE completes the dataset.
    filled = tmp_path / "filled"
    subprocess.run(["cp", "-r", str(data), str(filled)], check=True)
    command = extract_command(kit, filled)
    command[command.index("--semvae") + 1] = str(out)
    run(command)
    manifest = read_manifest(filled)
    assert manifest.semantic_channels == blob["bottleneck_dim"]
    assert manifest.provenance["weights"]["semvae"]["file"] == "semvae_export.pt"
    assert all_samples(filled)[0]["sem.npy"].shape[1] == blob["bottleneck_dim"]
