"""Shard format, manifest and the deterministic orders."""

import json
import os
import tarfile

import numpy as np
import pytest
import torch

from sfd_train.data_pipeline import format as fmt
from sfd_train.data_pipeline.errors import ManifestError
from sfd_train.data_pipeline.manifest import Manifest, brace_pattern, expand_braces, read_manifest
from sfd_train.data_pipeline.order import Schedule, epoch_order, flip_choices, writer_permutation
from sfd_train.data_pipeline.synthetic import SyntheticSource
from sfd_train.data_pipeline.testing import tiny_synthetic


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("fmt") / "ds")
    tiny_synthetic(path, num_samples=150, shard_size=64)
    return path


def test_layout_is_fixed_stride_and_tar_readable(dataset):
    m = read_manifest(dataset)
    layout = m.layout
    assert layout.stride % fmt.BLOCK == 0
    with tarfile.open(os.path.join(dataset, m.shards[1].name)) as tar:
        members = tar.getmembers()
    # Every field, no scale members (those come only with compact features, see test_compact_features.py).
    assert layout.fields == tuple(name for name in fmt.MEMBER_ORDER if name not in fmt.SCALE_OF.values())
    assert len(members) == m.shards[1].count * len(layout.fields)
    for j, member in enumerate(members):
        sample, pos = divmod(j, len(layout.fields))
        name = layout.fields[pos]
        assert member.name == f"{m.shards[1].first_index + sample:09d}.{name}"
        assert member.offset == sample * layout.stride + layout.members[name].offset
        assert member.pax_headers == {}  # plain USTAR, no extensions
    assert os.path.getsize(os.path.join(dataset, m.shards[1].name)) == m.shards[1].bytes


def test_webdataset_library_reads_what_the_writer_wrote(dataset):
    """The format test: shards from our writer, read by ``webdataset.WebDataset`` (a test
    requirement; the package itself reads them with its own reader), give back every sample
    with every member, equal to what the writer was given."""
    import webdataset as wds

    m = read_manifest(dataset)
    urls = [os.path.join(dataset, s.name) for s in m.shards]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode())
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(m.num_samples)]
    # Written in the writer's permutation of the source: sample i is source item perm[i].
    arrays, labels = SyntheticSource(m.num_samples, seed=0).read(writer_permutation(m.num_samples, 0))
    for i, s in enumerate(samples):
        assert {k for k in s if not k.startswith("__")} == set(m.layout.fields), i
        assert s[fmt.LABEL] == labels[i], i
        for name in m.layout.fields:
            if name != fmt.LABEL:
                assert s[name].dtype == arrays[name].dtype, (i, name)
                np.testing.assert_array_equal(s[name], arrays[name][i], err_msg=f"sample {i}, {name}")


def test_encode_rejects_wrong_shape_and_dtype():
    layout = fmt.SampleLayout({fmt.TEXTURE: (2, 2, 2), fmt.TEXTURE_FLIP: (2, 2, 2), fmt.SEMANTIC: (1, 2, 2), fmt.SEMANTIC_FLIP: (1, 2, 2)}, "float16")
    good = {k: np.zeros(v, np.float16) for k, v in layout.shapes.items()}
    assert len(layout.encode(3, good, 1)) == layout.stride
    with pytest.raises(ValueError, match="tex.npy"):
        layout.encode(3, {**good, fmt.TEXTURE: np.zeros((2, 2, 3), np.float16)}, 1)
    with pytest.raises(ValueError, match="sem.npy"):
        layout.encode(3, {**good, fmt.SEMANTIC: np.zeros((1, 2, 2), np.float32)}, 1)


def test_storage_dtypes_round_trip():
    x = torch.randn(3, 4) * 100
    f16 = fmt.to_storage(x, "float16")
    assert f16.dtype == np.dtype("<f2")
    assert torch.equal(fmt.from_storage(f16, "float16"), x.half().float())
    bf = fmt.to_storage(x, "bfloat16")
    assert bf.dtype == np.dtype("<u2")
    assert torch.equal(fmt.from_storage(bf, "bfloat16"), x.bfloat16().float())
    with pytest.raises(ValueError, match="float16 range"):
        fmt.to_storage(torch.tensor([1e6]), "float16")


