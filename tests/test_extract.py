"""``sfd-data extract`` end to end with the reference's small networks: ranks, restarts, two passes,
bad images and wrong weights, and training on the result."""

import hashlib
import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from extract_kit import IMAGES, all_samples, extract_command, make_kit, run, shard_digests
from runs import committed, train, write_config
from sfd_train.data_pipeline.format import FEATURES, SEMANTIC, SEMANTIC_FLIP, TEXTURE, from_storage
from sfd_train.data_pipeline.manifest import read_manifest

@pytest.fixture(scope="module")
def kit(tmp_path_factory, tokenizer_reference_path):
    return make_kit(tmp_path_factory.mktemp("extract"), tokenizer_reference_path)


@pytest.fixture(scope="module")
def one_rank(kit):
    out = kit["root"] / "one_rank"
    run(extract_command(kit, out))
    return out


@pytest.mark.slow
def test_two_ranks_write_the_same_shards_as_one(kit, one_rank):
    out = kit["root"] / "two_ranks"
    run(extract_command(kit, out, nproc=2))
    assert shard_digests(out) == shard_digests(one_rank)
    assert (out / "source_order.txt").read_text() == (one_rank / "source_order.txt").read_text()


@pytest.mark.slow
def test_a_killed_extraction_run_again_finishes_the_same_dataset(kit, one_rank):
    out = kit["root"] / "killed"
    proc = subprocess.Popen(extract_command(kit, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "train-000001.tar").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "the run finished before it could be killed; use more images"
    run(extract_command(kit, out))
    assert shard_digests(out) == shard_digests(one_rank)
    assert not list(out.glob("*.tmp-*")), "a temporary shard was left behind"


def test_the_dataset_records_what_made_it(kit, one_rank):
    manifest = read_manifest(one_rank)
    assert manifest.num_samples == IMAGES and manifest.num_classes == 3
    weights = manifest.provenance["weights"]
    assert weights["vae"] == {"file": "vae.ckpt", "sha256": hashlib.sha256(kit["files"]["vae"].read_bytes()).hexdigest()}
    assert set(weights) == {"vae", "dino", "semvae"}
    assert manifest.stats["texture"]["mean"] and len(manifest.stats["semantic"]["std"]) == manifest.semantic_channels
    arrays, labels = all_samples(one_rank)
    order = (one_rank / "source_order.txt").read_text().splitlines()
    assert [int(Path(p).parent.name.split("_")[1]) for p in order] == labels.tolist()
    # Statistics are those of the stored non-flipped latents.
    texture = from_storage(arrays[TEXTURE], manifest.storage_dtype).double()
    assert np.allclose(manifest.stats["texture"]["mean"], texture.mean(dim=(0, 2, 3)).numpy(), atol=1e-5)


def test_two_passes_give_the_one_pass_dataset(kit, one_rank):
    out = kit["root"] / "two_passes"
    run(extract_command(kit, out, semvae=False))
    first = read_manifest(out)
    assert first.semantic_channels == 0 and first.feature_dim == kit["reference"]["dino"]["config"]["embed_dim"]
    run(extract_command(kit, out))  # the same command with --semvae: only the semantic part is computed
    filled, expected = all_samples(out), all_samples(one_rank)
    assert np.array_equal(filled[1], expected[1])
    for name in (TEXTURE, FEATURES):
        assert np.array_equal(filled[0][name], expected[0][name]), name
    manifest = read_manifest(out)
    for name in (SEMANTIC, SEMANTIC_FLIP):
        # The second pass encodes the stored (float16) features, the first the float32 ones.
        a, b = (from_storage(x[0][name], manifest.storage_dtype).float() for x in (filled, expected))
        assert (a - b).abs().max() <= 2e-2 * max(1.0, b.abs().max().item()), name
    assert manifest.semantic_channels == kit["reference"]["semvae"]["config"]["bottleneck_dim"]
    assert manifest.provenance["weights"]["semvae"]["file"] == "semvae.pt"


def test_bad_images_stop_the_job_before_any_encoding_or_are_left_out(kit, tmp_path):
    images = tmp_path / "images"
    (images / "a").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (70, 50), (i * 40, 10, 200)).save(images / "a" / f"{i}.jpg")
    good = (images / "a" / "0.jpg").read_bytes()
    (images / "a" / "3.jpg").write_bytes(good[: len(good) // 2])  # truncated
    (images / "a" / "4.png").write_bytes(b"")  # zero bytes
    command = extract_command({**kit, "images": images}, tmp_path / "out")
    result = run(command, expect=2)
    assert "2 unusable image(s)" in result.stderr and "3.jpg" in result.stderr and "4.png" in result.stderr
    assert not list((tmp_path / "out").glob("*.tar"))
    report = json.loads((tmp_path / "out" / "extract_report.json").read_text())
    assert sorted(Path(b["image"]).name for b in report["bad"]) == ["3.jpg", "4.png"]
    run(command + ["--on-bad-image", "skip"])
    assert read_manifest(tmp_path / "out").num_samples == 3


def test_wrong_weights_fail_before_any_work(kit, tmp_path):
    command = extract_command(kit, tmp_path / "out")
    command[command.index("--vae") + 1] = str(kit["files"]["dino"])
    result = run(command, expect=2)
    assert f"{kit['files']['dino']}: not the weights of the texture VAE" in result.stderr
    assert not (tmp_path / "out" / ".sfd-write" / "scan.json").exists()


@pytest.mark.slow
def test_the_shards_train_with_sfd_train(kit, one_rank, tmp_path):
    reference = kit["reference"]
    grid = reference["latent_grid"]
    channels = reference["vae"]["config"]["embed_dim"], reference["semvae"]["config"]["bottleneck_dim"]
    config = write_config(
        tmp_path / "job.yaml", data={"path": str(one_rank), "num_workers": 0},
        model={"input_size": grid, "in_channels": sum(channels), "semantic_channels": channels[1], "num_classes": 3,
               "repa_feature_dim": reference["dino"]["config"]["embed_dim"]},
        train={"max_steps": 2, "global_batch_size": 8}, checkpoint={"every": 0},
    )
    train(config, [f"run.output_dir={tmp_path / 'run'}"])
    assert committed(tmp_path / "run") == [2]


def test_webdataset_tars_give_the_same_shards_as_the_folder(kit, one_rank, tmp_path):
    import io
    import tarfile

    from sfd_train.data_pipeline.images import list_images

    folder = list_images(str(kit["images"]))
    tars = tmp_path / "tars"
    tars.mkdir()
    for part in range(2):  # the folder's images, in its order, split over two shards
        with tarfile.open(tars / f"train-{part}.tar", "w") as tar:
            for index in range(part * len(folder.items) // 2, (part + 1) * len(folder.items) // 2):
                item = folder.items[index]
                for suffix, data in ((Path(item.path).suffix, Path(item.path).read_bytes()),
                                     (".cls", str(item.label).encode())):
                    info = tarfile.TarInfo(f"{index:06d}{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    command = extract_command(kit, tmp_path / "out")
    command[command.index(str(kit["images"]))] = str(tars / "train-{0..1}.tar")
    run(command)
    assert shard_digests(tmp_path / "out") == shard_digests(one_rank)
    assert read_manifest(tmp_path / "out").num_classes == 3
