"""Source images for ``sfd-data extract``: listing, validation and decoding.

Three kinds of SOURCE give a deterministic list of items (an image and its integer label):

* an **image folder** with one sub-folder per class, listed exactly as torchvision's
  ``ImageFolder`` lists it: classes are the sorted sub-folder names (labels 0..K-1); within a
  class, the folders found by walking it recursively (following symbolic links) in sorted path
  order, and in each the files in sorted name order whose lower-cased name ends in one of
  :data:`IMAGE_EXTENSIONS`. Other files are counted per extension in ``ignored``.
* a **list file** (``*.txt`` / ``*.lst``): one ``PATH LABEL`` per line (a path relative to the
  list file's folder unless absolute; label an integer >= 0; blank lines and ``#`` comments
  ignored).
* **WebDataset tar shards**: one ``.tar`` or a brace pattern (``data/train-{000000..000009}.tar``),
  local or ``s3://...``. Members are grouped into samples as ``webdataset.WebDataset`` groups
  them (tests/test_images.py checks the two agree): a sample is a run of consecutive members
  sharing a key (the member name up to the first dot of its base name); the extension after
  that dot is compared in lower case; members whose base name has no such dot are not part of
  any sample. A sample's image is the member with an image extension, its label the ``cls``
  member (decimal text). The byte offset and size of each image's data in its tar are recorded
  while listing, so that one image is later read by a single ranged read. (WebDataset's own
  reader is not used here: it reads every byte of a shard, where listing reads the headers only.)

The number of classes is the number of class folders for a folder, ``max(label) + 1`` otherwise.

Public API::

    list_images(source: str, storage_options: dict | None = None, *, on_bad_sample: str = "error") -> ImageListing
    read_image(item: ImageItem, storage: Storage) -> PIL.Image.Image     # RGB, fully decoded
    load_crop_pair(item: ImageItem, size: int, storage: Storage) -> np.ndarray   # uint8 (2, size, size, 3)
    scan_images(items: ImageItems, storage: Storage, *, workers: int = 0, progress: bool = False) -> ScanResult
    write_report(path: str, listing: ImageListing, scan: ScanResult | None) -> dict

``listing.items`` is an :class:`ImageItems`: a compact, picklable sequence (names in one byte
string, labels and tar offsets in numpy arrays) whose elements are :class:`ImageItem` records;
``listing.storage()`` is the :class:`~sfd_train.data_pipeline.storage.Storage` that reads them
(its root is ``listing.root``, under which every item lies).

An image that cannot be used raises :class:`BadImage` (its message names the file, or
``tarpath:member``, and the reason): a missing, empty, unreadable or non-image file, a directory,
a broken symbolic link, truncated or corrupt data. Everything Pillow can convert is converted
exactly as ``Image.open(f).convert("RGB")`` does -- the authors' loader -- including grayscale,
palette, CMYK, RGBA and 16-bit images; images smaller than the crop are upsampled by the crop.
Pillow's ``LOAD_TRUNCATED_IMAGES`` is never set: a truncated file is an error, not grey pixels.
"""

from __future__ import annotations

import concurrent.futures as cf
import io
import json
import multiprocessing as mp
import os
import posixpath
import sys
import tarfile
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from sfd_train.data_pipeline.credentials import credential_keys, how_to_give_credentials
from sfd_train.data_pipeline.errors import DataError
from sfd_train.data_pipeline.storage import Storage, is_url, url_output_error

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
"""Extensions (lower case) of image files in a folder or a tar sample: torchvision's ``IMG_EXTENSIONS``."""

LIST_SUFFIXES = (".txt", ".lst")
LABEL_FIELD = "cls"
_NO_EXTENSION = "(none)"


class BadImage(DataError):
    """An image that cannot be used; the message names the file (or ``tarpath:member``) and the reason."""

    def __init__(self, locator: str, reason: str):
        self.locator = locator
        self.reason = reason
        super().__init__(f"bad image '{locator}': {reason}")

    def __reduce__(self):
        # Keeps the fields when the error crosses from a worker process.
        return (type(self), (self.locator, self.reason))


# --------------------------------------------------------------------------------------------
# Items


def _join(root: str, name: str) -> str:
    """``root/name`` spelled the way :meth:`Storage.path` spells it."""
    return f"{root}/{name}" if root else name


