"""``sfd-data extract`` end to end with the reference's small networks: ranks, restarts, two passes,
bad images and wrong weights, and training on the result."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from runs import committed, train, write_config
from sfd_train.data_pipeline.format import FEATURES, SEMANTIC, SEMANTIC_FLIP, TEXTURE, from_storage
from sfd_train.data_pipeline.manifest import read_manifest
from sfd_train.data_pipeline.writer import read_shard_arrays
from sfd_train.data_pipeline.format import SampleLayout

IMAGES = 24
SIZE = 64


@pytest.fixture(scope="module")
def kit(tmp_path_factory, tokenizer_reference_path):
    """An image folder (3 classes, varied sizes and formats) and the reference networks as released files."""
    root = tmp_path_factory.mktemp("extract")
    reference = torch.load(tokenizer_reference_path, weights_only=False)
    rng = np.random.default_rng(0)
    for i in range(IMAGES):
        h, w = (int(v) for v in rng.integers(40, 140, size=2))
        coarse = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
        folder = root / "images" / f"class_{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:03d}.{'png' if i % 2 else 'jpg'}")
    files = {"vae": root / "vae.ckpt", "dino": root / "dino.pth", "semvae": root / "semvae.pt"}
    for name, path in files.items():
        torch.save(reference[name]["checkpoint"], path)
    tokenizers = root / "tokenizers.yaml"
    tokenizers.write_text(yaml.safe_dump({name: reference[name]["config"] for name in files}))
    return {"root": root, "images": root / "images", "files": files, "tokenizers": tokenizers, "reference": reference}


def extract_command(kit, out: Path, *extra: str, semvae: bool = True, nproc: int = 1) -> list[str]:
    args = [str(kit["images"]), "--out", str(out), "--vae", str(kit["files"]["vae"]), "--dino",
            str(kit["files"]["dino"]), "--tokenizers", str(kit["tokenizers"]), "--image-size", str(SIZE),
            "--shard-size", "5", "--batch-size", "4", "--workers", "1", "--quiet", *extra]
    if semvae:
        args += ["--semvae", str(kit["files"]["semvae"])]
    if nproc == 1:
        return [sys.executable, "-m", "sfd_train.data_pipeline.cli", "extract", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m",
            "sfd_train.data_pipeline.cli", "extract", *args]


def run(command: list[str], expect: int = 0) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == expect, result.stderr[-4000:]
    return result


def shard_digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))}


def all_samples(out: Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    manifest = read_manifest(out)
    layout = SampleLayout(manifest.shapes, manifest.storage_dtype)
    parts = [read_shard_arrays(str(out / s.name), layout, s.count) for s in manifest.shards]
    return {k: np.concatenate([p[0][k] for p in parts]) for k in parts[0][0]}, np.concatenate([p[1] for p in parts])


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