def test_manifest_validation(dataset):
    with open(os.path.join(dataset, "manifest.json")) as f:
        data = json.load(f)
    m = Manifest.from_dict(data)
    assert m.channels == (12, 4) and m.feature_dim == 32 and m.latent_size == (8, 8)
    assert expand_braces(m.shard_pattern) == [s.name for s in m.shards]
    broken = json.loads(json.dumps(data))
    broken["shards"][0]["count"] += 1
    with pytest.raises(ManifestError, match="train-000000.tar"):
        Manifest.from_dict(broken)
    broken = json.loads(json.dumps(data))
    broken["num_samples"] = 10
    with pytest.raises(ManifestError, match="add up"):
        Manifest.from_dict(broken)
    broken = json.loads(json.dumps(data))
    broken["stats"]["semantic"]["std"] = [1.0]
    with pytest.raises(ManifestError, match="semantic"):
        Manifest.from_dict(broken)
    broken = json.loads(json.dumps(data))
    broken["layout"]["sample_bytes"] += 512
    with pytest.raises(ManifestError, match="layout"):
        Manifest.from_dict(broken)


def test_brace_patterns():
    assert expand_braces("a-{00..02}.tar") == ["a-00.tar", "a-01.tar", "a-02.tar"]
    assert expand_braces("{x,y}-{1..2}") == ["x-1", "x-2", "y-1", "y-2"]
    assert expand_braces(brace_pattern("train-", 12)) == [f"train-{i:06d}.tar" for i in range(12)]


@pytest.mark.parametrize("n,chunk", [(1000, 16), (1001, 16), (37, 8), (50, 1), (5, 16)])
def test_epoch_order_is_a_permutation_of_chunks(n, chunk):
    a = epoch_order(n, seed=3, epoch=2, chunk_size=chunk)
    assert np.array_equal(np.sort(a), np.arange(n))
    assert np.array_equal(a, epoch_order(n, seed=3, epoch=2, chunk_size=chunk))
    assert not np.array_equal(a, epoch_order(n, seed=3, epoch=3, chunk_size=chunk))
    assert not np.array_equal(a, epoch_order(n, seed=4, epoch=2, chunk_size=chunk))
    if chunk > 1 and n > chunk:
        # Mostly runs of consecutive stored samples: few contiguous pieces per slice.
        steps = np.diff(a)
        assert np.mean(steps == 1) > 0.8
        assert np.mean(steps == 1) < 1.0


def test_epoch_order_known_values():
    # Pure integer hashing: these values must not change between machines or versions,
    # or a resumed run would see different data than the run it continues.
    assert epoch_order(20, seed=0, epoch=2, chunk_size=4).tolist() == [
        1, 2, 3, 4, 17, 18, 19, 0, 9, 10, 11, 12, 5, 6, 7, 8, 13, 14, 15, 16,
    ]
    assert writer_permutation(8, 0).tolist() == [0, 7, 5, 6, 4, 1, 3, 2]
    assert flip_choices(0, 0, np.arange(12)).astype(int).tolist() == [1, 1, 0, 1, 0, 1, 0, 0, 0, 0, 1, 1]


def test_flips_are_balanced_and_vary_by_epoch():
    f0 = flip_choices(1, 0, np.arange(10000))
    f1 = flip_choices(1, 1, np.arange(10000))
    assert 0.47 < f0.mean() < 0.53
    assert 0.4 < np.mean(f0 != f1) < 0.6


def test_schedule_slices():
    s = Schedule(num_samples=100, global_batch_size=32, micro_batch_size=8, rank=1, world_size=2)
    assert s.batches_per_epoch == 3 and s.accumulation_steps == 2 and s.micro_per_epoch == 6
    assert s.positions(0) == (0, 16, 24)
    assert s.positions(1) == (0, 24, 32)
    assert s.positions(2) == (0, 48, 56)
    assert s.positions(6) == (1, 16, 24)
    assert s.first_micro(1, 64) == 6 + 4
    with pytest.raises(ValueError, match="divide"):
        Schedule(100, 32, 5, 0, 2)
    with pytest.raises(ValueError, match="multiple of world_size"):
        Schedule(100, 32, 4, 0, 3)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        Schedule(10, 32, 4, 0, 2)
