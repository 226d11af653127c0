"""Smoke test of the example on a slice of real MNIST: it learns and writes valid --json."""
import importlib.util
import json
import os

import pytest

from mx_lsoftmax.data import resolve_directory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_example():
    spec = importlib.util.spec_from_file_location("train_mnist", os.path.join(ROOT, "examples", "train_mnist.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("backend", ["python", "compiled", "softmax"])
def test_short_run_learns_and_writes_json(tmp_path, backend):
    if resolve_directory(None) is None:
        pytest.skip("real MNIST not found (set MNIST_DIR, see ../shared/data/mnist)")
    if backend == "compiled":
        import mx_lsoftmax
        if not mx_lsoftmax.library.is_loaded():
            pytest.skip("the compiled library is not built (run `make`)")
    summary_path = tmp_path / "summary.json"
    load_example().main(["--backend", backend, "--epochs", "2", "--train-limit", "10000",
                         "--test-limit", "1000", "--embed-dim", "2", "--margin", "2", "--beta", "10",
                         "--lr", "0.05", "--lr-steps", "--no-progress", "--json", str(summary_path),
                         "--plot", str(tmp_path / "features.png")])
    summary = json.loads(summary_path.read_text())
    assert summary["test_accuracy"] > 0.5  # chance is 0.1
    assert summary["train_samples_per_sec"] > 0
    assert summary["settings"]["backend"] == backend
    if backend != "softmax":
        assert summary["final_beta"] < 10.0 or summary["settings"]["scale"] == 1.0
    assert (tmp_path / "features.png").stat().st_size > 1000
