"""MNIST and Fashion-MNIST in IDX format, for the examples.

Search order for the four files: ``data_dir``, ``$MNIST_DIR``, ``~/.mxnet/datasets/mnist``,
then a download from the usual mirror. Both spellings of the names are accepted
(``train-images-idx3-ubyte`` and ``train-images.idx3-ubyte``), gzip-compressed or raw.
Every file is checked (magic number, counts, sizes) and a bad one is named.
"""
import gzip
import os
import struct
import zlib
import urllib.error
import urllib.request

import numpy as np

__all__ = ["load_mnist", "DataError", "MNIST_FILES"]

MNIST_FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"
DEFAULT_DIR = os.path.join(os.path.expanduser("~"), ".mxnet", "datasets", "mnist")
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049


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


def _download(directory, base):
    os.makedirs(directory, exist_ok=True)
    target = os.path.join(directory, base + ".gz")
    try:
        with urllib.request.urlopen(MIRROR + base + ".gz", timeout=20) as response, open(target, "wb") as out:
            out.write(response.read())
    except (urllib.error.URLError, OSError) as error:
        if os.path.exists(target):
            os.remove(target)
        return error
    return None


def resolve_directory(data_dir=None):
    """The first directory that holds all four files, or None."""
    for directory in (data_dir, os.environ.get("MNIST_DIR"), DEFAULT_DIR):
        if directory and all(_find(directory, base) for base in MNIST_FILES.values()):
            return directory
    return None


def load_mnist(data_dir=None, download=True):
    """Return {'train': (images, labels), 'test': (images, labels)}, uint8 arrays.

    images: (count, 28, 28); labels: (count,). Raises DataError with the file to
    fix, or, offline with no local copy, with the files to put where.
    """
    directory = resolve_directory(data_dir)
    if directory is None:
        directory = data_dir or os.environ.get("MNIST_DIR") or DEFAULT_DIR
        if not download:
            raise DataError(_missing_message(data_dir))
        for base in MNIST_FILES.values():
            if _find(directory, base) is None:
                error = _download(directory, base)
                if error is not None:
                    raise DataError(f"could not download {base}.gz ({error}). " + _missing_message(data_dir))
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


def _missing_message(data_dir):
    places = [p for p in (data_dir, os.environ.get("MNIST_DIR"), DEFAULT_DIR) if p]
    names = ", ".join(base + ".gz" for base in MNIST_FILES.values())
    return (f"MNIST not found. Put the four IDX files ({names}; gzip or raw) in one of: "
            f"{', '.join(places)} (or pass --data-dir, set MNIST_DIR, or give make the folder: "
            f"`make demo MNIST_DIR=/path/to/mnist`, `make test MNIST_DIR=/path/to/mnist`). "
            f"Fashion-MNIST: Debian's package dataset-fashion-mnist, /usr/share/datasets/fashion-mnist.")
