"""Console entry points: ``sfd-train`` (train, export) and ``sfd-sample``."""

from __future__ import annotations

import argparse
import sys


def build_export_parser() -> argparse.ArgumentParser:
    from sfd_train.safe_load import add_trust_argument

    parser = argparse.ArgumentParser(
        prog="sfd-train export",
        description="Write a checkpoint's weights in the published form {'model', 'ema', 'config'} "
        "(loadable by the authors' inference code with strict=True), or as .safetensors: the model's and the "
        "EMA's tensors as model.<name> and ema.<name>, the config as JSON metadata. Every command that reads "
        "weights (sfd-sample, checkpoint.init_from, sampler.autoguidance_checkpoint) takes either file.",
        epilog="examples:\n  sfd-train export outputs/tiny --out tiny.pt\n"
        "  sfd-train export outputs/tiny --out tiny.safetensors --format safetensors",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", help="a checkpoint folder (step_*), or a run folder or its checkpoints/ folder (the newest complete checkpoint)")
    parser.add_argument("--out", required=True, help="the file to write (.pt or .safetensors)")
    parser.add_argument("--format", choices=["pt", "safetensors"], default=None,
                        help="file format (default: from --out's suffix, .safetensors or else pt)")
    add_trust_argument(parser)
    return parser


def export_main(argv: list[str]) -> int:
    from sfd_train.safe_load import apply_trust_argument

    args = build_export_parser().parse_args(argv)
    apply_trust_argument(args)
    from sfd_train.data_pipeline.storage import url_output_error
    from sfd_train.engine.checkpoint import CheckpointError
    from sfd_train.engine.weights import export_published

    problem = url_output_error(args.out)
    if problem:
        print(f"sfd-train export: --out {problem}", file=sys.stderr)
        return 2
    fmt = args.format or ("safetensors" if args.out.endswith(".safetensors") else "pt")
    try:
        out = export_published(args.checkpoint, args.out, format=fmt)
    except (CheckpointError, ValueError) as err:  # ValueError: a file refused as unsafe
        print(f"sfd-train export: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def train_main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "export":
        return export_main(argv[1:])
    from sfd_train.train import main

    return main(argv)


def sample_main(argv: list[str] | None = None) -> int:
    from sfd_train.sample import main

    return main(argv)


if __name__ == "__main__":
    sys.exit(train_main())
