"""The shard format: field names, storage dtypes and the byte layout of one sample.

A shard is an ordinary (USTAR) tar file. Each sample is a run of members named
``<key>.<field>`` with ``key = "%09d" % global_index``, always in the order of
:data:`MEMBER_ORDER` (fields a dataset does not have are left out). Every array is
an ``.npy`` file in the dataset's storage dtype; ``cls`` is the class index as
decimal text. The REPA features may instead be stored compact (``dino_storage``
``int8``, see :mod:`.compact`): int8 values, each variant followed by its float32
scales (``dino_scale.npy``, ``dino_flip_scale.npy``).

Because all samples of a dataset have the same fields and shapes, every sample
occupies the same number of bytes and every member sits at the same offset within
it. :class:`SampleLayout` computes those offsets; the manifest records them, and
the reader uses them to fetch samples with ranged reads instead of scanning tars.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from sfd_train.data_pipeline import compact

FORMAT_NAME = "sfd-composite-latents"
FORMAT_VERSION = 1

TEXTURE = "tex.npy"
TEXTURE_FLIP = "tex_flip.npy"
SEMANTIC = "sem.npy"
SEMANTIC_FLIP = "sem_flip.npy"
LABEL = "cls"
FEATURES = "dino.npy"
FEATURES_FLIP = "dino_flip.npy"
FEATURES_SCALE = "dino_scale.npy"
FEATURES_FLIP_SCALE = "dino_flip_scale.npy"
SCALE_OF = {FEATURES: FEATURES_SCALE, FEATURES_FLIP: FEATURES_FLIP_SCALE}
"""The scale member that follows each feature variant in compact (int8) storage."""

# Latents first and features last: a reader that does not want the features reads
# one short contiguous block per sample, and the non-flipped features (with their
# scales, if compact) follow it directly, so the common case is a single contiguous read.
MEMBER_ORDER = (TEXTURE, TEXTURE_FLIP, SEMANTIC, SEMANTIC_FLIP, LABEL, FEATURES, FEATURES_SCALE, FEATURES_FLIP,
                FEATURES_FLIP_SCALE)
ARRAY_FIELDS = (TEXTURE, TEXTURE_FLIP, SEMANTIC, SEMANTIC_FLIP, FEATURES, FEATURES_FLIP)
"""The arrays a dataset describes by shape (scale members follow from the features' shapes)."""
REQUIRED_FIELDS = (TEXTURE, TEXTURE_FLIP, SEMANTIC, SEMANTIC_FLIP, LABEL)

# bfloat16 has no numpy dtype: it is stored as its raw 16 bits in a uint16 .npy.
STORAGE_DTYPES = {"float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2")}
TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
COMPACT = "int8"
DINO_STORAGES = (*STORAGE_DTYPES, COMPACT)
"""How the REPA features may be stored: in the dataset's storage dtype, or compact."""
# numpy dtype of every kind of member: the storage dtypes, compact values and their scales.
FIELD_DTYPES = {**STORAGE_DTYPES, COMPACT: compact.VALUE_DTYPE, "float32": compact.SCALE_DTYPE}

BLOCK = 512
KEY_DIGITS = 9
# Tar headers carry no time so that the same inputs give byte-identical shards.
_MTIME = 0


def sample_key(index: int) -> str:
    """The tar key of the sample with global index ``index``."""
    if not 0 <= index < 10**KEY_DIGITS:
        raise ValueError(f"sample index {index} does not fit {KEY_DIGITS} digits")
    return f"{index:0{KEY_DIGITS}d}"


