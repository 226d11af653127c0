"""MNIST and Fashion-MNIST in IDX format, for the examples.

Both data sets share the IDX format and the four file names; ``DATASETS`` says
where each is looked for. Search order: ``data_dir``, the data set's environment
variable (``$MNIST_DIR``, ``$FASHION_MNIST_DIR``), its usual folders, then (MNIST
only) a download from the usual mirror. Both spellings of the names are accepted
(``train-images-idx3-ubyte`` and ``train-images.idx3-ubyte``), gzip-compressed or raw.
Every file is checked (magic number, counts, sizes) and a bad one is named.
"""
import gzip
import os
import struct
import zlib
import urllib.error
import urllib.request
from dataclasses import dataclass

import numpy as np

__all__ = ["load_dataset", "load_mnist", "resolve_directory", "DataError", "MNIST_FILES", "DATASETS"]

MNIST_FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049


@dataclass(frozen=True)
class Dataset:
    """Where one IDX data set is looked for, and what its classes are."""

    name: str
    environment: str          # the variable naming its folder
    folders: tuple            # usual folders, after data_dir and the variable
    mirror: str               # download URL prefix, or None (no download)
    class_names: tuple
    hint: str                 # how to get it when it is missing
    train_per_class: int = 6000  # training images per class (both sets are balanced)


DATASETS = {dataset.name: dataset for dataset in (
    Dataset("mnist", "MNIST_DIR", (os.path.join(os.path.expanduser("~"), ".mxnet", "datasets", "mnist"),),
            "https://ossci-datasets.s3.amazonaws.com/mnist/", tuple(str(digit) for digit in range(10)),
            "or give make the folder: `make demo MNIST_DIR=/path/to/mnist`, "
            "`make test MNIST_DIR=/path/to/mnist`"),
    Dataset("fashion-mnist", "FASHION_MNIST_DIR",
            (os.path.join(os.path.expanduser("~"), ".mxnet", "datasets", "fashion-mnist"),
             "/usr/share/datasets/fashion-mnist"),
            None, ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                   "Bag", "Ankle boot"),
            "or install Debian's package dataset-fashion-mnist (/usr/share/datasets/fashion-mnist)"),
)}
DEFAULT_DIR = DATASETS["mnist"].folders[0]


class DataError(RuntimeError):
    """A data file is missing, truncated or corrupt; the message names it."""


def _candidates(directory, base):
    dotted = base.replace("-idx", ".idx")
    for name in (base, dotted):
        for suffix in (".gz", ""):
            yield os.path.join(directory, name + suffix)


def _find(directory, base):
    for path in _candidates(directory, base):
        if os.path.isfile(path):
            return path
    return None


def _read(path):
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            return handle.read()
    except (OSError, EOFError, zlib.error) as error:  # zlib.error: a corrupt deflate stream
        raise DataError(f"{path}: cannot be read ({error}); it is truncated or corrupt") from None


def parse_idx(blob, path, kind):
    """Images (count, 28, 28) uint8 or labels (count,) uint8 from IDX bytes; checks every size."""
    magic_expected = IMAGE_MAGIC if kind == "images" else LABEL_MAGIC
    header = 16 if kind == "images" else 8
    if len(blob) < header:
        raise DataError(f"{path}: {len(blob)} bytes, shorter than an IDX {kind} header")
    magic, count = struct.unpack(">II", blob[:8])
    if magic != magic_expected:
        raise DataError(f"{path}: magic number {magic}, expected {magic_expected} for IDX {kind}")
    shape = (count,)
    if kind == "images":
        rows, columns = struct.unpack(">II", blob[8:16])
        if (rows, columns) != (28, 28):
            raise DataError(f"{path}: images of {rows}x{columns} pixels, expected 28x28 (MNIST / Fashion-MNIST)")
        shape = (count, rows, columns)
    expected = header + int(np.prod(shape))
    if len(blob) != expected:
        raise DataError(f"{path}: {len(blob)} bytes, expected {expected} for {count} {kind}; "
                        f"the file is truncated or corrupt")
    return np.frombuffer(blob, dtype=np.uint8, offset=header).reshape(shape)


def _download(mirror, directory, base):
    os.makedirs(directory, exist_ok=True)
    target = os.path.join(directory, base + ".gz")
    try:
        with urllib.request.urlopen(mirror + base + ".gz", timeout=20) as response, open(target, "wb") as out:
            out.write(response.read())
    except (urllib.error.URLError, OSError) as error:
        if os.path.exists(target):
            os.remove(target)
        return error
    return None


def _dataset(name):
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {tuple(DATASETS)}, got {name!r}")
    return DATASETS[name]


def _places(dataset, data_dir):
    return [place for place in (data_dir, os.environ.get(dataset.environment), *dataset.folders) if place]


def resolve_directory(data_dir=None, dataset="mnist"):
    """The first folder that holds all four files of ``dataset``, or None."""
    for directory in _places(_dataset(dataset), data_dir):
        if all(_find(directory, base) for base in MNIST_FILES.values()):
            return directory
    return None


def load_dataset(dataset="mnist", data_dir=None, download=True):
    """Return {'train': (images, labels), 'test': (images, labels)}, uint8 arrays.

    dataset: 'mnist' or 'fashion-mnist'. images: (count, 28, 28); labels: (count,)
    in 0..9. Raises DataError with the file to fix, or, with no local copy (and,
    for MNIST, no network), with the files to put where.
    """
    spec = _dataset(dataset)
    directory = resolve_directory(data_dir, dataset)
    if directory is None:
        directory = _places(spec, data_dir)[0]
        if not download or spec.mirror is None:
            raise DataError(_missing_message(spec, data_dir))
        for base in MNIST_FILES.values():
            if _find(directory, base) is None:
                error = _download(spec.mirror, directory, base)
                if error is not None:
                    raise DataError(f"could not download {base}.gz ({error}). " + _missing_message(spec, data_dir))
    result = {}
    for split in ("train", "test"):
        arrays = []
        for kind in ("images", "labels"):
            path = _find(directory, MNIST_FILES[(split, kind)])
            arrays.append(parse_idx(_read(path), path, kind))
        images, labels = arrays
        if len(images) != len(labels):
            raise DataError(f"{directory}: {split} has {len(images)} images but {len(labels)} labels")
        if len(images) == 0:
            raise DataError(f"{path}: the {split} set is empty (0 images)")
        if labels.size and labels.max() > 9:
            raise DataError(f"{directory}: {split} labels hold {labels.max()}, expected 0..9")
        result[split] = (images, labels)
    return result


def load_mnist(data_dir=None, download=True):
    """MNIST: ``load_dataset('mnist', data_dir, download)``."""
    return load_dataset("mnist", data_dir, download)


def _missing_message(spec, data_dir):
    names = ", ".join(base + ".gz" for base in MNIST_FILES.values())
    return (f"{spec.name} not found. Put the four IDX files ({names}; gzip or raw) in one of: "
            f"{', '.join(_places(spec, data_dir))} (or pass --data-dir, set {spec.environment}, "
            f"{spec.hint}).")
