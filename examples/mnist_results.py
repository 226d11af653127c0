#!/usr/bin/env python3
"""Run the MNIST comparisons of docs/results.md: softmax vs L-Softmax m = 1..4.

  figure:   2-D LeNet embeddings, one panel per setting (the paper's Fig. 2)
  accuracy: LeNet with a 256-wide embedding, the mx-lsoftmax schedule, per seed
  speed:    training samples/s of softmax, python and compiled (m = 4), batch 128 and 256
Writes docs/results.md, docs/figures/features_2d.png and the per-run JSON under build/results/.
Example: python examples/mnist_results.py --epochs 20 --seeds 0 1
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_mnist  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = {"softmax": 99.60, 1: None, 2: 99.68, 3: 99.69, 4: 99.69}
PYTORCH = {"softmax": None, 1: 99.37, 2: 99.60, 3: 99.56, 4: 99.61}
SETTINGS = ["softmax", 1, 2, 3, 4]


def run(name, extra, arguments):
    path = os.path.join(ROOT, "build", "results", name + ".json")
    argv = ["--epochs", str(arguments.epochs), "--json", path, "--no-progress"] + extra
    if arguments.train_limit:
        argv += ["--train-limit", str(arguments.train_limit)]
    print(f"== {name}: {' '.join(argv)}", flush=True)
    return train_mnist.main(argv)


def setting_args(setting):
    if setting == "softmax":
        return ["--backend", "softmax"]
    return ["--margin", str(setting), "--beta", "100", "--scale", "0.99"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--figure-epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1])
    parser.add_argument("--train-limit", type=int, default=0)
    parser.add_argument("--parts", nargs="*", default=["figure", "accuracy", "speed"])
    arguments = parser.parse_args()
    os.makedirs(os.path.join(ROOT, "build", "results"), exist_ok=True)
    os.makedirs(os.path.join(ROOT, "docs", "figures"), exist_ok=True)
    command = "python examples/mnist_results.py " + " ".join(sys.argv[1:])
    sections = [f"# MNIST results\n\nMade by `{command}` on this project's code; the per-run logs are "
                f"the JSON files under `build/results/` of that run.\n"]

    if "figure" in arguments.parts:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        figure, axes = plt.subplots(1, len(SETTINGS), figsize=(4 * len(SETTINGS), 4))
        rows = []
        for axis, setting in zip(axes, SETTINGS):
            name = f"figure_{setting}"
            saved_epochs = arguments.epochs
            arguments.epochs = arguments.figure_epochs
            summary = run(name, setting_args(setting) + ["--embed-dim", "2", "--plot",
                                                         os.path.join(ROOT, "build", "results", name + ".png")], arguments)
            arguments.epochs = saved_epochs
            image = plt.imread(os.path.join(ROOT, "build", "results", name + ".png"))
            axis.imshow(image)
            axis.axis("off")
            rows.append(f"| {setting} | {100 * summary['test_accuracy']:.2f} |")
        figure.tight_layout()
        figure.savefig(os.path.join(ROOT, "docs", "figures", "features_2d.png"), dpi=110)
        sections.append(f"## 2-D test features (the paper's Fig. 2)\n\nLeNet with a 2-D embedding, "
                        f"{arguments.figure_epochs} epochs, beta 100, scale 0.99.\n\n"
                        f"![2-D features](figures/features_2d.png)\n\n| setting | test accuracy % |\n|---|---|\n"
                        + "\n".join(rows) + "\n")

    if "accuracy" in arguments.parts:
        rows = []
        for setting in SETTINGS:
            accuracies = []
            for seed in arguments.seeds:
                summary = run(f"accuracy_{setting}_seed{seed}", setting_args(setting) + ["--seed", str(seed)], arguments)
                accuracies.append(100 * summary["test_accuracy"])
            paper = PAPER[setting]
            pytorch = PYTORCH[setting]
            rows.append(f"| {setting} | {' / '.join(f'{a:.2f}' for a in accuracies)} | "
                        f"{sum(accuracies) / len(accuracies):.2f} | {paper if paper else '-'} | "
                        f"{pytorch if pytorch else '-'} |")
        sections.append(f"## Test accuracy, LeNet, 256-wide embedding\n\n{arguments.epochs} epochs, "
                        f"seeds {arguments.seeds}, beta 100, scale 0.99, SGD lr 0.01 momentum 0.9 wd 5e-4."
                        f"{' Training on the first ' + str(arguments.train_limit) + ' images.' if arguments.train_limit else ''}\n\n"
                        "| setting (m) | ours, per seed % | ours, mean % | paper % | PyTorch re-impl. % |\n"
                        "|---|---|---|---|---|\n" + "\n".join(rows) + "\n")

    if "speed" in arguments.parts:
        rows = []
        for batch in (128, 256):
            speeds = {}
            for backend in ("softmax", "python", "compiled"):
                # Two epochs, the second one timed: the first pays for graph
                # building and oneDNN primitive creation.
                extra = ["--backend", backend, "--batch-size", str(batch), "--epochs", "2",
                         "--train-limit", "12800", "--lr-steps"]
                if backend != "softmax":
                    extra += ["--margin", "4", "--beta", "1"]
                path = os.path.join(ROOT, "build", "results", f"speed_{backend}_{batch}.json")
                summary = train_mnist.main(extra + ["--json", path, "--no-progress"])
                speeds[backend] = summary["epochs"][-1]["samples_per_sec"]
            rows.append(f"| {batch} | {speeds['softmax']:.0f} | {speeds['python']:.0f} "
                        f"({speeds['python'] / speeds['softmax']:.2f}x) | {speeds['compiled']:.0f} "
                        f"({speeds['compiled'] / speeds['softmax']:.2f}x) |")
        speed_section = ("# LeNet training throughput\n\nMade by `" + command + "`. LeNet (256-wide embedding), "
                        "m = 4, beta 1: samples/s over the second of two epochs of 12800 images "
                        "(the example's --json, `epochs[-1].samples_per_sec`), one process per run.\n\n"
                        "| batch | softmax | python (ratio) | compiled (ratio) |\n|---|---|---|---|\n"
                        + "\n".join(rows) + "\n")
        with open(os.path.join(ROOT, "docs", "lenet_throughput.md"), "w") as handle:
            handle.write(speed_section)
        print(speed_section)

    if "figure" in arguments.parts or "accuracy" in arguments.parts:
        with open(os.path.join(ROOT, "docs", "results.md"), "w") as handle:
            handle.write("\n".join(sections))
        print("\n".join(sections))


if __name__ == "__main__":
    main()
