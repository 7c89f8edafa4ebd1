import hashlib
import http.server
import os
import tarfile
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from alexnet_mlflow import layouts
from alexnet_mlflow.data import CIFAR10_CLASSES
from alexnet_mlflow.errors import DataError


def test_batches_folder_inside_data_dir(tmp_path, write_cifar_batches):
    write_cifar_batches(tmp_path / "cifar-10-batches-py", per_batch=20)
    images = layouts.load(tmp_path)
    assert images.layout == "cifar-10-batches-py"
    assert images.train_images.shape == (100, 3, 32, 32) and images.train_images.dtype == torch.uint8
    assert images.test_images.shape == (20, 3, 32, 32) and images.has_test
    assert images.train_labels.dtype == torch.int64 and images.train_labels.max() <= 9
    assert images.classes == CIFAR10_CLASSES and len(images.digest) == 16


def test_data_dir_may_be_the_batches_folder_itself(tmp_path, write_cifar_batches):
    folder = write_cifar_batches(tmp_path / "cifar-10-batches-py", per_batch=4)
    assert torch.equal(layouts.load(folder).train_images, layouts.load(tmp_path).train_images)


def test_rows_decode_as_channel_planes(tmp_path, write_cifar_batches):
    """A CIFAR row is 1024 red, then 1024 green, then 1024 blue bytes, each plane row-major."""
    import pickle

    folder = write_cifar_batches(tmp_path / "cifar-10-batches-py", per_batch=2)
    with open(folder / "data_batch_1", "rb") as f:
        row = pickle.load(f, encoding="latin1")["data"][0]
    image = layouts.load(tmp_path).train_images[0]
    assert image[0, 0, 1] == row[1] and image[1, 0, 0] == row[1024] and image[2, 31, 31] == row[3071]


def make_archive(source, archive):
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname="cifar-10-batches-py")
    return archive


def test_archive_is_read_in_place(tmp_path, write_cifar_batches):
    source = write_cifar_batches(tmp_path / "src" / "cifar-10-batches-py", per_batch=5)
    root = tmp_path / "data"
    root.mkdir()
    make_archive(source, root / layouts.CIFAR10_ARCHIVE)
    images = layouts.load(root)
    assert images.layout == "cifar-10-python.tar.gz" and len(images.train_labels) == 25
    assert torch.equal(images.train_images, layouts.read_batches(source).train_images)
    assert sorted(p.name for p in root.iterdir()) == [layouts.CIFAR10_ARCHIVE]  # nothing extracted


def test_truncated_archive_names_the_file(tmp_path, write_cifar_batches):
    source = write_cifar_batches(tmp_path / "src" / "cifar-10-batches-py", per_batch=5)
    archive = make_archive(source, tmp_path / layouts.CIFAR10_ARCHIVE)
    archive.write_bytes(archive.read_bytes()[:200])
    with pytest.raises(DataError, match="cifar-10-python.tar.gz is not a readable tar.gz archive"):
        layouts.load(tmp_path)


def test_image_folder_png_and_jpeg_in_cifar_label_order(tmp_path, write_image_folder):
    write_image_folder(tmp_path, ["truck", "airplane", "cat"], per_class=3)
    images = layouts.load(tmp_path)
    assert images.layout == "image-folder" and images.classes == ("airplane", "cat", "truck")
    assert images.train_images.shape == (9, 3, 32, 32) and images.test_images.shape == (9, 3, 32, 32)
    assert images.train_labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    png = np.asarray(Image.open(tmp_path / "train" / "cat" / "0001.png"))
    assert torch.equal(images.train_images[4], torch.from_numpy(png).permute(2, 0, 1))  # PNG is lossless

    jpegs = write_image_folder(tmp_path / "jpeg", ["dog", "bird"], per_class=2, suffix=".jpg", test=False)
    assert layouts.load(jpegs).classes == ("bird", "dog")  # CIFAR order: bird 2, dog 5


def test_other_class_names_are_sorted(tmp_path, write_image_folder):
    write_image_folder(tmp_path, ["zebra", "ant", "moose"], per_class=1, test=False)
    images = layouts.load(tmp_path)
    assert images.classes == ("ant", "moose", "zebra") and not images.has_test
    assert images.test_images.shape == (0, 3, 32, 32)


