#!/usr/bin/env python3
"""Run the MNIST comparisons of docs/results.md: softmax vs L-Softmax m = 1..4.

  figure:   2-D LeNet embeddings, one panel per setting (the paper's Fig. 2)
  accuracy: LeNet with a 256-wide embedding, the mx-lsoftmax schedule, per seed
  speed:    training samples/s of softmax, python and compiled (m = 4), batch 128 and 256

Every run is examples/train_mnist.py; its --json log (and --plot image) is kept
under --runs-dir (committed: docs/runs). With --reuse, a run whose log exists
with the same settings is read back instead of trained again, so the 20-epoch
runs can be done in pieces (or in parallel processes) and the document rebuilt.
Writes docs/results.md and docs/figures/features_2d.png.

Example: python examples/mnist_results.py --epochs 20 --seeds 0 1 --figure-epochs 5 --reuse
"""
import argparse
import json
import os
import sys

import benchmark
from mx_lsoftmax.support.cli import non_negative_int, positive_int
import train_mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = {"softmax": 99.60, 1: None, 2: 99.68, 3: 99.69, 4: 99.69, "4-caffe": None}
PYTORCH = {"softmax": None, 1: 99.37, 2: 99.60, 3: 99.56, 4: 99.61, "4-caffe": None}
SETTINGS = ["softmax", 1, 2, 3, 4]  # the figure's panels and the table's main rows
# One more accuracy row: m = 4 with the Caffe original's MNIST schedule, which keeps beta
# above ~0.4 for 10000 steps where mx-lsoftmax's (scale 0.99) reaches 0.01 in 917.
ACCURACY_SETTINGS = SETTINGS + ["4-caffe"]
LABELS = {"4-caffe": "4, Caffe schedule"}
# The settings a reused log must match (train_mnist.py's --json "settings").
COMPARED = ("backend", "margin", "beta", "beta_min", "scale", "gamma", "power", "epochs", "seed", "embed_dim", "train_limit", "net",
            "batch_size", "lr", "lr_steps", "wd")


def setting_args(setting):
    if setting == "softmax":
        return ["--backend", "softmax"]
    if setting == "4-caffe":
        return ["--backend", "compiled", "--margin", "4", "--beta", "1000", "--gamma", "2.5e-5", "--power", "35",
                "--scale", "1"]
    return ["--backend", "compiled", "--margin", str(setting), "--beta", "100", "--scale", "0.99"]


def limited(argv, arguments):
    """``argv`` with --train-limit when the comparison runs on a slice of the training set."""
    return argv + (["--train-limit", str(arguments.train_limit)] if arguments.train_limit else [])


def run(name, argv, arguments):
    """One train_mnist.py run (or its matching log with --reuse); returns its --json summary."""
    path = os.path.join(arguments.runs_dir, name + ".json")
    argv = argv + ["--json", path, "--no-progress"]
    if arguments.reuse and os.path.exists(path):
        wanted = vars(train_mnist.parse_arguments(argv))
        with open(path) as handle:
            summary = json.load(handle)
        if all(summary["settings"].get(key) == wanted[key] for key in COMPARED):
            print(f"== {name}: reused {os.path.relpath(path, ROOT)}", flush=True)
            return summary
        print(f"== {name}: {os.path.relpath(path, ROOT)} has other settings, running again", flush=True)
    print(f"== {name}: {' '.join(argv)}", flush=True)
    return train_mnist.main(argv)


def versions(summaries):
    """The code versions the runs' logs record ('not recorded' for logs older than the field)."""
    found = sorted({summary.get("code_version") or "not recorded" for summary in summaries})
    return "Code version of the runs (train_mnist.py's `code_version`): " + ", ".join(found) + "."


def figure_section(arguments):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(1, len(SETTINGS), figsize=(4 * len(SETTINGS), 4))
    rows, summaries = [], []
    for axis, setting in zip(axes, SETTINGS):
        name = f"figure_{setting}"
        image_path = os.path.join(arguments.runs_dir, name + ".png")
        summary = run(name, limited(setting_args(setting) + ["--epochs", str(arguments.figure_epochs),
                                                             "--embed-dim", "2", "--plot", image_path], arguments),
                      arguments)
        summaries.append(summary)
        axis.imshow(plt.imread(image_path))
        axis.axis("off")
        rows.append(f"| {setting} | {100 * summary['test_accuracy']:.2f} |")
    figure.tight_layout()
    figure.savefig(os.path.join(ROOT, "docs", "figures", "features_2d.png"), dpi=110)
    plt.close(figure)
    return (f"## 2-D test features (the paper's Fig. 2)\n\nLeNet with a 2-D embedding, "
            f"{arguments.figure_epochs} epochs, beta 100, scale 0.99. {versions(summaries)}\n\n"
            f"![2-D features](figures/features_2d.png)\n\n| setting | test accuracy % |\n|---|---|\n"
            + "\n".join(rows) + "\n")


