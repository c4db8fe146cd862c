"""The three tokenizers against what the authors' code computed (the tokenizer reference file).

Every size is read from the file ($SFD_TOKENIZER_REFERENCE): the networks are built from
its configs through the public config path and loaded from its checkpoints, written to disk
in their released formats, strictly.
"""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from sfd_train.config.base import from_mapping
from sfd_train.tokenizers import DinoConfig, SemVAEConfig, TextureVAEConfig, TokenizerWeightsError
from sfd_train.tokenizers.dinov2 import load_dinov2
from sfd_train.tokenizers.preprocess import crop_pair, to_pixels
from sfd_train.tokenizers.semvae import export_semvae, load_semvae, semvae_loss
from sfd_train.tokenizers.texture_vae import load_texture_vae

FEATURE_TOL = 1e-4  # float32 features, posteriors, decoder output (the reference's own bound)
LOSS_TOL = 1e-5


@pytest.fixture(scope="module")
def reference(tokenizer_reference_path):
    return torch.load(tokenizer_reference_path, weights_only=False)


@pytest.fixture(scope="module")
def released_files(reference, tmp_path_factory):
    """The reference's checkpoints as the released files: an LDM .ckpt, a hub .pth, the authors' SemVAE .pt."""
    root = tmp_path_factory.mktemp("weights")
    paths = {"vae": root / "vae.ckpt", "dino": root / "dinov2.pth", "semvae": root / "semvae.pt"}
    for name, path in paths.items():
        torch.save(reference[name]["checkpoint"], path)
    return paths


@pytest.fixture(scope="module")
def networks(reference, released_files):
    configs = {"vae": TextureVAEConfig, "dino": DinoConfig, "semvae": SemVAEConfig}
    built = {name: from_mapping(cls, reference[name]["config"]) for name, cls in configs.items()}
    return {
        "vae": load_texture_vae(str(released_files["vae"]), built["vae"]),
        "dino": load_dinov2(str(released_files["dino"]), built["dino"]),
        "semvae": load_semvae(str(released_files["semvae"]), built["semvae"]),
    }


def _pixels(reference) -> torch.Tensor:
    crops = [crop_pair(Image.open(io.BytesIO(png)), reference["image_size"]) for png in reference["images_png"]]
    return to_pixels(np.stack(crops))  # (N, 2, 3, S, S)


def test_preprocessing_is_exact(reference):
    expected = reference["expected"]
    pixels = _pixels(reference)
    assert torch.equal(pixels, expected["pixels"].float()) or (pixels - expected["pixels"]).abs().max() <= 1e-6
    # The PNG bytes and the arrays are the same images.
    for png, array in zip(reference["images_png"], reference["images"]):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), array)


def test_texture_vae_posterior_and_decoder(reference, networks):
    expected = reference["expected"]
    s = reference["image_size"]
    mean, std = networks["vae"].posterior(expected["pixels"].reshape(-1, 3, s, s).float())
    assert (mean.reshape(expected["tex_mean"].shape) - expected["tex_mean"]).abs().max() <= FEATURE_TOL
    assert (std.reshape(expected["tex_std"].shape) - expected["tex_std"]).abs().max() <= FEATURE_TOL
    decode = expected["decode"]
    assert (networks["vae"].decode(decode["z"]) - decode["images"]).abs().max() <= FEATURE_TOL


def test_dinov2_patch_tokens(reference, networks):
    expected = reference["expected"]
    s, grid = reference["image_size"], reference["latent_grid"]
    pixels = expected["pixels"].reshape(-1, 3, s, s).float()
    dino = networks["dino"]
    inputs = dino.preprocess(pixels, grid)
    assert inputs.shape[-1] == reference["dino_input_size"]
    assert (inputs.reshape(expected["dino_pixels"].shape) - expected["dino_pixels"]).abs().max() <= 1e-6
    features = dino(pixels, grid)
    assert (features.reshape(expected["dino"].shape) - expected["dino"]).abs().max() <= FEATURE_TOL


def test_semvae_posterior(reference, networks):
    expected = reference["expected"]
    d, g = expected["dino"].shape[2], expected["dino"].shape[-1]
    mean, std = networks["semvae"].encode_grid(expected["dino"].reshape(-1, d, g, g))
    assert (mean.reshape(expected["sem_mean"].shape) - expected["sem_mean"]).abs().max() <= FEATURE_TOL
    assert (std.reshape(expected["sem_std"].shape) - expected["sem_std"]).abs().max() <= FEATURE_TOL