@dataclass(frozen=True)
class ImageItem:
    """One image: a file, or the data of a member of a tar shard, and its label."""

    root: str
    """The listing's root (folder or URL); ``name`` is relative to it."""
    name: str
    """The image file, or the tar shard, relative to ``root``."""
    label: int
    member: str | None = None
    """The member's name inside the tar shard; None for a plain file."""
    offset: int = -1
    """Byte offset of the member's data in the tar shard (tars only)."""
    size: int = -1
    """Byte size of the member's data (tars only)."""

    @property
    def path(self) -> str:
        """The full path or URL of the file (of the tar shard for a tar member)."""
        return _join(self.root, self.name)

    @property
    def locator(self) -> str:
        """What names the image in messages: the file's path, or ``tarpath:member``."""
        return self.path if self.member is None else f"{self.path}:{self.member}"


class _Strings:
    """Many short strings in one UTF-8 byte string plus an array of end offsets.

    ImageNet's 1.28M relative paths take about 40 MB this way (a Python list of str would
    take about 120 MB) and pickle as two objects, which matters when the listing is sent to
    worker processes or other ranks.
    """

    def __init__(self, strings: Sequence[str]):
        encoded = [s.encode("utf-8") for s in strings]
        self.blob = b"".join(encoded)
        self.ends = np.cumsum(np.fromiter((len(e) for e in encoded), dtype=np.int64, count=len(encoded)))

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, i: int) -> str:
        start = int(self.ends[i - 1]) if i > 0 else 0
        return self.blob[start : int(self.ends[i])].decode("utf-8")

    def take(self, indices: np.ndarray) -> _Strings:
        return _Strings([self[int(i)] for i in indices])


