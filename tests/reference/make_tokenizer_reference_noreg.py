"""Writes ``tokenizer_reference_noreg.pt``: the tokenizer reference with a DINOv2 WITHOUT registers.

The expected outputs come from the original public code, run as the oracle; nothing of
``sfd_train`` is used to compute them (this file imports none of it):

* DINOv2: ``DinoVisionTransformer`` of facebookresearch/dinov2 (the hub's model code), built with
  the arguments ``dinov2_vitb14`` is built with (no registers, ``interpolate_antialias=False``,
  ``interpolate_offset=0.1``) at a small width;
* texture VAE and image preprocessing: the authors' ``tokenizer/autoencoder.py`` (yuemingPAN/SFD):
  its ``Encoder``, ``Decoder``, ``DiagonalGaussianDistribution`` and ADM ``center_crop_arr``;
* SemVAE: the authors' SemVAE code is not public in the snapshot at hand, so the SemVAE (its
  config, its checkpoint and the ``semvae_loss`` case, which do not depend on DINOv2) is taken
  unchanged from the public reference (the checkpoint without its optimizer state), and only its posterior of the new DINOv2 features is
  recomputed, by a small independent implementation written from the layout in
  ``../shared/reference/README.md``. Before anything is written, every oracle reproduces the
  public reference's own expected outputs (``--check-only`` stops there).

Neither repository's code is part of sfd-train: fetch them and point this script at them::

    python tests/reference/make_tokenizer_reference_noreg.py --dinov2 /tmp/oracle/dinov2-src \\
        --sfd-autoencoder /tmp/oracle/sfd_autoencoder.py --out tests/reference/tokenizer_reference_noreg.pt

(``--dinov2``: a folder holding the ``dinov2`` package; ``--sfd-autoencoder``: the file
``tokenizer/autoencoder.py``.) Run with one thread on the CPU; the file is deterministic
given the seed.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import subprocess
import sys
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PUBLIC = Path(__file__).resolve().parents[2].parent / "shared" / "reference" / "tokenizer_reference_public.pt"

# The new file's sizes: an f4 texture VAE (3 levels), so S = 4 * g; DINOv2 of the public width 64
# (the SemVAE's input) with another depth and head count, the released 518 px (37 x 37) position table.
IMAGE_SIZE = 16
GRID = 4
VAE_CONFIG = {"embed_dim": 4, "z_channels": 4, "double_z": True, "resolution": IMAGE_SIZE, "in_channels": 3,
              "out_ch": 3, "ch": 32, "ch_mult": [1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [IMAGE_SIZE // 4],
              "dropout": 0.0}
DINO_CONFIG = {"img_size": 518, "patch_size": 14, "in_chans": 3, "embed_dim": 64, "depth": 3, "num_heads": 4,
               "mlp_ratio": 4, "qkv_bias": True, "proj_bias": True, "ffn_bias": True, "init_values": 1.0,
               "ffn_layer": "mlp", "block_chunks": 0, "num_register_tokens": 0, "interpolate_antialias": False,
               "interpolate_offset": 0.1, "drop_path_rate": 0.0,
               "block_fn": "NestedTensorBlock(attn_class=MemEffAttention)"}
# (H, W): a crop, the square size, BOX halving twice (min side 66 >= 2S, then 33 >= 2S), once, and upscaling.
IMAGE_SHAPES = [(22, 29), (16, 16), (45, 34), (80, 66), (11, 15)]
LABELS = [0, 0, 1, 2, 2]


# ----------------------------------------------------------------------------- oracles
def _load_module(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def hub_dinov2(dinov2_root: str, config: dict) -> nn.Module:
    """``DinoVisionTransformer`` exactly as the hub builds its models (``vit_base`` passes this block class)."""
    os.environ.setdefault("XFORMERS_DISABLED", "1")
    sys.path.insert(0, dinov2_root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from dinov2.layers import MemEffAttention, NestedTensorBlock
        from dinov2.models.vision_transformer import DinoVisionTransformer
    args = {k: v for k, v in config.items() if k != "block_fn"}
    return DinoVisionTransformer(**args, block_fn=partial(NestedTensorBlock, attn_class=MemEffAttention)).eval()


class AuthorsVAE(nn.Module):
    """The authors' AutoencoderKL (encode -> quant_conv -> posterior; post_quant_conv -> decode) with a
    small ddconfig: their class hard-codes ch 128 etc., so the same Encoder/Decoder are built here."""

    def __init__(self, sfd, config: dict):
        super().__init__()
        dd = {k: v for k, v in config.items() if k != "embed_dim"}
        self.sfd = sfd
        self.encoder = sfd.Encoder(**dd)
        self.decoder = sfd.Decoder(**dd)
        self.quant_conv = nn.Conv2d(2 * config["z_channels"], 2 * config["embed_dim"], 1)
        self.post_quant_conv = nn.Conv2d(config["embed_dim"], config["z_channels"], 1)

    def posterior(self, x):
        return self.sfd.DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))


class _SemBlock(nn.Module):
    """Pre-LayerNorm block: x + MHA(norm1(x)), then x + MLP(norm2(x)); MLP = Linear, GELU, Linear."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class OracleSemVAE(nn.Module):
    """The SemVAE's layout as ../shared/reference/README.md gives it (one block per side there)."""

    def __init__(self, config: dict):
        super().__init__()
        d_in, c, w, heads = config["input_dim"], config["bottleneck_dim"], config["hidden_dim"], config["transformer_heads"]
        blocks = config["transformer_blocks"]
        self.encoder = nn.Sequential(nn.Linear(d_in, w), *[_SemBlock(w, heads) for _ in range(blocks)],
                                     nn.LayerNorm(w), nn.Linear(w, 2 * c))
        self.decoder = nn.Sequential(nn.Linear(c, w), *[_SemBlock(w, heads) for _ in range(blocks)],
                                     nn.LayerNorm(w), nn.Linear(w, d_in))
        self.eval()

    def posterior(self, features):
        """(mean, std) (B, C, g, g) of features (B, D, g, g): tokens row-major, logvar clamped to [-30, 20]."""
        b, _, g, _ = features.shape
        moments = self.encoder(features.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, -1, g, g)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))


