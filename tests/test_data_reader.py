"""The loader: contents, determinism, world-size independence, resumption."""

import logging

import numpy as np
import pytest
import torch

from sfd_train.data_pipeline.config import DataConfig
from sfd_train.data_pipeline.manifest import read_manifest
from sfd_train.data_pipeline.order import epoch_order, flip_choices, writer_permutation
from sfd_train.data_pipeline.reader import CompositeLatentLoader, build_loader
from sfd_train.data_pipeline.stats import denormalize, normalize
from sfd_train.data_pipeline.synthetic import SyntheticSource, decode_texture, encode_texture, render
from sfd_train.data_pipeline.testing import collect, indices_of, tiny_synthetic

N = 300  # 5 shards of 64 (the last holds 44); not a multiple of any global batch below
G = 32


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("reader") / "ds")
    tiny_synthetic(path, num_samples=N, shard_size=64)
    return path


def make(path, *, world_size=1, rank=0, micro=None, workers=0, seed=7, g=G, **kw):
    micro = micro or g // world_size
    return CompositeLatentLoader(path, global_batch_size=g, micro_batch_size=micro, rank=rank, world_size=world_size,
                                 seed=seed, num_workers=workers, **kw)


def global_batches(path, steps, *, world_size, micro, workers=0, start_state=None, **kw):
    """Runs every rank of a world for ``steps`` optimizer steps; returns the global batches' indices."""
    loaders = [make(path, world_size=world_size, rank=r, micro=micro, workers=workers, **kw) for r in range(world_size)]
    if start_state is not None:
        for loader in loaders:
            loader.load_state_dict(start_state)
    accumulation = G // world_size // micro
    out = []
    for _ in range(steps):
        parts = [indices_of(collect(loader, accumulation)) for loader in loaders]
        out.append(np.concatenate(parts))
    states = [loader.state_dict() for loader in loaders]
    for loader in loaders:
        loader.close()
    return out, states


def test_batches_hold_the_stored_samples(dataset):
    m = read_manifest(dataset)
    loader = make(dataset, normalize=False)
    batch = next(loader)
    assert set(batch) == {"x", "y", "dino", "index"}
    assert batch["x"].shape == (G, 16, 8, 8) and batch["x"].dtype == torch.float32
    assert batch["dino"].shape == (G, 32, 8, 8) and batch["y"].dtype == torch.int64
    assert loader.channels == (12, 4) and loader.feature_dim == 32
    idx = batch["index"].numpy()
    assert np.array_equal(idx, epoch_order(N, 7, 0, loader.chunk_size)[:G])
    # Compare with the generator: global index i holds source sample perm[i].
    arrays, labels = SyntheticSource(N, seed=0).read(writer_permutation(N, m.order["seed"])[idx])
    flips = flip_choices(7, 0, idx)
    assert 0 < flips.sum() < G
    for row in range(G):
        suffix = "_flip" if flips[row] else ""
        tex = torch.from_numpy(arrays[f"tex{suffix}.npy"][row]).float()
        sem = torch.from_numpy(arrays[f"sem{suffix}.npy"][row]).float()
        dino = torch.from_numpy(arrays[f"dino{suffix}.npy"][row]).float()
        assert torch.equal(batch["x"][row], torch.cat([tex, sem]))
        assert torch.equal(batch["dino"][row], dino)
    assert np.array_equal(batch["y"].numpy(), labels)