class ImageItems(Sequence[ImageItem]):
    """The items of a listing: a compact, picklable sequence of :class:`ImageItem`.

    ``items[i]`` is an :class:`ImageItem`; ``items[a:b]`` and :meth:`take` give another
    ``ImageItems`` (e.g. one rank's share), and ``labels`` is an int64 array.

    Args:
        root: the folder or URL all items lie under.
        names: per item, the file relative to ``root`` (files), or the tar member name (tars).
        labels: per item, the label.
        shards: for tars, the shard files relative to ``root``; None for files.
        shard_index, offsets, sizes: for tars, per item the shard (index into ``shards``)
            and the offset and size of the member's data in it.
    """

    def __init__(self, root: str, names: Sequence[str] | _Strings, labels: Sequence[int] | np.ndarray, *,
                 shards: Sequence[str] | None = None, shard_index: Sequence[int] | np.ndarray | None = None,
                 offsets: Sequence[int] | np.ndarray | None = None, sizes: Sequence[int] | np.ndarray | None = None):
        self.root = root
        self.names = names if isinstance(names, _Strings) else _Strings(names)
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        self.shards = list(shards) if shards is not None else None
        if self.shards is not None:
            self.shard_index = np.asarray(shard_index, dtype=np.int32).reshape(-1)
            self.offsets = np.asarray(offsets, dtype=np.int64).reshape(-1)
            self.sizes = np.asarray(sizes, dtype=np.int64).reshape(-1)
        else:
            self.shard_index = self.offsets = self.sizes = None
        per_item = [self.names] + ([self.shard_index, self.offsets, self.sizes] if self.shards is not None else [])
        if any(len(values) != len(self.labels) for values in per_item):
            raise ValueError("ImageItems: the per-item fields differ in length")

    @property
    def is_tar(self) -> bool:
        return self.shards is not None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.take(np.arange(len(self))[index])
        i = int(index)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"item {index} of {len(self)}")
        if not self.is_tar:
            return ImageItem(self.root, self.names[i], int(self.labels[i]))
        return ImageItem(self.root, self.shards[int(self.shard_index[i])], int(self.labels[i]), member=self.names[i],
                         offset=int(self.offsets[i]), size=int(self.sizes[i]))

    def __iter__(self) -> Iterator[ImageItem]:
        for i in range(len(self)):
            yield self[i]

    def take(self, indices: Sequence[int] | np.ndarray) -> ImageItems:
        """The items at ``indices``, in that order."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if not self.is_tar:
            return ImageItems(self.root, self.names.take(idx), self.labels[idx])
        return ImageItems(self.root, self.names.take(idx), self.labels[idx], shards=self.shards,
                          shard_index=self.shard_index[idx], offsets=self.offsets[idx], sizes=self.sizes[idx])


@dataclass
class ImageListing:
    """What :func:`list_images` found."""

    source: str
    """SOURCE as given."""
    kind: str
    """``folder``, ``list`` or ``tar``."""
    root: str
    """The folder or URL every item lies under (the root of :meth:`storage`)."""
    items: ImageItems
    num_classes: int
    description: str
    """One line for provenance."""
    ignored: dict[str, int] = field(default_factory=dict)
    """Files (or tar members) that are not images or labels, counted by lower-cased extension."""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """Tar samples left out with ``on_bad_sample="skip"``: ``(tarpath:key, reason)``."""
    classes: list[str] | None = None
    """The class folder names (folders only): ``classes[label]``."""
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)

    def storage(self) -> Storage:
        """A :class:`Storage` that reads the items (picklable; each process opens its own handles)."""
        return Storage(self.root, self.storage_options)


@dataclass
class ScanResult:
    """What :func:`scan_images` found, in item order."""

    total: int
    good: np.ndarray
    """int64 indices of the usable items."""
    bad_indices: np.ndarray
    """int64 indices of the bad items."""
    bad: list[tuple[str, str]]
    """``(locator, reason)`` of each bad item, in the order of ``bad_indices``."""


# --------------------------------------------------------------------------------------------
# Listing


def list_images(source: str, storage_options: dict[str, Any] | None = None, *, on_bad_sample: str = "error") -> ImageListing:
    """Lists the images of SOURCE: an image folder, a list file or WebDataset tar shards.

    Args:
        source: a folder with one sub-folder per class; a ``*.txt``/``*.lst`` list file; a
            ``.tar`` or a brace pattern of them (local or a URL such as ``s3://bucket/x-{0..9}.tar``).
        storage_options: fsspec options for URLs (an endpoint, ``anon``, ...). Credentials are
            refused: they come from the environment or the AWS configuration.
        on_bad_sample: for tar shards, what a sample without an image or a valid ``cls`` does:
            ``error`` raises, ``skip`` leaves it out and records it in ``skipped``.

    Returns:
        The :class:`ImageListing`.

    Raises:
        DataError: the source is missing, empty, malformed or not recognised.
    """
    if on_bad_sample not in ("error", "skip"):
        raise ValueError(f"on_bad_sample must be 'error' or 'skip', not {on_bad_sample!r}")
    options = dict(storage_options or {})
    found = credential_keys(options)
    if found:
        raise DataError(f"storage option {found[0]} looks like a credential, which must not be given here; "
                        + how_to_give_credentials("AWS_PROFILE"))
    source = str(source)
    if source.startswith("file://"):
        source = source[len("file://") :]
    lowered = source.lower()
    if lowered.endswith(LIST_SUFFIXES):
        listing = _list_file(source, options)
    elif lowered.endswith(".tar"):
        listing = _list_tars(source, options, on_bad_sample)
    elif is_url(source):
        raise DataError(f"{source}: image folders are read from a local (or mounted) filesystem only; on object "
                        "storage, give a list file (*.txt, *.lst) or WebDataset tar shards (*.tar)")
    elif os.path.isdir(source):
        listing = _list_folder(source)
    elif not os.path.exists(source):
        raise DataError(f"{source}: no such folder or file")
    else:
        raise DataError(f"{source}: not an image folder, a list file (*.txt, *.lst) or tar shards (*.tar)")
    if not len(listing.items):
        raise DataError(f"{source}: no images found")
    return listing


def _extension(name: str) -> str:
    """The lower-cased extension of a file name, for the ``ignored`` counts."""
    return os.path.splitext(name)[1].lower() or _NO_EXTENSION


def _is_image_name(name: str) -> bool:
    # torchvision's has_file_allowed_extension: a plain suffix test on the lower-cased name.
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _scan_dir(path: str) -> tuple[list[str], list[str]]:
    """The sub-folder and file names in ``path`` (symbolic links followed, as ``os.walk`` does)."""
    dirs, files = [], []
    try:
        with os.scandir(path) as it:
            for entry in it:
                try:
                    is_dir = entry.is_dir()
                except OSError:
                    is_dir = False
                (dirs if is_dir else files).append(entry.name)
    except OSError as err:
        # os.walk would skip an unreadable folder silently, dropping its images from the dataset.
        raise DataError(f"{path}: cannot list the folder: {err.strerror or err}") from err
    return dirs, files


def _walk_class(root: str, class_name: str) -> list[tuple[str, list[str]]]:
    """``(folder relative to root, its file names)`` for every folder under one class folder.

    Sorted like ``sorted(os.walk(class_folder, followlinks=True))``, i.e. by the folders' path
    strings, which is what ImageFolder does. A symbolic link back to a folder being walked
    would make ``os.walk`` descend until paths get too long; it is an error here.
    """
    found: list[tuple[str, list[str]]] = []

    def visit(rel: str, ancestors: frozenset[str]) -> None:
        full = os.path.join(root, rel)
        real = os.path.realpath(full)
        if real in ancestors:
            raise DataError(f"{full}: symbolic link loop (the folder contains itself)")
        dirs, files = _scan_dir(full)
        found.append((rel, files))
        for name in dirs:
            visit(os.path.join(rel, name), ancestors | {real})

    visit(class_name, frozenset())
    # Sorting the full paths sorts the same as os.walk's tuples (the folder paths are unique).
    found.sort(key=lambda entry: os.path.join(root, entry[0]))
    return found


def _list_folder(source: str) -> ImageListing:
    """An ImageFolder-style tree: one sub-folder per class."""
    root = os.path.abspath(source)
    dirs, top_files = _scan_dir(root)
    classes = sorted(dirs)
    if not classes:
        raise DataError(f"{root}: no class folders (an image folder holds one sub-folder per class)")
    ignored: dict[str, int] = {}
    for name in top_files:  # files beside the class folders belong to no class
        ignored[_extension(name)] = ignored.get(_extension(name), 0) + 1
    names: list[str] = []
    labels: list[int] = []
    empty = []
    for label, class_name in enumerate(classes):
        count = len(names)
        for rel, files in _walk_class(root, class_name):
            for name in sorted(files):
                if _is_image_name(name):
                    names.append(os.path.join(rel, name))
                    labels.append(label)
                else:
                    ignored[_extension(name)] = ignored.get(_extension(name), 0) + 1
        if len(names) == count:
            empty.append(class_name)
    if empty:
        # ImageFolder refuses this too; a class without images would still take a label.
        raise DataError(f"{root}: no image files in the class folder(s) {', '.join(empty[:10])}"
                        f"{' ...' if len(empty) > 10 else ''} (image extensions: {' '.join(IMAGE_EXTENSIONS)})")
    description = f"image folder {root}: {len(names)} images in {len(classes)} classes (ImageFolder order)"
    return ImageListing(source, "folder", root, ImageItems(root, names, labels), len(classes), description,
                        ignored=dict(sorted(ignored.items())), classes=classes)


def _is_under(path: str, folder: str) -> bool:
    return path.startswith(folder if folder.endswith("/") else folder + "/")


def _common_root(paths: Sequence[str]) -> str:
    """The deepest folder (an absolute local path or a URL) that all ``paths`` lie under."""
    common = posixpath.dirname(paths[0])
    for path in paths:
        # Most paths share the previous answer: one prefix test per path, not a split.
        while not _is_under(path, common):
            if common in ("", "/"):
                raise DataError(f"{paths[0]!r} and {path!r} share no folder; all images must be under one root")
            common = posixpath.dirname(common)
    if is_url(paths[0]) and common.endswith(":/"):
        raise DataError(f"the images lie in different buckets or hosts (e.g. {paths[0]!r} and {paths[-1]!r}); "
                        "they must share one root")
    return common


def _relative(paths: Sequence[str], root: str) -> list[str]:
    prefix = root if root.endswith("/") else root + "/"
    return [p[len(prefix) :] for p in paths]


def _parse_list(text: str, where: str) -> list[tuple[str, int]]:
    """``(path, label)`` per entry of a list file; ``where`` names the file in errors."""
    entries = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        # The label is the last field, so paths may contain spaces.
        fields = line.rsplit(maxsplit=1)
        if len(fields) != 2:
            raise DataError(f"{where}, line {lineno}: expected 'PATH LABEL', got {raw!r}")
        path, label_text = fields
        if not (label_text.isascii() and label_text.isdigit()):
            raise DataError(f"{where}, line {lineno}: the label must be an integer >= 0, got {label_text!r}")
        label = int(label_text)
        entries.append((path, label))
    return entries


def _normalize_url(url: str) -> str:
    """``s3://b/lists/../imgs/x.jpg`` -> ``s3://b/imgs/x.jpg``, as for local paths (object keys
    hardly ever contain a literal ``..``; a list file that says ``../`` means the parent)."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{posixpath.normpath(rest)}"


