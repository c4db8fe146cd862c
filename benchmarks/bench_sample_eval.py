"""Images out: sampling images/s (ours vs the authors' style) and the evaluator's throughput.

``sampling``: the same weights, solver (three-phase Euler with CFG on both parts) and decoder,
two pipelines:

* ``ours`` -- :mod:`sfd_train.evaluation.sampling` on our model (kernel dispatch, the guided
  velocity evaluated with the conditional and unconditional halves in one batch), writing
  restartable npz chunks and finally ``samples.npz``;
* ``authors' style`` -- their habits: their model class (``benchmarks/authors_style.py``), an Euler
  loop that concatenates ``[x, x]`` and ``[y, null]``, decodes, writes one PNG per image, then
  packs the PNGs into an npz.

``evaluator``: Inception features per second (random weights in the released format) and the
time of precision/recall's nearest-neighbour search for N samples against N references.

    python benchmarks/bench_sample_eval.py                     # this machine: a small model
    python benchmarks/bench_sample_eval.py --device cuda --size XL --num 512 --batch-size 64 --steps 50
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _model_config(size: str):
    from sfd_train.config import build_config

    if size == "small":
        model = {"size": "custom", "depth": 4, "hidden_size": 256, "num_heads": 4, "input_size": 8, "in_channels": 16,
                 "semantic_channels": 4, "num_classes": 10, "repa_projector_dim": 64, "repa_feature_dim": 32}
    else:
        model = {"size": size}
    return build_config({"model": model, "data": {"path": "synthetic"},
                         "sampler": {"method": "euler", "cfg_scale_sem": 1.5, "cfg_scale_tex": 1.5}})


def _authors_model(config, ours, device):
    from authors_style import SFDLightningDiT

    m = config.model
    depth, hidden, heads = m.dims()
    model = SFDLightningDiT(input_size=m.input_size, patch_size=m.patch_size, in_channels=m.in_channels, hidden=hidden,
                            depth=depth, heads=heads, num_classes=m.num_classes, projector_dim=m.repa_projector_dim,
                            z_dim=m.repa_feature_dim, compile_blocks=False).to(device).eval()
    missing = model.load_state_dict({k: v for k, v in ours.state_dict().items() if k in model.state_dict()}, strict=False)
    return model, missing


@torch.no_grad()
def authors_style_sampling(model, config, num: int, batch: int, steps: int, decoder, out: Path, device) -> float:
    """Their loop: per batch, Euler over the three phases with [x, x] / [y, null] concatenated, decode, PNGs, pack."""
    from PIL import Image

    from sfd_train.evaluation.decode import to_uint8

    m, dt = config.model, config.model.delta_t
    scale = config.sampler.cfg_scale_tex
    grid = torch.linspace(0, 1 + dt, steps + 1, device=device)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    written = 0
    for lo in range(0, num, batch):
        b = min(batch, num - lo)
        x = torch.randn(b, m.in_channels, m.input_size, m.input_size, device=device)
        y = torch.arange(lo, lo + b, device=device) % m.num_classes
        y_null = torch.full_like(y, m.num_classes)
        for i in range(steps):
            s, s_next = grid[i], grid[i + 1]
            t_sem, t_tex = s.clamp(max=1.0), (s - dt).clamp(min=0.0)
            xx = torch.cat([x, x])
            v, _ = model(xx, t_tex.expand(2 * b), t_sem.expand(2 * b), torch.cat([y, y_null]))
            cond, uncond = v.chunk(2)
            v = uncond + scale * (cond - uncond)
            mask = torch.ones_like(v)
            mask[:, :-m.semantic_channels] *= float(s >= dt)
            mask[:, -m.semantic_channels:] *= float(s <= 1)
            x = x + (s_next - s) * v * mask
        images = to_uint8(decoder(x[:, :m.texture_channels]))
        for j, image in enumerate(images):
            Image.fromarray(image).save(out / f"{lo + j:06d}.png")
        written += b
    files = sorted(out.glob("*.png"))
    np.savez(out / "samples.npz", arr_0=np.stack([np.asarray(Image.open(f)) for f in files]))
    return written / (time.perf_counter() - start)


def ours_sampling(model, config, num: int, batch: int, steps: int, decoder, out: Path, device) -> float:
    from sfd_train.diffusion.sampler import sample_with_config
    from sfd_train.evaluation.sampling import SamplingJob, sample_to_folder

    m = config.model
    job = SamplingJob(num=num, batch_size=batch, chunk=max(batch, 256))
    start = time.perf_counter()
    sample_to_folder(lambda noise, labels: sample_with_config(model, noise, labels, m, config.sampler, num_steps=steps),
                     decoder, job, str(out), shape=(m.in_channels, m.input_size, m.input_size), classes=m.num_classes,
                     texture_channels=m.texture_channels, device=device, settings={}, progress=False)
    return num / (time.perf_counter() - start)


def inception_rate(device, images: int, batch: int) -> float:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from sfd_train.evaluation.inception import InceptionFeatures

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "inception.pth")
        with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None), \
                mock.patch("torch_fidelity.feature_extractor_inceptionv3.torch.load", return_value={}):
            net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="unused")
        torch.save(net.state_dict(), path)
        features = InceptionFeatures(path, device)
        data = np.random.default_rng(0).integers(0, 256, (batch, 256, 256, 3), dtype=np.uint8)
        features(data[:2])  # warm-up
        start, done = time.perf_counter(), 0
        while done < images:
            features(data)
            done += batch
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        return done / (time.perf_counter() - start)


def precision_recall_seconds(n: int, device) -> float:
    from sfd_train.evaluation.metrics import precision_recall

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(n, 2048)).astype(np.float32), rng.normal(size=(n, 2048)).astype(np.float32)
    start = time.perf_counter()
    precision_recall(a, b, device=device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", help="'small' (CPU) or a model size such as XL")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num", type=int, default=128, help="samples per pipeline")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=25, help="Euler steps")
    parser.add_argument("--inception-images", type=int, default=64)
    parser.add_argument("--pr-samples", type=int, default=5000, help="N of the precision/recall timing")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    from sfd_train.evaluation.decode import synthetic_decoder
    from sfd_train.models import build_model

    device = torch.device(args.device)
    config = _model_config(args.size)
    torch.manual_seed(0)
    ours = build_model(config.model).to(device).eval()
    theirs, missing = _authors_model(config, ours, device)
    if missing.missing_keys:
        print(f"note: the authors'-style model did not receive {len(missing.missing_keys)} tensors", file=sys.stderr)
    # The synthetic decoder for the small model; the latent preview (no VAE) for the released sizes.
    decoder = synthetic_decoder() if args.size == "small" else (lambda t: torch.sigmoid(t[:, :3]).float())
    with tempfile.TemporaryDirectory() as tmp:
        rate_theirs = authors_style_sampling(theirs, config, args.num, args.batch_size, args.steps, decoder,
                                             Path(tmp) / "theirs", device)
        rate_ours = ours_sampling(ours, config, args.num, args.batch_size, args.steps, decoder, Path(tmp) / "ours", device)
    inception = inception_rate(device, args.inception_images, min(args.batch_size, 32))
    pr_seconds = precision_recall_seconds(args.pr_samples, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    result = {"device": name, "model": args.size, "num": args.num, "batch_size": args.batch_size, "euler_steps": args.steps,
              "sampling_images_per_s_ours": round(rate_ours, 2), "sampling_images_per_s_authors_style": round(rate_theirs, 2),
              "inception_images_per_s": round(inception, 1), "precision_recall_seconds": round(pr_seconds, 2),
              "precision_recall_samples": args.pr_samples, "torch": torch.__version__}
    print(f"{name}, model {args.size}, batch {args.batch_size}, {args.steps} Euler steps with CFG")
    print(f"  sampling, ours            {rate_ours:8.2f} images/s")
    print(f"  sampling, authors' style  {rate_theirs:8.2f} images/s  (ours: {rate_ours / rate_theirs:.2f}x)")
    print(f"  Inception features        {inception:8.1f} images/s")
    print(f"  precision/recall, {args.pr_samples} vs {args.pr_samples}: {pr_seconds:.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
