import pytest
import torch

from alexnet_mlflow import data
from alexnet_mlflow.errors import DataError


def test_synthetic_is_deterministic_and_class_dependent():
    a, b = data.synthetic(seed=3), data.synthetic(seed=3)
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.train_labels, b.train_labels)
    assert not torch.equal(a.train_images, data.synthetic(seed=4).train_images)
    # Images of one class are closer to their class mean than to other classes' means.
    means = torch.stack([a.train_images[a.train_labels == c].float().mean(0) for c in range(10)])
    distances = torch.cdist(a.test_images.float().flatten(1), means.flatten(1))
    assert (distances.argmin(1) == a.test_labels).float().mean() > 0.5


def test_split_holds_out_a_seeded_fraction():
    images = data.synthetic(seed=0)
    first, again = data.split(images, 0.1, seed=1), data.split(images, 0.1, seed=1)
    assert len(first.val[1]) == 100 and len(first.train[1]) == 900
    assert torch.equal(first.val[0], again.val[0])
    assert not torch.equal(first.val[0], data.split(images, 0.1, seed=2).val[0])


def test_augment_crops_within_the_padding_and_flips():
    gen = torch.Generator().manual_seed(0)
    images = torch.arange(32 * 32, dtype=torch.int32).reshape(1, 1, 32, 32).repeat(256, 3, 1, 1)
    out = data.augment(images, crop_padding=4, hflip=False, gen=gen)
    assert out.shape == images.shape
    shifts = set()
    for img in out:
        nonzero = img[0] != 0
        rows, cols = nonzero.any(1).nonzero(), nonzero.any(0).nonzero()
        shifts.add((int(rows.min()), int(cols.min())))
    assert len(shifts) > 20  # many different offsets across the batch
    flipped = data.augment(images, crop_padding=0, hflip=True, gen=gen)
    is_flipped = (flipped == images.flip(3)).flatten(1).all(1)
    is_same = (flipped == images).flatten(1).all(1)
    assert (is_flipped | is_same).all() and 64 < is_flipped.sum() < 192


def test_split_refuses_a_fraction_that_leaves_nothing():
    with pytest.raises(DataError, match="leaves no training or no validation images"):
        data.split(data.synthetic(0), 0.0001, seed=0)


def test_augment_off_is_identity():
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(data.augment(images, 0, False, torch.Generator()), images)