def _list_file(source: str, options: dict[str, Any]) -> ImageListing:
    """A list file: ``PATH LABEL`` per line."""
    remote = is_url(source)
    list_path = source if remote else os.path.abspath(source)
    folder, _, file_name = list_path.rpartition("/")
    try:
        raw = Storage(folder or "/", options).read_bytes(file_name)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as err:
        raise DataError(f"{list_path}: cannot read the list file: {err.strerror or err}") from err
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{list_path}: the list file is not UTF-8 text ({err})") from err
    entries = _parse_list(text, list_path)
    if not entries:
        raise DataError(f"{list_path}: the list file names no images")
    paths = []
    for path, _ in entries:
        if is_url(path):
            full = _normalize_url(path)
        elif remote:
            if path.startswith("/"):
                raise DataError(f"{list_path}: the local absolute path {path!r} cannot be read relative to a URL")
            full = _normalize_url(f"{folder}/{path}")
        else:
            full = os.path.normpath(os.path.join(folder, path))
        paths.append(full)
    if len({is_url(p) for p in paths}) > 1:
        raise DataError(f"{list_path}: mixes local paths and URLs; all images must be under one root")
    root = Storage(_common_root(paths), options).root
    labels = [label for _, label in entries]
    items = ImageItems(root, _relative(paths, root), labels)
    description = f"list file {list_path}: {len(items)} images, labels 0..{max(labels)}"
    return ImageListing(source, "list", root, items, max(labels) + 1, description, storage_options=options)


