"""The IDX loader: good files in every spelling, bad files named, offline message."""
import gzip
import os
import platform
import struct
import subprocess
import sys

import numpy as np
import pytest

from mx_lsoftmax.support.data import MNIST_FILES, DataError, load_mnist, parse_idx


def write_idx(directory, count=3, spelling="dash", compress=True, truncate=False, magic=None, side=28):
    rng = np.random.default_rng(0)
    for (split, kind), base in MNIST_FILES.items():
        n = count if split == "train" else count - 1
        if kind == "images":
            body = (struct.pack(">IIII", magic or 2051, n, side, side) +
                    rng.integers(0, 256, n * side * side, dtype=np.uint8).tobytes())
        else:
            body = struct.pack(">II", 2049, n) + rng.integers(0, 10, n, dtype=np.uint8).tobytes()
        if truncate and kind == "images" and split == "train":
            body = body[:-5]
        name = base if spelling == "dash" else base.replace("-idx", ".idx")
        path = os.path.join(directory, name + (".gz" if compress else ""))
        with (gzip.open if compress else open)(path, "wb") as handle:
            handle.write(body)


@pytest.mark.parametrize("spelling", ["dash", "dot"])
@pytest.mark.parametrize("compress", [True, False])
def test_loads_both_spellings_gzip_or_raw(tmp_path, spelling, compress):
    write_idx(str(tmp_path), spelling=spelling, compress=compress)
    mnist = load_mnist(str(tmp_path), download=False)
    assert mnist["train"][0].shape == (3, 28, 28) and mnist["train"][1].shape == (3,)
    assert mnist["test"][0].shape == (2, 28, 28)


def test_truncated_file_is_named(tmp_path):
    write_idx(str(tmp_path), truncate=True)
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz.*truncated"):
        load_mnist(str(tmp_path), download=False)


def test_wrong_magic_is_named(tmp_path):
    write_idx(str(tmp_path), magic=1234)
    with pytest.raises(DataError, match="magic number 1234, expected 2051"):
        load_mnist(str(tmp_path), download=False)


def test_corrupt_deflate_stream_is_named(tmp_path):
    """A valid gzip header over a damaged compressed body: zlib's error, with the file's name."""
    write_idx(str(tmp_path))
    path = tmp_path / "train-images-idx3-ubyte.gz"
    blob = bytearray(path.read_bytes())
    for index in range(20, 60):
        blob[index] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: cannot be read"):
        load_mnist(str(tmp_path), download=False)


def test_images_that_are_not_28_by_28_are_named(tmp_path):
    write_idx(str(tmp_path), side=32)
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: images of 32x32 pixels, expected 28x28"):
        load_mnist(str(tmp_path), download=False)


def test_an_empty_set_is_named(tmp_path):
    write_idx(str(tmp_path), count=1)  # the test set gets count - 1 = 0 images
    with pytest.raises(DataError, match="the test set is empty"):
        load_mnist(str(tmp_path), download=False)


def test_corrupt_gzip_is_named(tmp_path):
    write_idx(str(tmp_path))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b\x08garbage")
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz"):
        load_mnist(str(tmp_path), download=False)


def test_missing_files_say_what_to_put_where(tmp_path, monkeypatch):
    monkeypatch.delenv("MNIST_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(DataError) as error:
        load_mnist(str(tmp_path / "nowhere"), download=False)
    assert "train-images-idx3-ubyte.gz" in str(error.value) and "MNIST_DIR" in str(error.value)
    assert "make demo MNIST_DIR=/path/to/mnist" in str(error.value)  # what a make user can pass


def test_header_shorter_than_idx():
    with pytest.raises(DataError, match="shorter than an IDX images header"):
        parse_idx(b"\x00\x00", "x", "images")


def test_real_mnist_when_present():
    directory = os.environ.get("MNIST_DIR")
    if not directory or not os.path.isdir(directory):
        pytest.skip("MNIST_DIR is not set to the real MNIST files")
    mnist = load_mnist(directory, download=False)
    assert mnist["train"][0].shape == (60000, 28, 28)
    assert mnist["test"][0].shape == (10000, 28, 28)
    assert set(np.unique(mnist["test"][1])) == set(range(10))


def test_fashion_mnist_is_found_by_its_own_variable_and_never_downloaded(tmp_path, monkeypatch):
    from mx_lsoftmax.support.data import load_dataset
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
    with pytest.raises(DataError) as error:  # download=True: no mirror is tried for Fashion-MNIST
        load_dataset("fashion-mnist", str(tmp_path / "nowhere"))
    assert "fashion-mnist not found" in str(error.value) and "FASHION_MNIST_DIR" in str(error.value)
    assert "dataset-fashion-mnist" in str(error.value)
    (tmp_path / "fashion").mkdir()
    write_idx(str(tmp_path / "fashion"))
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path / "fashion"))
    loaded = load_dataset("fashion-mnist", download=False)
    assert loaded["train"][0].shape[1:] == (28, 28)
    with pytest.raises(ValueError, match="dataset must be one of"):
        load_dataset("cifar10")


def test_real_fashion_mnist_when_present():
    from mx_lsoftmax.support.data import DATASETS, load_dataset
    directory = os.environ.get("FASHION_MNIST_DIR")
    if not directory or not os.path.isdir(directory):
        pytest.skip("FASHION_MNIST_DIR is not set to the real Fashion-MNIST files")
    loaded = load_dataset("fashion-mnist", directory, download=False)
    assert loaded["train"][0].shape == (60000, 28, 28)
    assert np.bincount(loaded["test"][1]).tolist() == [1000] * 10
    assert len(DATASETS["fashion-mnist"].class_names) == 10
    # A different data set from MNIST: the first training images differ.
    mnist_dir = os.environ.get("MNIST_DIR")
    if mnist_dir and os.path.isdir(mnist_dir):
        assert not np.array_equal(load_mnist(mnist_dir, download=False)["train"][0][:10], loaded["train"][0][:10])


def test_environment_names_the_processor_and_settings(monkeypatch):
    from mx_lsoftmax.support import environment
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    described = environment.machine("/lib/x.so")
    assert described["processor"] == environment.processor() and described["processor"]
    assert described["environment"]["OMP_NUM_THREADS"] == "2"
    assert described["mx_lsoftmax_backend_library"] == "/lib/x.so" and described["mxnet"] == "1.9.1"
    assert described["operator_threads"] == environment.operator_threads()


# MXNet 1.9.1's default on x86: half the processors (it assumes two hardware threads per core).
MXNET_DEFAULT_THREADS = max(1, (os.cpu_count() or 1) // (2 if platform.machine() in ("x86_64", "AMD64") else 1))


@pytest.mark.parametrize("setting, expected", [
    ({}, MXNET_DEFAULT_THREADS),
    ({"OMP_NUM_THREADS": "3"}, 3),
])
def test_operator_threads_reads_what_mxnet_set(setting, expected):
    child_environment = {name: value for name, value in os.environ.items()
                         if name not in ("OMP_NUM_THREADS", "MXNET_OMP_MAX_THREADS")}
    child_environment.update(setting)
    printed = subprocess.run(
        [sys.executable, "-c", "import mxnet; from mx_lsoftmax.support import environment; "
                               "print(environment.operator_threads())"],
        env=child_environment, capture_output=True, text=True, check=True).stdout.split()[-1]
    assert printed == str(expected)
