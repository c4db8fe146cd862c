"""``sfd-data extract``: images -> composite-latent shards (texture VAE, DINOv2, SemVAE).

The job, on one process or under torchrun (every rank runs the same command):

1. Every rank loads the networks, so wrong weights fail before any work starts.
2. Rank 0 lists the source (image folder, list file, WebDataset tars, local or s3://)
   and checks that every image decodes, in worker processes. The result is kept in
   ``DIR/.sfd-write/scan.json``, so a restart does not check again. Bad images stop
   the job with the list (``--on-bad-image error``, the default), or are left out and
   listed (``skip``). ``DIR/extract_report.json`` always lists them, each with its path
   and reason.
3. The usable images are stored in a seeded permutation and cut into shards. Shard i
   belongs to rank i mod world size. So the shards' contents depend on the source and
   the options, never on the number of ranks, and a shard is always made from the same
   batches.
4. Each rank decodes its images in DataLoader worker processes: RGB, ADM centre crop,
   mirror. It then runs the networks (bf16 on a GPU or NPU, float32 on the CPU) and
   writes each shard under a temporary name, renaming it when complete (see
   :mod:`.writer`). A killed job run again keeps finished shards and redoes the rest.
5. Rank 0 writes ``manifest.json`` last. It holds the per-channel statistics of the
   non-flipped latents and the provenance: the command, the source, and the weight
   files' names and SHA-256.

Without ``--semvae`` the semantic part has 0 channels. That gives a dataset of texture
latents and DINOv2 features, enough to train a SemVAE on (``sfd-train semvae``).
Running again with ``--semvae`` on such a folder fills in the semantic latents from
the stored features, shard by shard, without touching the images, the VAE or DINOv2
(:func:`fill_semantic`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Iterator, Literal

import numpy as np
import torch
from tqdm import tqdm

from sfd_train.data_pipeline.errors import DataError, WriterError
from sfd_train.data_pipeline.format import (
    FEATURES,
    FEATURES_FLIP,
    SEMANTIC,
    SEMANTIC_FLIP,
    TEXTURE,
    TEXTURE_FLIP,
    SampleLayout,
    stored_features,
    to_storage,
    to_stored_arrays,
)
from sfd_train.data_pipeline.manifest import MANIFEST_NAME, read_manifest
from sfd_train.data_pipeline.order import writer_permutation
from sfd_train.data_pipeline.writer import (
    STATE_DIR,
    ShardWriter,
    finish_dataset,
    prepare_job,
    read_shard_arrays,
    remove_leftovers,
    shard_names,
    write_json,
)
from sfd_train.tokenizers.config import TokenizersConfig

logger = logging.getLogger(__name__)

REPORT_NAME = "extract_report.json"
SCAN_NAME = "scan.json"
FILL_PLAN = "fill.json"
SOURCE_ORDER = "source_order.txt"
"""Written beside the manifest: line i names the image of the sample with global index i."""


@dataclass
class ExtractOptions:
    """What ``sfd-data extract`` does (its command-line flags)."""

    source: str
    out: str
    vae: str | None = None
    dino: str | None = None
    semvae: str | None = None
    tokenizers: TokenizersConfig = field(default_factory=TokenizersConfig)
    image_size: int = 256
    latent: Literal["mean", "sample"] = "mean"
    seed: int = 0
    shard_size: int = 1000
    batch_size: int = 64
    workers: int = 4
    on_bad_image: Literal["error", "skip"] = "error"
    shuffle: bool = True
    storage_dtype: str = "float16"
    dino_storage: str | None = None
    """None: features stored like the latents; "int8": compact (see :mod:`.compact`)."""
    features: bool = True
    device: str = "auto"
    storage_options: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------ ranks
@dataclass
class _World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            torch.distributed.barrier()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        if self.size == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


@contextlib.contextmanager
def _world() -> Iterator[_World]:
    """This process's place in the job: torchrun's variables, else a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    world = _World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))
    if size > 1 and not torch.distributed.is_initialized():
        # Collectives only coordinate (CPU, gloo); rank 0 may check a whole dataset's images
        # while the others wait, so the timeout is generous.
        torch.distributed.init_process_group("gloo", timeout=timedelta(hours=6))
        try:
            yield world
        finally:
            torch.distributed.destroy_process_group()
        return
    yield world


def _device(name: str, local_rank: int) -> torch.device:
    if name != "auto":
        return torch.device(name)
    from sfd_train import device as devices

    return devices.local_device(devices.detect_device_type("auto"), local_rank)