def _tar_paths(source: str) -> list[str]:
    """The shard paths or URLs of a ``.tar`` or brace pattern, in order."""
    from sfd_train.data_pipeline.manifest import expand_braces  # noqa: PLC0415 - imports torch

    paths = expand_braces(source)
    return paths if is_url(source) else [os.path.abspath(p) for p in paths]


def _split_member(name: str) -> tuple[str, str] | None:
    """WebDataset's ``(key, extension)`` of a member, the extension in lower case: split at the
    first dot of the base name. None where WebDataset leaves the member out of every sample (no
    dot in the base name, or nothing before it)."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not (stem and dot):
        return None
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


@dataclass
class _TarScan:
    """What listing one shard found."""

    names: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    ignored: dict[str, int] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _sample_problem(members: list[tuple[tarfile.TarInfo, str]], label_text: bytes | None) -> tuple[str | None, int]:
    """Why a sample's members do not make an image and a label (None if they do), and the label."""
    extensions = [ext for _, ext in members]
    repeated = sorted({ext for ext in extensions if extensions.count(ext) > 1})
    if repeated:  # WebDataset refuses such a sample too ("duplicate file name")
        return (f"more than one '{repeated[0]}' member "
                f"({', '.join(info.name for info, ext in members if ext == repeated[0])})"), -1
    images = [info.name for info, ext in members if ("." + ext) in IMAGE_EXTENSIONS]
    if not images:
        return f"no image member (members: {', '.join(info.name for info, _ in members)})", -1
    if len(images) > 1:
        return f"more than one image member ({', '.join(images)})", -1
    if label_text is None:
        return f"no '{LABEL_FIELD}' member (members: {', '.join(info.name for info, _ in members)})", -1
    text = label_text.decode("utf-8", "replace").strip()
    if not (text.isascii() and text.isdigit()):
        return f"the '{LABEL_FIELD}' member is not a decimal integer >= 0: {label_text[:40]!r}", -1
    return None, int(text)


def _tar_end_problem(f, end: int) -> str | None:
    """Why a tar whose members stopped at byte ``end`` is incomplete, or None if it ended properly.

    Python's tarfile stops without an error at a truncated or garbled header after the first
    member, which would silently drop the rest of a shard; a proper tar ends with a zero block
    there (or, from some writers, exactly at the end of the file).
    """
    f.seek(0, os.SEEK_END)
    size = f.tell()
    if end > size:
        return f"truncated: the last member's data runs past the end of the file ({size} bytes, expected {end})"
    if end == size:
        return None
    f.seek(end)
    block = f.read(tarfile.BLOCKSIZE)
    if len(block) < tarfile.BLOCKSIZE:
        return f"truncated: the file ends inside the header at byte {end}"
    if block.count(0) != len(block):
        return f"unreadable tar header at byte {end} (corrupt, or not a tar file from there on)"
    return None


