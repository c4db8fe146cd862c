"""The shard format: field names, storage dtypes and the byte layout of one sample.

A shard is an ordinary (USTAR) tar file. Each sample is a run of members named
``<key>.<field>`` with ``key = "%09d" % global_index``, always in the order of
:data:`MEMBER_ORDER` (fields a dataset does not have are left out). Every array is
an ``.npy`` file in the dataset's storage dtype; ``cls`` is the class index as
decimal text.

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

FORMAT_NAME = "sfd-composite-latents"
FORMAT_VERSION = 1

TEXTURE = "tex.npy"
TEXTURE_FLIP = "tex_flip.npy"
SEMANTIC = "sem.npy"
SEMANTIC_FLIP = "sem_flip.npy"
LABEL = "cls"
FEATURES = "dino.npy"
FEATURES_FLIP = "dino_flip.npy"

# Latents first and features last: a reader that does not want the features reads
# one short contiguous block per sample, and the non-flipped features follow it
# directly, so the common case is a single contiguous read.
MEMBER_ORDER = (TEXTURE, TEXTURE_FLIP, SEMANTIC, SEMANTIC_FLIP, LABEL, FEATURES, FEATURES_FLIP)
ARRAY_FIELDS = (TEXTURE, TEXTURE_FLIP, SEMANTIC, SEMANTIC_FLIP, FEATURES, FEATURES_FLIP)
REQUIRED_FIELDS = (TEXTURE, TEXTURE_FLIP, SEMANTIC, SEMANTIC_FLIP, LABEL)

# bfloat16 has no numpy dtype: it is stored as its raw 16 bits in a uint16 .npy.
STORAGE_DTYPES = {"float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2")}
TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}

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
    """The .npy (version 1.0) header of a C-ordered array of ``shape``."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf,
        {
            "descr": np.lib.format.dtype_to_descr(STORAGE_DTYPES[storage_dtype]),
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

    @property
    def end(self) -> int:
        return self.offset + self.size


class SampleLayout:
    """Byte layout of one sample, the same for every sample of a dataset.

    Args:
        shapes: ``{field: shape}`` for the array fields present (``cls`` is implied).
        storage_dtype: ``"float16"`` or ``"bfloat16"``.
    """

    def __init__(self, shapes: Mapping[str, Sequence[int]], storage_dtype: str):
        if storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage dtype must be one of {list(STORAGE_DTYPES)}, got {storage_dtype!r}")
        for name in REQUIRED_FIELDS:
            if name != LABEL and name not in shapes:
                raise ValueError(f"field {name!r} is required")
        unknown = set(shapes) - set(ARRAY_FIELDS)
        if unknown:
            raise ValueError(f"unknown fields {sorted(unknown)}")
        self.storage_dtype = storage_dtype
        self.np_dtype = STORAGE_DTYPES[storage_dtype]
        self.shapes = {name: tuple(int(s) for s in shapes[name]) for name in ARRAY_FIELDS if name in shapes}
        members = {}
        offset = 0
        for name in MEMBER_ORDER:
            if name == LABEL:
                header = b""
                payload = BLOCK  # decimal text, at most one block
            elif name in self.shapes:
                header = npy_header(self.shapes[name], storage_dtype)
                payload = int(np.prod(self.shapes[name])) * self.np_dtype.itemsize
            else:
                continue
            size = BLOCK + padded(len(header) + payload)
            members[name] = Member(name, offset, offset + BLOCK + len(header), payload, size, header)
            offset += size
        self.members: dict[str, Member] = members
        self.stride = offset

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(self.members)

    @property
    def latent_block_end(self) -> int:
        """End of the latents and label, the part every read needs."""
        return self.members[LABEL].end

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
            arrays: ``{field: array}`` in the storage dtype, one per array field of the layout.
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
            if arr.shape != self.shapes[m.name] or arr.dtype != self.np_dtype:
                raise ValueError(
                    f"sample {key} field {m.name}: got {arr.dtype}{list(arr.shape)}, "
                    f"expected {self.np_dtype}{list(self.shapes[m.name])}"
                )
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
    """Turns a stored array (float16, or bfloat16 bits as uint16) into a float32 tensor."""
    array = np.ascontiguousarray(array)
    if not array.flags.writeable:  # torch warns about read-only buffers; these are small
        array = array.copy()
    if storage_dtype == "float16":
        return torch.from_numpy(array.view(np.float16)).float()
    if storage_dtype == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16).float()
    raise ValueError(f"unknown storage dtype {storage_dtype!r}")
