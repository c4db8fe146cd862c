"""Source images for extraction: listing (folder, list file, tar shards, S3), validation, decoding."""

import io
import json
import logging
import os
import pickle
import tarfile

import moto.server as moto_server  # test extras: missing, the suite fails rather than skipping
import numpy as np
import pytest
from PIL import Image

from ports import free_port
from sfd_train.data_pipeline.errors import DataError
from sfd_train.data_pipeline.storage import Storage
from sfd_train.data_pipeline.images import (
    IMAGE_EXTENSIONS,
    BadImage,
    ImageItems,
    decode_image,
    list_images,
    load_crop_pair,
    read_bytes,
    read_image,
    scan_images,
    write_report,
)
from sfd_train.tokenizers.preprocess import crop_pair

SIZE = 32  # crop side: small keeps the test fast; the code path is the one used at 256


def _pattern(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth RGB image with some noise: compresses small, decodes non-trivially."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (h + w)], axis=-1)
    return np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def _fails_to_decode(data: bytes) -> bool:
    try:
        Image.open(io.BytesIO(data)).load()
    except Exception:  # noqa: BLE001
        return True
    return False


def _corrupt_png() -> bytes:
    """A PNG with bytes overwritten in the middle of its IDAT data (Pillow fails to decode it)."""
    data = bytearray(_encode(Image.fromarray(_pattern(96, 128, 7)), "PNG"))
    start = data.index(b"IDAT") + 4
    length = int.from_bytes(data[start - 8 : start - 4], "big")
    middle = start + length // 2
    data[middle : middle + 16] = b"\xff" * 16
    assert _fails_to_decode(bytes(data)), "the corruption must make Pillow's decode fail"
    return bytes(data)


def _truncated_jpeg() -> bytes:
    data = _encode(Image.fromarray(_pattern(120, 160, 8)), "JPEG", quality=90)
    cut = data[: len(data) * 2 // 3]
    assert _fails_to_decode(cut)
    return cut


# Good images: name -> bytes. Modes that must be converted, not rejected.
def _good_images() -> dict[str, bytes]:
    rgb = Image.fromarray(_pattern(60, 80, 1))
    i16 = Image.fromarray((np.arange(40 * 50, dtype=np.uint16).reshape(40, 50) * 29).astype(np.uint16))
    assert i16.mode == "I;16"
    return {
        "apple/rgb.jpg": _encode(rgb, "JPEG", quality=90),
        "apple/rgb_upper.JPEG": _encode(Image.fromarray(_pattern(48, 40, 2)), "JPEG"),
        "apple/rgb.png": _encode(rgb, "PNG"),
        "apple/gray.png": _encode(rgb.convert("L"), "PNG"),
        "apple/sub/nested.jpeg": _encode(Image.fromarray(_pattern(50, 70, 3)), "JPEG"),
        "apple/sub-x/dash.bmp": _encode(Image.fromarray(_pattern(40, 40, 4)), "BMP"),
        "apple/sub/deeper/deep.webp": _encode(Image.fromarray(_pattern(36, 52, 5)), "WEBP", quality=90),
        "Banana/cmyk.jpg": _encode(rgb.convert("CMYK"), "JPEG"),
        "Banana/rgba.png": _encode(rgb.convert("RGBA"), "PNG"),
        "Banana/la.png": _encode(rgb.convert("LA"), "PNG"),
        "Banana/palette.png": _encode(rgb.convert("P"), "PNG"),
        "Banana/bilevel.tif": _encode(rgb.convert("1"), "TIFF"),
        "Banana/i16.png": _encode(i16, "PNG"),
        "Banana/small.jpg": _encode(Image.fromarray(_pattern(12, 16, 6)), "JPEG"),  # smaller than the crop
        "cherry/gray.pgm": _encode(rgb.convert("L"), "PPM"),
    }


def _write(root, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def _make_good_tree(root, outside) -> None:
    _write(root, _good_images())
    # A class folder that is a symbolic link (ImageFolder follows it), and a linked sub-folder.
    _write(outside, {"linked/l1.png": _encode(Image.fromarray(_pattern(30, 30, 9)), "PNG"),
                     "sublink/s1.jpg": _encode(Image.fromarray(_pattern(30, 34, 10)), "JPEG")})
    os.symlink(outside / "linked", root / "date")
    os.symlink(outside / "sublink", root / "apple" / "sublink")


BAD = {
    "apple/truncated.jpg": "truncated or corrupt JPEG",
    "apple/corrupt.png": "truncated or corrupt PNG",
    "Banana/empty.jpg": "empty file",
    "Banana/text.png": "not an image",
    "cherry/broken.jpg": "broken symbolic link",
}


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    """A folder of good images only, and one that also holds bad files."""
    base = tmp_path_factory.mktemp("images")
    good, mixed = base / "good", base / "mixed"
    _make_good_tree(good, base / "outside_good")
    _make_good_tree(mixed, base / "outside_mixed")
    _write(mixed, {"apple/truncated.jpg": _truncated_jpeg(), "apple/corrupt.png": _corrupt_png(),
                   "Banana/empty.jpg": b"", "Banana/text.png": b"hello, I am not a PNG\n",
                   "README.txt": b"beside the classes\n", "cherry/notes.TXT": b"not an image\n",
                   "cherry/labels.csv": b"a,b\n"})
    os.symlink(mixed / "nowhere.jpg", mixed / "cherry" / "broken.jpg")
    (mixed / "Banana" / "x.jpg").mkdir()  # a folder with an image name: ImageFolder walks into it
    _write(mixed, {"Banana/x.jpg/inside.png": _encode(Image.fromarray(_pattern(33, 33, 11)), "PNG")})
    return {"good": good, "mixed": mixed}


def _samples(listing):
    return [(item.path, item.label) for item in listing.items]


@pytest.mark.parametrize("tree", ["good", "mixed"])
def test_folder_order_and_labels_are_imagefolders(trees, tree):
    from torchvision.datasets import ImageFolder

    root = trees[tree]
    listing = list_images(str(root))
    reference = ImageFolder(str(root))
    assert listing.classes == reference.classes == ["Banana", "apple", "cherry", "date"]
    assert _samples(listing) == reference.samples
    assert listing.num_classes == 4 and listing.kind == "folder"
    # The walk order torchvision uses: folders sorted by path string, so "sub" < "sub-x" < "sub/deeper"
    # ('-' sorts before '/'); symbolic links followed.
    names = [item.name for item in listing.items if item.label == 1]
    assert names.index("apple/sub/nested.jpeg") < names.index("apple/sub-x/dash.bmp") < names.index("apple/sub/deeper/deep.webp")
    assert "apple/sublink/s1.jpg" in names and "apple/rgb_upper.JPEG" in names
    if tree == "mixed":
        assert listing.ignored == {".csv": 1, ".txt": 2}
        assert not any(item.name == "Banana/x.jpg" for item in listing.items)
        assert any(item.name == "Banana/x.jpg/inside.png" for item in listing.items)
    else:
        assert listing.ignored == {}
    assert str(len(listing.items)) in listing.description


def test_folder_errors(tmp_path):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes(b"x")
    with pytest.raises(DataError, match="no class folders"):
        list_images(str(tmp_path / "flat"))
    (tmp_path / "flat" / "empty_class").mkdir()
    (tmp_path / "flat" / "full").mkdir()
    (tmp_path / "flat" / "full" / "a.png").write_bytes(b"x")
    with pytest.raises(DataError, match="empty_class"):
        list_images(str(tmp_path / "flat"))
    with pytest.raises(DataError, match="no such"):
        list_images(str(tmp_path / "missing"))
    loop = tmp_path / "loop" / "c"
    loop.mkdir(parents=True)
    (loop / "a.png").write_bytes(b"x")
    os.symlink(loop, loop / "again")
    with pytest.raises(DataError, match="symbolic link loop"):
        list_images(str(tmp_path / "loop"))


def test_scan_reports_exactly_the_bad_images_whatever_the_workers(trees):
    listing = list_images(str(trees["mixed"]))
    storage = listing.storage()
    serial = scan_images(listing.items, storage, workers=0)
    pooled = scan_images(listing.items, storage, workers=2, chunk_size=2)  # several tasks, two processes
    assert serial.bad == pooled.bad
    assert np.array_equal(serial.good, pooled.good) and np.array_equal(serial.bad_indices, pooled.bad_indices)
    reasons = {loc[len(str(trees["mixed"])) + 1 :]: reason for loc, reason in serial.bad}
    assert set(reasons) == set(BAD)
    for name, words in BAD.items():
        assert words in reasons[name], (name, reasons[name])
    assert "image file is truncated" in reasons["apple/truncated.jpg"]
    assert len(serial.good) + len(serial.bad) == len(listing.items) == serial.total
    assert [listing.items[int(i)].locator for i in serial.bad_indices] == [loc for loc, _ in serial.bad]
    # Every bad one raises BadImage from read_image too, naming the file and the reason.
    for i in serial.bad_indices:
        item = listing.items[int(i)]
        with pytest.raises(BadImage) as info:
            read_image(item, storage)
        assert item.path in str(info.value) and info.value.reason == dict(serial.bad)[item.locator]
        assert pickle.loads(pickle.dumps(info.value)).reason == info.value.reason


def test_crop_pairs_equal_pillows_rgb_conversion(trees):
    listing = list_images(str(trees["good"]))
    storage = listing.storage()
    assert not scan_images(listing.items, storage, workers=0).bad
    modes = set()
    for item in listing.items:
        with Image.open(item.path) as original:
            modes.add(original.mode)
            expected = crop_pair(original, SIZE)
        got = load_crop_pair(item, SIZE, storage)
        assert got.dtype == np.uint8 and got.shape == (2, SIZE, SIZE, 3)
        assert np.array_equal(got, expected), item.name
        image = read_image(item, storage)
        assert image.mode == "RGB"
        with Image.open(item.path) as original:
            assert np.array_equal(np.asarray(image), np.asarray(original.convert("RGB")))
    assert {"RGB", "L", "LA", "P", "1", "CMYK", "RGBA", "I;16"} <= modes


def test_truncation_is_found_at_reduced_jpeg_scale():
    full = _encode(Image.fromarray(_pattern(400, 640, 12)), "JPEG", quality=90)
    assert decode_image(full, "big.jpg", draft=True).size[0] < 640  # the reduced-scale path is taken
    for cut in (len(full) // 2, len(full) - 100, len(full) - 2):  # down to a missing end marker
        for draft in (False, True):
            with pytest.raises(BadImage, match="truncated"):
                decode_image(full[:cut], "big.jpg", draft=draft)


def test_list_file(tmp_path, trees):
    good = trees["good"]
    outside = tmp_path / "elsewhere" / "far.png"
    _write(tmp_path, {"elsewhere/far.png": (good / "apple" / "rgb.png").read_bytes()})
    (tmp_path / "lists").mkdir()
    os.symlink(good, tmp_path / "lists" / "imgs")
    (tmp_path / "lists" / "somedir.jpg").mkdir()
    lst = tmp_path / "lists" / "train.txt"
    lst.write_text("# path label\n\nimgs/apple/rgb.jpg 0\n"
                   f"  {outside} 3\nimgs/Banana/cmyk.jpg 1\nmissing.jpg 2\nsomedir.jpg 0\n")
    listing = list_images(str(lst))
    assert listing.kind == "list" and listing.num_classes == 4 and listing.ignored == {}
    paths = [item.path for item in listing.items]
    assert paths == [str(tmp_path / "lists/imgs/apple/rgb.jpg"), str(outside), str(tmp_path / "lists/imgs/Banana/cmyk.jpg"),
                     str(tmp_path / "lists/missing.jpg"), str(tmp_path / "lists/somedir.jpg")]
    assert listing.items.labels.tolist() == [0, 3, 1, 2, 0]
    assert listing.root == str(tmp_path)
    storage = listing.storage()
    with Image.open(outside) as im:
        assert np.array_equal(load_crop_pair(listing.items[1], SIZE, storage), crop_pair(im, SIZE))
    scan = scan_images(listing.items, storage, workers=0)
    assert scan.good.tolist() == [0, 1, 2]
    assert scan.bad == [(str(tmp_path / "lists/missing.jpg"), "missing file"),
                        (str(tmp_path / "lists/somedir.jpg"), "a directory, not a file")]

    for n, (line, words) in enumerate([("a.jpg", "expected 'PATH LABEL'"), ("a.jpg -1", "integer >= 0"),
                                       ("a.jpg cat", "integer >= 0"), ("a.jpg 1.5", "integer >= 0")]):
        bad = tmp_path / f"bad{n}.lst"
        bad.write_text(f"# header\na.jpg 0\n{line}\n")
        with pytest.raises(DataError) as info:
            list_images(str(bad))
        assert f"{bad}, line 3" in str(info.value) and words in str(info.value)


def test_unreadable_file_is_bad(tmp_path, monkeypatch):
    (tmp_path / "locked.png").write_bytes(_encode(Image.fromarray(_pattern(20, 20, 13)), "PNG"))
    os.chmod(tmp_path / "locked.png", 0)
    (tmp_path / "l.txt").write_text("locked.png 0\n")
    listing = list_images(str(tmp_path / "l.txt"))
    if os.geteuid() == 0:  # root reads it anyway: make the read fail as it would for anyone else
        def denied(self, name):
            raise PermissionError(13, "Permission denied", self.path(name))

        monkeypatch.setattr(Storage, "read_bytes", denied)
    assert scan_images(listing.items, listing.storage(), workers=0).bad == [(str(tmp_path / "locked.png"), "permission denied")]


def test_items_are_compact_and_picklable(trees):
    items = list_images(str(trees["mixed"])).items
    again = pickle.loads(pickle.dumps(items))
    assert list(again) == list(items)
    part = items[2:7]
    assert isinstance(part, ImageItems) and list(part) == list(items)[2:7]
    assert list(items.take([5, 1])) == [items[5], items[1]] and items[-1] == list(items)[-1]
    with pytest.raises(IndexError):
        items[len(items)]


# ----------------------------------------------------------------------------------------------
# WebDataset tar shards


def _tar(path, members) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two shards of five samples each (JPEG and PNG images, one extra member), and the originals."""
    root = tmp_path_factory.mktemp("tars")
    images, labels = [], []
    for k in range(10):
        image = Image.fromarray(_pattern(40 + 3 * k, 50, 100 + k))
        images.append(_encode(image, "JPEG") if k % 2 else _encode(image.convert("L"), "PNG"))
        labels.append((7 * k) % 5)
    for s in range(2):
        members = []
        for k in range(5 * s, 5 * s + 5):
            ext = "jpg" if k % 2 else "png"
            members += [(f"{k:06d}.{ext}", images[k]), (f"{k:06d}.cls", f"{labels[k]}\n".encode())]
            if k == 3:
                members.append((f"{k:06d}.json", b"{}"))
        _tar(root / f"train-{s}.tar", members)
    return {"root": root, "images": images, "labels": labels}


def _check_tar_listing(listing, shards) -> None:
    assert listing.kind == "tar" and len(listing.items) == 10 and listing.num_classes == 5
    assert listing.items.labels.tolist() == shards["labels"]
    assert listing.ignored == {".json": 1}
    storage = listing.storage()
    for k, item in enumerate(listing.items):
        assert item.member == f"{k:06d}.{'jpg' if k % 2 else 'png'}" and item.name == f"train-{k // 5}.tar"
        assert item.locator == f"{listing.root}/train-{k // 5}.tar:{item.member}"
        assert read_bytes(item, storage) == shards["images"][k]
        with Image.open(io.BytesIO(shards["images"][k])) as original:
            assert np.array_equal(np.asarray(read_image(item, storage)), np.asarray(original.convert("RGB")))
            assert np.array_equal(load_crop_pair(item, SIZE, storage), crop_pair(original, SIZE))


def test_tar_shards_by_brace_pattern(shards):
    listing = list_images(str(shards["root"] / "train-{0..1}.tar"))
    _check_tar_listing(listing, shards)
    assert listing.root == str(shards["root"])
    with tarfile.open(shards["root"] / "train-1.tar") as tar:  # offsets agree with tarfile's own
        member = tar.getmember("000007.jpg")
    item = listing.items[7]
    assert (item.offset, item.size) == (member.offset_data, member.size)
    single = list_images(str(shards["root"] / "train-1.tar"))
    assert single.items.labels.tolist() == shards["labels"][5:]


def test_tar_samples_are_grouped_as_webdataset_groups_them(tmp_path, shards):
    """The listing reads only headers, so it groups members itself; WebDataset's reader is the oracle."""
    import webdataset as wds
    from webdataset.tariterators import base_plus_ext

    png, jpg = shards["images"][0], shards["images"][1]
    _tar(tmp_path / "odd.tar", [
        ("n01/000000.jpg", jpg), ("n01/000000.cls", b"3"),  # the key keeps its folder
        ("x.jpg", jpg), ("x.seg.png", png), ("x.cls", b"1"),  # the extension runs from the first dot
        ("UP.JPG", jpg), ("UP.CLS", b"2"),  # extensions compare in lower case
        ("k.png", png), ("README", b"notes"), ("k.cls", b"0"),  # a name without a dot is in no sample
        ("y.jpeg", jpg), ("y.json", b"{}"), ("y.cls", b"4"),
    ])
    listing = list_images(str(tmp_path / "odd.tar"))
    storage = listing.storage()
    ours = [(base_plus_ext(item.member)[0], read_bytes(item, storage), item.label) for item in listing.items]
    theirs = []
    for sample in wds.WebDataset(str(tmp_path / "odd.tar"), shardshuffle=False, empty_check=False):
        (image,) = [value for field, value in sample.items() if "." + field in IMAGE_EXTENSIONS]
        theirs.append((sample["__key__"], image, int(sample["cls"])))
    assert len(theirs) == 5 and ours == theirs
    assert listing.ignored == {"(none)": 1, ".json": 1, ".seg.png": 1}

    # A sample with two members of one extension: WebDataset refuses it; so does the listing.
    _tar(tmp_path / "twice.tar", [("a.jpg", jpg), ("a.cls", b"1"), ("a.cls", b"2"), ("b.jpg", jpg), ("b.cls", b"0")])
    with pytest.raises(ValueError, match="duplicate"):
        list(wds.WebDataset(str(tmp_path / "twice.tar"), shardshuffle=False, empty_check=False))
    with pytest.raises(DataError, match="sample 'a': more than one 'cls' member"):
        list_images(str(tmp_path / "twice.tar"))
    skipping = list_images(str(tmp_path / "twice.tar"), on_bad_sample="skip")
    assert [item.member for item in skipping.items] == ["b.jpg"] and len(skipping.skipped) == 1


def test_bad_tar_samples_and_truncated_tars(tmp_path, shards):
    image = shards["images"][1]
    _tar(tmp_path / "bad.tar", [("a.jpg", image), ("a.cls", b"1"), ("b.jpg", image), ("c.cls", b"2"),
                                ("d.png", image), ("d.cls", b"x"), ("e.jpg", image), ("e.cls", b"4")])
    with pytest.raises(DataError) as info:
        list_images(str(tmp_path / "bad.tar"))
    assert f"{tmp_path / 'bad.tar'}: sample 'b'" in str(info.value) and "no 'cls' member" in str(info.value)
    listing = list_images(str(tmp_path / "bad.tar"), on_bad_sample="skip")
    assert [item.member for item in listing.items] == ["a.jpg", "e.jpg"] and listing.num_classes == 5
    skipped = dict(listing.skipped)
    where = str(tmp_path / "bad.tar")
    assert list(skipped) == [f"{where}:b", f"{where}:c", f"{where}:d"]
    assert "no 'cls' member" in skipped[f"{where}:b"] and "no image member" in skipped[f"{where}:c"]
    assert "not a decimal integer" in skipped[f"{where}:d"]

    raw = (shards["root"] / "train-0.tar").read_bytes()
    with tarfile.open(shards["root"] / "train-0.tar") as tar:
        second_header = tar.getmember("000001.jpg").offset
    (tmp_path / "cut-0.tar").write_bytes(raw[: second_header + 100])  # cut inside a header
    with pytest.raises(DataError, match="cut-0.tar: truncated"):
        list_images(str(tmp_path / "cut-0.tar"))
    (tmp_path / "cut-1.tar").write_bytes(raw[: second_header + 700])  # cut inside the data
    with pytest.raises(DataError, match="cut-1.tar"):
        list_images(str(tmp_path / "cut-1.tar"))
    # A shard cut after listing: the ranged read comes back short.
    listing = list_images(str(shards["root"] / "train-{0..1}.tar"))
    shorter = tmp_path / "train-0.tar"
    shorter.write_bytes(raw[: listing.items[1].offset + 10])
    item = ImageItems(str(tmp_path), ["000001.jpg"], [0], shards=["train-0.tar"], shard_index=[0],
                      offsets=[listing.items[1].offset], sizes=[listing.items[1].size])[0]
    with pytest.raises(BadImage, match="the tar ends inside the member's data"):
        read_image(item, Storage(str(tmp_path)))


def test_report(tmp_path, trees):
    listing = list_images(str(trees["mixed"]))
    scan = scan_images(listing.items, listing.storage(), workers=0)
    write_report(tmp_path / "report.json", listing, scan)
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["num_items"] == len(listing.items) and data["usable"] == len(listing.items) - len(BAD)
    assert data["bad"] == len(BAD) and data["ignored_files_by_extension"] == {".csv": 1, ".txt": 2}
    assert [(b["item"], b["reason"]) for b in data["bad_items"]] == scan.bad
    assert data["num_classes"] == 4 and data["description"] == listing.description
    with pytest.raises(DataError, match="is a URL"):
        write_report("s3://bucket/report.json", listing, scan)


# ----------------------------------------------------------------------------------------------
# S3 (moto on loopback)

BUCKET = "sfd-images"


@pytest.fixture(scope="module")
def s3(shards, tmp_path_factory):
    """A moto S3 server holding the two shards and a list file; its endpoint in the environment."""
    mp = pytest.MonkeyPatch()
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        mp.setenv(key, value)
    mp.delenv("AWS_PROFILE", raising=False)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    mp.setenv("AWS_ENDPOINT_URL_S3", endpoint)  # how the code under test finds the server
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
    fs.mkdir(BUCKET)
    for s in range(2):
        fs.put(str(shards["root"] / f"train-{s}.tar"), f"{BUCKET}/train-{s}.tar")
    fs.pipe(f"{BUCKET}/lists/l.txt", b"../imgs/a.png 2\nmissing.jpg 0\n")
    fs.pipe(f"{BUCKET}/imgs/a.png", shards["images"][0])
    yield endpoint
    server.stop()
    mp.undo()


def test_tar_shards_on_s3(s3, shards):
    listing = list_images(f"s3://{BUCKET}/train-{{0..1}}.tar")
    assert listing.root == f"s3://{BUCKET}"
    _check_tar_listing(listing, shards)
    local = list_images(str(shards["root"] / "train-{0..1}.tar"))
    assert listing.items.offsets.tolist() == local.items.offsets.tolist()
    scan = scan_images(listing.items, listing.storage(), workers=2, chunk_size=3)
    assert scan.bad == [] and scan.good.tolist() == list(range(10))
    with pytest.raises(DataError, match="credential"):
        list_images(f"s3://{BUCKET}/train-0.tar", {"key": "testing", "secret": "testing"})


def test_list_file_on_s3(s3, shards):
    listing = list_images(f"s3://{BUCKET}/lists/l.txt")
    assert [item.path for item in listing.items] == [f"s3://{BUCKET}/imgs/a.png", f"s3://{BUCKET}/lists/missing.jpg"]
    assert listing.root == f"s3://{BUCKET}" and listing.num_classes == 3
    storage = listing.storage()
    assert read_bytes(listing.items[0], storage) == shards["images"][0]
    assert scan_images(listing.items, storage, workers=0).bad == [(f"s3://{BUCKET}/lists/missing.jpg", "missing file")]