def test_semvae_loss_terms(reference, networks):
    case = reference["expected"]["semvae_loss"]
    weights = case["weights"]
    model = networks["semvae"].train()
    try:
        terms = semvae_loss(model, case["features"], case["eps"], mse_weight=weights["mse_weight"],
                            cos_weight=weights["cos_weight"], l1_weight=weights["l1_weight"],
                            kl_weight=weights["kl_weight"], cos_axis=case["cos_dim"])
        per_feature = semvae_loss(model, case["features"], case["eps"], cos_axis="features")
    finally:
        model.eval()
    for name in ("mse", "l1", "cos", "kl"):
        assert abs(terms[name].item() - float(case[name])) <= LOSS_TOL * max(1.0, abs(float(case[name]))), name
    assert abs(terms["loss"].item() - float(case["total"])) <= LOSS_TOL
    assert abs(per_feature["cos"].item() - float(case["cos_features_axis_value"])) <= LOSS_TOL


def test_semvae_export_round_trips_in_the_authors_format(networks, tmp_path):
    path = tmp_path / "exported.pt"
    export_semvae(networks["semvae"], path, iteration=7)
    blob = torch.load(path, weights_only=False)
    assert {"iteration", "model_state_dict", "config", "input_dim", "bottleneck_dim"} <= set(blob)
    again = load_semvae(str(path))  # the architecture comes from the file's own record
    assert again.config == networks["semvae"].config
    for key, value in networks["semvae"].state_dict().items():
        assert torch.equal(again.state_dict()[key], value)


def test_wrong_weights_fail_naming_the_file_and_key(reference, released_files):
    vae_config = from_mapping(TextureVAEConfig, reference["vae"]["config"])
    with pytest.raises(TokenizerWeightsError, match=rf"{released_files['dino']}: not the weights of the texture VAE.*"
                                                    r"missing key 'autoencoder\.encoder\.conv_in\.weight'"):
        load_texture_vae(str(released_files["dino"]), vae_config)
    wider = from_mapping(DinoConfig, {**reference["dino"]["config"], "embed_dim": 128})
    with pytest.raises(TokenizerWeightsError, match=r"key 'cls_token' has shape \(1, 1, 64\), the network needs "
                                                    r"\(1, 1, 128\)"):
        load_dinov2(str(released_files["dino"]), wider)
    with pytest.raises(TokenizerWeightsError, match="no such weight file"):
        load_semvae(str(released_files["semvae"]) + ".missing")


def test_extract_finds_the_reference_latents(reference, released_files, tmp_path):
    """``sfd-data extract`` (a subprocess, posterior means) on a folder of the reference's PNGs stores exactly
    the reference's latents and features, to storage precision, with labels and counts."""
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    from sfd_train.data_pipeline.format import FEATURES, FEATURES_FLIP, SEMANTIC, SEMANTIC_FLIP, TEXTURE, TEXTURE_FLIP
    from sfd_train.data_pipeline.format import SampleLayout, from_storage
    from sfd_train.data_pipeline.manifest import read_manifest
    from sfd_train.data_pipeline.writer import read_shard_arrays

    images = tmp_path / "images"
    for i, (png, label) in enumerate(zip(reference["images_png"], reference["labels"])):
        (images / f"{label:03d}").mkdir(parents=True, exist_ok=True)
        (images / f"{label:03d}" / f"{i:03d}.png").write_bytes(png)
    tokenizers = tmp_path / "tokenizers.yaml"
    tokenizers.write_text(yaml.safe_dump({name: reference[name]["config"] for name in ("vae", "dino", "semvae")}))
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "sfd_train.data_pipeline.cli", "extract", str(images), "--out", str(out),
         "--vae", str(released_files["vae"]), "--dino", str(released_files["dino"]), "--semvae",
         str(released_files["semvae"]), "--tokenizers", str(tokenizers), "--image-size", str(reference["image_size"]),
         "--latent", "mean", "--shard-size", "2", "--workers", "0", "--quiet"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = read_manifest(out)
    assert manifest.num_samples == len(reference["images_png"]) and manifest.num_classes == max(reference["labels"]) + 1
    layout = SampleLayout(manifest.shapes, manifest.storage_dtype)
    stored, labels = {}, []
    for shard in manifest.shards:
        arrays, shard_labels = read_shard_arrays(str(out / shard.name), layout, shard.count)
        for name, value in arrays.items():
            stored.setdefault(name, []).append(from_storage(value, manifest.storage_dtype).float())
        labels.extend(shard_labels.tolist())
    stored = {name: torch.cat(parts) for name, parts in stored.items()}
    image_of = [int(Path(line).stem) for line in (out / "source_order.txt").read_text().splitlines()]
    assert labels == [reference["labels"][i] for i in image_of]
    expected = reference["expected"]
    for fields, key in (((TEXTURE, TEXTURE_FLIP), "tex_mean"), ((SEMANTIC, SEMANTIC_FLIP), "sem_mean"),
                        ((FEATURES, FEATURES_FLIP), "dino")):
        for flip, name in enumerate(fields):
            want = expected[key][image_of, flip].float()
            # float16 storage: half a unit in the last place, plus the networks' own 1e-4.
            tolerance = want.abs() * 2.0**-11 + FEATURE_TOL
            assert ((stored[name] - want).abs() <= tolerance).all(), (name, (stored[name] - want).abs().max())
