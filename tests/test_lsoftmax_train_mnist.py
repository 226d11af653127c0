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
    head = [] if backend == "softmax" else ["--margin", "2", "--beta", "10"]
    load_example("train_mnist").main(["--backend", backend, "--epochs", "2", "--train-limit", "10000",
                         "--test-limit", "1000", "--embed-dim", "2", "--lr", "0.05", "--lr-steps",
                         "--no-progress", "--json", str(summary_path),
                         "--plot", str(tmp_path / "features.png")] + head)
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


def test_code_version_marks_changed_code_not_changed_logs(tmp_path):
    """A log records '+changes' when tracked code differs from the commit; the run logs and
    documents under docs/ (which `make results` rewrites and removes) and untracked files do not count."""
    import subprocess
    code_version = load_example("train_mnist").code_version

    def git(*arguments):
        subprocess.run(["git", *arguments], cwd=tmp_path, check=True, capture_output=True)
    (tmp_path / "docs" / "runs").mkdir(parents=True)
    (tmp_path / "model.py").write_text("margin = 4\n")
    (tmp_path / "docs" / "runs" / "family_seed0.json").write_text("{}\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-q", "-m", "runs")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, check=True,
                            capture_output=True, text=True).stdout.strip()
    assert code_version(str(tmp_path)) == commit

    (tmp_path / "docs" / "runs" / "family_seed0.json").unlink()  # removed, to run it again
    (tmp_path / "scratch.py").write_text("untracked\n")
    assert code_version(str(tmp_path)) == commit

    (tmp_path / "model.py").write_text("margin = 2\n")
    assert code_version(str(tmp_path)) == commit + "+changes"
    assert code_version(str(tmp_path / "missing")) is None


@pytest.mark.parametrize("loss", ["sphereface", "cosface", "arcface", "combined"])
def test_every_kind_trains_on_fashion_mnist_and_draws_the_sphere(tmp_path, loss):
    if resolve_directory(None, "fashion-mnist") is None:
        pytest.skip("real Fashion-MNIST not found (set FASHION_MNIST_DIR, see ../shared/data/fashion-mnist)")
    summary_path, plot_path = tmp_path / "summary.json", tmp_path / "sphere.png"
    head = {"sphereface": [], "cosface": ["--s", "16", "--margin", "0.2"], "arcface": ["--s", "16", "--margin", "0.3"],
            "combined": ["--s", "16", "--m2", "0.2", "--m3", "0.1"]}[loss]
    load_example("train_mnist").main(["--dataset", "fashion-mnist", "--loss", loss, "--epochs", "1",
                                      "--train-limit", "6000", "--test-limit", "1000", "--no-progress",
                                      "--json", str(summary_path)] + head)
    summary = json.loads(summary_path.read_text())
    settings = summary["settings"]
    assert settings["dataset"] == "fashion-mnist" and settings["loss"] == loss
    assert summary["test_accuracy"] > 0.3  # chance is 0.1
    assert len(summary["test_accuracy_per_class"]) == 10
    # The overall accuracy is the class-weighted mean of the per-class ones.
    import numpy as np
    from mx_lsoftmax.support.data import load_dataset
    counts = np.bincount(load_dataset("fashion-mnist", download=False)["test"][1][:1000], minlength=10)
    assert np.dot(counts, summary["test_accuracy_per_class"]) / counts.sum() == pytest.approx(summary["test_accuracy"])
    # The settings the kind takes are recorded with their values, the others as None.
    assert settings["s"] == (None if loss == "sphereface" else 16.0) and settings["m1"] == (1.0 if loss == "combined" else None)
    if loss == "arcface":  # the sphere figure: a 3-D embedding on the unit sphere
        load_example("train_mnist").main(["--dataset", "fashion-mnist", "--loss", loss, "--epochs", "1",
                                          "--train-limit", "1000", "--test-limit", "500", "--embed-dim", "3",
                                          "--no-progress", "--plot", str(plot_path)] + head)
        assert plot_path.stat().st_size > 1000


