"""The example scripts check every setting while parsing: an argparse error naming the option
and the value (exit status 2), before any data is read; --help shows every default."""
import pytest

from conftest import load_example

BAD = [
    ("train_mnist", ["--margin", "0"], "L-Softmax parameter margin must be an integer >= 1, got 0.0"),
    ("train_mnist", ["--power", "0"], "L-Softmax parameter power must be > 0, got 0.0"),
    ("train_mnist", ["--margin", "2.5"], "L-Softmax parameter margin must be an integer >= 1, got 2.5"),
    ("train_mnist", ["--loss", "sphereface", "--margin", "1.5"], "SphereFace parameter margin must be an integer"),
    ("train_mnist", ["--loss", "arcface", "--margin", "3.2"], "ArcFace parameter margin must be in [0, pi), got 3.2"),
    ("train_mnist", ["--loss", "cosface", "--s", "0"], "CosFace parameter s must be > 0, got 0.0"),
    ("train_mnist", ["--loss", "cosface", "--m1", "2"], "--m1 2.0: the cosface loss does not take it"),
    ("train_mnist", ["--loss", "softmax", "--margin", "2"], "--margin 2.0: the softmax loss does not take it"),
    ("train_mnist", ["--loss", "arcface", "--easy-margin", "maybe"], "--easy-margin: expected true or false"),
    ("train_mnist", ["--dataset", "cifar10"], "--dataset: invalid choice: 'cifar10'"),
    ("train_mnist", ["--imbalance", "linear"], "--imbalance: invalid choice: 'linear'"),
    ("train_mnist", ["--imbalance", "exp", "--imbalance-factor", "0"], "imbalance factor must be in (0, 1], got 0.0"),
    ("train_mnist", ["--imbalance", "exp", "--imbalance-factor", "1e-5"], "with no training sample (n_max = 6000)"),
    ("train_mnist", ["--epochs", "10", "--drw-epoch", "10"], "--drw-epoch 10 is past the run (--epochs 10)"),
    ("train_mnist", ["--loss", "ldam", "--max-margin", "0"], "--max-margin must be > 0, got 0.0"),
    ("train_mnist", ["--loss", "arcface", "--max-margin", "0.5"], "--max-margin 0.5: only the ldam loss takes it"),
    ("train_mnist", ["--few-shot", "2000"], "--few-shot 2000 must be <= --many-shot 1000"),
    ("train_mnist", ["--batch-size", "0"], "--batch-size: expected an integer > 0, got '0'"),
    ("train_mnist", ["--embed-dim", "0"], "--embed-dim: expected an integer > 0, got '0'"),
    ("train_mnist", ["--scale", "1.5"], "scale must be in (0, 1], got 1.5"),
    ("train_mnist", ["--beta", "nan"], "--beta: expected a finite number, got 'nan'"),
    ("train_mnist", ["--lr", "-1"], "--lr: expected a finite number > 0, got '-1'"),
    ("train_mnist", ["--plot", "x.png", "--embed-dim", "4"], "--plot needs --embed-dim 2 or 3, got --embed-dim 4"),
    ("benchmark", ["--shapes", "4x8"], "--shapes: expected NxDxC with three integers > 0, got '4x8'"),
    ("benchmark", ["--dtypes", "float16"], "invalid choice: 'float16'"),
    ("benchmark", ["--rounds", "0"], "--rounds: expected an integer > 0, got '0'"),
    ("benchmark", ["--kind-shapes", "1x0x3"], "--kind-shapes: expected NxDxC with three integers > 0"),
    ("mnist_results", ["--epochs", "0"], "--epochs: expected an integer > 0, got '0'"),
    ("mnist_results", ["--seeds", "-1"], "--seeds: expected an integer >= 0, got '-1'"),
    ("imbalanced_results", ["--epochs", "10", "--drw-epoch", "10"], "--drw-epoch 10 is past the run (--epochs 10)"),
    ("imbalanced_results", ["--seeds", "x"], "--seeds: expected an integer >= 0, got 'x'"),
]


@pytest.mark.parametrize("script, argv, message", BAD, ids=[" ".join([s] + a) for s, a, _ in BAD])
def test_bad_settings_are_argparse_errors_before_any_data(script, argv, message, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("MNIST_DIR", str(tmp_path / "no-mnist-here"))  # reading data would fail differently
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path / "no-fashion-mnist-here"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(SystemExit) as stop:
        load_example(script).main(argv)
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert message in error and "MNIST" not in error


@pytest.mark.parametrize("script", ["train_mnist", "benchmark", "mnist_results", "imbalanced_results"])
def test_help_shows_every_default(script, capsys):
    with pytest.raises(SystemExit) as stop:
        load_example(script).main(["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    options = [line.split()[0] for line in text.splitlines() if line.startswith("  --")]
    blocks = text.split("\n  --")[1:]
    for option, block in zip(options, blocks):
        if option in ("--help", "--no-progress", "--reuse"):
            continue
        # "(default: X)" from argparse, or "default: ..." where the default depends on another option
        assert "default:" in block or "default 256" in block, f"{script} {option} does not show its default"
