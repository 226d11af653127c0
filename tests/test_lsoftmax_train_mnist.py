"""Smoke test of the example on a slice of real MNIST: it learns and writes valid --json."""
import json

import pytest

from mx_lsoftmax.support.data import resolve_directory

from conftest import load_example


@pytest.mark.parametrize("backend", ["python", "compiled", "softmax"])
def test_short_run_learns_and_writes_json(tmp_path, backend):
    if resolve_directory(None) is None:
        pytest.skip("real MNIST not found (set MNIST_DIR, see ../shared/data/mnist)")
    if backend == "compiled":
        import mx_lsoftmax
        if not mx_lsoftmax.library.is_loaded():
            pytest.skip("the compiled library is not built (run `make`)")
    summary_path = tmp_path / "summary.json"
    load_example("train_mnist").main(["--backend", backend, "--epochs", "2", "--train-limit", "10000",
                         "--test-limit", "1000", "--embed-dim", "2", "--margin", "2", "--beta", "10",
                         "--lr", "0.05", "--lr-steps", "--no-progress", "--json", str(summary_path),
                         "--plot", str(tmp_path / "features.png")])
    summary = json.loads(summary_path.read_text())
    assert summary["test_accuracy"] > 0.5  # chance is 0.1
    assert summary["train_samples_per_sec"] > 0
    assert summary["settings"]["backend"] == backend
    machine = summary["machine"]  # what the figures depend on besides the code
    assert machine["cores"] >= 1 and machine["mxnet"] == "1.9.1" and "OMP_NUM_THREADS" in machine["environment"]
    if backend != "softmax":
        assert summary["final_beta"] < 10.0 or summary["settings"]["scale"] == 1.0
    assert (tmp_path / "features.png").stat().st_size > 1000


def test_paper_net_layout_and_one_training_epoch(tmp_path):
    """The paper's MNIST network: 10 convs with BN + ReLU, three pools, FC 512; it trains end to end."""
    import mxnet as mx
    from mxnet.gluon import nn

    example = load_example("train_mnist")
    net = example.paper_net(512)
    layers = list(net._children.values())
    convolutions = [layer for layer in layers if isinstance(layer, nn.Conv2D)]
    assert len(convolutions) == 10
    assert [layer._channels for layer in convolutions] == [64] + [64] * 3 + [128] * 3 + [256] * 3
    assert sum(isinstance(layer, nn.BatchNorm) for layer in layers) == 10
    assert sum(isinstance(layer, nn.MaxPool2D) for layer in layers) == 3
    net.initialize(mx.init.Xavier())
    assert net(mx.nd.zeros((2, 1, 28, 28))).shape == (2, 512)
    assert example.parse_arguments(["--net", "paper"]).embed_dim == 512
    assert example.parse_arguments([]).embed_dim == 256

    if resolve_directory(None) is None:
        pytest.skip("real MNIST not found (set MNIST_DIR, see ../shared/data/mnist)")
    summary_path = tmp_path / "paper.json"
    example.main(["--net", "paper", "--epochs", "1", "--train-limit", "64", "--test-limit", "64",
                  "--batch-size", "32", "--no-progress", "--json", str(summary_path)])
    summary = json.loads(summary_path.read_text())
    assert summary["settings"]["net"] == "paper" and summary["settings"]["embed_dim"] == 512
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    assert summary["epochs"][0]["loss"] > 0 and summary["train_samples_per_sec"] > 0


def test_results_script_reuses_only_matching_logs(tmp_path, monkeypatch):
    results = load_example("mnist_results")
    trained = []

    def fake_main(argv):
        trained.append(argv)
        return {"test_accuracy": 0.5, "settings": {}}
    monkeypatch.setattr(results.train_mnist, "main", fake_main)
    arguments = results.argparse.Namespace(runs_dir=str(tmp_path), reuse=True, train_limit=0)
    argv = results.setting_args(4) + ["--epochs", "20", "--seed", "1"]
    settings = vars(results.train_mnist.parse_arguments(argv + ["--json", "x"]))
    (tmp_path / "accuracy_4_seed1.json").write_text(json.dumps({"test_accuracy": 0.99, "settings": settings}))
    assert results.run("accuracy_4_seed1", argv, arguments)["test_accuracy"] == 0.99
    assert trained == []

    settings["epochs"] = 5  # a log of another protocol is not reused
    (tmp_path / "accuracy_4_seed1.json").write_text(json.dumps({"test_accuracy": 0.99, "settings": settings}))
    assert results.run("accuracy_4_seed1", argv, arguments)["test_accuracy"] == 0.5
    assert trained and "--epochs" in trained[0] and trained[0][trained[0].index("--epochs") + 1] == "20"
