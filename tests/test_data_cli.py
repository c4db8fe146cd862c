"""The sfd-data command, statistics, and the synthetic dataset."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from sfd_train.data_pipeline.cli import main as sfd_data
from sfd_train.data_pipeline.manifest import read_manifest
from sfd_train.data_pipeline.stats import ChannelStats
from sfd_train.data_pipeline.synthetic import NUM_CLASSES, SyntheticSource, ensure_synthetic_dataset
from sfd_train.data_pipeline.testing import patch_bytes


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cli") / "synth")
    assert sfd_data(["synth", "--out", out, "--num-samples", "500", "--shard-size", "128", "--quiet"]) == 0
    return out


def test_console_script_help():
    exe = os.path.join(os.path.dirname(sys.executable), "sfd-data")
    for args in ([], ["synth"], ["convert"], ["stats"], ["inspect"]):
        result = subprocess.run([exe, *args, "--help"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "usage: sfd-data" in result.stdout
    result = subprocess.run([exe, "convert", "--help"], capture_output=True, text=True, timeout=60)
    assert "--from-published" in result.stdout and "--workers" in result.stdout


def test_synth_writes_a_valid_dataset(synth):
    m = read_manifest(synth)
    assert m.num_samples == 500 and m.num_classes == NUM_CLASSES == 10
    assert m.channels == (12, 4) and m.feature_dim == 32 and m.latent_size == (8, 8)
    assert m.provenance["command"] == f"sfd-data synth --out {synth} --num-samples 500 --shard-size 128 --quiet"


def test_inspect_json(synth, capsys):
    assert sfd_data(["inspect", synth, "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True and report["samples_found"] == 500 and report["num_shards"] == 4
    assert report["shapes"]["tex.npy"] == [12, 8, 8] and report["manifest"]["num_classes"] == 10
    assert all(s["ok"] for s in report["shards"])
    assert sfd_data(["inspect", synth, "--quiet"]) == 0
    assert "check          OK: 500 samples found" in capsys.readouterr().out


def test_inspect_fails_on_a_damaged_copy(synth, tmp_path, capsys):
    import shutil

    copy = str(tmp_path / "copy")
    shutil.copytree(synth, copy)
    m = read_manifest(copy)
    patch_bytes(os.path.join(copy, m.shards[2].name), 3 * m.layout.stride + 600, b"\xff" * 64)
    assert sfd_data(["inspect", copy, "--json", "--quiet"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    assert any("key '000000259'" in e for e in report["shards"][2]["errors"])
    assert sfd_data(["inspect", str(tmp_path / "nothing"), "--quiet"]) == 2


def test_stats_command_matches_the_data(synth, tmp_path, capsys):
    import shutil

    copy = str(tmp_path / "copy")
    shutil.copytree(synth, copy)
    before = read_manifest(copy).stats
    assert sfd_data(["stats", copy, "--quiet", "--write"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["count"] == 500 and printed["skipped"] == 0
    # Direct computation from the generator, in float64.
    arrays, _ = SyntheticSource(500, seed=0).read(np.arange(500))
    tex = torch.from_numpy(arrays["tex.npy"].astype(np.float64))
    np.testing.assert_allclose(printed["texture"]["mean"], tex.mean(dim=(0, 2, 3)).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(printed["texture"]["std"], tex.std(dim=(0, 2, 3)).numpy(), rtol=1e-5)
    after = read_manifest(copy)
    assert after.stats == {p: printed[p] for p in ("texture", "semantic")}
    assert after.stats_source.startswith("sfd-data stats over 500")
    np.testing.assert_allclose(after.stats["semantic"]["std"], before["semantic"]["std"], rtol=1e-5)


def test_channel_stats_merge_exactly():
    x = torch.randn(40, 3, 4, 4, dtype=torch.float64) * torch.tensor([1.0, 5.0, 0.1]).view(1, 3, 1, 1) + 3
    whole, parts = ChannelStats(3), ChannelStats(3)
    whole.update(x)
    for chunk in x.split(7):
        part = ChannelStats(3)
        part.update(chunk)
        parts.merge(part)
    np.testing.assert_allclose(parts.mean, whole.mean, rtol=1e-12)
    np.testing.assert_allclose(parts.std, x.std(dim=(0, 2, 3)).numpy(), rtol=1e-12)


def test_semantic_part_carries_class_and_layout():
    arrays, labels = SyntheticSource(200, seed=1).read(np.arange(200))
    sem = torch.from_numpy(arrays["sem.npy"]).float()
    cover = (sem[:, 0] + 1) / 2
    identity = sem[:, 1:].sum(dim=(2, 3)) / cover.sum(dim=(1, 2))[:, None]  # the class's code, position-free
    codes = torch.stack([identity[torch.from_numpy(labels) == c].mean(0) for c in range(NUM_CLASSES)])
    predicted = torch.cdist(identity, codes).argmin(1).numpy()
    assert (predicted == labels).all()
    # Where the shape is, the texture differs from the background.
    tex = torch.from_numpy(arrays["tex.npy"]).float()
    assert tex.shape == (200, 12, 8, 8) and cover.max() > 0.9 and cover.min() < 0.05


@pytest.mark.slow
def test_ensure_synthetic_dataset_is_idempotent(tmp_path):
    path = ensure_synthetic_dataset(str(tmp_path / "syn"))
    m = read_manifest(path)
    assert m.num_samples == 4096 and len(m.shards) == 4
    stamp = os.stat(os.path.join(path, m.shards[0].name)).st_mtime_ns
    assert ensure_synthetic_dataset(str(tmp_path / "syn")) == path
    assert os.stat(os.path.join(path, m.shards[0].name)).st_mtime_ns == stamp
