"""Real CIFAR-10 on disk, in every layout users arrive with, decoded once into a cache.

Accepted under one --data-dir (detected in this order):
  cifar-10-batches-py/   torchvision's layout (pickled 10,000-image batches), or the folder itself
  cifar-10-python.tar.gz the downloaded archive, read in place without extracting
  train/<class>/*.png|jpg an image-folder export (Kaggle, cifar2png), with optional test/<class>/
A missing or empty folder gets the archive downloaded into it.

Decoding 50,000 JPEGs takes ~15 s on 2 cores and unpickling the batches ~1 s; the decoded uint8
tensors are cached in the per-user cache folder under a fingerprint of the source (names, sizes,
modification times) and load in well under a second while the source is unchanged.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from alexnet_mlflow.data import CIFAR10_CLASSES, ImageSet, digest
from alexnet_mlflow.errors import DataError

# torchvision.datasets.CIFAR10's source and checksum (the python version of the dataset).
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
BATCHES_FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CACHE_VERSION = 1  # bump when the cached format changes

LAYOUTS_ACCEPTED = (
    f"{BATCHES_FOLDER}/ (torchvision's layout), {CIFAR10_ARCHIVE} (the downloaded archive), "
    "or train/<class>/*.png|jpg with an optional test/<class>/ (an image-folder export)"
)


def default_data_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "alexnet-mlflow"


def resolve_data_dir(data_dir: str) -> Path:
    return default_data_dir() if data_dir == "auto" else Path(data_dir).expanduser().resolve()


def load(root: Path, skip_bad_images: bool = False) -> ImageSet:
    """The CIFAR-10 under root, from the cache when its source is unchanged."""
    layout, source, reader = detect(root, skip_bad_images)
    return cached(source, layout, skip_bad_images, reader)


def detect(root: Path, skip_bad_images: bool) -> tuple[str, Path, Callable[[], ImageSet]]:
    if root.exists() and not root.is_dir():
        raise DataError(f"data_dir {root} is a file: pass the folder that holds CIFAR-10 ({LAYOUTS_ACCEPTED})")
    for folder in (root / BATCHES_FOLDER, root):
        if (folder / TRAIN_BATCHES[0]).is_file():
            return BATCHES_FOLDER, folder, partial(read_batches, folder)
    archive = root / CIFAR10_ARCHIVE
    if archive.is_file():
        return CIFAR10_ARCHIVE, archive, partial(read_archive, archive)
    if (root / "train").is_dir():
        return "image-folder", root, partial(read_image_folder, root, skip_bad_images)
    if root.is_dir() and any(root.iterdir()):
        raise DataError(f"data_dir {root} holds no CIFAR-10: expected {LAYOUTS_ACCEPTED}; "
                        f"or pass an empty or new folder to download it there")
    download(root)
    folder = root / BATCHES_FOLDER
    return BATCHES_FOLDER, folder, partial(read_batches, folder)


def download(root: Path, url: str = CIFAR10_URL, md5: str = CIFAR10_MD5) -> Path:
    """Download and extract the archive with torchvision's checksum-verified downloader."""
    from torchvision.datasets.utils import download_and_extract_archive

    try:
        download_and_extract_archive(url, str(root), filename=CIFAR10_ARCHIVE, md5=md5)
    except Exception as e:  # urllib, socket and checksum errors all mean the same to a user
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(
            f"could not download CIFAR-10 from {url} ({reason}); put the extracted "
            f"{BATCHES_FOLDER}/ folder or {CIFAR10_ARCHIVE} in {root}, or pass --data-dir"
        ) from None
    return root / BATCHES_FOLDER


# ---- the decode cache ------------------------------------------------------------------------

