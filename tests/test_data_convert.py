"""Published layout -> convert -> read gives the same arrays, labels and statistics; resumable, parallel writing."""

import hashlib
import os

import numpy as np
import pytest
import torch

from sfd_train.data_pipeline import writer
from sfd_train.data_pipeline.cli import main as sfd_data
from sfd_train.data_pipeline.convert import convert_published
from sfd_train.data_pipeline.errors import DataError, WriterError
from sfd_train.data_pipeline.manifest import read_manifest
from sfd_train.data_pipeline.order import flip_choices, writer_permutation
from sfd_train.data_pipeline.reader import CompositeLatentLoader
from sfd_train.data_pipeline.testing import make_published_folder

COUNTS = (40, 37, 50)  # 127 samples in three files of different sizes
N = sum(COUNTS)


def read_all(path, use_flip, seed=3, **kw):
    """Every sample of one epoch (G = 127, so nothing is dropped), sorted by global index."""
    loader = CompositeLatentLoader(path, global_batch_size=N, micro_batch_size=N, rank=0, world_size=1, seed=seed,
                                   num_workers=0, normalize=False, use_flip=use_flip, **kw)
    batch = next(loader)
    order = torch.argsort(batch["index"])
    return {k: v[order] for k, v in batch.items()}


def source_rows(manifest):
    return torch.from_numpy(writer_permutation(manifest.num_samples, manifest.order["seed"]))


@pytest.mark.parametrize("dtype,stats_shape", [(torch.float16, "1C11"), (torch.bfloat16, "C11"), (torch.float16, "C")])
def test_round_trip(tmp_path, dtype, stats_shape):
    src = make_published_folder(str(tmp_path / "published"), COUNTS, dtype=dtype, stats_shape=stats_shape)
    manifest = convert_published(str(tmp_path / "published"), str(tmp_path / "shards"), shard_size=32, seed=5,
                                 workers=2, progress=False)
    assert manifest.storage_dtype == ("bfloat16" if dtype == torch.bfloat16 else "float16")
    assert manifest.num_samples == N and [s.count for s in manifest.shards] == [32, 32, 32, 31]
    assert manifest.num_classes == int(src["labels"].max()) + 1
    # Statistics are the published ones, exactly.
    for part, key in (("texture", "latents"), ("semantic", "latents_sv")):
        mean, std = manifest.stats_tensors(part)
        assert torch.equal(mean.flatten(), src[f"{key}_mean"]) and torch.equal(std.flatten(), src[f"{key}_std"])
    rows = source_rows(manifest)
    plain = read_all(str(tmp_path / "shards"), use_flip=False)
    assert torch.equal(plain["index"], torch.arange(N))
    assert torch.equal(plain["y"], src["labels"][rows])
    assert torch.equal(plain["x"][:, :8], src["latents"][rows].float())
    assert torch.equal(plain["x"][:, 8:], src["latents_sv"][rows].float())
    assert torch.equal(plain["dino"], src["feats_dino"][rows].float())
    flipped = read_all(str(tmp_path / "shards"), use_flip=True)
    flips = torch.from_numpy(flip_choices(3, 0, np.arange(N)))
    assert 0 < flips.sum() < N
    tex = torch.where(flips[:, None, None, None], src["latents_flip"][rows], src["latents"][rows]).float()
    dino = torch.where(flips[:, None, None, None], src["feats_dino_flip"][rows], src["feats_dino"][rows]).float()
    assert torch.equal(flipped["x"][:, :8], tex)
    assert torch.equal(flipped["dino"], dino)


def test_token_major_features_and_no_flipped_features(tmp_path):
    src = make_published_folder(str(tmp_path / "p"), (30, 20), token_major_features=True, flipped_features=False)
    manifest = convert_published(str(tmp_path / "p"), str(tmp_path / "s"), shard_size=16, progress=False)
    assert manifest.shapes["dino.npy"] == (6, 4, 4) and not manifest.has_flipped_features
    loader = CompositeLatentLoader(str(tmp_path / "s"), global_batch_size=50, micro_batch_size=50, rank=0, world_size=1,
                                   seed=1, num_workers=0, normalize=False)
    batch = next(loader)
    rows = source_rows(manifest)[batch["index"]]
    flips = torch.from_numpy(flip_choices(1, 0, batch["index"].numpy()))
    expected = src["feats_dino"][rows].float()
    expected[flips] = expected[flips].flip(-1)  # without dino_flip, flipped samples get mirrored features
    assert torch.equal(batch["dino"], expected)


