"""Classify image files with a logged model: the data behind `alexnet-mlflow predict`.

The logged model takes raw uint8 images (N, 3, 32, 32) and normalises them itself, exactly as in
training; here images are only decoded, made RGB and resized to 32x32 by the same function the
training data goes through (layouts.to_cifar_pixels). Class names come from the model's metadata.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from alexnet_mlflow.compare import Table
from alexnet_mlflow.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class Prediction:
    file: str
    predicted: str
    top: tuple[tuple[str, float], ...]  # (class, probability), most likely first
    note: str  # what was done to the image to fit the model, e.g. "resized from 640x480 to 32x32"


def image_files(paths: list[str]) -> list[Path]:
    """The files named, and the images inside the folders named (recursively, sorted)."""
    files: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{name!r} does not exist: pass image files or folders of images")
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(paths)}")
    return files


def read_images(files: list[Path]):
    """(N, 3, 32, 32) uint8 and one note per file."""
    import numpy as np
    from PIL import Image

    from alexnet_mlflow.layouts import to_cifar_pixels

    pixels, notes = [], []
    for path in files:
        try:
            with Image.open(path) as image:
                array, note = to_cifar_pixels(image)
        except Exception as e:  # noqa: BLE001 (PIL raises several kinds for unreadable files)
            raise DataError(f"{path} is not a readable image ({type(e).__name__}: {e})") from None
        pixels.append(array.transpose(2, 0, 1))  # HWC -> CHW, as the model takes it
        notes.append(note)
    return np.ascontiguousarray(np.stack(pixels)), notes


def predict(model, classes: list[str], files: list[Path], top_k: int = 3) -> list[Prediction]:
    import numpy as np

    images, notes = read_images(files)
    scores = np.asarray(model.predict(images), dtype=np.float64)
    probabilities = np.exp(scores - scores.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    out = []
    for path, row, note in zip(files, probabilities, notes):
        order = np.argsort(-row)[:top_k]
        top = tuple((classes[i], float(row[i])) for i in order)
        out.append(Prediction(str(path), top[0][0], top, note))
    return out


def prediction_table(predictions: list[Prediction], model_uri: str) -> Table:
    k = max(len(p.top) for p in predictions)
    columns = ("file", "predicted", *(f"top{i + 1}" for i in range(k)), *(f"p{i + 1}" for i in range(k)), "note")
    rows = tuple(
        (p.file, p.predicted, *(c for c, _ in p.top), *(round(prob, 4) for _, prob in p.top), p.note or None)
        for p in predictions
    )
    return Table(f"predictions of {model_uri}", columns, rows)