# ----------------------------------------------------------------------------- pipeline
def crops(sfd, pngs: list[bytes], image_size: int) -> torch.Tensor:
    """[N, 2, 3, S, S]: RGB, the authors' ADM centre crop, (mirror), ToTensor, Normalize(0.5, 0.5)."""
    out = []
    for png in pngs:
        cropped = np.asarray(sfd.center_crop_arr(Image.open(io.BytesIO(png)).convert("RGB"), image_size))
        pair = [cropped, cropped[:, ::-1]]
        out.append(torch.stack([torch.from_numpy(np.array(a)).permute(2, 0, 1).float() / 255.0 for a in pair]))
    return (torch.stack(out) - 0.5) / 0.5


def dino_inputs(pixels: torch.Tensor, side: int) -> torch.Tensor:
    """The authors' DINOv2 input: (x + 1) / 2, ImageNet mean/std, THEN bicubic resize (no antialias)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=pixels.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=pixels.dtype).view(1, 3, 1, 1)
    return F.interpolate(((pixels + 1) / 2 - mean) / std, size=(side, side), mode="bicubic", align_corners=False)


def patch_tokens(dino: nn.Module, x: torch.Tensor, grid: int) -> torch.Tensor:
    """``x_norm_patchtokens`` channel-first on the grid (token k at (k // g, k % g))."""
    tokens = dino.forward_features(x)["x_norm_patchtokens"]
    return tokens.transpose(1, 2).reshape(x.shape[0], -1, grid, grid)


@torch.no_grad()
def run_all(nets: dict, pngs, image_size: int, grid: int, patch: int, decode_z, dtype) -> dict:
    for name in ("dino", "vae", "semvae"):
        nets[name].to(dtype)
    pixels = crops(nets["sfd"], pngs, image_size).to(dtype)
    flat = pixels.reshape(-1, 3, image_size, image_size)
    n = pixels.shape[0]
    post = nets["vae"].posterior(flat)
    x = dino_inputs(flat, grid * patch)
    feats = patch_tokens(nets["dino"], x, grid)
    sem_mean, sem_std = nets["semvae"].posterior(feats)
    return {
        "pixels": pixels, "dino_pixels": x.reshape(n, 2, 3, grid * patch, grid * patch),
        "tex_mean": post.mean.reshape(n, 2, *post.mean.shape[1:]), "tex_std": post.std.reshape(n, 2, *post.std.shape[1:]),
        "tex_logvar": post.logvar, "dino": feats.reshape(n, 2, *feats.shape[1:]),
        "sem_mean": sem_mean.reshape(n, 2, *sem_mean.shape[1:]), "sem_std": sem_std.reshape(n, 2, *sem_std.shape[1:]),
        "decode_images": nets["vae"].decode(decode_z.to(dtype)),
    }


def semvae_case(semvae: OracleSemVAE, case: dict) -> dict:
    """The posterior and reconstruction of the public file's SemVAE-loss batch (a check of the SemVAE oracle)."""
    g = case["eps"].shape[-1]
    features = case["features"].transpose(1, 2).reshape(case["features"].shape[0], -1, g, g)
    mean, std = semvae.posterior(features)
    z = (mean + std * case["eps"]).flatten(2).transpose(1, 2)
    return {"post_mean": mean, "post_std": std, "z": z, "recon": semvae.decoder(z)}


def _max_diff(a, b) -> float:
    return float((a.double() - b.double()).abs().max())


# ----------------------------------------------------------------------------- steps
def check_public(public: dict, sfd, dinov2_root: str) -> None:
    """Every oracle reproduces the public reference's expected outputs (or the script stops)."""
    torch.manual_seed(0)
    dino = hub_dinov2(dinov2_root, public["dino"]["config"])
    dino.load_state_dict(public["dino"]["checkpoint"], strict=True)
    vae = AuthorsVAE(sfd, public["vae"]["config"]).eval()
    state = {k: v for k, v in public["vae"]["checkpoint"]["state_dict"].items() if "loss" not in k}
    vae.load_state_dict(state, strict=True)
    semvae = OracleSemVAE(public["semvae"]["config"])
    semvae.load_state_dict(public["semvae"]["checkpoint"]["model_state_dict"], strict=True)
    expected = public["expected"]
    got = run_all({"sfd": sfd, "dino": dino, "vae": vae, "semvae": semvae}, public["images_png"], public["image_size"],
                  public["latent_grid"], public["dino"]["config"]["patch_size"], expected["decode"]["z"], torch.float32)
    report = {k: _max_diff(got[k], expected[k]) for k in ("pixels", "dino_pixels", "tex_mean", "tex_std", "dino",
                                                          "sem_mean", "sem_std")}
    report["decode.images"] = _max_diff(got["decode_images"], expected["decode"]["images"])
    with torch.no_grad():
        case = semvae_case(semvae, expected["semvae_loss"])
    report.update({f"semvae_loss.{k}": _max_diff(v, expected["semvae_loss"][k]) for k, v in case.items()})
    print("oracles vs the public reference (max abs difference):")
    for key, value in report.items():
        print(f"  {key:24s} {value:.3g}")
    bound = {"pixels": 1e-6, "dino_pixels": 1e-6}
    bad = {k: v for k, v in report.items() if v > bound.get(k, 2e-5)}
    if bad:
        raise SystemExit(f"an oracle does not reproduce the public reference: {bad}")


def _images(rng: np.random.Generator) -> list[np.ndarray]:
    """Smooth random RGB images: a coarse random grid, bicubically enlarged."""
    out = []
    for h, w in IMAGE_SHAPES:
        coarse = rng.integers(0, 256, size=(3, 4, 3), dtype=np.uint8)
        out.append(np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC)))
    return out