def padded(size: int) -> int:
    """Bytes a member payload of ``size`` bytes occupies in a tar (512-byte blocks)."""
    return -(-size // BLOCK) * BLOCK


def npy_header(shape: Sequence[int], storage_dtype: str) -> bytes:
    """The .npy (version 1.0) header of a C-ordered array of ``shape`` (``storage_dtype``: a key of
    :data:`FIELD_DTYPES`)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf,
        {
            "descr": np.lib.format.dtype_to_descr(FIELD_DTYPES[storage_dtype]),
            "fortran_order": False,
            "shape": tuple(int(s) for s in shape),
        },
    )
    return buf.getvalue()


def tar_header(name: str, size: int) -> bytes:
    """A 512-byte USTAR header for a regular file (never a PAX extension)."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = _MTIME
    info.mode = 0o644
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


def tar_trailer() -> bytes:
    """The end-of-archive marker: two zero blocks."""
    return bytes(2 * BLOCK)


@dataclass(frozen=True)
class Member:
    """Where one member lies within a sample."""

    name: str
    """Field name (the member's suffix after the key)."""
    offset: int
    """Offset of the member's tar header from the start of the sample."""
    payload_offset: int
    """Offset of the array data (after the tar and .npy headers) from the start of the sample."""
    payload_bytes: int
    """Bytes of array data (for ``cls``: the longest label text that fits)."""
    size: int
    """Bytes the member occupies (header plus padded payload)."""
    npy_header: bytes = b""
    """The exact .npy header every sample carries for this field (empty for ``cls``)."""
    storage: str = ""
    """What the array holds, a key of :data:`FIELD_DTYPES` (empty for ``cls``)."""
    shape: tuple[int, ...] = ()
    """Shape of the array."""

    @property
    def end(self) -> int:
        return self.offset + self.size

    @property
    def dtype(self) -> np.dtype:
        return FIELD_DTYPES[self.storage]


class SampleLayout:
    """Byte layout of one sample, the same for every sample of a dataset.

    Args:
        shapes: ``{field: shape}`` for the array fields present (``cls`` is implied).
        storage_dtype: ``"float16"`` or ``"bfloat16"``.
        dino_storage: how the REPA features are stored: None (or ``storage_dtype``) = like
            the latents; ``"int8"`` = compact, each variant followed by its scale member.
    """

    def __init__(self, shapes: Mapping[str, Sequence[int]], storage_dtype: str, dino_storage: str | None = None):
        if storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage dtype must be one of {list(STORAGE_DTYPES)}, got {storage_dtype!r}")
        dino_storage = storage_dtype if dino_storage is None else dino_storage
        if dino_storage not in (storage_dtype, COMPACT):
            raise ValueError(f"dino_storage must be {storage_dtype!r} (the storage dtype) or {COMPACT!r}, got "
                             f"{dino_storage!r}")
        for name in REQUIRED_FIELDS:
            if name != LABEL and name not in shapes:
                raise ValueError(f"field {name!r} is required")
        unknown = set(shapes) - set(ARRAY_FIELDS)
        if unknown:
            raise ValueError(f"unknown fields {sorted(unknown)}")
        if dino_storage == COMPACT and FEATURES not in shapes:
            raise ValueError(f"dino_storage {COMPACT!r} needs REPA features ({FEATURES}), and there are none")
        self.storage_dtype = storage_dtype
        self.dino_storage = dino_storage
        self.compact = dino_storage == COMPACT
        self.np_dtype = STORAGE_DTYPES[storage_dtype]
        """numpy dtype of the latents (and of the features unless compact)."""
        self.shapes = {name: tuple(int(s) for s in shapes[name]) for name in ARRAY_FIELDS if name in shapes}
        members = {}
        offset = 0
        for name in MEMBER_ORDER:
            shape, storage = self._array(name)
            if name == LABEL:
                header = b""
                payload = BLOCK  # decimal text, at most one block
            elif shape is not None:
                header = npy_header(shape, storage)
                payload = int(np.prod(shape)) * FIELD_DTYPES[storage].itemsize
            else:
                continue
            size = BLOCK + padded(len(header) + payload)
            members[name] = Member(name, offset, offset + BLOCK + len(header), payload, size, header, storage,
                                   shape or ())
            offset += size
        self.members: dict[str, Member] = members
        self.stride = offset

    def _array(self, name: str) -> tuple[tuple[int, ...] | None, str]:
        """``(shape, storage)`` of member ``name``, or ``(None, "")`` if the sample has no such member."""
        if name in self.shapes:
            return self.shapes[name], (self.dino_storage if name in SCALE_OF else self.storage_dtype)
        scaled = next((f for f, s in SCALE_OF.items() if s == name), None)
        if scaled is not None and self.compact and scaled in self.shapes:
            return (compact.scale_length(self.shapes[scaled]),), "float32"
        return None, ""

    @classmethod
    def for_sizes(cls, texture_channels: int, semantic_channels: int, latent_size: int | Sequence[int],
                  feature_dim: int | None, *, flipped_features: bool = True, storage_dtype: str = "float16",
                  dino_storage: str | None = None) -> "SampleLayout":
        """The layout of a dataset of these sizes (all latents with their flips), without any data.

        Args:
            texture_channels, semantic_channels: C_tex and C_sem.
            latent_size: H (= W) or (H, W) of the latents and features.
            feature_dim: D of the REPA features, or None for a dataset without them.
            flipped_features: whether ``dino_flip`` is stored too.
        """
        h, w = (latent_size, latent_size) if isinstance(latent_size, int) else tuple(latent_size)
        shapes = {TEXTURE: (texture_channels, h, w), TEXTURE_FLIP: (texture_channels, h, w),
                  SEMANTIC: (semantic_channels, h, w), SEMANTIC_FLIP: (semantic_channels, h, w)}
        if feature_dim:
            shapes[FEATURES] = (feature_dim, h, w)
            if flipped_features:
                shapes[FEATURES_FLIP] = (feature_dim, h, w)
        return cls(shapes, storage_dtype, dino_storage)

    @property
    def fields(self) -> tuple[str, ...]:
        """Every member of a sample, in order (scale members included)."""
        return tuple(self.members)

    @property
    def array_fields(self) -> tuple[str, ...]:
        """The members that hold arrays (every member but ``cls``), in order."""
        return tuple(name for name in self.members if name != LABEL)

    @property
    def latent_block_end(self) -> int:
        """End of the latents and label, the part every read needs."""
        return self.members[LABEL].end

    def feature_span(self, name: str) -> tuple[int, int]:
        """``(start, end)`` within a sample of feature variant ``name`` with its scales (if compact)."""
        last = self.members[SCALE_OF[name]] if self.compact else self.members[name]
        return self.members[name].offset, last.end

    def shard_bytes(self, count: int) -> int:
        """Size of a shard file holding ``count`` samples."""
        return count * self.stride + 2 * BLOCK

    def to_dict(self) -> dict:
        return {
            "sample_bytes": self.stride,
            "members": {
                m.name: {"offset": m.offset, "payload_offset": m.payload_offset, "payload_bytes": m.payload_bytes}
                for m in self.members.values()
            },
        }

    def check_recorded(self, recorded: Mapping) -> None:
        """Raises ``ValueError`` if a manifest's recorded layout differs from this one."""
        if recorded != self.to_dict():
            raise ValueError(f"recorded layout {recorded} differs from the layout implied by the fields {self.to_dict()}")

    def encode(self, index: int, arrays: Mapping[str, np.ndarray], label: int) -> bytearray:
        """Encodes one sample as its tar members.

        Args:
            index: global sample index (gives the key).
            arrays: ``{field: array}`` as stored (see :func:`to_stored_arrays`), one per member of
                :attr:`array_fields`.
            label: class index.

        Returns:
            ``stride`` bytes: the sample's members, headers and padding included.
        """
        key = sample_key(index)
        buf = bytearray(self.stride)  # zeroed: the tar padding must be NUL bytes
        for m in self.members.values():
            if m.name == LABEL:
                data = str(int(label)).encode()
                buf[m.offset : m.offset + BLOCK] = tar_header(f"{key}.{m.name}", len(data))
                buf[m.offset + BLOCK : m.offset + BLOCK + len(data)] = data
                continue
            arr = arrays[m.name]
            if arr.shape != m.shape or arr.dtype != m.dtype:
                raise ValueError(f"sample {key} field {m.name}: got {arr.dtype}{list(arr.shape)}, "
                                 f"expected {m.dtype}{list(m.shape)}")
            buf[m.offset : m.offset + BLOCK] = tar_header(f"{key}.{m.name}", len(m.npy_header) + m.payload_bytes)
            start = m.offset + BLOCK
            buf[start : start + len(m.npy_header)] = m.npy_header
            buf[m.payload_offset : m.payload_offset + m.payload_bytes] = np.ascontiguousarray(arr).tobytes()
        return buf


def member_name_in_header(header: bytes | memoryview) -> bytes:
    """The member name stored in a 512-byte tar header (NUL padding removed)."""
    return bytes(header[:100]).split(b"\0", 1)[0]


def to_storage(array: np.ndarray | torch.Tensor, storage_dtype: str) -> np.ndarray:
    """Converts an array or tensor to the numpy array stored in a shard.

    float16 storage rounds to nearest; values beyond float16's range raise rather
    than silently becoming inf. bfloat16 storage keeps the 16 raw bits as uint16.
    """
    t = torch.as_tensor(array) if not isinstance(array, torch.Tensor) else array
    t = t.detach().cpu()
    if storage_dtype == "float16":
        if t.dtype == torch.bfloat16 or (t.dtype.is_floating_point and t.dtype != torch.float16):
            finite_in = torch.isfinite(t)
            out = t.to(torch.float16)
            if bool((finite_in & ~torch.isfinite(out)).any()):
                raise ValueError("values exceed the float16 range; store as bfloat16 instead")
            t = out
        elif t.dtype != torch.float16:
            t = t.to(torch.float16)
        return t.contiguous().numpy().astype("<f2", copy=False)
    if storage_dtype == "bfloat16":
        if t.dtype != torch.bfloat16:
            t = t.to(torch.bfloat16)
        return t.contiguous().view(torch.int16).numpy().view("<u2")
    raise ValueError(f"unknown storage dtype {storage_dtype!r}")


def from_storage(array: np.ndarray, storage_dtype: str) -> torch.Tensor:
    """Turns a stored array (float16, or bfloat16 bits as uint16) into a float32 tensor.

    ``storage_dtype`` may also be ``"int8"`` (compact values, returned unscaled; see
    :func:`stored_features`) or ``"float32"`` (their scales).
    """
    array = np.ascontiguousarray(array)
    if not array.flags.writeable:  # torch warns about read-only buffers; these are small
        array = array.copy()
    if storage_dtype == "float16":
        return torch.from_numpy(array.view(np.float16)).float()
    if storage_dtype == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16).float()
    if storage_dtype in (COMPACT, "float32"):
        return torch.from_numpy(array.view(FIELD_DTYPES[storage_dtype])).float()
    raise ValueError(f"unknown storage dtype {storage_dtype!r}")