def test_other_sizes_are_resized_to_32(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    Image.new("L", (64, 48), 200).save(tmp_path / "train" / "cat" / "big.png")  # grayscale, 64x48
    image = layouts.load(tmp_path).train_images[0]
    assert image.shape == (3, 32, 32) and int(image.min()) == int(image.max()) == 200


def test_corrupt_image_names_the_file_or_is_skipped(tmp_path, write_image_folder):
    write_image_folder(tmp_path, ["cat", "dog"], per_class=3, test=False, suffix=".jpg")
    bad = tmp_path / "train" / "dog" / "0001.jpg"
    bad.write_bytes(bad.read_bytes()[:100])  # truncated JPEG
    (tmp_path / "train" / "cat" / "notes.jpg").write_text("not an image")
    with pytest.raises(DataError, match=r"(0001|notes)\.jpg is not a readable image.*--skip-bad-images"):
        layouts.load(tmp_path)
    images = layouts.load(tmp_path, skip_bad_images=True)
    assert images.skipped == 2 and len(images.train_labels) == 5  # 6 images + notes.jpg, 2 unreadable


def test_folder_in_no_layout_lists_the_layouts(tmp_path):
    (tmp_path / "notes.txt").write_text("not CIFAR")
    with pytest.raises(DataError, match="holds no CIFAR-10: expected cifar-10-batches-py/.*cifar-10-python.tar.gz"
                                        ".*train/<class>"):
        layouts.load(tmp_path)


def test_incomplete_batches_folder_lists_what_is_missing(tmp_path, write_cifar_batches):
    folder = write_cifar_batches(tmp_path / "cifar-10-batches-py", per_batch=4)
    (folder / "test_batch").unlink()
    with pytest.raises(DataError, match="missing test_batch"):
        layouts.load(tmp_path)


def test_corrupt_batch_names_the_file(tmp_path, write_cifar_batches):
    folder = write_cifar_batches(tmp_path / "cifar-10-batches-py", per_batch=4)
    (folder / "data_batch_3").write_bytes(b"\x80\x02garbage")
    with pytest.raises(DataError, match="data_batch_3 is not a CIFAR-10 batch"):
        layouts.load(tmp_path)


def test_cache_is_used_while_the_source_is_unchanged_and_rebuilt_after(tmp_path, write_image_folder):
    write_image_folder(tmp_path, ["cat", "dog"], per_class=2, test=False)
    first = layouts.load(tmp_path)
    assert layouts.cache_path(tmp_path.resolve(), False).is_file() or layouts.cache_path(tmp_path, False).is_file()
    (tmp_path / "notes.txt").write_text("files beside train/ and test/ are not data")
    # Same size, same modification time, unreadable content: only the cache can still answer.
    image = tmp_path / "train" / "dog" / "0000.png"
    stat = image.stat()
    image.write_bytes(b"\0" * stat.st_size)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert torch.equal(layouts.load(tmp_path).train_images, first.train_images)
    # A changed modification time invalidates the cache: the bad file is decoded and reported.
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(DataError, match="0000.png is not a readable image"):
        layouts.load(tmp_path)


def test_cache_of_the_batches_is_reused(tmp_path, write_cifar_batches):
    write_cifar_batches(tmp_path / "cifar-10-batches-py", per_batch=4)
    first = layouts.load(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    stat = batch.stat()
    batch.write_bytes(b"\0" * stat.st_size)
    os.utime(batch, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert layouts.load(tmp_path).digest == first.digest


@pytest.fixture
def archive_server(tmp_path, write_cifar_batches):
    """A local HTTP server holding cifar-10-python.tar.gz built from a small batches folder."""
    source = write_cifar_batches(tmp_path / "src" / "cifar-10-batches-py", per_batch=10)
    served = tmp_path / "served"
    served.mkdir()
    archive = make_archive(source, served / layouts.CIFAR10_ARCHIVE)
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(served), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/{layouts.CIFAR10_ARCHIVE}"
    yield url, hashlib.md5(archive.read_bytes()).hexdigest()
    server.shutdown()


def test_download_verifies_the_checksum_and_extracts(tmp_path, archive_server):
    url, md5 = archive_server
    root = tmp_path / "cache"
    layouts.download(root, url=url, md5=md5)
    images = layouts.load(root)
    assert len(images.train_labels) == 50 and len(images.test_labels) == 10


def test_download_with_a_wrong_checksum_fails_with_where_to_put_the_files(tmp_path, archive_server):
    url, _ = archive_server
    with pytest.raises(DataError, match=f"could not download CIFAR-10 from {url}.*put the extracted"):
        layouts.download(tmp_path / "cache", url=url, md5="0" * 32)


def test_unreachable_download_says_where_to_put_the_files(tmp_path):
    from conftest import free_port

    url = f"http://127.0.0.1:{free_port()}/{layouts.CIFAR10_ARCHIVE}"
    with pytest.raises(DataError, match=f"put the extracted cifar-10-batches-py/ folder or .* in {tmp_path}"):
        layouts.download(tmp_path, url=url)