def _perturb(module: nn.Module, generator: torch.Generator, scale: float, table_scale: float) -> None:
    """Every tensor moved away from its initial value (position table: much more, so its resize matters)."""
    with torch.no_grad():
        for name, p in module.state_dict().items():
            if not p.is_floating_point():
                continue
            s = table_scale if name == "pos_embed" else (scale if p.dim() < 2 or name.endswith(("token", "gamma")) else
                                                          scale * 0.2)
            p.add_(torch.randn(p.shape, generator=generator) * s)


def make(public: dict, sfd, dinov2_root: str, seed: int) -> dict:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    images = _images(rng)
    pngs = []
    for array in images:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())

    dino = hub_dinov2(dinov2_root, DINO_CONFIG)
    _perturb(dino, generator, scale=0.1, table_scale=0.5)
    vae = AuthorsVAE(sfd, VAE_CONFIG).eval()
    _perturb(vae, generator, scale=0.1, table_scale=0.1)
    semvae = OracleSemVAE(public["semvae"]["config"])
    semvae.load_state_dict(public["semvae"]["checkpoint"]["model_state_dict"], strict=True)
    decode_z = torch.randn(2, VAE_CONFIG["embed_dim"], GRID, GRID, generator=generator)

    nets = {"sfd": sfd, "dino": dino, "vae": vae, "semvae": semvae}
    ours = run_all(nets, pngs, IMAGE_SIZE, GRID, DINO_CONFIG["patch_size"], decode_z, torch.float32)
    dino_state = {k: v.clone() for k, v in dino.state_dict().items()}  # the hub's names (a released .pth's keys)
    vae_state = {k: v.clone() for k, v in vae.state_dict().items()}
    wide = run_all(nets, pngs, IMAGE_SIZE, GRID, DINO_CONFIG["patch_size"], decode_z, torch.float64)
    names = ("tex_mean", "tex_std", "dino", "sem_mean", "sem_std", "dino_pixels")
    f64 = {k: _max_diff(ours[k], wide[k]) for k in names}
    f64["decode_images"] = _max_diff(ours["decode_images"], wide["decode_images"])
    f64.update({k: v for k, v in public["float32_vs_float64_max_abs"].items() if k.startswith("semvae_loss")})

    # LDM .ckpt layout: the model's tensors plus training-loss tensors a loader must drop.
    loss_tensors = {"loss.logvar": torch.zeros(()),
                    "loss.perceptual_loss.scaling_layer.shift": torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1),
                    "loss.perceptual_loss.scaling_layer.scale": torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)}
    n = len(images)
    expected = {
        "pixels": ours["pixels"], "dino_pixels": ours["dino_pixels"], "tex_mean": ours["tex_mean"],
        "tex_std": ours["tex_std"], "dino": ours["dino"], "sem_mean": ours["sem_mean"], "sem_std": ours["sem_std"],
        "decode": {"z": decode_z, "images": ours["decode_images"]},
        "semvae_loss": public["expected"]["semvae_loss"],
    }
    assert expected["dino"].shape == (n, 2, DINO_CONFIG["embed_dim"], GRID, GRID)
    versions = {"torch": torch.__version__, "pillow": Image.__version__, "numpy": np.__version__}
    return {
        "variant": "noreg", "seed": seed, "authors_commit": _commit(sfd.__file__) or "cde82a6",
        "dinov2_commit": _commit(dinov2_root) or "b8931f7bf91576930313be2c6d6af376033b35f0",
        "image_size": IMAGE_SIZE, "latent_grid": GRID, "dino_input_size": GRID * DINO_CONFIG["patch_size"],
        "images": images, "images_png": pngs, "labels": list(LABELS),
        "vae": {"config": dict(VAE_CONFIG), "checkpoint": {"state_dict": {**vae_state, **loss_tensors}, "epoch": 0,
                                                           "global_step": 0}},
        "dino": {"config": dict(DINO_CONFIG), "checkpoint": dino_state},
        # The authors' checkpoint dict without its optimizer state (880 KB the loaders never read).
        "semvae": {**public["semvae"], "checkpoint": {k: v for k, v in public["semvae"]["checkpoint"].items()
                                                      if k != "optimizer_state_dict"}},
        "expected": expected,
        "float32_vs_float64_max_abs": f64,
        "stats": {"tex_logvar_range": (float(ours["tex_logvar"].min()), float(ours["tex_logvar"].max())),
                  "sem_logvar_range": (float(2 * ours["sem_std"].log().min()), float(2 * ours["sem_std"].log().max()))},
        "versions": versions,
        "notes": NOTES,
    }