# ------------------------------------------------------------------ networks
@dataclass
class _Networks:
    vae: Any = None
    dino: Any = None
    semvae: Any = None
    files: dict[str, dict[str, str]] = field(default_factory=dict)
    """``{network: {"file", "sha256"}}`` for the manifest's provenance."""


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def load_networks(options: ExtractOptions, device: torch.device, need_images: bool) -> _Networks:
    """The networks the job needs, strictly loaded (their files' problems are reported now)."""
    from sfd_train.tokenizers.dinov2 import load_dinov2
    from sfd_train.tokenizers.semvae import load_semvae
    from sfd_train.tokenizers.texture_vae import load_texture_vae

    nets = _Networks()
    if need_images:
        if not options.vae or not options.dino:
            raise DataError("--vae and --dino are required to encode images")
        nets.vae = load_texture_vae(options.vae, options.tokenizers.vae).to(device)
        nets.dino = load_dinov2(options.dino, options.tokenizers.dino).to(device)
        nets.files.update(vae={"file": os.path.basename(options.vae), "sha256": _sha256(options.vae)},
                          dino={"file": os.path.basename(options.dino), "sha256": _sha256(options.dino)})
    if options.semvae:
        nets.semvae = load_semvae(options.semvae, options.tokenizers.semvae).to(device)
        nets.files["semvae"] = {"file": os.path.basename(options.semvae), "sha256": _sha256(options.semvae)}
    return nets


def _autocast(device: torch.device):
    # bf16 where the device has fast bf16 (GPU, NPU); the CPU computes in float32.
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type != "cpu")


def _draw(mean: torch.Tensor, std: torch.Tensor, indices: np.ndarray, seed: int, stream: int) -> torch.Tensor:
    """``mean + std * noise``, the noise of sample ``i`` seeded by (seed, stream, i) alone,
    so that a sample's latent does not depend on its batch, rank or restart."""
    noise = torch.empty(mean.shape, dtype=torch.float32)
    for row, index in enumerate(indices):
        generator = torch.Generator().manual_seed((seed * 1_000_003 + stream * 7_919 + int(index)) % (2**63 - 1))
        noise[row] = torch.randn(mean.shape[1:], generator=generator)
    return mean + std * noise.to(mean.device)


def _latent(posterior: tuple[torch.Tensor, torch.Tensor], options: ExtractOptions, indices: np.ndarray,
            stream: int) -> torch.Tensor:
    mean, std = (t.float() for t in posterior)
    return mean if options.latent == "mean" else _draw(mean, std, indices, options.seed, stream)


@torch.no_grad()
def encode_batch(nets: _Networks, crops: torch.Tensor, indices: np.ndarray, options: ExtractOptions,
                 grid: int, device: torch.device) -> dict[str, np.ndarray]:
    """Every array field of a batch: uint8 crops (B, 2, S, S, 3) (as is, mirrored) -> ``{field: (B, ...)}``."""
    from sfd_train.tokenizers.preprocess import to_pixels

    b = crops.shape[0]
    pixels = to_pixels(crops.to(device)).reshape(b * 2, 3, crops.shape[2], crops.shape[3])
    both = np.repeat(indices * 2, 2) + np.tile([0, 1], b)  # one noise stream per image and flip
    with _autocast(device):
        tex = _latent(nets.vae.posterior(pixels), options, both, stream=0)
        features = nets.dino(pixels, grid).float()
        sem = _latent(nets.semvae.encode_grid(features), options, both, stream=1) if nets.semvae else None
    out = {TEXTURE: tex[0::2], TEXTURE_FLIP: tex[1::2]}
    out[SEMANTIC], out[SEMANTIC_FLIP] = (sem[0::2], sem[1::2]) if sem is not None else (tex[0::2, :0], tex[1::2, :0])
    if options.features:
        out[FEATURES], out[FEATURES_FLIP] = features[0::2], features[1::2]
    return to_stored_arrays({name: value.float().cpu() for name, value in out.items()}, options.storage_dtype,
                            options.dino_storage)


