"""Console entry points: ``sfd-train`` (train, export) and ``sfd-sample``."""

from __future__ import annotations

import argparse
import sys


def build_export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sfd-train export",
        description="Write a checkpoint's weights in the published form {'model', 'ema', 'config'} "
        "(loadable by the authors' inference code with strict=True).",
    )
    parser.add_argument("checkpoint", help="a checkpoint folder (step_*), or a run folder or its checkpoints/ folder (the newest complete checkpoint)")
    parser.add_argument("--out", required=True, help="the .pt file to write")
    return parser


def export_main(argv: list[str]) -> int:
    args = build_export_parser().parse_args(argv)
    from sfd_train.data_pipeline.storage import url_output_error
    from sfd_train.engine.checkpoint import CheckpointError
    from sfd_train.engine.weights import export_published

    problem = url_output_error(args.out)
    if problem:
        print(f"sfd-train export: --out {problem}", file=sys.stderr)
        return 2
    try:
        out = export_published(args.checkpoint, args.out)
    except CheckpointError as err:
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