def _list_one_tar(storage: Storage, shard: str, on_bad_sample: str) -> _TarScan:
    """Reads the headers (and the small ``cls`` members) of one shard."""
    out = _TarScan()
    where = storage.path(shard)

    def finish(key: str, members: list[tuple[tarfile.TarInfo, str]], label_text: bytes | None) -> None:
        problem, label = _sample_problem(members, label_text)
        if problem is not None:
            if on_bad_sample == "error":
                raise DataError(f"{where}: sample '{key}': {problem} (on_bad_sample='skip' leaves such samples out)")
            out.skipped.append((f"{where}:{key}", problem))
            return
        for info, ext in members:
            if ("." + ext) in IMAGE_EXTENSIONS:
                out.names.append(info.name)
                out.offsets.append(info.offset_data)
                out.sizes.append(info.size)
                out.labels.append(label)
            elif ext != LABEL_FIELD:
                dotted = "." + ext if ext else _NO_EXTENSION
                out.ignored[dotted] = out.ignored.get(dotted, 0) + 1

    try:
        # "r:" seeks over the data (locally only headers are read; through fsspec the file is
        # still fetched in large sequential blocks) and lets the end be checked afterwards.
        with storage.open(shard) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            key, members, label_text = None, [], None
            for info in tar:
                if not info.isreg():  # folders, links, devices: no image data of their own
                    if not info.isdir():
                        out.ignored["(not a regular file)"] = out.ignored.get("(not a regular file)", 0) + 1
                    continue
                split = _split_member(info.name)
                if split is None:  # in no sample, and it does not end the current one
                    out.ignored[_NO_EXTENSION] = out.ignored.get(_NO_EXTENSION, 0) + 1
                    continue
                this_key, ext = split
                if this_key != key:  # WebDataset groups consecutive members with one key
                    if members:
                        finish(key, members, label_text)
                    key, members, label_text = this_key, [], None
                members.append((info, ext))
                if ext == LABEL_FIELD:
                    label_text = tar.extractfile(info).read()
            if members:
                finish(key, members, label_text)
            problem = _tar_end_problem(f, tar.offset)
        if problem:
            raise DataError(f"{where}: {problem}")
    except (tarfile.TarError, EOFError) as err:
        raise DataError(f"{where}: not a readable tar file ({type(err).__name__}: {err})") from err
    except (FileNotFoundError, IsADirectoryError, PermissionError) as err:
        raise DataError(f"{where}: cannot read the tar shard: {err.strerror or err}") from err
    return out


def _list_tars(source: str, options: dict[str, Any], on_bad_sample: str) -> ImageListing:
    """WebDataset tar shards: a ``.tar`` or a brace pattern of them."""
    paths = _tar_paths(source)
    storage = Storage(_common_root(paths), options)
    shards = _relative(paths, storage.root)
    names: list[str] = []
    labels: list[int] = []
    shard_index: list[int] = []
    offsets: list[int] = []
    sizes: list[int] = []
    ignored: dict[str, int] = {}
    skipped: list[tuple[str, str]] = []
    for index, shard in enumerate(shards):
        found = _list_one_tar(storage, shard, on_bad_sample)
        names += found.names
        labels += found.labels
        offsets += found.offsets
        sizes += found.sizes
        shard_index += [index] * len(found.names)
        skipped += found.skipped
        for ext, count in found.ignored.items():
            ignored[ext] = ignored.get(ext, 0) + count
    items = ImageItems(storage.root, names, labels, shards=shards, shard_index=shard_index, offsets=offsets, sizes=sizes)
    num_classes = max(labels) + 1 if labels else 0
    description = (f"WebDataset tar shards {source} ({len(shards)} shard{'s' if len(shards) != 1 else ''}): "
                   f"{len(items)} images, labels 0..{num_classes - 1}"
                   + (f", {len(skipped)} bad samples skipped" if skipped else ""))
    return ImageListing(source, "tar", storage.root, items, num_classes, description,
                        ignored=dict(sorted(ignored.items())), skipped=skipped, storage_options=options)


# --------------------------------------------------------------------------------------------
# Reading and decoding


def _check_storage(item: ImageItem, storage: Storage) -> None:
    if item.root != storage.root:
        raise ValueError(f"the item {item.locator!r} is not under the storage root {storage.root!r} "
                         "(use the listing's storage())")