def test_help_lists_each_kinds_defaults(capsys):
    with pytest.raises(SystemExit):
        load_example("train_mnist").main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for expected in ("lsoftmax 4", "sphereface 4", "cosface 0.35", "arcface 0.5", "cosface 64", "combined 0.3",
                     "sphereface 1000", "lsoftmax 100"):
        assert expected in text, expected


def test_long_tailed_ldam_drw_run_reports_groups(tmp_path):
    if resolve_directory(None, "fashion-mnist") is None:
        pytest.skip("real Fashion-MNIST not found (set FASHION_MNIST_DIR, see ../shared/data/fashion-mnist)")
    summary_path = tmp_path / "ldam.json"
    load_example("train_mnist").main(["--dataset", "fashion-mnist", "--imbalance", "exp", "--imbalance-factor", "0.1",
                                      "--train-limit", "10000", "--test-limit", "2000", "--loss", "ldam",
                                      "--epochs", "2", "--drw-epoch", "1", "--many-shot", "500", "--few-shot", "150",
                                      "--no-progress", "--json", str(summary_path)])
    summary = json.loads(summary_path.read_text())
    counts = summary["train_class_counts"]
    assert counts[0] / counts[-1] == pytest.approx(10, rel=0.05) and counts == sorted(counts, reverse=True)
    assert summary["settings"]["s"] == 30.0 and summary["settings"]["max_margin"] == 0.5
    assert summary["test_accuracy"] > 0.3
    groups = summary["shot_groups"]
    assert set(groups) <= {"many", "medium", "few"} and groups[0] == "many" and groups[-1] == "few"
    for group, accuracy in summary["group_accuracy"].items():
        members = [summary["test_accuracy_per_class"][i] for i, name in enumerate(groups) if name == group]
        assert accuracy == (pytest.approx(sum(members) / len(members)) if members else None)
    assert summary["shot_thresholds"] == {"many": ">= 500", "few": "< 150"}


def test_resnet18_option_builds_the_model_zoo_network():
    import mxnet as mx
    example = load_example("train_mnist")
    arguments = example.parse_arguments(["--net", "resnet18", "--loss", "softmax"])
    assert arguments.embed_dim == 512
    network = example.resnet18(16)
    network.initialize()
    assert network(mx.nd.zeros((2, 1, 28, 28))).shape == (2, 16)


def test_imbalanced_document_from_its_runs(tmp_path, monkeypatch):
    """docs/imbalanced.md's table and figure from the runs' logs (faked here): per-seed and mean
    accuracy, the group columns, the anchors, every head and factor, one figure."""
    results = load_example("imbalanced_results")
    calls = []

    def fake_run(name, argv, arguments):
        calls.append(argv)
        factor = float(argv[argv.index("--imbalance-factor") + 1])
        counts = results.mnist_results.train_mnist.long_tailed_counts(6000, 10, "exp", factor)
        seed = int(argv[argv.index("--seed") + 1])
        per_class = [0.9 - 0.05 * index + 0.01 * seed for index in range(10)]
        groups = ["many" if n >= 1000 else "few" if n < 200 else "medium" for n in counts]
        group_accuracy = {g: (sum(a for a, h in zip(per_class, groups) if h == g) / groups.count(g)
                              if g in groups else None) for g in ("many", "medium", "few")}
        return {"test_accuracy": sum(per_class) / 10, "test_accuracy_per_class": per_class,
                "train_class_counts": counts, "group_accuracy": group_accuracy,
                "train_samples_per_sec": 1000.0, "settings": {"imbalance_factor": factor}, "code_version": "abc"}
    monkeypatch.setattr(results.mnist_results, "run", fake_run)
    output = tmp_path / "docs" / "imbalanced.md"
    results.main(["--seeds", "0", "1", "--resnet-epochs", "0", "--runs-dir", str(tmp_path / "runs"),
                  "--output", str(output)])
    text = output.read_text()
    assert len(calls) == 2 * 7 * 2  # factors x heads x seeds
    drw_runs = [argv for argv in calls if "--drw-epoch" in argv]
    assert len(drw_runs) == 4 and all(argv[argv.index("--drw-epoch") + 1] == "12" for argv in drw_runs)
    assert text.count("| ldam + DRW `--loss ldam --drw-epoch 12` |") == 2
    assert "ERM 29.64%, LDAM-DRW 22.97%" in text and "ERM 13.61%, LDAM-DRW 11.84%" in text
    assert "| softmax `--loss softmax` | 67.50 / 68.50 | 68.00 | 32.00 |" in text
    assert (tmp_path / "docs" / "figures" / "imbalanced_per_class.png").stat().st_size > 1000


