"""Sample from a trained SFD model: ``sfd-sample CHECKPOINT [key=value ...]``.

CHECKPOINT is one of our run folders / checkpoint folders, or a published ``.pt``
(then give the model's config with ``--config``). Writes the sampled composite
latents (``.pt``) and a PNG grid of their texture part.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from sfd_train.config import ConfigError, build_config, load_config
from sfd_train.config.loader import parse_overrides


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sfd-sample", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  sfd-sample outputs/tiny sampler.cfg_scale_tex=2.0 --labels 0 1 2 3 --out samples.png\n"
        "  sfd-sample sfd_xl.pt --config configs/sfd_xl.yaml sampler.autoguidance_checkpoint=sfd_b.pt "
        "sampler.cfg_scale_sem=1.5 sampler.cfg_scale_tex=1.5",
    )
    parser.add_argument("checkpoint", help="run folder, checkpoint folder, or published .pt")
    parser.add_argument("overrides", nargs="*", help="section.key=value (sampler.*, model.*)")
    parser.add_argument("--config", help="config of the model when the checkpoint does not carry one")
    parser.add_argument("--labels", type=int, nargs="*", help="class labels to sample (default: 0..7)")
    parser.add_argument("--weights", choices=["ema", "model"], default="ema", help="which weights (default ema)")
    parser.add_argument("--out", default="samples.png", help="PNG grid to write (latents go next to it as .pt)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from sfd_train.data_pipeline.storage import url_output_error
    from sfd_train.diffusion.sampler import sample_with_config
    from sfd_train.engine.checkpoint import CheckpointError
    from sfd_train.engine.visualize import save_sample_grid
    from sfd_train.engine.weights import read_checkpoint_weights
    from sfd_train.models import build_model

    problem = url_output_error(args.out)
    if problem:
        print(f"sfd-sample: --out {problem}", file=sys.stderr)
        return 2
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
    except (ConfigError, CheckpointError) as err:
        print(f"sfd-sample: {err}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    model = build_model(config.model).to(device).eval()
    model.load_state_dict(ema_state if args.weights == "ema" and ema_state is not None else model_state)
    guide = None
    if config.sampler.autoguidance_checkpoint:
        guide_state, guide_ema, _ = read_checkpoint_weights(config.sampler.autoguidance_checkpoint)
        guide = build_model(config.model.with_size(config.sampler.autoguidance_size)).to(device).eval()
        guide.load_state_dict(guide_ema if guide_ema is not None else guide_state)
    labels = torch.tensor(args.labels if args.labels else list(range(min(8, config.model.num_classes))), device=device)
    generator = torch.Generator(device=device).manual_seed(config.sampler.seed)
    shape = (len(labels), config.model.in_channels, config.model.input_size, config.model.input_size)
    noise = torch.randn(shape, generator=generator, device=device)
    latents = sample_with_config(model, noise, labels, config.model, config.sampler, guide_model=guide)
    out = Path(args.out)
    torch.save({"latents": latents.cpu(), "labels": labels.cpu()}, out.with_suffix(".pt"))
    decoder = None
    if config.data.path == "synthetic":
        from sfd_train.data_pipeline import synthetic
        from sfd_train.data_pipeline.manifest import read_manifest

        manifest = read_manifest(synthetic.ensure_synthetic_dataset(config.data.synthetic_dir or None))
        decoder = lambda texture: synthetic.decode_texture(texture, manifest)  # noqa: E731
    save_sample_grid(latents, config.model.texture_channels, out, columns=min(8, len(labels)), decoder=decoder)
    print(f"wrote {out} and {out.with_suffix('.pt')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