def _unreadable(err: OSError, path: str, is_local: bool) -> str:
    """Why a file could not be read, in words."""
    if isinstance(err, FileNotFoundError):
        if is_local and os.path.islink(path):
            return f"broken symbolic link (to {os.readlink(path)!r})"
        return "missing file"
    if isinstance(err, IsADirectoryError):
        return "a directory, not a file"
    if isinstance(err, PermissionError):
        return "permission denied"
    return f"cannot read the file: {err.strerror or err}"


def _read_range(storage: Storage, name: str, start: int, size: int) -> bytes:
    """``size`` bytes of ``name`` from ``start`` (may be fewer where the file ends)."""
    if storage.is_local:
        # Storage.read_into keeps one descriptor open per file; over thousands of shards that
        # would exhaust the process's descriptors, so a local read opens and closes its own.
        with open(storage.path(name), "rb") as f:
            return os.pread(f.fileno(), size, start)
    buffer = bytearray(size)
    got = storage.read_into([(name, start, start + size)], memoryview(buffer), [0])[0]
    return bytes(buffer[:got])


def read_bytes(item: ImageItem, storage: Storage) -> bytes:
    """The encoded image of ``item`` (a whole file, or a tar member's data by one ranged read).

    Raises:
        BadImage: missing, empty or unreadable (a directory, a broken link, no permission), or
            the tar ends before the member's data.
        StorageError: object storage kept failing (not the image's fault).
    """
    _check_storage(item, storage)
    try:
        if item.member is None:
            data = storage.read_bytes(item.name)
        else:
            data = _read_range(storage, item.name, item.offset, item.size)
            if len(data) < item.size:
                raise BadImage(item.locator, f"the tar ends inside the member's data (read {len(data)} of "
                                             f"{item.size} bytes from offset {item.offset})")
    except OSError as err:
        raise BadImage(item.locator, _unreadable(err, item.path, storage.is_local)) from err
    if not data:
        raise BadImage(item.locator, "empty file (0 bytes)")
    return data


def decode_image(data: bytes, locator: str, *, draft: bool = False) -> Image.Image:
    """Decodes an encoded image fully and converts it to RGB as ``Image.open(f).convert("RGB")`` does.

    Args:
        data: the file's bytes.
        locator: names the image in errors.
        draft: let JPEG decode at 1/8 scale (only to validate: the entropy-coded data is still
            read to its end, so truncation and corruption are found the same way).

    Raises:
        BadImage: not an image, or truncated or corrupt data, or a mode Pillow cannot convert.
    """
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as err:
        raise BadImage(locator, f"not an image: Pillow cannot identify the content (starts with {data[:16]!r})") from err
    except Image.DecompressionBombError as err:
        raise BadImage(locator, f"too many pixels: {err}") from err
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - any format plug-in error means a malformed header
        raise BadImage(locator, f"malformed image header: {type(err).__name__}: {err}") from err
    fmt = image.format or "image"
    try:
        if draft and fmt == "JPEG":
            image.draft("RGB", (1, 1))
        image.load()  # a full decode: Image.open reads only the header
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - OSError, SyntaxError, zlib.error, ... from the decoders
        raise BadImage(locator, f"truncated or corrupt {fmt} data: {err}") from err
    try:
        return image if image.mode == "RGB" else image.convert("RGB")
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001
        raise BadImage(locator, f"cannot convert the {fmt} image of mode {image.mode} to RGB: {err}") from err


def read_image(item: ImageItem, storage: Storage) -> Image.Image:
    """The image of ``item``, fully decoded, as an RGB ``PIL.Image``.

    Args:
        item: from a listing's ``items``.
        storage: the listing's :meth:`ImageListing.storage`.

    Raises:
        BadImage: the image cannot be used (the message names it and says why).
    """
    return decode_image(read_bytes(item, storage), item.locator)


def load_crop_pair(item: ImageItem, size: int, storage: Storage) -> np.ndarray:
    """ADM's centre crop of ``item`` and its mirror: uint8 (2, size, size, 3).

    Raises:
        BadImage: the image cannot be used.
    """
    from sfd_train.tokenizers.preprocess import crop_pair  # noqa: PLC0415 - imports torch; scan workers do not need it

    return crop_pair(read_image(item, storage), size)