def to_stored_arrays(values: Mapping[str, np.ndarray | torch.Tensor], storage_dtype: str,
                     dino_storage: str | None = None) -> dict[str, np.ndarray]:
    """Every field of a batch as a shard stores it (what a writer source returns).

    Args:
        values: ``{field: (B, ...)}`` float arrays or tensors, fields of :data:`ARRAY_FIELDS`.
        storage_dtype: the dataset's storage dtype.
        dino_storage: None (like the latents) or ``"int8"``: the features are then quantised
            (:func:`.compact.quantize`) and each variant's scale member is added.
    """
    out = {}
    for name, value in values.items():
        if name in SCALE_OF and dino_storage == COMPACT:
            out[name], out[SCALE_OF[name]] = compact.quantize(value)
        else:
            out[name] = to_storage(value, storage_dtype)
    return out


def stored_features(arrays: Mapping[str, np.ndarray], name: str, layout: SampleLayout) -> torch.Tensor:
    """Feature variant ``name`` (``dino.npy`` or ``dino_flip.npy``) of stored arrays (B, D, H, W), as
    float32 features: converted, or dequantised when the layout stores them compact."""
    if layout.compact:
        return compact.dequantize(arrays[name], arrays[SCALE_OF[name]])
    return from_storage(arrays[name], layout.storage_dtype)
