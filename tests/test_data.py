import hashlib
import http.server
import tarfile
import threading

import pytest
import torch

from alexnet_mlflow import data
from alexnet_mlflow.errors import DataError


def test_batches_loader_reads_the_torchvision_layout(tmp_path, write_cifar_batches):
    write_cifar_batches(tmp_path / "cifar-10-batches-py", per_batch=20)
    images = data.load_cifar10(tmp_path)
    assert images.train_images.shape == (100, 3, 32, 32) and images.train_images.dtype == torch.uint8
    assert images.test_images.shape == (20, 3, 32, 32)
    assert images.train_labels.dtype == torch.int64 and images.train_labels.max() <= 9
    assert images.classes[0] == "airplane" and len(images.classes) == 10


def test_rows_decode_as_channel_planes(tmp_path, write_cifar_batches):
    """A CIFAR row is 1024 red, then 1024 green, then 1024 blue bytes, each plane row-major."""
    import pickle

    folder = write_cifar_batches(tmp_path / "cifar-10-batches-py", per_batch=2)
    with open(folder / "data_batch_1", "rb") as f:
        row = pickle.load(f, encoding="latin1")["data"][0]
    image = data.load_cifar10(tmp_path).train_images[0]
    assert image[0, 0, 1] == row[1] and image[1, 0, 0] == row[1024] and image[2, 31, 31] == row[3071]


def test_folder_without_cifar_is_an_error_that_says_what_is_expected(tmp_path):
    (tmp_path / "notes.txt").write_text("not CIFAR")
    with pytest.raises(DataError, match="holds no CIFAR-10.*cifar-10-batches-py"):
        data.load_cifar10(tmp_path)


def test_corrupt_batch_names_the_file(tmp_path, write_cifar_batches):
    folder = write_cifar_batches(tmp_path / "cifar-10-batches-py", per_batch=4)
    (folder / "data_batch_3").write_bytes(b"\x80\x02garbage")
    with pytest.raises(DataError, match="data_batch_3 is not a CIFAR-10 batch"):
        data.load_cifar10(tmp_path)


def test_incomplete_folder_lists_missing_batches(tmp_path, write_cifar_batches):
    folder = write_cifar_batches(tmp_path / "cifar-10-batches-py", per_batch=4)
    (folder / "test_batch").unlink()
    with pytest.raises(DataError, match="missing test_batch"):
        data.load_cifar10(tmp_path)


@pytest.fixture
def archive_server(tmp_path, write_cifar_batches):
    """A local HTTP server holding cifar-10-python.tar.gz built from a small batches folder."""
    source = write_cifar_batches(tmp_path / "src" / "cifar-10-batches-py", per_batch=10)
    served = tmp_path / "served"
    served.mkdir()
    archive = served / data.CIFAR10_ARCHIVE
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname="cifar-10-batches-py")
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(served), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/{data.CIFAR10_ARCHIVE}"
    yield url, hashlib.md5(archive.read_bytes()).hexdigest()
    server.shutdown()


def test_download_verifies_the_checksum_and_extracts(tmp_path, archive_server):
    url, md5 = archive_server
    root = tmp_path / "cache"
    data.download_cifar10(root, url=url, md5=md5)
    images = data.load_cifar10(root)
    assert len(images.train_labels) == 50 and len(images.test_labels) == 10


def test_download_with_a_wrong_checksum_fails_with_where_to_put_the_files(tmp_path, archive_server):
    url, _ = archive_server
    root = tmp_path / "cache"
    with pytest.raises(DataError, match=f"could not download CIFAR-10 from {url}.*put the extracted"):
        data.download_cifar10(root, url=url, md5="0" * 32)


def test_unreachable_download_says_where_to_put_the_files(tmp_path):
    from conftest import free_port

    url = f"http://127.0.0.1:{free_port()}/{data.CIFAR10_ARCHIVE}"
    with pytest.raises(DataError, match=f"put the extracted cifar-10-batches-py/ folder or .* in {tmp_path}"):
        data.download_cifar10(tmp_path, url=url)


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


def test_augment_off_is_identity():
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(data.augment(images, 0, False, torch.Generator()), images)