def test_module_example_refuses_what_it_does_not_do(tmp_path, monkeypatch):
    monkeypatch.setenv("MNIST_DIR", str(tmp_path / "none"))
    example = load_example("train_mnist_module")
    for argv, option in ((["--net", "paper"], "--net paper"), (["--embed-dim", "2", "--plot", "x.png"], "--plot"),
                         (["--epochs", "3", "--drw-epoch", "1"], "--drw-epoch")):
        with pytest.raises(SystemExit) as stop:
            example.main(argv)
        assert f"{option} is train_mnist.py's only" in str(stop.value)


def test_module_example_trains_every_head_kind(tmp_path):
    if resolve_directory(None) is None:
        pytest.skip("real MNIST not found (set MNIST_DIR, see ../shared/data/mnist)")
    summary = load_example("train_mnist_module").main(
        ["--loss", "sphereface", "--epochs", "1", "--train-limit", "3000", "--test-limit", "500", "--lr-steps",
         "--no-progress", "--json", str(tmp_path / "module.json")])
    assert summary["test_accuracy"] > 0.3 and len(summary["test_accuracy_per_class"]) == 10
    # sphereface's schedule: beta after one epoch of 24 steps (3000 images, the last batch padded)
    assert summary["epochs"][0]["beta"] == pytest.approx(1000 / (1 + 0.12 * 24))


def test_family_table_and_findings_from_its_runs(monkeypatch):
    """docs/results.md's family table from the runs' logs (faked): every head, data set and seed,
    samples/s from the speed runs, and the findings against softmax computed from the means."""
    results = load_example("mnist_results")
    accuracy = {"softmax": 0.9, "arcface_10-class": 0.92, "cosface_paper": 0.85}

    def fake_run(name, argv, arguments):
        key = next((k for k in accuracy if f"_{k}_" in name + "_"), None)  # "_softmax_", not lsoftmax
        return {"test_accuracy": accuracy.get(key, 0.91), "code_version": "abc",
                "epochs": [{"samples_per_sec": 2000.0 if key == "softmax" else 1800.0}]}
    monkeypatch.setattr(results, "run", fake_run)
    arguments = results.argparse.Namespace(seeds=[0, 1], family_epochs=10, train_limit=0)
    text = results.family_section(arguments)
    assert text.count("| 90.00 / 90.00 | 90.00 |") == 1  # softmax on both data sets: one row
    assert "| 1800 (0.90x) |" in text
    assert "- fashion-mnist: softmax 90.00%; above it: lsoftmax m=2 +1.00" in text
    assert "not above it: cosface (paper) -5.00; best: arcface (10-class)." in text


def test_throughput_section_from_its_runs(monkeypatch):
    """docs/results.md's three-backend throughput table from the runs' logs (faked): one run
    per backend and batch, the ratio to softmax, and the code versions the logs record."""
    results = load_example("mnist_results")
    speeds = {"softmax": 2000.0, "python": 1500.0, "compiled": 2200.0}
    names = []

    def fake_run(name, argv, arguments):
        names.append(name)
        backend = name.split("_")[1]
        return {"test_accuracy": 0.97, "code_version": "old" if backend == "python" else "new",
                "epochs": [{"samples_per_sec": speeds[backend] / 2}, {"samples_per_sec": speeds[backend]}]}
    monkeypatch.setattr(results, "run", fake_run)
    text = results.speed_section(results.argparse.Namespace())
    assert sorted(names) == sorted(f"speed_{backend}_{batch}" for backend in speeds for batch in (128, 256))
    assert text.count("| 2000 | 1500 (0.75x) | 2200 (1.10x) | 0.970, 0.970, 0.970 |") == 2
    assert "Code version of the runs (train_mnist.py's `code_version`): new, old." in text