# ------------------------------------------------------------------ the scan
def _scan(options: ExtractOptions, world: _World, progress: bool) -> dict[str, Any]:
    """Rank 0 lists and checks the source (or reuses an earlier check); every rank gets the result."""
    from sfd_train.data_pipeline import images

    result = None
    if world.is_main:
        # A tar sample without an image or label is a bad image too (listed, or an error).
        listing = images.list_images(options.source, options.storage_options, on_bad_sample=options.on_bad_image)
        path = os.path.join(options.out, STATE_DIR, SCAN_NAME)
        cached = _read_json(path)
        if cached and cached["source"] == listing.description and cached["num_items"] == len(listing.items):
            logger.info("using the image check of an earlier run (%s)", path)
            usable, bad = cached["usable"], [tuple(b) for b in cached["bad"]]
        else:
            scan = images.scan_images(listing.items, listing.storage(), workers=options.workers, progress=progress)
            usable = [int(i) for i in scan.good]
            bad = [tuple(b) for b in listing.skipped] + [tuple(b) for b in scan.bad]
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_json(path, {"source": listing.description, "num_items": len(listing.items), "usable": usable,
                              "bad": bad})
        report = {"source": listing.description, "images": len(listing.items), "usable": len(usable),
                  "bad": [{"image": image, "reason": reason} for image, reason in bad],
                  "ignored_files": listing.ignored, "on_bad_image": options.on_bad_image}
        write_json(os.path.join(options.out, REPORT_NAME), report)
        result = {"listing": listing, "usable": usable, "bad": bad}
    result = world.broadcast(result)
    if result["bad"]:
        shown = "; ".join(f"{image}: {reason}" for image, reason in result["bad"][:5])
        more = f" (and {len(result['bad']) - 5} more)" if len(result["bad"]) > 5 else ""
        if options.on_bad_image == "error":
            raise DataError(f"{len(result['bad'])} unusable image(s) in {options.source}: {shown}{more}. All are listed "
                            f"in {os.path.join(options.out, REPORT_NAME)}; fix or remove them, or pass "
                            "--on-bad-image skip to leave them out")
        if world.is_main:
            logger.warning("leaving out %d unusable image(s) (listed in %s): %s%s", len(result["bad"]),
                           os.path.join(options.out, REPORT_NAME), shown, more)
    if not result["usable"]:
        raise DataError(f"{options.source}: no usable images")
    return result


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------ encoding shards
class _Crops(torch.utils.data.Dataset):
    """Decoded crop pairs of the source's items, by item number (in worker processes)."""

    def __init__(self, items, storage, size: int):
        self.items, self.storage, self.size = items, storage, size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        from sfd_train.data_pipeline.images import load_crop_pair

        item = self.items[index]
        return torch.from_numpy(np.ascontiguousarray(load_crop_pair(item, self.size, self.storage))), int(item.label)


def _batches(tasks, order: np.ndarray, usable: np.ndarray, batch_size: int) -> list[list[int]]:
    """Item numbers of every batch of the given shards, batches never crossing a shard boundary."""
    out = []
    for _, lo, hi in tasks:
        for start in range(lo, hi, batch_size):
            out.append([int(usable[order[j]]) for j in range(start, min(start + batch_size, hi))])
    return out


def extract_dataset(options: ExtractOptions, command: str = "", progress: bool = True):
    """Runs the extraction on this rank; returns the manifest on rank 0 (None elsewhere).

    Raises:
        DataError: bad images (with ``on_bad_image="error"``), an unusable source, or an
            output folder that holds another job.
        TokenizerWeightsError: a weight file that does not fit its network.
    """
    with _world() as world:
        existing = _existing_dataset(options.out)
        if options.semvae and (existing is not None or os.path.exists(os.path.join(options.out, STATE_DIR, FILL_PLAN))):
            return fill_semantic(options, world, command, progress)
        device = _device(options.device, world.local_rank)
        nets = load_networks(options, device, need_images=True)
        if not options.semvae and not options.features:
            raise DataError("without --semvae the DINOv2 features must be stored (they train the SemVAE and give the "
                            "semantic latents later): drop --no-features")
        if world.is_main:
            os.makedirs(os.path.join(options.out, STATE_DIR), exist_ok=True)
        world.barrier()
        scan = _scan(options, world, progress)
        usable = np.asarray(scan["usable"], dtype=np.int64)
        n = len(usable)
        grid = options.image_size // nets.vae.config.downsampling
        if options.image_size % nets.vae.config.downsampling:
            raise DataError(f"--image-size {options.image_size} is not a multiple of the VAE's {nets.vae.config.downsampling}")
        shapes = _shapes(nets, options, grid)
        try:
            layout = SampleLayout(shapes, options.storage_dtype, options.dino_storage)
        except ValueError as err:
            raise DataError(f"--dino-storage: {err}") from None
        names = shard_names(n, options.shard_size)
        plan = {
            "source": scan["listing"].description, "images": len(scan["listing"].items), "usable": n,
            "usable_sha256": hashlib.sha256(usable.tobytes()).hexdigest(), "image_size": options.image_size,
            "latent": options.latent, "seed": options.seed, "shard_size": options.shard_size,
            "batch_size": options.batch_size, "shuffle": options.shuffle, "storage_dtype": options.storage_dtype,
            "shapes": {k: list(v) for k, v in shapes.items()}, "weights": nets.files,
        }
        if layout.compact:  # only then, so that jobs started before the option existed resume
            plan["dino_storage"] = layout.dino_storage
        records = prepare_job(options.out, plan, names, layout, options.shard_size, n) if world.is_main else None
        records = world.broadcast(records)
        order = writer_permutation(n, options.seed) if options.shuffle else np.arange(n, dtype=np.int64)
        tasks = [(name, i * options.shard_size, min((i + 1) * options.shard_size, n)) for i, name in enumerate(names)
                 if name not in records and i % world.size == world.rank]
        if world.is_main and records:
            logger.info("resuming: %d of %d shards already written", len(records), len(names))
        _encode_shards(options, nets, scan, tasks, order, usable, layout, grid, device, progress and world.is_main)
        world.barrier()
        if not world.is_main:
            return None
        provenance = {"source": scan["listing"].description, "weights": nets.files, "image_size": options.image_size,
                      "latent": f"posterior {options.latent}", "bad_images_left_out": len(scan["bad"]),
                      "source_order": SOURCE_ORDER, "dino": nets.dino.config.description}
        _write_source_order(options.out, scan["listing"].items, usable[order])
        return finish_dataset(options.out, names, layout, num_classes=scan["listing"].num_classes, plan=plan,
                              command=command, source=f"images: {scan['listing'].description}",
                              extra_provenance=provenance, shuffle=options.shuffle, seed=options.seed)