def fingerprint(source: Path) -> str:
    """Names, sizes and modification times of every file the layout reads: any change shows.
    Other files beside them do not count: with --data-dir auto the decode cache, journals and
    checkpoints live in the data folder, and each write would otherwise invalidate the cache.

    os.scandir with plain strings: 50,000 files in ~0.2 s, where Path.rglob took ~1 s."""
    lines = []

    def walk(folder: str, prefix: str) -> None:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=True):
                    walk(entry.path, f"{prefix}{entry.name}/")
                else:
                    stat = entry.stat()
                    lines.append(f"{prefix}{entry.name}\0{stat.st_size}\0{stat.st_mtime_ns}")

    for path in _files_read(source):
        if path.is_dir():
            walk(str(path), f"{path.name}/")
        elif path.is_file():
            stat = path.stat()
            lines.append(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}")
    lines.sort()
    return hashlib.sha256("\n".join([str(source), *lines]).encode()).hexdigest()


def _files_read(source: Path) -> list[Path]:
    """What the source's reader opens: the archive, an image folder's splits, or the batches."""
    if source.is_file():
        return [source]
    if (source / "train").is_dir():
        return [source / "train", source / "test"]
    return [source / name for name in (*TRAIN_BATCHES, TEST_BATCH)]


def cache_path(source: Path, skip_bad_images: bool) -> Path:
    key = hashlib.sha256(f"{source}\0{skip_bad_images}".encode()).hexdigest()[:20]
    return default_data_dir() / "decoded" / f"{key}.pt"


def cached(source: Path, layout: str, skip_bad_images: bool, reader: Callable[[], ImageSet]) -> ImageSet:
    path = cache_path(source, skip_bad_images)
    stamp = f"v{CACHE_VERSION}:{fingerprint(source)}"
    if path.is_file():
        try:
            # weights_only: a cache file can be swapped by another user; it holds plain data only.
            saved = torch.load(path, weights_only=True)
            if saved["stamp"] == stamp:
                return ImageSet(**{k: v for k, v in saved.items() if k != "stamp"} | {"classes": tuple(saved["classes"])})
        except Exception:  # unreadable or from another version: decode again
            pass
    decoded = reader()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save({"stamp": stamp, **decoded.__dict__, "classes": list(decoded.classes)}, temporary)
    temporary.replace(path)  # atomic: a concurrent run sees the old cache or the new one
    return decoded


def _decoded(train, test, classes, layout: str, source: Path, skipped: int = 0) -> ImageSet:
    return ImageSet(*train, *test, tuple(classes), layout, str(source), digest(*train, *test), skipped)


# ---- the layouts -----------------------------------------------------------------------------

def read_batches(folder: Path) -> ImageSet:
    """torchvision's cifar-10-batches-py folder: pickled dicts of 3072-byte rows."""
    missing = [n for n in (*TRAIN_BATCHES, TEST_BATCH) if not (folder / n).is_file()]
    if missing:
        raise DataError(f"{folder} is incomplete: missing {', '.join(missing)}; download CIFAR-10 again")
    train = [_unpickle_batch(folder / n, (folder / n).read_bytes()) for n in TRAIN_BATCHES]
    test = _unpickle_batch(folder / TEST_BATCH, (folder / TEST_BATCH).read_bytes())
    return _decoded(_concat(train), test, CIFAR10_CLASSES, BATCHES_FOLDER, folder)