def check_image(item: ImageItem, storage: Storage) -> str | None:
    """Why ``item`` cannot be used, or None when it can (reads, fully decodes and converts it)."""
    try:
        decode_image(read_bytes(item, storage), item.locator, draft=True)
    except BadImage as err:
        return err.reason
    return None


# --------------------------------------------------------------------------------------------
# Scanning


_WORKER_STATE: tuple[ImageItems, Storage] | None = None


def _init_worker(items: ImageItems, storage: Storage) -> None:
    global _WORKER_STATE
    _WORKER_STATE = (items, storage)


def _check_range(start: int, stop: int, items: ImageItems | None = None, storage: Storage | None = None) -> list[str | None]:
    """The reason (or None) for each item in ``[start, stop)``."""
    if items is None:
        items, storage = _WORKER_STATE
    return [check_image(items[i], storage) for i in range(start, stop)]


def _pool_context():
    # fork avoids importing everything again in each worker (and passes the items without
    # pickling them); elsewhere fall back to spawn. Storage re-opens its handles per process.
    return mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")


def scan_images(items: ImageItems, storage: Storage, *, workers: int = 0, progress: bool = False,
                chunk_size: int = 64) -> ScanResult:
    """Validates every item: reads it, decodes it fully and converts it to RGB.

    Args:
        items: a listing's ``items`` (or a part of them).
        storage: the listing's :meth:`ImageListing.storage`.
        workers: processes; 0 or 1 scan in this process. The result does not depend on it.
        progress: show a progress bar on stderr.
        chunk_size: items per task sent to a worker.

    Returns:
        The :class:`ScanResult`, in item order.

    Raises:
        StorageError: object storage kept failing (not an image's fault).
    """
    n = len(items)
    ranges = [(lo, min(lo + chunk_size, n)) for lo in range(0, n, chunk_size)]
    reasons: list[str | None] = [None] * n
    bar = tqdm(total=n, unit="image", desc="scanning images", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    with bar:
        if workers <= 1 or len(ranges) <= 1:
            for lo, hi in ranges:
                reasons[lo:hi] = _check_range(lo, hi, items, storage)
                bar.update(hi - lo)
        else:
            with cf.ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context(), initializer=_init_worker,
                                        initargs=(items, storage)) as pool:
                pending: dict[cf.Future, tuple[int, int]] = {}
                todo = iter(ranges)
                # A bounded window of tasks in flight, rather than one future per chunk of 1.28M images.
                for lo, hi in todo:
                    pending[pool.submit(_check_range, lo, hi)] = (lo, hi)
                    if len(pending) >= 4 * workers:
                        break
                while pending:
                    done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                    for fut in done:
                        lo, hi = pending.pop(fut)
                        reasons[lo:hi] = fut.result()
                        bar.update(hi - lo)
                        nxt = next(todo, None)
                        if nxt is not None:
                            pending[pool.submit(_check_range, *nxt)] = nxt
    bad_indices = np.flatnonzero(np.array([r is not None for r in reasons], dtype=bool))
    return ScanResult(
        total=n,
        good=np.flatnonzero(np.array([r is None for r in reasons], dtype=bool)),
        bad_indices=bad_indices,
        bad=[(items[int(i)].locator, reasons[i]) for i in bad_indices],
    )


# --------------------------------------------------------------------------------------------
# Report


def report(listing: ImageListing, scan: ScanResult | None = None) -> dict[str, Any]:
    """The JSON-ready summary of a listing and its scan (storage options are left out)."""
    out: dict[str, Any] = {
        "source": listing.source,
        "kind": listing.kind,
        "root": listing.root,
        "description": listing.description,
        "num_items": len(listing.items),
        "num_classes": listing.num_classes,
        "ignored_files_by_extension": dict(listing.ignored),
        "skipped_samples": [{"item": loc, "reason": reason} for loc, reason in listing.skipped],
    }
    if scan is not None:
        out.update(
            scanned=scan.total,
            usable=int(len(scan.good)),
            bad=len(scan.bad),
            bad_items=[{"item": loc, "reason": reason} for loc, reason in scan.bad],
        )
    return out


def write_report(path: str | os.PathLike, listing: ImageListing, scan: ScanResult | None = None) -> dict[str, Any]:
    """Writes :func:`report` as JSON to the local file ``path`` (atomically) and returns it."""
    problem = url_output_error(path)
    if problem:
        raise DataError(problem)
    data = report(listing, scan)
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return data