def accuracy_section(arguments):
    rows, summaries, logs = [], {}, []
    for setting in ACCURACY_SETTINGS:
        accuracies, speeds = [], []
        for seed in arguments.seeds:
            summary = run(f"accuracy_{setting}_seed{seed}", limited(
                setting_args(setting) + ["--epochs", str(arguments.epochs), "--seed", str(seed)], arguments), arguments)
            logs.append(summary)
            accuracies.append(100 * summary["test_accuracy"])
            speeds.append(summary["train_samples_per_sec"])
        summaries[setting] = accuracies
        paper, pytorch = PAPER[setting], PYTORCH[setting]
        backend = "softmax" if setting == "softmax" else "compiled"
        rows.append(f"| {LABELS.get(setting, setting)} | {' / '.join(f'{a:.2f}' for a in accuracies)} | "
                    f"{sum(accuracies) / len(accuracies):.2f} | {paper if paper else '-'} | "
                    f"{pytorch if pytorch else '-'} | {sum(speeds) / len(speeds):.0f} ({backend}) |")
    limit = f" Training on the first {arguments.train_limit} images." if arguments.train_limit else ""
    return (f"## Test accuracy, LeNet, 256-wide embedding\n\n{arguments.epochs} epochs, seeds "
            f"{', '.join(map(str, arguments.seeds))}, the mx-lsoftmax schedule (beta 100, scale 0.99, beta_min 0) "
            f"except the last row (beta 1000, gamma 2.5e-5, power 35, beta_min 0), batch 128, SGD lr 0.01 "
            f"momentum 0.9 wd 5e-4, lr x0.1 at epoch 10, Xavier init; test accuracy on plain logits after the "
            f"last epoch.{limit} {versions(logs)}\n\n"
            "| setting (m) | ours, per seed % | ours, mean % | paper % | PyTorch re-impl. % | training samples/s |\n"
            "|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n"), summaries


def speed_section(arguments):
    backends = ("softmax", "python", "compiled")
    rows = benchmark.lenet_throughput(backends=backends, run_one=lambda name, argv: run(name, argv, arguments))
    return ("## Training throughput, all three backends\n\nLeNet (256-wide embedding), m = 4, beta 100, scale "
            "0.99: samples/s over the second of two epochs of 12800 images (the first pays for graph building), "
            "from each run's --json (`epochs[-1].samples_per_sec`); `make bench` measures the same in "
            "docs/benchmarks.md.\n\n" + benchmark.lenet_table(rows, backends) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--epochs", type=positive_int, default=20, help="epochs of the accuracy runs")
    parser.add_argument("--figure-epochs", type=positive_int, default=10, help="epochs of the 2-D figure runs")
    parser.add_argument("--seeds", type=non_negative_int, nargs="+", default=[0, 1], help="seeds of the accuracy runs")
    parser.add_argument("--train-limit", type=non_negative_int, default=0, help="train on the first N images (0: all)")
    parser.add_argument("--parts", nargs="*", default=["figure", "accuracy", "speed"],
                        choices=["figure", "accuracy", "speed"], help="which parts to (re)make")
    parser.add_argument("--runs-dir", default=os.path.join(ROOT, "docs", "runs"),
                        help="where each run's --json log and plot go")
    parser.add_argument("--reuse", action="store_true", help="read back runs whose log has the same settings")
    parser.add_argument("--output", default=os.path.join(ROOT, "docs", "results.md"), help="the document to write")
    arguments = parser.parse_args(argv)
    os.makedirs(arguments.runs_dir, exist_ok=True)
    os.makedirs(os.path.join(ROOT, "docs", "figures"), exist_ok=True)
    command = "python examples/mnist_results.py " + " ".join(sys.argv[1:] if argv is None else argv)
    sections = [f"# MNIST results\n\nMade by `{command}` on this project's code; each run's log (its "
                f"`--json`, with per-epoch loss, accuracy, beta and samples/s) is under "
                f"`{os.path.relpath(arguments.runs_dir, ROOT)}/`.\n"]
    if "figure" in arguments.parts:
        sections.append(figure_section(arguments))
    if "accuracy" in arguments.parts:
        sections.append(accuracy_section(arguments)[0])
    if "speed" in arguments.parts:
        sections.append(speed_section(arguments))
    document = "\n".join(sections)
    with open(arguments.output, "w") as handle:
        handle.write(document)
    print(document)


if __name__ == "__main__":
    main()
