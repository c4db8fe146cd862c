"""``sfd-eval SAMPLES REFERENCE``: FID, sFID, Inception Score, precision and recall as ADM's evaluator.

Exit codes: 0 done, 2 an unusable input or missing weights (one line names the file and what is wrong).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from datetime import timedelta

from sfd_train.safe_load import UnsafeFileError, add_trust_argument, apply_trust_argument


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sfd-eval",
        description="Compares a set of samples with a reference the way ADM's evaluator does (guided-diffusion "
        "evaluations/evaluator.py): FID on Inception pool_3 features, sFID on mixed_6/conv, the Inception "
        "Score, precision and recall (k = 3). In PyTorch, on GPU, NPU or CPU; under torchrun the features "
        "are split over the ranks. SAMPLES and REFERENCE: an .npz with arr_0 (N x H x W x 3 uint8), an .npz "
        "with mu/sigma (ADM's reference batches; statistics only), a folder of images, or an sfd-sample "
        "output folder.",
        epilog="examples:\n"
        "  sfd-eval outputs/samples VIRTUAL_imagenet256_labeled.npz --inception pt_inception-2015-12-05-6726825d.pth\n"
        "  torchrun --nproc-per-node 8 -m sfd_train.evaluation.cli samples.npz ref.npz --device cuda --json\n"
        "  sfd-eval a_stats.npz b_stats.npz --json         # two statistics files: FID without any network",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("samples", help="the generated images (or statistics)")
    parser.add_argument("reference", help="the reference images or statistics")
    parser.add_argument("--inception", help="the Inception weights file (torch-fidelity's "
                        "pt_inception-2015-12-05-6726825d.pth); default $SFD_INCEPTION_WEIGHTS")
    parser.add_argument("--device", default="auto", help="torch device (default: this rank's GPU/NPU, else cpu)")
    parser.add_argument("--batch-size", type=int, default=100, help="images per Inception forward (default 100)")
    parser.add_argument("--cache", help="where reference features are cached (default ~/.cache/sfd_train/eval; "
                        "'' = no cache)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_trust_argument(parser)
    return parser


def _device(name: str) -> str:
    if name != "auto":
        return name
    from sfd_train import device as devices

    return str(devices.local_device(devices.detect_device_type("auto"), int(os.environ.get("LOCAL_RANK", "0"))))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    apply_trust_argument(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    import torch

    from sfd_train.evaluation.evaluate import evaluate
    from sfd_train.evaluation.sources import EvalInputError

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", timeout=timedelta(hours=2))
    try:
        result = evaluate(args.samples, args.reference, weights=args.inception, device=_device(args.device),
                          batch_size=args.batch_size, cache=args.cache, progress=not args.quiet)
    except (EvalInputError, FileNotFoundError, UnsafeFileError) as err:  # bad inputs, missing weights: one line
        print(f"sfd-eval: {err}", file=sys.stderr)
        return 2
    finally:
        if distributed:
            torch.distributed.destroy_process_group()
    if result is None:
        return 0
    if args.json:
        print(json.dumps(result))
        return 0
    for key in ("fid", "sfid", "inception_score", "precision", "recall"):
        if key in result:
            value = result[key]
            print(f"{key:16s} {'n/a' if value is None else f'{value:.4f}'}")
    for note in result.get("notes", []):
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
