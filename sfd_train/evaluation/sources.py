"""What ``sfd-eval`` compares: image sets and statistics, read in batches.

A SAMPLES or REFERENCE argument is one of:

* an ``.npz`` with ``arr_0`` (N x H x W x 3 uint8, ADM's layout), read in batches straight from
  the archive (50,000 images at 256 px are 9.8 GB; they never have to fit in memory);
* an ``.npz`` with ``mu`` and ``sigma`` (ADM's reference batches also hold ``mu_s``/``sigma_s``):
  used through those statistics, no images needed;
* a folder of images (PNG/JPEG, read in sorted order, all of the same size);
* an ``sfd-sample`` output folder (its ``samples.npz``).
"""

from __future__ import annotations

import contextlib
import os
import zipfile
from dataclasses import dataclass
from typing import Iterator

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
SAMPLES_FILE = "samples.npz"


class EvalInputError(ValueError):
    """An input of the evaluation is unusable; the message names the file and what is wrong."""


@dataclass
class ImageSet:
    """Images to compute features of."""

    path: str
    count: int
    shape: tuple[int, int, int]

    def batches(self, batch_size: int, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]:
        raise NotImplementedError


@dataclass
class StatsOnly:
    """Precomputed statistics (``mu``, ``sigma``; ``mu_s``, ``sigma_s`` when present)."""

    path: str
    arrays: dict[str, np.ndarray]


class _NpzImages(ImageSet):
    """``arr_0`` of an npz, streamed from the zip member without loading it whole."""

    def __init__(self, path: str, offset_reader):
        self._open, header = offset_reader
        shape, dtype = header
        _check_images(path, shape, dtype)
        super().__init__(path, int(shape[0]), tuple(int(s) for s in shape[1:]))

    def batches(self, batch_size: int, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]:
        stop = self.count if stop is None else min(stop, self.count)
        item = int(np.prod(self.shape))
        with self._open() as member:
            member.seek(member.tell() + start * item)
            for lo in range(start, stop, batch_size):
                n = min(batch_size, stop - lo)
                data = member.read(n * item)
                if len(data) != n * item:
                    raise EvalInputError(f"{self.path}: arr_0 ends early (image {lo + len(data) // item} of {self.count})")
                batch = np.frombuffer(data, dtype=np.uint8).reshape(n, *self.shape)
                yield batch


class _FolderImages(ImageSet):
    def __init__(self, path: str, files: list[str], shape: tuple[int, int, int]):
        super().__init__(path, len(files), shape)
        self.files = files

    def batches(self, batch_size: int, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]:
        from PIL import Image

        stop = self.count if stop is None else min(stop, self.count)
        for lo in range(start, stop, batch_size):
            batch = []
            for name in self.files[lo:min(lo + batch_size, stop)]:
                with Image.open(name) as image:
                    array = np.asarray(image.convert("RGB"))
                if array.shape != self.shape:
                    raise EvalInputError(f"{name}: {array.shape[1]}x{array.shape[0]} pixels, the first image of "
                                         f"{self.path} has {self.shape[1]}x{self.shape[0]}; all must have the same size")
                batch.append(array)
            yield np.stack(batch)


def _check_images(path: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
    if dtype != np.uint8:
        raise EvalInputError(f"{path}: arr_0 is {dtype}, expected uint8 images in [0, 255] (N x H x W x 3); "
                             "convert floats with (x * 255).round().clip(0, 255).astype(np.uint8)")
    if len(shape) != 4 or shape[-1] != 3:
        raise EvalInputError(f"{path}: arr_0 has shape {tuple(shape)}, expected N x H x W x 3 (NHWC, RGB)")
    if shape[0] == 0:
        raise EvalInputError(f"{path}: arr_0 holds no images")


def _read_header(member) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(member)
    read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read is None:
        raise EvalInputError(f"unsupported .npy version {version}")
    return read(member)


def _npz_member(path: str, name: str):
    """``(opener, (shape, dtype))`` of member ``name``.npy of an npz; the opener yields the member
    positioned at the first byte of the data."""

    @contextlib.contextmanager
    def open_member():
        with zipfile.ZipFile(path) as archive, archive.open(f"{name}.npy") as member:
            _read_header(member)
            yield member

    with zipfile.ZipFile(path) as archive, archive.open(f"{name}.npy") as member:
        shape, fortran, dtype = _read_header(member)
    if fortran:
        raise EvalInputError(f"{path}: {name} is stored in Fortran order; save it with np.savez")
    return open_member, (shape, dtype)


def open_input(path: str) -> ImageSet | StatsOnly:
    """The image set or statistics at ``path`` (see the module docstring).

    Raises:
        EvalInputError: missing, or none of the accepted forms (names what was found).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, SAMPLES_FILE)):
            return open_input(os.path.join(path, SAMPLES_FILE))
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_SUFFIXES))
        if not files:
            raise EvalInputError(f"{path}: a folder with neither {SAMPLES_FILE} nor images ({', '.join(IMAGE_SUFFIXES)})")
        from PIL import Image

        with Image.open(files[0]) as first:
            shape = (first.height, first.width, 3)
        return _FolderImages(path, files, shape)
    if not os.path.isfile(path):
        raise EvalInputError(f"{path}: no such file or folder")
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n.removesuffix(".npy") for n in archive.namelist()]
    except zipfile.BadZipFile:
        raise EvalInputError(f"{path}: not an .npz file (nor a folder of images)") from None
    if "mu" in names and "sigma" in names:
        with np.load(path) as data:
            return StatsOnly(path, {k: data[k] for k in ("mu", "sigma", "mu_s", "sigma_s") if k in data})
    member = _npz_member(path, "arr_0") if "arr_0" in names else None
    if member is None:
        raise EvalInputError(f"{path}: holds neither arr_0 (images) nor mu and sigma (statistics); it has "
                             f"{', '.join(names) or 'nothing'}")
    return _NpzImages(path, member)


def write_samples_npz(path: str, images: np.ndarray, labels: np.ndarray | None = None) -> None:
    """ADM's layout: ``arr_0`` (N x H x W x 3 uint8) and ``labels``, written atomically."""
    tmp = f"{path}.tmp.npz"
    arrays = {"arr_0": images} if labels is None else {"arr_0": images, "labels": labels}
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
