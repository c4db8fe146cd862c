"""``sfd-data``: write, convert, check and describe composite-latent datasets.

Exit status: 0 on success, 1 when ``inspect`` finds a problem, 2 on an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import sys
from typing import Any, Sequence

from sfd_train.data_pipeline.credentials import (
    credential_keys,
    how_to_give_credentials,
    url_has_password,
    without_password,
)
from sfd_train.data_pipeline.errors import DataError
from sfd_train.data_pipeline.storage import url_output_error
from sfd_train.safe_load import add_trust_argument

logger = logging.getLogger("sfd-data")

# How a profile is named on this command line, for the advice in error messages.
_PROFILE_OPTION = "--storage-option profile=NAME"


def _storage_options(items: Sequence[str]) -> dict[str, Any]:
    """Parses ``--storage-option KEY=VALUE`` flags (JSON values, else strings); refuses credentials."""
    options: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep:
            raise DataError(f"--storage-option expects KEY=VALUE, got {item!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    found = credential_keys(options)
    if found:
        # A secret on the command line ends up in shell histories, process lists and job logs.
        raise DataError(f"--storage-option {found[0]}: looks like a credential, which must not be given on the "
                        f"command line; remove it and {how_to_give_credentials(_PROFILE_OPTION)}")
    return options


def _check_locations(args: argparse.Namespace) -> None:
    """Refuses a dataset URL with a password in it and an output (``--out``) that is a URL."""
    path = getattr(args, "path", None) or getattr(args, "source", None)
    if path is not None and url_has_password(path):
        raise DataError(f"{without_password(path)!r} embeds a password, which must not be given on the command "
                        "line; remove 'user:password@' from the URL and " + how_to_give_credentials(_PROFILE_OPTION))
    problem = url_output_error(args.out) if getattr(args, "out", None) is not None else None
    if problem:
        raise DataError(f"--out {problem}")


def _add_dino_storage(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dino-storage", choices=["dtype", "int8"], default="dtype",
                        help="how the DINOv2 features are stored: 'dtype' = like the latents (--dtype, default); "
                        "'int8' = compact, about half the bytes, read back as float features (docs/data.md)")


def _dino_storage(args: argparse.Namespace) -> str | None:
    """``--dino-storage`` as the writers take it: None = like the latents."""
    return None if args.dino_storage == "dtype" else args.dino_storage


def _command_line(args: argparse.Namespace) -> str:
    return shlex.join(["sfd-data", *args.argv])


def cmd_synth(args: argparse.Namespace) -> int:
    from sfd_train.data_pipeline.synthetic import write_synthetic_dataset  # noqa: PLC0415 - keeps --help fast

    m = write_synthetic_dataset(
        args.out, args.num_samples, seed=args.seed, shard_size=args.shard_size, with_features=not args.no_features,
        storage_dtype=args.dtype, dino_storage=_dino_storage(args), workers=args.workers, progress=not args.quiet,
        command=_command_line(args),
    )
    print(f"wrote {m.num_samples} samples in {len(m.shards)} shards to {args.out}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from sfd_train.data_pipeline.convert import convert_published  # noqa: PLC0415

    m = convert_published(
        args.from_published, args.out, shard_size=args.shard_size, seed=args.seed, shuffle=not args.no_shuffle,
        workers=args.workers, storage_dtype=args.dtype, with_features=not args.no_features,
        dino_storage=_dino_storage(args), num_classes=args.num_classes, command=_command_line(args), progress=not args.quiet,
    )
    print(f"wrote {m.num_samples} samples in {len(m.shards)} shards to {args.out}")
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from sfd_train.config.base import from_mapping  # noqa: PLC0415
    from sfd_train.config.loader import read_yaml  # noqa: PLC0415
    from sfd_train.data_pipeline.extract import ExtractOptions, extract_dataset  # noqa: PLC0415
    from sfd_train.tokenizers.config import TokenizersConfig  # noqa: PLC0415

    tokenizers = from_mapping(TokenizersConfig, read_yaml(args.tokenizers)) if args.tokenizers else TokenizersConfig()
    options = ExtractOptions(
        source=args.source, out=args.out, vae=args.vae, dino=args.dino, semvae=args.semvae, tokenizers=tokenizers,
        image_size=args.image_size, latent=args.latent, seed=args.seed, shard_size=args.shard_size,
        batch_size=args.batch_size, workers=args.workers, on_bad_image=args.on_bad_image, shuffle=not args.no_shuffle,
        storage_dtype=args.dtype, dino_storage=_dino_storage(args), features=not args.no_features, device=args.device,
        storage_options=_storage_options(args.storage_option),
    )
    m = extract_dataset(options, command=_command_line(args), progress=not args.quiet)
    if m is not None:
        print(f"wrote {m.num_samples} samples in {len(m.shards)} shards to {args.out}")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from sfd_train.data_pipeline.check import compute_dataset_stats  # noqa: PLC0415
    from sfd_train.data_pipeline.manifest import read_manifest, write_manifest  # noqa: PLC0415
    from sfd_train.data_pipeline.storage import is_url  # noqa: PLC0415

    options = _storage_options(args.storage_option)
    if args.write and is_url(args.path):
        raise DataError("--write needs a local folder (rewrite the manifest locally and upload it)")
    stats = compute_dataset_stats(args.path, options, workers=args.workers, progress=not args.quiet)
    print(json.dumps(stats, indent=1))
    if stats["skipped"]:
        logger.warning("%d bad samples were left out of the statistics; run `sfd-data inspect` for details", stats["skipped"])
    if args.write:
        manifest = read_manifest(args.path, options)
        manifest = dataclasses.replace(
            manifest,
            stats={part: stats[part] for part in ("texture", "semantic")},
            stats_source=f"sfd-data stats over {stats['count']} non-flipped samples (per channel over samples, H, W; unbiased std)",
        )
        write_manifest(manifest, args.path)
        logger.info("statistics written to %s/manifest.json", args.path)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from sfd_train.data_pipeline.check import check_dataset  # noqa: PLC0415
    from sfd_train.data_pipeline.manifest import read_manifest  # noqa: PLC0415

    options = _storage_options(args.storage_option)
    if args.no_check:
        m = read_manifest(args.path, options)
        report = {"path": args.path, "ok": None, "num_samples": m.num_samples, "num_shards": len(m.shards),
                  "shapes": {k: list(v) for k, v in m.shapes.items()}, "storage_dtype": m.storage_dtype, "manifest": m.to_dict()}
    else:
        report = check_dataset(args.path, options, workers=args.workers, progress=not args.quiet)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        _print_report(report)
    return 1 if report["ok"] is False else 0


def _print_report(report: dict[str, Any]) -> None:
    m = report["manifest"]
    print(f"dataset        {report['path']}")
    print(f"samples        {report['num_samples']} in {report['num_shards']} shards ({m['shard_pattern']})")
    print(f"classes        {m['num_classes']}")
    print(f"storage dtype  {report['storage_dtype']}")
    if m.get("dino_storage", report["storage_dtype"]) != report["storage_dtype"]:
        print(f"dino storage   {m['dino_storage']} (compact REPA features, read as float32)")
    for name, shape in report["shapes"].items():
        print(f"  {name:<15}{'x'.join(map(str, shape))}")
    print(f"statistics     {(m.get('stats') or {}).get('source', 'none')}")
    print(f"source         {m['provenance'].get('source', '?')}")
    if report["ok"] is None:
        return
    print(f"check          {'OK' if report['ok'] else 'FAILED'}: {report['samples_found']} samples found, {report['bad_samples']} bad")
    for err in report["errors"]:
        print(f"  {err}")
    for shard in report["shards"]:
        for err in shard["errors"]:
            print(f"  {err}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sfd-data",
        description="Composite-latent datasets for SFD training: tar shards plus manifest.json (format: docs/data.md).",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write the built-in synthetic dataset (coloured shapes, 10 classes, 8x8 latents)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num-samples", type=int, default=4096, help="samples to write (default 4096)")
    p.add_argument("--shard-size", type=int, default=1024, help="samples per shard (default 1024)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pictures and of the storage order")
    p.add_argument("--no-features", action="store_true", help="leave out the REPA-like features")
    p.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16", help="storage dtype")
    _add_dino_storage(p)
    p.add_argument("--workers", type=int, default=1, help="writer processes")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_synth)

    p = sub.add_parser("convert", help="convert the published imagenet1k-latents safetensors layout into shards (resumable)")
    p.add_argument("--from-published", required=True, metavar="DIR", help="folder of *.safetensors files (+ latents_stats.pt, latents_sv_stats.pt)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the storage permutation")
    p.add_argument("--no-shuffle", action="store_true", help="keep the source order (the reader then reads in a full random order, slower)")
    p.add_argument("--dtype", choices=["auto", "float16", "bfloat16"], default="auto", help="storage dtype (auto: bfloat16 sources stay bfloat16, others float16)")
    p.add_argument("--no-features", action="store_true", help="leave out feats_dino / feats_dino_flip")
    _add_dino_storage(p)
    p.add_argument("--num-classes", type=int, default=None, help="number of classes (default: largest label + 1)")
    p.add_argument("--workers", type=int, default=1, help="writer processes")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_trust_argument(p)
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser(
        "extract", help="images -> composite-latent shards (texture VAE, DINOv2, SemVAE); torchrun for several GPUs",
        description="Encodes images into shards of this project's format: texture latents (LDM AutoencoderKL), "
        "DINOv2 patch features and, with --semvae, semantic latents, each for the image and its mirror. Under "
        "torchrun every rank takes its own shards; the result does not depend on their number. Run the same "
        "command again after a failure: finished shards are kept. Without --semvae the semantic part is empty: "
        "train a SemVAE on the features (sfd-train semvae_ch16 data.path=OUT), then run the command again with "
        "--semvae to fill it in.",
        epilog="examples:\n  sfd-data extract /data/imagenet/train --out /data/in1k-latents --vae ldm-f16d32.ckpt "
        "--dino dinov2_vitb14_reg4_pretrain.pth --semvae semvae_ch16.pt\n"
        "  torchrun --nproc-per-node 8 -m sfd_train.data_pipeline.cli extract 's3://bucket/train-{000000..000146}.tar' "
        "--out /data/latents --vae V --dino D",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", help="an image folder (one sub-folder per class), a list file of 'path label' lines, or "
                   "WebDataset tars (a .tar or a brace pattern, local or s3://) with jpg/png and cls members")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--vae", help="texture VAE weights: the LDM .ckpt (e.g. ldm-imagenet256-f16d32-50ep.ckpt)")
    p.add_argument("--dino", help="DINOv2 weights as released for torch.hub, with registers (e.g. "
                   "dinov2_vitb14_reg4_pretrain.pth) or without (dinov2_vitb14_pretrain.pth): the file's keys say "
                   "which, and the position table is resized as the hub does for that family")
    p.add_argument("--semvae", help="SemVAE checkpoint (the authors' format or sfd-train's export); on a folder "
                   "extracted without it, fills in the semantic latents")
    p.add_argument("--tokenizers", metavar="YAML", help="architectures of the networks (sections vae, dino, semvae); "
                   "default: the released ones; e.g. 'dino: {preset: dinov2_vitb14}' names a hub model and its family")
    p.add_argument("--image-size", type=int, default=256, help="side of the centre crop (default 256)")
    p.add_argument("--latent", choices=["mean", "sample"], default="mean",
                   help="store the posterior mean (default) or a draw seeded by --seed and the sample's index")
    p.add_argument("--seed", type=int, default=0, help="seed of the storage order and of --latent sample")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="image-decoding processes per rank (default: 4, or the number of cores if fewer)")
    p.add_argument("--on-bad-image", choices=["error", "skip"], default="error",
                   help="a corrupt, empty or unreadable image stops the job before any encoding (default), or is "
                   "left out; both list every one in OUT/extract_report.json")
    p.add_argument("--no-shuffle", action="store_true", help="store in source order (the reader then reads slower)")
    p.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16", help="storage dtype")
    p.add_argument("--no-features", action="store_true", help="leave out the DINOv2 features (needs --semvae)")
    _add_dino_storage(p)
    p.add_argument("--device", default="auto", help="torch device (default: this rank's GPU/NPU, else the CPU)")
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   help="fsspec option for s3:// sources (repeatable; credentials come from the environment)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_trust_argument(p)
    p.set_defaults(fn=cmd_extract)

    p = sub.add_parser("stats", help="compute per-channel mean/std of the texture and semantic latents")
    p.add_argument("path", help="dataset folder or URL")
    p.add_argument("--write", action="store_true", help="record them in manifest.json (local folders)")
    p.add_argument("--workers", type=int, default=2, help="shards read in parallel")
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE", help="fsspec option for URLs (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_stats)

    p = sub.add_parser("inspect", help="show the manifest and check every shard (exit status 1 if a check fails)")
    p.add_argument("path", help="dataset folder or URL")
    p.add_argument("--json", action="store_true", help="machine-readable report on stdout")
    p.add_argument("--no-check", action="store_true", help="only read the manifest")
    p.add_argument("--workers", type=int, default=2, help="shards read in parallel")
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE", help="fsspec option for URLs (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from sfd_train.config.base import ConfigError  # noqa: PLC0415 - keeps --help fast
    from sfd_train.safe_load import UnsafeFileError, apply_trust_argument  # noqa: PLC0415
    from sfd_train.tokenizers.weights import TokenizerWeightsError  # noqa: PLC0415

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    apply_trust_argument(args)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        _check_locations(args)
        return args.fn(args)
    except DataError as err:
        print(f"sfd-data {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ConfigError, TokenizerWeightsError, UnsafeFileError) as err:
        print(f"sfd-data {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
