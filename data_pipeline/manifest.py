"""The dataset manifest (``manifest.json`` beside the shards): schema, reading, writing.

The manifest is the public description of a dataset; ``docs/data.md`` shows an
example. It is written last, atomically, so a folder with a manifest is complete.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from sfd_train.data_pipeline.errors import ManifestError
from sfd_train.data_pipeline.format import (
    COMPACT,
    DINO_STORAGES,
    FEATURES,
    FEATURES_FLIP,
    FORMAT_NAME,
    FORMAT_VERSION,
    LABEL,
    SCALE_OF,
    SEMANTIC,
    STORAGE_DTYPES,
    TEXTURE,
    SampleLayout,
)
from sfd_train.data_pipeline.storage import Storage

MANIFEST_NAME = "manifest.json"
PARTS = ("texture", "semantic")


@dataclass(frozen=True)
class ShardInfo:
    name: str
    """File name relative to the dataset folder."""
    count: int
    """Samples in the shard."""
    first_index: int
    """Global index of its first sample (samples are numbered consecutively across shards)."""
    bytes: int
    """File size."""
    sha256: str = ""
    """Hex digest of the file (checked by ``sfd-data inspect``)."""


@dataclass(frozen=True)
class Manifest:
    """A parsed, validated manifest. Build one with :func:`read_manifest` or :meth:`from_dict`."""

    num_samples: int
    num_classes: int
    storage_dtype: str
    shapes: dict[str, tuple[int, ...]]
    """``{field: shape}`` of the array fields present."""
    shards: tuple[ShardInfo, ...]
    stats: dict[str, dict[str, list[float]]] | None
    """``{"texture"|"semantic": {"mean": [...], "std": [...]}}`` per channel, or None if not computed."""
    order: dict[str, Any] = field(default_factory=dict)
    """How samples were ordered on writing: ``{"shuffled": bool, "seed": int}``."""
    provenance: dict[str, Any] = field(default_factory=dict)
    shard_pattern: str = ""
    stats_source: str = ""
    dino_storage: str | None = None
    """How the REPA features are stored: the storage dtype (also what None becomes) or ``"int8"``."""

    def __post_init__(self):
        if self.dino_storage is None:
            object.__setattr__(self, "dino_storage", self.storage_dtype)

    @functools.cached_property
    def layout(self) -> SampleLayout:
        return SampleLayout(self.shapes, self.storage_dtype, self.dino_storage)

    @property
    def texture_channels(self) -> int:
        return self.shapes[TEXTURE][0]

    @property
    def semantic_channels(self) -> int:
        return self.shapes[SEMANTIC][0]

    @property
    def channels(self) -> tuple[int, int]:
        return self.texture_channels, self.semantic_channels

    @property
    def latent_size(self) -> tuple[int, int]:
        return tuple(self.shapes[TEXTURE][1:])  # type: ignore[return-value]

    @property
    def feature_dim(self) -> int | None:
        return self.shapes[FEATURES][0] if FEATURES in self.shapes else None

    @property
    def has_flipped_features(self) -> bool:
        return FEATURES_FLIP in self.shapes

    @property
    def shuffled(self) -> bool:
        return bool(self.order.get("shuffled", False))

    def stats_tensors(self, part: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, std)`` of ``part`` as float32 tensors of shape (C, 1, 1)."""
        if self.stats is None or part not in self.stats:
            raise ManifestError(f"the manifest has no '{part}' statistics; run `sfd-data stats DIR --write`")
        s = self.stats[part]
        mean = torch.tensor(s["mean"], dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(s["std"], dtype=torch.float32).view(-1, 1, 1)
        return mean, std

    def to_dict(self) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        for name, m in self.layout.members.items():
            if name == LABEL:
                continue
            fields[name] = {"shape": list(m.shape), "dtype": m.storage, "npy_dtype": m.dtype.str}
            if self.layout.compact and name in SCALE_OF:
                fields[name]["scales"] = SCALE_OF[name]
            elif m.storage == "float32":
                fields[name]["encoding"] = "per-channel scales (D), then per-token scales (H*W, row-major)"
        fields[LABEL] = {"dtype": "int64", "encoding": "decimal text"}
        stats = None
        if self.stats is not None:
            stats = {part: {"mean": list(map(float, v["mean"])), "std": list(map(float, v["std"]))} for part, v in self.stats.items()}
            stats["source"] = self.stats_source
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "num_samples": self.num_samples,
            "num_classes": self.num_classes,
            "storage_dtype": self.storage_dtype,
            **({"dino_storage": self.dino_storage} if self.feature_dim is not None else {}),
            "fields": fields,
            "channels": {"texture": self.texture_channels, "semantic": self.semantic_channels, "features": self.feature_dim},
            "stats": stats,
            "order": dict(self.order),
            "shard_pattern": self.shard_pattern,
            "shards": [vars(s).copy() for s in self.shards],
            "layout": self.layout.to_dict(),
            "provenance": dict(self.provenance),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Manifest":
        """Parses and validates a manifest dictionary.

        Raises:
            ManifestError: naming the first key that is missing or inconsistent.
        """
        try:
            return cls._from_dict(data)
        except ManifestError:
            raise
        except (KeyError, TypeError, ValueError) as err:
            raise ManifestError(f"malformed manifest: {err!r}") from None

    @classmethod
    def _from_dict(cls, data: Mapping[str, Any]) -> "Manifest":
        if data.get("format") != FORMAT_NAME:
            raise ManifestError(f"not an {FORMAT_NAME} manifest (format={data.get('format')!r})")
        if data.get("format_version") != FORMAT_VERSION:
            raise ManifestError(f"format_version {data.get('format_version')!r} is not supported (this reader knows {FORMAT_VERSION})")
        dtype = data["storage_dtype"]
        if dtype not in STORAGE_DTYPES:
            raise ManifestError(f"storage_dtype must be one of {list(STORAGE_DTYPES)}, got {dtype!r}")
        # Manifests from before compact features have no dino_storage: their features are in the storage dtype.
        dino_storage = data.get("dino_storage", dtype)
        if dino_storage not in (dtype, COMPACT):
            raise ManifestError(f"dino_storage must be {dtype!r} (the storage_dtype) or {COMPACT!r}, got "
                                f"{dino_storage!r} (known values: {list(DINO_STORAGES)})")
        shapes = {}
        scale_members = set(SCALE_OF.values())
        for name, spec in data["fields"].items():
            if name == LABEL or name in scale_members:
                continue  # scale members follow from the features' shapes; the layout check covers them
            expected = dino_storage if name in SCALE_OF else dtype
            if spec.get("dtype") != expected:
                raise ManifestError(f"field {name} has dtype {spec.get('dtype')!r}, the dataset stores {expected!r}")
            shapes[name] = tuple(int(s) for s in spec["shape"])
        if LABEL not in data["fields"]:
            raise ManifestError("the manifest has no 'cls' field")
        try:
            layout = SampleLayout(shapes, dtype, dino_storage)
        except ValueError as err:
            raise ManifestError(str(err)) from None
        listed = {name for name in data["fields"] if name in scale_members}
        implied = {name for name in layout.fields if name in scale_members}
        if listed != implied:
            raise ManifestError(f"fields list the scale members {sorted(listed)}, dino_storage {dino_storage!r} "
                                f"implies {sorted(implied)}")
        spatial = {shape[1:] for shape in shapes.values()}
        if len(spatial) != 1 or any(len(s) != 3 for s in shapes.values()):
            raise ManifestError(f"all fields must be (C, H, W) with the same H, W; got {shapes}")
        if "layout" in data:
            try:
                layout.check_recorded(data["layout"])
            except ValueError as err:
                raise ManifestError(str(err)) from None
        shards = tuple(ShardInfo(**s) for s in data["shards"])
        manifest = cls(
            num_samples=int(data["num_samples"]),
            num_classes=int(data["num_classes"]),
            storage_dtype=dtype,
            shapes=shapes,
            shards=shards,
            stats=_parse_stats(data.get("stats"), shapes),
            order=dict(data.get("order") or {}),
            provenance=dict(data.get("provenance") or {}),
            shard_pattern=str(data.get("shard_pattern", "")),
            stats_source=str((data.get("stats") or {}).get("source", "")),
            dino_storage=dino_storage,
        )
        manifest.validate()
        return manifest

    def validate(self) -> None:
        """Checks the manifest's internal consistency (not the shards; see the reader and ``inspect``)."""
        total = 0
        layout = self.layout
        for s in self.shards:
            if s.first_index != total:
                raise ManifestError(f"shard {s.name}: first_index {s.first_index}, expected {total} (shards must be consecutive)")
            if s.count <= 0:
                raise ManifestError(f"shard {s.name}: count must be positive, got {s.count}")
            if s.bytes != layout.shard_bytes(s.count):
                raise ManifestError(f"shard {s.name}: {s.bytes} bytes recorded, {layout.shard_bytes(s.count)} implied by count and layout")
            total += s.count
        if total != self.num_samples:
            raise ManifestError(f"shard counts add up to {total}, num_samples is {self.num_samples}")
        if len({s.name for s in self.shards}) != len(self.shards):
            raise ManifestError("shard names are not unique")
        if self.num_classes <= 0:
            raise ManifestError(f"num_classes must be positive, got {self.num_classes}")
        if self.shard_pattern and expand_braces(self.shard_pattern) != [s.name for s in self.shards]:
            raise ManifestError(f"shard_pattern {self.shard_pattern!r} does not list the shards")


def _parse_stats(stats: Mapping[str, Any] | None, shapes: Mapping[str, Sequence[int]]):
    if stats is None:
        return None
    out = {}
    for part, name in (("texture", TEXTURE), ("semantic", SEMANTIC)):
        if part not in stats:
            raise ManifestError(f"stats has no '{part}' entry")
        mean, std = [float(v) for v in stats[part]["mean"]], [float(v) for v in stats[part]["std"]]
        if len(mean) != shapes[name][0] or len(std) != shapes[name][0]:
            raise ManifestError(f"stats.{part}: {len(mean)} means / {len(std)} stds for {shapes[name][0]} channels")
        if not all(s > 0 for s in std):
            raise ManifestError(f"stats.{part}.std must be positive")
        out[part] = {"mean": mean, "std": std}
    return out


def expand_braces(pattern: str) -> list[str]:
    """Expands ``train-{000000..000003}.tar`` (and ``{a,b}``) into file names."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    head, tail, body = pattern[: m.start()], pattern[m.end() :], m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.groups()
        items = [f"{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [name for item in items for name in expand_braces(head + item + tail)]


def brace_pattern(prefix: str, count: int, suffix: str = ".tar", digits: int = 6) -> str:
    """``prefix{000000..00000N}suffix`` for ``count`` shards."""
    if count == 1:
        return f"{prefix}{0:0{digits}d}{suffix}"
    return f"{prefix}{{{0:0{digits}d}..{count - 1:0{digits}d}}}{suffix}"


def _split(path: str) -> tuple[str, str]:
    path = str(path).rstrip("/")
    if path.endswith(".json"):
        root, _, name = path.rpartition("/")
        return root, name
    return path, MANIFEST_NAME


def read_manifest(path: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> Manifest:
    """Reads and validates the manifest of a dataset.

    Args:
        path: the dataset folder or URL (``manifest.json`` inside it is read), or
            the manifest file itself.
        storage_options: fsspec options for URLs.

    Returns:
        The :class:`Manifest`.

    Raises:
        ManifestError: no manifest, not valid JSON, or an inconsistent one.
    """
    root, name = _split(str(path))
    storage = Storage(root, storage_options)
    try:
        raw = storage.read_bytes(name)
    except FileNotFoundError:
        raise ManifestError(f"no {name} in {root!r}: not a dataset written by sfd-data") from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ManifestError(f"{storage.path(name)} is not valid JSON: {err}") from None
    return Manifest.from_dict(data)


def write_manifest(manifest: Manifest, folder: str | os.PathLike) -> str:
    """Writes ``manifest.json`` into a local folder atomically; returns its path."""
    manifest.validate()
    path = os.path.join(folder, MANIFEST_NAME)
    tmp = f"{path}.tmp-{os.getpid()}"
    text = json.dumps(manifest.to_dict(), indent=1)
    # Lists of numbers (shapes, statistics) on one line each keeps the file readable.
    text = re.sub(r"\[\s+([-+0-9.eE,\s]+?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    os.replace(tmp, path)
    return path
