"""CIFAR-10 as uint8 tensors, decoded once, and batched augmentation on the training device.

The standard pipeline (torchvision dataset + per-image PIL RandomCrop/Flip/ToTensor in a
DataLoader) spends 3-7 s an epoch on a 2-core CPU in PIL alone; cropping and flipping a whole
uint8 batch with tensor indexing costs ~0.5 s an epoch and runs on the GPU when there is one.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from alexnet_mlflow.errors import DataError

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
# torchvision.datasets.CIFAR10's source and checksum (the python version of the dataset).
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
BATCHES_FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"

# Small enough for a CPU smoke run of the full AlexNet in seconds an epoch.
SYNTHETIC_TRAIN, SYNTHETIC_TEST = 1000, 200


@dataclass(frozen=True)
class ImageSet:
    """A dataset's splits as uint8 (N, 3, 32, 32) images and int64 labels, on the CPU."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: tuple[str, ...]
    name: str  # e.g. "cifar10" or "synthetic"
    source: str  # where the images came from: a folder, or a description


@dataclass(frozen=True)
class Splits:
    """Training, validation and test tensors, ready for the loop."""

    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    classes: tuple[str, ...]

    def to(self, device: torch.device) -> "Splits":
        move = lambda pair: tuple(t.to(device) for t in pair)  # noqa: E731
        return Splits(move(self.train), move(self.val), move(self.test), self.classes)


def default_data_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "alexnet-mlflow"


def resolve_data_dir(data_dir: str) -> Path:
    return default_data_dir() if data_dir == "auto" else Path(data_dir).expanduser()


def load_dataset(dataset: str, data_dir: str, seed: int) -> ImageSet:
    if dataset == "synthetic":
        return synthetic(seed)
    return load_cifar10(resolve_data_dir(data_dir))


def load_cifar10(root: Path) -> ImageSet:
    """CIFAR-10 from root/cifar-10-batches-py, downloading it first if root is missing or empty."""
    folder = root / BATCHES_FOLDER
    if not folder.is_dir():
        if root.exists() and not root.is_dir():
            raise DataError(f"data_dir {root} is a file: pass a folder to --data-dir")
        if root.is_dir() and any(p.name != CIFAR10_ARCHIVE for p in root.iterdir()):
            raise DataError(
                f"data_dir {root} holds no CIFAR-10: expected {folder}/ (torchvision's layout) "
                f"or {root / CIFAR10_ARCHIVE}; pass an empty or new folder to download it there"
            )
        download_cifar10(root)
    return read_batches(folder)


def download_cifar10(root: Path, url: str = CIFAR10_URL, md5: str = CIFAR10_MD5) -> Path:
    """Download and extract the archive with torchvision's checksum-verified downloader.

    An archive already in root with the right checksum is extracted without downloading.
    """
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


def read_batches(folder: Path) -> ImageSet:
    """Decode torchvision's cifar-10-batches-py folder (pickled dicts of 3072-byte rows)."""
    missing = [n for n in (*TRAIN_BATCHES, TEST_BATCH) if not (folder / n).is_file()]
    if missing:
        raise DataError(f"{folder} is incomplete: missing {', '.join(missing)}; download CIFAR-10 again")
    train = [_read_batch(folder / n) for n in TRAIN_BATCHES]
    test_images, test_labels = _read_batch(folder / TEST_BATCH)
    return ImageSet(
        train_images=torch.cat([images for images, _ in train]),
        train_labels=torch.cat([labels for _, labels in train]),
        test_images=test_images,
        test_labels=test_labels,
        classes=CIFAR10_CLASSES,
        name="cifar10",
        source=str(folder),
    )


def _read_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        with open(path, "rb") as f:
            # Python 2 pickles: latin1 maps their byte strings to str keys, as torchvision does.
            batch = pickle.load(f, encoding="latin1")
        data = np.asarray(batch["data"], dtype=np.uint8)
        labels = np.asarray(batch["labels"], dtype=np.int64)
        images = data.reshape(-1, 3, 32, 32)
    except Exception as e:
        raise DataError(f"{path} is not a CIFAR-10 batch ({type(e).__name__}: {e}); download CIFAR-10 again") from None
    if len(images) != len(labels) or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
        raise DataError(f"{path} is not a CIFAR-10 batch (labels do not match images); download CIFAR-10 again")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels)


def synthetic(seed: int, n_train: int = SYNTHETIC_TRAIN, n_test: int = SYNTHETIC_TEST) -> ImageSet:
    """A learnable stand-in: each class is a smooth colour pattern, each image that pattern,
    shifted by up to 4 pixels, plus noise. Same seed, same images."""
    gen = torch.Generator().manual_seed(seed)
    # 10 smooth 32x32 colour templates from upsampled 4x4 noise.
    coarse = torch.rand(10, 3, 4, 4, generator=gen)
    templates = torch.nn.functional.interpolate(coarse, size=(40, 40), mode="bilinear", align_corners=False)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(n) % 10
        labels = labels[torch.randperm(n, generator=gen)]
        dy, dx = torch.randint(0, 9, (2, n), generator=gen)
        images = _crop(templates[labels], dy, dx)
        images = images * 200 + 28 + torch.randn(images.shape, generator=gen) * 25
        return images.clamp(0, 255).to(torch.uint8), labels

    train_images, train_labels = make(n_train)
    test_images, test_labels = make(n_test)
    return ImageSet(train_images, train_labels, test_images, test_labels,
                    CIFAR10_CLASSES, name="synthetic", source=f"synthetic(seed={seed})")


def split(images: ImageSet, val_fraction: float, seed: int) -> Splits:
    """Hold out a seeded random val_fraction of the training images for validation."""
    n = len(images.train_labels)
    n_val = round(n * val_fraction)
    if not 0 < n_val < n:
        raise DataError(f"val_fraction={val_fraction} leaves no training or no validation images out of {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val, train = order[:n_val], order[n_val:]
    return Splits(
        train=(images.train_images[train], images.train_labels[train]),
        val=(images.train_images[val], images.train_labels[val]),
        test=(images.test_images, images.test_labels),
        classes=images.classes,
    )


def augment(images: torch.Tensor, crop_padding: int, hflip: bool, gen: torch.Generator) -> torch.Tensor:
    """Random crops (zero padding, as torchvision's RandomCrop(32, padding)) and horizontal flips
    of a whole uint8 batch at once, on the batch's device."""
    n = len(images)
    if crop_padding:
        padded = torch.nn.functional.pad(images, (crop_padding,) * 4)
        dy, dx = torch.randint(0, 2 * crop_padding + 1, (2, n), generator=gen, device=gen.device)
        images = _crop(padded, dy.to(images.device), dx.to(images.device))
    if hflip:
        flip = torch.rand(n, generator=gen, device=gen.device).to(images.device) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(3), images)
    return images


def _crop(padded: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, size: int = 32) -> torch.Tensor:
    """Per-image size x size windows at offsets (dy, dx), by one gather over the batch."""
    offsets = torch.arange(size, device=padded.device)
    rows = (dy[:, None] + offsets)[:, None, :, None]  # (N, 1, size, 1)
    cols = (dx[:, None] + offsets)[:, None, None, :]  # (N, 1, 1, size)
    batch = torch.arange(len(padded), device=padded.device)[:, None, None, None]
    channels = torch.arange(padded.shape[1], device=padded.device)[None, :, None, None]
    return padded[batch, channels, rows, cols]