def read_archive(archive: Path) -> ImageSet:
    """The batches straight from cifar-10-python.tar.gz, without extracting it."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            missing = [n for n in (*TRAIN_BATCHES, TEST_BATCH) if n not in members]
            if missing:
                raise DataError(f"{archive} is incomplete: missing {', '.join(missing)}; download it again")
            read = lambda name: _unpickle_batch(archive / name, tar.extractfile(members[name]).read())  # noqa: E731
            train, test = [read(n) for n in TRAIN_BATCHES], read(TEST_BATCH)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{archive} is not a readable tar.gz archive ({e}); download it again") from None
    return _decoded(_concat(train), test, CIFAR10_CLASSES, CIFAR10_ARCHIVE, archive)


def _unpickle_batch(path: Path, raw: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        # Python 2 pickles: latin1 maps their byte strings to str keys, as torchvision does.
        batch = pickle.load(io.BytesIO(raw), encoding="latin1")
        images = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch["labels"], dtype=np.int64)
    except Exception as e:
        raise DataError(f"{path} is not a CIFAR-10 batch ({type(e).__name__}: {e}); download CIFAR-10 again") from None
    if len(images) != len(labels) or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
        raise DataError(f"{path} is not a CIFAR-10 batch (labels do not match images); download CIFAR-10 again")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels)


def _concat(parts) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([images for images, _ in parts]), torch.cat([labels for _, labels in parts])


def class_order(names: list[str]) -> list[str]:
    """CIFAR-10's label order when every folder is a CIFAR-10 class, else sorted by name."""
    if set(names) <= set(CIFAR10_CLASSES):
        return [c for c in CIFAR10_CLASSES if c in names]
    return sorted(names)


def read_image_folder(root: Path, skip_bad_images: bool = False) -> ImageSet:
    classes = class_order([p.name for p in (root / "train").iterdir() if p.is_dir()])
    if not classes:
        raise DataError(f"{root / 'train'} has no class folders: expected {LAYOUTS_ACCEPTED}")
    train, skipped_train = _read_split(root / "train", classes, skip_bad_images)
    if (root / "test").is_dir():
        unknown = sorted({p.name for p in (root / "test").iterdir() if p.is_dir()} - set(classes))
        if unknown:
            raise DataError(f"{root / 'test'} has classes that train/ lacks: {', '.join(unknown)}")
        test, skipped_test = _read_split(root / "test", classes, skip_bad_images)
    else:
        test, skipped_test = (torch.empty(0, 3, 32, 32, dtype=torch.uint8), torch.empty(0, dtype=torch.int64)), 0
    return _decoded(train, test, classes, "image-folder", root, skipped_train + skipped_test)


def _read_split(folder: Path, classes: list[str], skip_bad_images: bool) -> tuple[tuple[torch.Tensor, torch.Tensor], int]:
    files = [(path, label) for label, name in enumerate(classes) if (folder / name).is_dir()
             for path in sorted((folder / name).iterdir()) if path.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DataError(f"{folder} holds no .png or .jpg images in its class folders")
    # PIL releases the GIL while decoding: threads overlap file reads and decodes.
    with ThreadPoolExecutor(max(2, os.cpu_count() or 2)) as pool:
        images = list(pool.map(lambda item: _decode_image(item[0], skip_bad_images), files))
    kept = [(image, label) for image, (_, label) in zip(images, files) if image is not None]
    stacked = np.stack([image for image, _ in kept]).transpose(0, 3, 1, 2)  # NHWC -> NCHW
    labels = np.array([label for _, label in kept], dtype=np.int64)
    return (torch.from_numpy(np.ascontiguousarray(stacked)), torch.from_numpy(labels)), len(files) - len(kept)


def to_cifar_pixels(image) -> tuple[np.ndarray, str]:
    """A PIL image as CIFAR-10 pixels, (32, 32, 3) uint8 RGB, and a note of what was changed.
    Training data and `predict` share it, so both see images prepared the same way."""
    from PIL import Image

    notes = []
    if image.mode != "RGB":
        notes.append(f"{image.mode} -> RGB")
        image = image.convert("RGB")
    if image.size != (32, 32):  # exports of other sizes, photos: CIFAR-10 is 32x32
        notes.append(f"resized from {image.size[0]}x{image.size[1]} to 32x32")
        image = image.resize((32, 32), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8), "; ".join(notes)


def _decode_image(path: Path, skip_bad_images: bool) -> np.ndarray | None:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return to_cifar_pixels(image)[0]
    except Exception as e:  # PIL raises OSError for truncated files, UnidentifiedImageError for others
        if skip_bad_images:
            return None
        raise DataError(f"{path} is not a readable image ({type(e).__name__}: {e}); "
                        f"remove it, or pass --skip-bad-images to skip such files") from None
