"""The three tokenizers against what the authors' code computed (the tokenizer reference files).

Every size is read from the file, the deliberately wrong ones included: the networks are built
from its configs through the public config path and loaded from its checkpoints, written to
disk in their released formats, strictly. The tests run on each file in turn:
$SFD_TOKENIZER_REFERENCE alone, or by default the public one (DINOv2 with registers) and
tests/reference/tokenizer_reference_noreg.pt (DINOv2 without registers, an f4 texture VAE).
"""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from sfd_train.config.base import from_mapping
from sfd_train.tokenizers import DinoConfig, SemVAEConfig, TextureVAEConfig, TokenizerWeightsError
from sfd_train.tokenizers.config import DINO_PRESETS, TokenizersConfig
from sfd_train.tokenizers.dinov2 import DinoFeatures, from_hub_state_dict, load_dinov2, resize_position_table
from sfd_train.tokenizers.preprocess import crop_pair, to_pixels
from sfd_train.tokenizers.semvae import export_semvae, load_semvae, semvae_loss
from sfd_train.tokenizers.texture_vae import load_texture_vae

FEATURE_TOL = 1e-4  # float32 features, posteriors, decoder output (the reference's own bound)
LOSS_TOL = 1e-5


@pytest.fixture(scope="module")
def reference(tokenizer_reference_each):
    return torch.load(tokenizer_reference_each, weights_only=False)


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
    dino = reference["dino"]["config"]
    width = dino["embed_dim"]
    wider = from_mapping(DinoConfig, {**dino, "embed_dim": 2 * width})  # still a multiple of num_heads
    with pytest.raises(TokenizerWeightsError, match=rf"key 'cls_token' has shape \(1, 1, {width}\), the network needs "
                                                    rf"\(1, 1, {2 * width}\)"):
        load_dinov2(str(released_files["dino"]), wider)
    registers = dino["num_register_tokens"]
    other_family = from_mapping(DinoConfig, {**dino, "num_register_tokens": 0 if registers else 4})
    held = f"{registers} register tokens" if registers else r"no 'register_tokens' \(a model without registers\)"
    with pytest.raises(TokenizerWeightsError, match=rf"{released_files['dino']}: .*the file has {held}, the network "
                                                    rf"{0 if registers else 4}"):
        load_dinov2(str(released_files["dino"]), other_family)
    sem = reference["semvae"]["config"]
    hidden, features = sem["hidden_dim"], sem["input_dim"]
    with pytest.raises(TokenizerWeightsError, match=rf"key 'encoder\.0\.weight' has shape \({hidden}, {features}\), "
                                                    rf"the network needs \({2 * hidden}, {features}\)"):
        load_semvae(str(released_files["semvae"]), from_mapping(SemVAEConfig, {**sem, "hidden_dim": 2 * hidden}))
    with pytest.raises(TokenizerWeightsError, match="no such weight file"):
        load_semvae(str(released_files["semvae"]) + ".missing")


def test_dinov2_family_follows_the_weight_file(reference, released_files):
    """With the registers and the resize left open, the file's keys say the family (``register_tokens`` or
    not) and the features are the reference's all the same, as ``sfd-data extract --dino`` reads them."""
    given = reference["dino"]["config"]
    family = ("num_register_tokens", "interpolate_antialias", "interpolate_offset")
    dino = load_dinov2(str(released_files["dino"]), from_mapping(DinoConfig, {k: v for k, v in given.items()
                                                                            if k not in family}))
    assert {k: getattr(dino.config, k) for k in family} == {k: given[k] for k in family}
    expected = reference["expected"]
    s, grid = reference["image_size"], reference["latent_grid"]
    features = dino(expected["pixels"].reshape(-1, 3, s, s).float(), grid)
    assert (features.reshape(expected["dino"].shape) - expected["dino"]).abs().max() <= FEATURE_TOL


def _hub_layout(width: int, depth: int, registers: int, table: int = 37, patch: int = 14) -> dict[str, tuple]:
    """Names and shapes of a released torch.hub DINOv2 ``.pth`` (ViT with the 'mlp' FFN, blocks.N)."""
    layout = {"cls_token": (1, 1, width), "pos_embed": (1, 1 + table * table, width), "mask_token": (1, width),
              "patch_embed.proj.weight": (width, 3, patch, patch), "patch_embed.proj.bias": (width,),
              "norm.weight": (width,), "norm.bias": (width,)}
    if registers:
        layout["register_tokens"] = (1, registers, width)
    for i in range(depth):
        for name, shape in (("norm1.weight", (width,)), ("norm1.bias", (width,)), ("attn.qkv.weight", (3 * width, width)),
                            ("attn.qkv.bias", (3 * width,)), ("attn.proj.weight", (width, width)),
                            ("attn.proj.bias", (width,)), ("ls1.gamma", (width,)), ("norm2.weight", (width,)),
                            ("norm2.bias", (width,)), ("mlp.fc1.weight", (4 * width, width)),
                            ("mlp.fc1.bias", (4 * width,)), ("mlp.fc2.weight", (width, 4 * width)),
                            ("mlp.fc2.bias", (width,)), ("ls2.gamma", (width,))):
            layout[f"blocks.{i}.{name}"] = shape
    return layout