def test_normalisation_uses_each_parts_statistics(dataset):
    m = read_manifest(dataset)
    raw = next(make(dataset, normalize=False))["x"]
    normed = next(make(dataset, normalize=True))["x"]
    tex_mean, tex_std = m.stats_tensors("texture")
    sem_mean, sem_std = m.stats_tensors("semantic")
    torch.testing.assert_close(normed[:, :12], (raw[:, :12] - tex_mean) / tex_std)
    torch.testing.assert_close(normed[:, 12:], (raw[:, 12:] - sem_mean) / sem_std)
    torch.testing.assert_close(denormalize(normed, m), raw, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(normalize(raw[:, :12], m), normed[:, :12])
    # Over a whole epoch, normalised channels are close to zero mean and unit std.
    loader = make(dataset, normalize=True, use_flip=False)
    x = torch.cat([b["x"] for b in collect(loader, N // G)])
    assert x.mean(dim=(0, 2, 3)).abs().max() < 0.15
    assert (x.std(dim=(0, 2, 3)) - 1).abs().max() < 0.15


def test_no_flip_and_no_features(dataset):
    plain = next(make(dataset, use_flip=False, use_repa_features=False, normalize=False))
    assert "dino" not in plain
    arrays, _ = SyntheticSource(N, seed=0).read(writer_permutation(N, 0)[plain["index"].numpy()])
    assert torch.equal(plain["x"][:, :12], torch.from_numpy(arrays["tex.npy"]).float())
    assert make(dataset, use_repa_features=False).feature_dim is None


def test_decode_texture_shows_the_pictures(dataset):
    m = read_manifest(dataset)
    batch = next(make(dataset, use_flip=False, normalize=True))
    pictures = decode_texture(batch["x"], m)
    assert pictures.shape == (G, 3, 32, 32) and 0 <= pictures.min() and pictures.max() <= 1
    images, _, _ = render(writer_permutation(N, 0)[batch["index"].numpy()], seed=0)
    pooled = torch.nn.functional.avg_pool2d(torch.from_numpy(images), 2).repeat_interleave(2, 2).repeat_interleave(2, 3)
    assert (pictures - pooled).abs().max() < 0.01  # exact up to float16 storage
    assert (decode_texture(encode_texture(torch.from_numpy(images))) - pooled).abs().max() < 1e-5


@pytest.mark.parametrize("world_size,micro", [(2, 16), (2, 8), (4, 4)])
def test_global_batches_do_not_depend_on_world_size(dataset, world_size, micro):
    steps = 2 * (N // G) + 3  # crosses two epoch boundaries
    reference, ref_states = global_batches(dataset, steps, world_size=1, micro=G)
    batches, states = global_batches(dataset, steps, world_size=world_size, micro=micro)
    for a, b in zip(reference, batches):
        assert np.array_equal(a, b)
    # Every rank ends at the same, world-size independent position.
    assert all(s == ref_states[0] for s in states)
    assert ref_states[0]["epoch"] == 2 and ref_states[0]["samples_in_epoch"] == 3 * G


def test_each_epoch_visits_every_sample_once_and_drops_the_remainder(dataset):
    per_epoch = N // G
    batches, _ = global_batches(dataset, 2 * per_epoch, world_size=2, micro=16)
    for epoch in range(2):
        seen = np.concatenate(batches[epoch * per_epoch : (epoch + 1) * per_epoch])
        assert len(seen) == len(np.unique(seen)) == per_epoch * G
        assert np.array_equal(seen, epoch_order(N, 7, epoch, 16)[: per_epoch * G])
    assert not np.array_equal(np.concatenate(batches[:per_epoch]), np.concatenate(batches[per_epoch:]))


def test_ranks_never_starve(dataset):
    # 300 samples, G = 30 over 3 ranks: every rank gets the same number of batches, forever.
    loaders = [make(dataset, world_size=3, rank=r, micro=5, g=30) for r in range(3)]
    counts = [sum(len(b["index"]) for b in collect(loader, 2 * 20 + 7)) for loader in loaders]
    assert counts == [5 * 47] * 3


@pytest.mark.slow
def test_workers_give_identical_batches(dataset):
    reference = collect(make(dataset, workers=0), 12)
    for workers in (1, 2):
        loader = make(dataset, workers=workers)
        for a, b in zip(reference, collect(loader, 12)):
            for key in a:
                assert torch.equal(a[key], b[key]), key
        loader.close()


@pytest.mark.slow
@pytest.mark.parametrize(
    "before,after",
    [
        ((1, 32, 0), (2, 16, 2)),  # one rank, in-process -> two ranks with two workers each
        ((2, 8, 2), (1, 32, 1)),  # two ranks with accumulation and workers -> one rank
        ((2, 16, 2), (4, 8, 0)),
    ],
)
def test_resume_mid_epoch_on_another_world_size(dataset, before, after):
    total, stop = 20, 5  # 9 optimizer steps per epoch: stops mid-epoch, resumes across the boundary
    reference, _ = global_batches(dataset, total, world_size=1, micro=G)
    w0, m0, nw0 = before
    first, states = global_batches(dataset, stop, world_size=w0, micro=m0, workers=nw0)
    assert states[0]["samples_in_epoch"] == stop * G
    w1, m1, nw1 = after
    rest, _ = global_batches(dataset, total - stop, world_size=w1, micro=m1, workers=nw1, start_state=states[0])
    for a, b in zip(reference, first + rest):
        assert np.array_equal(a, b)


def test_resume_same_loader_restarts_from_state(dataset):
    loader = make(dataset, workers=0)
    collect(loader, 3)
    state = loader.state_dict()
    expected = collect(loader, 4)
    loader.load_state_dict(state)
    again = collect(loader, 4)
    for a, b in zip(expected, again):
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["index"], b["index"])


def test_state_inside_a_global_batch(dataset):
    loader = make(dataset, world_size=2, rank=1, micro=8)  # 2 micro-batches per optimizer step
    collect(loader, 3)
    state = loader.state_dict()
    assert state["micro_in_batch"] == 1 and state["samples_in_epoch"] == G
    expected = next(loader)
    same = make(dataset, world_size=2, rank=1, micro=8)
    same.load_state_dict(state)
    assert torch.equal(next(same)["index"], expected["index"])
    other = make(dataset, world_size=1, micro=G)
    with pytest.raises(ValueError, match="inside a global batch"):
        other.load_state_dict(state)


def test_state_from_another_dataset_or_seed_is_refused(dataset):
    state = make(dataset).state_dict()
    with pytest.raises(ValueError, match="seed"):
        make(dataset, seed=8).load_state_dict(state)
    with pytest.raises(ValueError, match="num_samples"):
        make(dataset).load_state_dict({**state, "num_samples": 301})
    with pytest.raises(ValueError, match="multiple of the global batch"):
        make(dataset, g=64).load_state_dict({**state, "samples_in_epoch": 32})


def test_build_loader_reads_the_data_config(dataset, tmp_path, monkeypatch):
    cfg = DataConfig(path=dataset, num_workers=0, use_repa_features=False, use_flip=False)
    loader = build_loader(cfg, global_batch_size=G, micro_batch_size=16, rank=1, world_size=2, seed=7)
    batch = next(loader)
    assert "dino" not in batch and batch["x"].shape[0] == 16
    assert np.array_equal(batch["index"].numpy(), epoch_order(N, 7, 0, 16)[16:32])
    monkeypatch.setenv("SFD_SYNTHETIC_DIR", str(tmp_path / "syn"))
    synthetic = build_loader(DataConfig(path="synthetic", num_workers=0), global_batch_size=64, micro_batch_size=64,
                             rank=0, world_size=1, seed=0)
    assert synthetic.manifest.num_samples == 4096 and synthetic.manifest.num_classes == 10
    assert next(synthetic)["x"].shape == (64, 16, 8, 8)


def test_pin_memory_without_accelerator_is_ignored(dataset, caplog):
    with caplog.at_level(logging.WARNING):
        loader = make(dataset, pin_memory=True)
    assert not torch.accelerator.is_available()
    assert "pin_memory" in caplog.text
    assert not next(loader)["x"].is_pinned()


def test_unshuffled_dataset_reads_in_full_random_order(tmp_path):
    from sfd_train.data_pipeline.synthetic import SyntheticSource as Src
    from sfd_train.data_pipeline.writer import write_dataset

    write_dataset(tmp_path / "ds", Src(100, seed=1, with_features=False), shard_size=40, shuffle=False, progress=False)
    loader = CompositeLatentLoader(str(tmp_path / "ds"), global_batch_size=20, micro_batch_size=20, rank=0,
                                   world_size=1, seed=0, num_workers=0)
    assert loader.chunk_size == 1
    idx = next(loader)["index"].numpy()
    assert np.mean(np.diff(idx) == 1) < 0.5


def test_reads_are_merged_into_few_ranges(dataset):
    idx = epoch_order(N, 7, 0, 16)[:G]
    local = make(dataset)._reader.plan(idx, 0)
    bridged = make(dataset, max_gap=4 << 20)._reader.plan(idx, 0)
    no_features = make(dataset, max_gap=4 << 20, use_repa_features=False)._reader.plan(idx, 0)
    runs = 1 + int(np.sum(np.diff(np.sort(idx)) != 1))  # runs of consecutive stored samples
    # Locally only touching pieces merge (a sample whose unused dino_flip follows is its own read) ...
    assert G <= len(local.ranges) <= 2 * G
    # ... for object stores the unused variant is read through, one request per run of samples ...
    assert len(bridged.ranges) <= runs + 5  # (+ shard boundaries)
    assert bridged.total < 2 * local.total
    # ... but never a gap bigger than the piece after it (here the features, when not wanted).
    assert len(no_features.ranges) == G
    a = next(make(dataset))
    b = next(make(dataset, max_gap=4 << 20))
    for key in a:
        assert torch.equal(a[key], b[key])


def test_generic_fsspec_url(dataset):
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.put(dataset + "/", "/sfd-reader-test/", recursive=True)
    try:
        remote = make("memory://sfd-reader-test")
        assert remote.storage.direct is None and not remote.storage.is_local
        for a, b in zip(collect(make(dataset), 3), collect(remote, 3)):
            assert torch.equal(a["x"], b["x"]) and torch.equal(a["dino"], b["dino"])
    finally:
        fs.rm("/sfd-reader-test", recursive=True)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("workers", [0, 2])
def test_pinned_batches_reach_the_device(dataset, workers):
    pinned = make(dataset, pin_memory=True, workers=workers)
    reference = make(dataset)
    for _ in range(3):
        batch, expected = next(pinned), next(reference)
        assert all(v.is_pinned() for v in batch.values())
        on_device = {k: v.cuda(non_blocking=True) for k, v in batch.items()}
        torch.cuda.synchronize()
        for key in expected:
            assert torch.equal(on_device[key].cpu(), expected[key])
    pinned.close()
