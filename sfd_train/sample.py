"""Sample from a trained SFD model: ``sfd-sample CHECKPOINT [key=value ...] [options]``.

CHECKPOINT is one of our run folders / checkpoint folders, or a published ``.pt`` (then give
the model's config with ``--config``). Two modes:

* a preview grid (default): ``--out grid.png`` with a few labels; the latents go next to it (``.pt``);
* a sample set: ``--num N --out DIR`` writes ``DIR/samples.npz`` in ADM's layout for ``sfd-eval``,
  on any number of ranks under torchrun, restartable (see :mod:`sfd_train.evaluation.sampling`).

Pictures: the texture part is decoded by the texture VAE (``--vae``, with the training data's
statistics or ``--stats``), or by the synthetic set's decoder for models trained on it. Every
sampler setting of the published inference configs is a ``sampler.*`` override: solver
(euler/heun/dopri5), steps, guidance per part and interval, timestep shift, autoguidance.
Overrides (``section.key=value``) may stand anywhere among the options.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch

from sfd_train.config import ConfigError, build_config, load_config
from sfd_train.config.loader import parse_args_with_overrides, parse_overrides
from sfd_train.safe_load import add_trust_argument, apply_trust_argument


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sfd-sample", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  sfd-sample outputs/tiny --labels 0 1 2 3 sampler.cfg_scale_tex=2.0 --out samples.png\n"
        "  sfd-sample sfd_xl.pt --config configs/sfd_xl.yaml --vae ldm-f16d32.ckpt --stats latents_stats.pt \\\n"
        "      sampler.autoguidance_checkpoint=sfd_b.pt sampler.cfg_scale_sem=1.5 sampler.cfg_scale_tex=1.5\n"
        "  torchrun --nproc-per-node 8 -m -- sfd_train.sample /ckpt/sfd_xl --num 50000 --out /samples/xl --vae V "
        "--device auto\n  sfd-eval /samples/xl VIRTUAL_imagenet256_labeled.npz\n"
        "(under torchrun, '--' before the module keeps torchrun's own --numa-binding from taking --num)",
    )
    parser.add_argument("checkpoint", help="run folder, checkpoint folder, or published .pt")
    parser.add_argument("overrides", nargs="*", help="section.key=value (sampler.*, model.*), anywhere among the options")
    parser.add_argument("--config", help="config of the model when the checkpoint does not carry one")
    parser.add_argument("--labels", type=int, nargs="*", help="grid: class labels to sample (default: 0..7)")
    parser.add_argument("--num", type=int, help="sample set: how many images (writes OUT/samples.npz)")
    parser.add_argument("--random-labels", action="store_true", help="sample set: random labels instead of balanced")
    parser.add_argument("--chunk", type=int, default=1000, help="sample set: images per restartable piece (default 1000)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per sampling batch (default sampler.batch_size)")
    parser.add_argument("--png", action="store_true", help="sample set: also write OUT/png/NNNNNN.png")
    parser.add_argument("--vae", help="texture VAE weights (LDM .ckpt) to decode pictures")
    parser.add_argument("--tokenizers", metavar="YAML", help="a non-default VAE architecture (its vae section)")
    parser.add_argument("--stats", help="texture statistics: a dataset folder, its manifest.json, or latents_stats.pt "
                        "(default: the training data's)")
    parser.add_argument("--weights", choices=["ema", "model"], default="ema", help="which weights (default ema)")
    parser.add_argument("--out", default="samples.png", help="grid: the PNG (latents beside it as .pt); "
                        "sample set: the folder")
    parser.add_argument("--device", default="cpu", help="torch device; 'auto' = this rank's GPU/NPU (default cpu)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_trust_argument(parser)
    return parser


def _label_error(labels: list[int], num_classes: int) -> str | None:
    """Why ``--labels`` cannot be sampled by a model of ``num_classes`` classes, or None.

    Label ``num_classes`` is the model's null (unconditional) class, so it would quietly give
    unconditional samples; other labels outside 0..num_classes-1 are no class at all.
    """
    bad = [label for label in labels if not 0 <= label < num_classes]
    if not bad:
        return None
    return (f"--labels {' '.join(map(str, bad))}: not a class of this model; use labels in 0..{num_classes - 1} "
            f"(model.num_classes = {num_classes})")


def _device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    from sfd_train import device as devices

    return devices.local_device(devices.detect_device_type("auto"), int(os.environ.get("LOCAL_RANK", "0")))


def _models(args, config, model_state, ema_state, device):
    from sfd_train.engine.weights import read_checkpoint_weights
    from sfd_train.models import build_model

    model = build_model(config.model).to(device).eval()
    model.load_state_dict(ema_state if args.weights == "ema" and ema_state is not None else model_state)
    guide = None
    if config.sampler.autoguidance_checkpoint:
        guide_state, guide_ema, _ = read_checkpoint_weights(config.sampler.autoguidance_checkpoint)
        guide = build_model(config.model.with_size(config.sampler.autoguidance_size)).to(device).eval()
        guide.load_state_dict(guide_ema if guide_ema is not None else guide_state)
    return model, guide


def main(argv: list[str] | None = None) -> int:
    args = parse_args_with_overrides(build_parser(), argv)
    apply_trust_argument(args)
    from sfd_train.data_pipeline.storage import url_output_error
    from sfd_train.engine.checkpoint import CheckpointError
    from sfd_train.engine.weights import read_checkpoint_weights
    from sfd_train.evaluation.decode import build_decoder

    problem = url_output_error(args.out)
    if problem:
        print(f"sfd-sample: --out {problem}", file=sys.stderr)
        return 2
    if args.num is not None and args.num < 1:
        print(f"sfd-sample: --num must be >= 1, got {args.num}", file=sys.stderr)
        return 2
    device = _device(args.device)
    try:
        model_state, ema_state, saved = read_checkpoint_weights(args.checkpoint)
        if args.config:
            config = load_config(args.config, args.overrides)
        elif saved:
            config = build_config(saved, parse_overrides(args.overrides))
        else:
            raise ConfigError("", f"{args.checkpoint} carries no config: pass --config")
        problem = _label_error(args.labels or [], config.model.num_classes)
        if problem:
            raise ConfigError("", problem)
        if args.num is None and not args.vae and config.data.path != "synthetic":
            decoder = None  # a preview of latent channels; pictures need the VAE
            print("sfd-sample: no --vae: the grid shows three texture-latent channels, not pictures", file=sys.stderr)
        else:
            decoder = build_decoder(config, vae=args.vae, tokenizers=args.tokenizers, stats=args.stats, device=device)
        model, guide = _models(args, config, model_state, ema_state, device)  # reads the autoguidance checkpoint
    except (ConfigError, CheckpointError, ValueError) as err:  # ValueError: a weight file that does not fit or is unsafe
        print(f"sfd-sample: {err}", file=sys.stderr)
        return 2
    if args.num is not None:
        return _sample_set(args, config, model, guide, decoder, device)
    return _grid(args, config, model, guide, decoder, device)


def _grid(args, config, model, guide, decoder, device) -> int:
    from sfd_train.diffusion.sampler import sample_with_config
    from sfd_train.engine.visualize import save_sample_grid

    labels = torch.tensor(args.labels if args.labels else list(range(min(8, config.model.num_classes))), device=device)
    generator = torch.Generator(device=device).manual_seed(config.sampler.seed)
    shape = (len(labels), config.model.in_channels, config.model.input_size, config.model.input_size)
    noise = torch.randn(shape, generator=generator, device=device)
    with torch.no_grad():
        latents = sample_with_config(model, noise, labels, config.model, config.sampler, guide_model=guide)
    out = Path(args.out)
    torch.save({"latents": latents.cpu(), "labels": labels.cpu()}, out.with_suffix(".pt"))
    save_sample_grid(latents, config.model.texture_channels, out, columns=min(8, len(labels)), decoder=decoder)
    print(f"wrote {out} and {out.with_suffix('.pt')}")
    return 0


def _sample_set(args, config, model, guide, decoder, device) -> int:
    from sfd_train.config import to_dict
    from sfd_train.diffusion.sampler import sample_with_config
    from sfd_train.evaluation.sampling import SamplingJob, sample_to_folder

    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", timeout=timedelta(hours=6))
    job = SamplingJob(num=args.num, seed=config.sampler.seed, random_labels=args.random_labels, chunk=args.chunk,
                      batch_size=args.batch_size or config.sampler.batch_size, png=args.png)
    settings = {"checkpoint": os.path.abspath(args.checkpoint), "weights": args.weights,
                "sampler": to_dict(config.sampler), "vae": args.vae}
    try:
        path = sample_to_folder(
            lambda noise, labels: sample_with_config(model, noise, labels, config.model, config.sampler, guide_model=guide),
            decoder, job, args.out, shape=(config.model.in_channels, config.model.input_size, config.model.input_size),
            classes=config.model.num_classes, texture_channels=config.model.texture_channels, device=device,
            settings=settings, rank=rank, world=world,
            barrier=torch.distributed.barrier if world > 1 else (lambda: None), progress=not args.quiet,
        )
    except ValueError as err:  # another run's samples in --out
        print(f"sfd-sample: {err}", file=sys.stderr)
        return 2
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()
    if path is not None:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