def _write_source_order(out: str, items, storage_order: np.ndarray) -> None:
    """``SOURCE_ORDER``: the image (path, or tar:member) of every sample, one line per global index."""
    tmp = os.path.join(out, f".{SOURCE_ORDER}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for index in storage_order:
            f.write(items[int(index)].locator + "\n")
    os.replace(tmp, os.path.join(out, SOURCE_ORDER))


def _shapes(nets: _Networks, options: ExtractOptions, grid: int) -> dict[str, tuple[int, ...]]:
    sem = nets.semvae.config.bottleneck_dim if nets.semvae else 0
    shapes = {TEXTURE: (nets.vae.config.embed_dim, grid, grid), TEXTURE_FLIP: (nets.vae.config.embed_dim, grid, grid),
              SEMANTIC: (sem, grid, grid), SEMANTIC_FLIP: (sem, grid, grid)}
    if options.features:
        width = nets.dino.config.embed_dim
        shapes.update({FEATURES: (width, grid, grid), FEATURES_FLIP: (width, grid, grid)})
    return shapes


def _encode_shards(options, nets, scan, tasks, order, usable, layout, grid, device, progress) -> None:
    """Encodes and writes this rank's shards ``tasks`` (name, first, end) in order."""
    if not tasks:
        return
    batches = _batches(tasks, order, usable, options.batch_size)
    loader = torch.utils.data.DataLoader(
        _Crops(scan["listing"].items, scan["listing"].storage(), options.image_size),
        batch_sampler=batches, num_workers=options.workers, pin_memory=device.type != "cpu",
        persistent_workers=False, multiprocessing_context="fork" if options.workers else None,
    )
    total = sum(hi - lo for _, lo, hi in tasks)
    bar = tqdm(total=total, unit="img", desc="encoding images", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    stream = iter(loader)
    with bar:
        for name, lo, hi in tasks:
            writer = ShardWriter(options.out, name, lo, layout)
            with writer:
                for start in range(lo, hi, options.batch_size):
                    crops, labels = next(stream)
                    arrays = encode_batch(nets, crops, np.arange(start, start + len(labels)), options, grid, device)
                    writer.add(arrays, labels.numpy())
                    bar.update(len(labels))
                writer.finish()


def _existing_dataset(out: str):
    """The manifest of a finished dataset in ``out``, or None."""
    return read_manifest(out) if os.path.exists(os.path.join(out, MANIFEST_NAME)) else None


# ------------------------------------------------------------------ the second pass
def fill_semantic(options: ExtractOptions, world: _World, command: str = "", progress: bool = True):
    """Adds the semantic latents to a dataset of texture latents and DINOv2 features, in place.

    The manifest is set aside first (nobody trains on a half-filled folder) and written
    anew at the end; each shard is rewritten under a temporary name and renamed. A
    killed run, run again, continues: a shard already rewritten is recognised by its size.
    """
    device = _device(options.device, world.local_rank)
    nets = load_networks(options, device, need_images=False)
    plan_path = os.path.join(options.out, STATE_DIR, FILL_PLAN)
    fill = None
    if world.is_main:
        fill = _read_json(plan_path)
        if fill is None:
            manifest = read_manifest(options.out)
            if manifest.semantic_channels:
                raise WriterError(f"{options.out} already has semantic latents ({manifest.semantic_channels} channels)")
            if manifest.feature_dim is None:
                raise WriterError(f"{options.out} holds no DINOv2 features to encode; extract again with --semvae")
            fill = {"manifest": manifest.to_dict(), "semvae": nets.files["semvae"], "latent": options.latent,
                    "seed": options.seed}
            os.makedirs(os.path.dirname(plan_path), exist_ok=True)
            write_json(plan_path, fill)
            os.replace(os.path.join(options.out, MANIFEST_NAME), os.path.join(options.out, STATE_DIR, "before-fill.json"))
        elif fill["semvae"]["sha256"] != nets.files["semvae"]["sha256"]:
            raise WriterError(f"{options.out} is being filled with another SemVAE ({fill['semvae']['file']}); finish "
                              "that run or start from the first pass")
        remove_leftovers(options.out)
    fill = world.broadcast(fill)
    from sfd_train.data_pipeline.manifest import Manifest

    before = Manifest.from_dict(fill["manifest"])
    options.latent, options.seed = fill["latent"], fill["seed"]
    channels = nets.semvae.config.bottleneck_dim
    grid = before.latent_size[0]
    shapes = dict(before.shapes)
    shapes[SEMANTIC] = shapes[SEMANTIC_FLIP] = (channels, grid, grid)
    old = before.layout
    new = SampleLayout(shapes, before.storage_dtype, before.dino_storage)
    mine = [s for i, s in enumerate(before.shards) if i % world.size == world.rank]
    bar = tqdm(total=sum(s.count for s in mine), unit="sample", desc="encoding semantics",
               disable=not (progress and world.is_main), file=sys.stderr, dynamic_ncols=True)
    with bar:
        for shard in mine:
            path = os.path.join(options.out, shard.name)
            if os.path.getsize(path) == new.shard_bytes(shard.count) and os.path.exists(
                    os.path.join(options.out, STATE_DIR, shard.name + ".json")):
                bar.update(shard.count)
                continue
            layout = new if os.path.getsize(path) == new.shard_bytes(shard.count) else old
            arrays, labels = read_shard_arrays(path, layout, shard.count)
            writer = ShardWriter(options.out, shard.name, shard.first_index, new)
            with writer:
                for lo in range(0, shard.count, options.batch_size):
                    hi = min(lo + options.batch_size, shard.count)
                    block = {k: v[lo:hi] for k, v in arrays.items()}
                    block.update(_semantic_of(nets, block, options, np.arange(shard.first_index + lo,
                                                                               shard.first_index + hi), device, before))
                    writer.add(block, labels[lo:hi])
                writer.finish()
            bar.update(shard.count)
    world.barrier()
    if not world.is_main:
        return None
    names = [s.name for s in before.shards]
    provenance = dict(before.provenance)
    provenance.setdefault("weights", {})["semvae"] = nets.files["semvae"]
    provenance["semantic"] = f"filled in from the stored DINOv2 features (posterior {options.latent})"
    manifest = finish_dataset(options.out, names, new, num_classes=before.num_classes,
                              plan=dict(provenance.get("parameters") or {}), command=command,
                              source=str(before.provenance.get("source", "")), extra_provenance=provenance,
                              shuffle=before.shuffled, seed=int(before.order.get("seed", 0)),
                              keep_stats={"texture": before.stats["texture"]} if before.stats else None)
    return manifest  # finish_dataset removed the job's records, the fill plan with them


def _semantic_of(nets, block, options, indices, device, manifest) -> dict[str, np.ndarray]:
    """Semantic latents of a block of stored samples, from their stored features (both flips)."""
    out = {}
    for stream, (features, name) in enumerate(((FEATURES, SEMANTIC), (FEATURES_FLIP, SEMANTIC_FLIP))):
        stored = stored_features(block, features, manifest.layout).to(device)
        with _autocast(device):
            posterior = nets.semvae.encode_grid(stored)
        # The same noise streams as a one-pass extraction: (index * 2 + flip), stream 1.
        latent = _latent(posterior, options, indices * 2 + stream, stream=1)
        out[name] = to_storage(latent.float().cpu(), manifest.storage_dtype)
    return out