def test_float32_sources_are_stored_as_float16(tmp_path):
    src = make_published_folder(str(tmp_path / "p"), (10,), dtype=torch.float32, feature_dim=None)
    manifest = convert_published(str(tmp_path / "p"), str(tmp_path / "s"), progress=False)
    assert manifest.storage_dtype == "float16" and manifest.feature_dim is None
    loader = CompositeLatentLoader(str(tmp_path / "s"), global_batch_size=10, micro_batch_size=10, rank=0, world_size=1,
                                   seed=0, num_workers=0, normalize=False, use_flip=False)
    batch = next(loader)
    rows = source_rows(manifest)[batch["index"]]
    assert torch.equal(batch["x"][:, :8], src["latents"][rows].half().float())


def test_missing_tensors_are_reported(tmp_path):
    from safetensors.torch import save_file

    os.makedirs(tmp_path / "p")
    save_file({"latents": torch.zeros(2, 4, 2, 2), "labels": torch.zeros(2, dtype=torch.long)}, str(tmp_path / "p" / "a.safetensors"))
    with pytest.raises(DataError, match="latents_sv"):
        convert_published(str(tmp_path / "p"), str(tmp_path / "s"), progress=False)
    with pytest.raises(DataError, match="no \\*.safetensors"):
        convert_published(str(tmp_path / "empty"), str(tmp_path / "s2"), progress=False)


def _digests(folder):
    return {n: hashlib.sha256(open(os.path.join(folder, n), "rb").read()).hexdigest() for n in sorted(os.listdir(folder)) if n.endswith(".tar")}


@pytest.mark.slow
def test_interrupted_conversion_resumes(tmp_path, monkeypatch):
    make_published_folder(str(tmp_path / "p"), COUNTS)
    clean = convert_published(str(tmp_path / "p"), str(tmp_path / "clean"), shard_size=20, progress=False)

    real = writer._write_shard
    calls = []

    def crash_on_fourth(source, task):
        calls.append(task.name)
        if len(calls) == 4:
            # Leave a partial file behind, as a killed process would.
            with open(os.path.join(task.folder, task.name + ".tmp-999"), "wb") as f:
                f.write(b"partial")
            raise KeyboardInterrupt
        return real(source, task)

    out = str(tmp_path / "out")
    monkeypatch.setattr(writer, "_write_shard", crash_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        convert_published(str(tmp_path / "p"), out, shard_size=20, progress=False)
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    finished = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out) if n.endswith(".tar")}
    assert len(finished) == 3

    calls.clear()
    monkeypatch.setattr(writer, "_write_shard", lambda source, task: (calls.append(task.name), real(source, task))[1])
    resumed = convert_published(str(tmp_path / "p"), out, shard_size=20, progress=False)
    assert sorted(calls) == [f"train-{i:06d}.tar" for i in range(3, 7)]  # only the unfinished shards
    assert all(os.stat(os.path.join(out, n)).st_mtime_ns == t for n, t in finished.items())
    assert _digests(out) == _digests(str(tmp_path / "clean"))  # byte-identical to an uninterrupted run
    assert resumed.to_dict()["shards"] == clean.to_dict()["shards"]
    # Done: running again does nothing; another job into the same folder is refused.
    calls.clear()
    convert_published(str(tmp_path / "p"), out, shard_size=20, progress=False)
    assert calls == []
    with pytest.raises(WriterError, match="different dataset"):
        convert_published(str(tmp_path / "p"), out, shard_size=10, progress=False)


def test_convert_command_line(tmp_path, capsys):
    make_published_folder(str(tmp_path / "p"), (12, 9), stats_shape="C")
    rc = sfd_data(["convert", "--from-published", str(tmp_path / "p"), "--out", str(tmp_path / "s"), "--shard-size", "8",
                   "--workers", "2", "--quiet"])
    assert rc == 0 and "wrote 21 samples in 3 shards" in capsys.readouterr().out
    m = read_manifest(str(tmp_path / "s"))
    assert m.provenance["command"].startswith("sfd-data convert --from-published")
    assert "published" in m.provenance["source"] and m.stats_source.startswith("published latents_stats.pt")
    assert sfd_data(["convert", "--from-published", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x"), "--quiet"]) == 2