@pytest.mark.parametrize("name, registers, antialias, offset",
                         [("dinov2_vitb14", 0, False, 0.1), ("dinov2_vitb14_reg", 4, True, 0.0)])
def test_vitb14_presets_are_the_hub_models(name, registers, antialias, offset):
    """Each ViT-B/14 preset has the hub's arguments for its family and takes that family's released
    file strictly (its names and shapes, on the meta device); a YAML section can name it."""
    config = from_mapping(TokenizersConfig, {"dino": {"preset": name}}).dino.resolved()
    assert (config.embed_dim, config.depth, config.num_heads) == (768, 12, 12)
    assert (config.num_register_tokens, config.interpolate_antialias, config.interpolate_offset) == (registers, antialias,
                                                                                                     offset)
    assert DinoConfig().resolved(file_registers=registers) == DinoConfig(**DINO_PRESETS[name])
    released = {k: torch.empty(shape, device="meta") for k, shape in _hub_layout(768, 12, registers).items()}
    with torch.device("meta"):
        model = DinoFeatures(config)
    wanted = {k: tuple(v.shape) for k, v in model.vit.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in from_hub_state_dict(released).items() if k != "mask_token"} == wanted


def _keys_bicubic(table: np.ndarray, out: int, step: float) -> np.ndarray:
    """Bicubic resampling written out (Keys, a = -0.75, edge indices clamped) at the positions
    (i + 0.5) * step - 0.5 of an (M, M, D) table, in float64."""
    def weights(t):
        a = -0.75
        near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1  # noqa: E731 - |x| <= 1
        far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # noqa: E731 - 1 < |x| < 2
        return np.array([far(t + 1), near(t), near(1 - t), far(2 - t)])

    m = table.shape[0]
    matrix = np.zeros((out, m))
    for i in range(out):
        src = (i + 0.5) * step - 0.5
        base = int(np.floor(src))
        for w, j in zip(weights(src - base), range(base - 1, base + 3)):
            matrix[i, min(max(j, 0), m - 1)] += w
    return np.einsum("ij,jkd,lk->ild", matrix, table, matrix)


def test_position_table_resize_of_each_family():
    """The two hub resizes, against bicubic interpolation written out: without registers the table is sampled
    with the step 37 / (g + 0.1), not 37 / g; at the table's own size both leave it as it is."""
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(1, 37 * 37, 8, generator=generator)
    square = table[0].double().numpy().reshape(37, 37, 8)
    for grid in (4, 16):
        plain = resize_position_table(table, (grid, grid), offset=0.1, antialias=False)[0].reshape(grid, grid, 8)
        written_out = _keys_bicubic(square, grid, 37 / (grid + 0.1))
        assert np.abs(plain.double().numpy() - written_out).max() < 1e-5
        exact_size = _keys_bicubic(square, grid, 37 / grid)
        assert np.abs(plain.double().numpy() - exact_size).max() > 1e-2  # the offset moves the samples
        registers = resize_position_table(table, (grid, grid), offset=0.0, antialias=True)
        assert (registers - plain.reshape(1, -1, 8)).abs().max() > 1e-2
    for offset, antialias in ((0.1, False), (0.0, True)):
        assert resize_position_table(table, (37, 37), offset=offset, antialias=antialias) is table


def test_extract_finds_the_reference_latents(reference, released_files, tmp_path):
    """``sfd-data extract`` (a subprocess, posterior means) on a folder of the reference's PNGs stores exactly
    the reference's latents and features, to storage precision, with labels and counts; the DINOv2 family
    comes from the weight file and is named in the manifest."""
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
    # The DINOv2 section leaves its family (registers, position-table resize) to the weight file's keys.
    family = ("num_register_tokens", "interpolate_antialias", "interpolate_offset")
    sections = {name: reference[name]["config"] for name in ("vae", "semvae")}
    sections["dino"] = {k: v for k, v in reference["dino"]["config"].items() if k not in family}
    tokenizers.write_text(yaml.safe_dump(sections))
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
    assert f"{reference['dino']['config']['num_register_tokens']} registers" in manifest.provenance["dino"]
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