NOTES = """\
- DINOv2 without registers: DinoVisionTransformer (facebookresearch/dinov2) with the arguments the hub's dinov2_vitb14
  passes (num_register_tokens 0, interpolate_antialias False, interpolate_offset 0.1, block_chunks 0, init_values 1.0,
  NestedTensorBlock with MemEffAttention; xFormers off, so plain attention) at embed_dim 64, depth 3, 4 heads.
  Its position table (37 x 37, std 0.5 after perturbation) is resized by F.interpolate(mode='bicubic',
  antialias=False, scale_factor=((g + 0.1) / 37, (g + 0.1) / 37)): the scale factor, not the output size, sets the
  sampling positions. At g = 37 (518 px) the table is used as it is. No register tokens: checkpoint has no
  'register_tokens'; x_norm_patchtokens = norm(x)[:, 1:].
- Texture VAE: the authors' Encoder/Decoder/DiagonalGaussianDistribution (tokenizer/autoencoder.py) with an f4 ddconfig
  (ch 32, ch_mult [1, 1, 1], 1 res-block per level, attention at the lowest level 4 x 4 and in the middle,
  z_channels = embed_dim = 4), so image_size = 4 * latent_grid = 16. Checkpoint: LDM .ckpt layout with 3 loss.* tensors.
- Preprocessing: the authors' center_crop_arr (ADM), mirror after the crop, ToTensor + Normalize(0.5, 0.5) written
  out; image 80x66 is halved twice by the BOX loop, 45x34 once, 11x15 is upscaled.
- SemVAE: config, weights and the semvae_loss case are the public reference's, unchanged (they do not depend on
  DINOv2; its width stays 64); its checkpoint is the authors' dict less optimizer_state_dict, to keep the file small. sem_mean/sem_std of the new features come from an independent implementation of the
  layout in the reference README (torch MultiheadAttention pre-LN blocks), which reproduced the public file's
  sem_mean/sem_std and semvae_loss posterior/recon to <= 2e-5 before this file was written.
- Everything on the CPU in float32, one thread; float32_vs_float64_max_abs from the same oracles in float64.
"""


def _commit(path: str) -> str | None:
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    try:
        return subprocess.run(["git", "-C", folder, "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dinov2", required=True, help="folder holding facebookresearch/dinov2's 'dinov2' package")
    parser.add_argument("--sfd-autoencoder", required=True, help="the authors' tokenizer/autoencoder.py (yuemingPAN/SFD)")
    parser.add_argument("--public", default=str(PUBLIC), help="the public tokenizer reference (oracle check, SemVAE)")
    parser.add_argument("--out", default=str(Path(__file__).with_name("tokenizer_reference_noreg.pt")))
    parser.add_argument("--seed", type=int, default=25)
    parser.add_argument("--check-only", action="store_true", help="only check the oracles against the public file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    public = torch.load(args.public, weights_only=False)
    sfd = _load_module(args.sfd_autoencoder, "sfd_autoencoder")
    check_public(public, sfd, args.dinov2)
    if args.check_only:
        return
    reference = make(public, sfd, args.dinov2, args.seed)
    torch.save(reference, args.out)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
