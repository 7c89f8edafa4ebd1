"""CIFAR-10 as uint8 tensors, decoded once, and batched augmentation on the training device.

The standard pipeline (torchvision dataset + per-image PIL RandomCrop/Flip/ToTensor in a
DataLoader) spends 3-7 s an epoch on a 2-core CPU in PIL alone; cropping and flipping a whole
uint8 batch with tensor indexing costs ~0.5 s an epoch and runs on the GPU when there is one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alexnet_mlflow.errors import DataError

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
# Small enough for a CPU smoke run of the full AlexNet in seconds an epoch.
SYNTHETIC_TRAIN, SYNTHETIC_TEST = 1000, 200


@dataclass(frozen=True)
class ImageSet:
    """A dataset's splits as uint8 (N, 3, 32, 32) images and int64 labels, on the CPU.
    The test split is empty when the source has none."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: tuple[str, ...]
    layout: str  # "cifar-10-batches-py", "cifar-10-python.tar.gz", "image-folder" or "synthetic"
    source: str  # the folder or file decoded, or how the images were made
    digest: str  # sha256 of images and labels, first 16 hex digits: tells datasets apart
    skipped: int = 0  # unreadable images skipped with --skip-bad-images

    @property
    def has_test(self) -> bool:
        return len(self.test_labels) > 0


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


def load_dataset(dataset: str, data_dir: str, seed: int, skip_bad_images: bool = False) -> ImageSet:
    if dataset == "synthetic":
        return synthetic(seed)
    from alexnet_mlflow import layouts

    return layouts.load(layouts.resolve_data_dir(data_dir), skip_bad_images)


def digest(*tensors: torch.Tensor) -> str:
    import hashlib

    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


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
    return ImageSet(train_images, train_labels, test_images, test_labels, CIFAR10_CLASSES, layout="synthetic",
                    source=f"synthetic(seed={seed})",
                    digest=digest(train_images, train_labels, test_images, test_labels))


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
