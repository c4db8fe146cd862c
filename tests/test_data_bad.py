"""Bad data: every kind is reported with shard and key, and either stops the run or is skipped and counted."""

import json
import logging
import re
import os
import shutil
import struct

import numpy as np
import pytest

from sfd_train.data_pipeline.check import check_dataset
from sfd_train.data_pipeline.errors import BadSampleError, ManifestError
from sfd_train.data_pipeline.format import BLOCK, SEMANTIC, SEMANTIC_FLIP, TEXTURE, tar_header
from sfd_train.data_pipeline.manifest import read_manifest
from sfd_train.data_pipeline.reader import CompositeLatentLoader
from sfd_train.data_pipeline.testing import patch_bytes, sample_offset, tiny_synthetic

N, G = 200, 20


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("bad") / "clean")
    tiny_synthetic(path, num_samples=N, shard_size=50)
    return path


@pytest.fixture
def dataset(clean, tmp_path):
    path = str(tmp_path / "ds")
    shutil.copytree(clean, path)
    return path


def loader(path, on_bad_sample, workers=0):
    return CompositeLatentLoader(path, global_batch_size=G, micro_batch_size=G, rank=0, world_size=1, seed=1,
                                 num_workers=workers, on_bad_sample=on_bad_sample)


def one_epoch(path, on_bad_sample="skip", workers=0):
    it = loader(path, on_bad_sample, workers)
    seen = np.concatenate([next(it)["index"].numpy() for _ in range(N // G)])
    it.close()
    return it, seen


def corrupt(path, how, index=57):
    """Damages sample ``index`` in one of several ways; returns (shard name, key)."""
    m = read_manifest(path)
    name, offset = sample_offset(m, index, SEMANTIC)
    shard = os.path.join(path, name)
    member = m.layout.members[SEMANTIC]
    if how == "nan":
        # Both variants: the reader checks the values it uses (the flip choice picks one).
        for field in (SEMANTIC, SEMANTIC_FLIP):
            _, at = sample_offset(m, index, field)
            patch_bytes(shard, at + (member.payload_offset - member.offset) + 6, struct.pack("<H", 0x7E00))
    elif how == "shape":
        header = member.npy_header
        patch_bytes(shard, offset + BLOCK, header.replace(b"(4, 8, 8)", b"(8, 4, 8)"))
    elif how == "missing_field":
        # A well-formed member with another name where sem.npy belongs.
        patch_bytes(shard, offset, tar_header(f"{index:09d}.xyz.npy", len(member.npy_header) + member.payload_bytes))
    elif how == "garbage":
        _, tex_offset = sample_offset(m, index, TEXTURE)
        patch_bytes(shard, tex_offset, os.urandom(2 * BLOCK))
    elif how == "label":
        _, cls_offset = sample_offset(m, index, "cls")
        patch_bytes(shard, cls_offset + BLOCK, b"x1\0")
    else:
        raise ValueError(how)
    return name, f"{index:09d}"


@pytest.mark.parametrize("how,reason", [
    ("nan", "NaN"),
    ("shape", "is float16[8, 4, 8], expected float16[4, 8, 8]"),
    ("missing_field", "'sem.npy' is missing"),
    ("garbage", "expected member"),
    ("label", "not an integer"),
])
def test_bad_sample_error_names_shard_and_key(dataset, how, reason):
    shard, key = corrupt(dataset, how)
    with pytest.raises(BadSampleError, match=re.escape(reason)) as info:
        one_epoch(dataset, "error")
    assert (info.value.shard, info.value.key) == (shard, key)
    assert f"shard '{shard}', key '{key}'" in str(info.value)


@pytest.mark.parametrize("how", ["nan", "shape", "garbage"])
def test_bad_sample_skipped_and_counted(dataset, how, caplog):
    shard, key = corrupt(dataset, how)
    with caplog.at_level(logging.WARNING):
        it, seen = one_epoch(dataset, "skip")
    assert it.bad_samples == 1
    assert 57 not in seen and len(seen) == N - 1
    assert f"shard '{shard}', key '{key}'" in caplog.text


@pytest.mark.slow
def test_bad_sample_error_crosses_worker_processes(dataset):
    shard, key = corrupt(dataset, "nan")
    with pytest.raises(Exception, match=f"shard '{shard}', key '{key}'"):
        one_epoch(dataset, "error", workers=2)
    it, seen = one_epoch(dataset, "skip", workers=2)
    assert it.bad_samples == 1 and len(seen) == N - 1


def test_truncated_shard(dataset, caplog):
    m = read_manifest(dataset)
    shard = os.path.join(dataset, m.shards[1].name)
    keep = 20 * m.layout.stride + 1000  # 20 whole samples and a piece of the 21st
    with open(shard, "r+b") as f:
        f.truncate(keep)
    with pytest.raises(BadSampleError, match="truncated") as info:
        loader(dataset, "error")
    assert info.value.shard == m.shards[1].name and info.value.key == f"{50 + 20:09d}"
    with caplog.at_level(logging.WARNING):
        it, seen = one_epoch(dataset, "skip")
    assert it.bad_samples == 30
    assert set(range(70, 100)).isdisjoint(seen) and len(seen) == N - 30
    assert "key '000000070'" in caplog.text


def test_manifest_that_does_not_match_the_shards(dataset):
    m = read_manifest(dataset)
    os.rename(os.path.join(dataset, m.shards[2].name), os.path.join(dataset, "moved.bin"))
    with pytest.raises(ManifestError, match=f"{m.shards[2].name} .* does not exist"):
        loader(dataset, "skip")
    os.rename(os.path.join(dataset, "moved.bin"), os.path.join(dataset, m.shards[2].name))
    shutil.copy(os.path.join(dataset, m.shards[0].name), os.path.join(dataset, "train-000009.tar"))
    with pytest.raises(ManifestError, match="not in manifest.json"):
        loader(dataset, "skip")
    os.remove(os.path.join(dataset, "train-000009.tar"))
    with open(os.path.join(dataset, m.shards[0].name), "ab") as f:
        f.write(bytes(BLOCK))
    with pytest.raises(ManifestError, match="bytes"):
        loader(dataset, "skip")


def test_malformed_manifest(dataset):
    path = os.path.join(dataset, "manifest.json")
    with open(path) as f:
        data = json.load(f)
    data["shards"][1]["count"] = 49
    with open(path, "w") as f:
        json.dump(data, f)
    with pytest.raises(ManifestError, match="train-000001.tar"):
        loader(dataset, "skip")
    with open(path, "w") as f:
        f.write("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        loader(dataset, "skip")
    os.remove(path)
    with pytest.raises(ManifestError, match="no manifest.json"):
        loader(dataset, "skip")


@pytest.mark.parametrize("how,reason", [
    ("nan", "'sem.npy' contains NaN"),
    ("shape", "'sem.npy' is float16[8, 4, 8], expected float16[4, 8, 8]"),
    ("missing_field", "unexpected field 'xyz.npy'"),
    ("label", "'cls' is not an integer"),
])
def test_inspect_finds_each_problem(dataset, how, reason):
    shard, key = corrupt(dataset, how)
    report = check_dataset(dataset, progress=False)
    assert report["ok"] is False and report["bad_samples"] == 1, report
    errors = [e for s in report["shards"] for e in s["errors"]]
    assert any(f"shard '{shard}', key '{key}'" in e and reason in e for e in errors), errors
    assert any("SHA-256" in e for e in errors)


def test_inspect_truncated_and_clean(clean, dataset):
    assert check_dataset(clean, progress=False)["ok"] is True
    m = read_manifest(dataset)
    with open(os.path.join(dataset, m.shards[3].name), "r+b") as f:
        f.truncate(10 * m.layout.stride + 700)
    report = check_dataset(dataset, progress=False)
    assert report["ok"] is False
    errors = " ".join(report["shards"][3]["errors"])
    assert "truncated" in errors and m.shards[3].name in errors and "000000160" in errors
