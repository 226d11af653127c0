#!/usr/bin/env python3
"""Run the long-tailed comparisons of docs/imbalanced.md: margins on a long-tailed Fashion-MNIST.

LDAM-DRW's experiment (Cao et al., NeurIPS 2019) on the data these machines have: the
training set subsampled with the 'exp' profile at imbalance factors 0.1 and 0.01, the
test set balanced, LeNet with a 256-wide embedding, heads softmax, L-Softmax (m = 2, 4),
CosFace, ArcFace, LDAM and LDAM + DRW, per seed; overall, per-class and many / medium /
few-shot test accuracy; the figure of per-class accuracy against training count; and the
time per epoch of --net resnet18.

Every run is examples/train_mnist.py; its --json log is kept under --runs-dir (committed:
docs/runs/imbalanced); with --reuse a log with the same settings is read back.

Example: python examples/imbalanced_results.py --epochs 15 --seeds 0 1 --reuse
"""
import argparse
import os
import sys

from mx_lsoftmax.support.cli import DefaultsFormatter, non_negative_int, positive_int
import mnist_results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FACTORS = (0.1, 0.01)
# (row label, train_mnist.py head arguments); cosface / arcface at the 10-class settings of
# docs/results.md (s = 16), LDAM at its paper's (s = 30, largest margin 0.5).
HEADS = [
    ("softmax", ["--loss", "softmax"]),
    ("lsoftmax m=2", ["--loss", "lsoftmax", "--margin", "2"]),
    ("lsoftmax m=4", ["--loss", "lsoftmax", "--margin", "4"]),
    ("cosface", ["--loss", "cosface", "--s", "16", "--margin", "0.2"]),
    ("arcface", ["--loss", "arcface", "--s", "16", "--margin", "0.3"]),
    ("ldam", ["--loss", "ldam"]),
    ("ldam + DRW", ["--loss", "ldam", "--drw"]),  # --drw: the DRW epoch is filled in per run
]
# LDAM paper, long-tailed CIFAR-10 ('exp'), top-1 error %, ResNet-32: ERM (softmax) and LDAM-DRW.
ANCHORS = {0.1: ("13.61", "11.84"), 0.01: ("29.64", "22.97")}
GROUPS = ("many", "medium", "few")
# The profile follows the class index, as LDAM-DRW's does: which classes end up rare is the data
# set's order (Fashion-MNIST: the footwear and bags come last).
CLASS_NAMES = mnist_results.train_mnist.DATASETS["fashion-mnist"].class_names


def run_name(label, factor, seed, net="lenet"):
    stem = label.replace(" + ", "-").replace(" ", "_").replace("=", "")
    return f"{net}_{stem}_f{factor:g}_seed{seed}"


def head_args(head, arguments):
    if "--drw" in head:
        return [value for value in head if value != "--drw"] + ["--drw-epoch", str(arguments.drw_epoch)]
    return list(head)


def common_args(factor, seed, epochs, lr_step, arguments):
    return (["--dataset", "fashion-mnist", "--imbalance", "exp", "--imbalance-factor", str(factor),
             "--epochs", str(epochs), "--lr-steps", str(lr_step), "--seed", str(seed)]
            + (["--train-limit", str(arguments.train_limit)] if arguments.train_limit else []))


def mean(values):
    values = [value for value in values if value is not None]
    return sum(values) / len(values) if values else None


def percent(value):
    return "-" if value is None else f"{100 * value:.2f}"


def table(arguments):
    """Runs every head, factor and seed; returns (markdown, logs, per-class means for the figure)."""
    sections, logs, curves = [], [], {}
    for factor in FACTORS:
        rows, means = [], {}
        for label, head in HEADS:
            summaries = []
            for seed in arguments.seeds:
                argv = common_args(factor, seed, arguments.epochs, arguments.drw_epoch, arguments) + \
                    head_args(head, arguments) + ([] if head[1] == "softmax" else ["--backend", "compiled"])
                summaries.append(mnist_results.run(run_name(label, factor, seed), argv, arguments))
            logs.extend(summaries)
            overall = [summary["test_accuracy"] for summary in summaries]
            groups = {group: mean([summary["group_accuracy"][group] for summary in summaries]) for group in GROUPS}
            counts = summaries[0]["train_class_counts"]
            per_class = [mean([summary["test_accuracy_per_class"][index] for summary in summaries])
                         for index in range(len(counts))]
            curves[(factor, label)] = (counts, per_class)
            means[label] = (mean(overall), groups)
            rows.append(f"| {label} `{' '.join(head_args(head, arguments))}` | "
                        f"{' / '.join(percent(value) for value in overall)} | {percent(mean(overall))} | "
                        f"{100 - 100 * mean(overall):.2f} | " + " | ".join(percent(groups[g]) for g in GROUPS) + " |")
        counts = curves[(factor, HEADS[0][0])][0]
        erm, ldam_drw = ANCHORS[factor]
        sections.append(
            f"### Imbalance factor {factor:g} (ratio {1 / factor:g})\n\nTraining images per class: "
            f"{', '.join(f'{name} {count}' for name, count in zip(CLASS_NAMES, counts))}; {sum(counts)} in all. "
            f"LDAM paper, long-tailed CIFAR-10 at this "
            f"ratio, top-1 error: ERM {erm}%, LDAM-DRW {ldam_drw}%.\n\n"
            "| head | test accuracy per seed % | mean % | mean error % | many-shot % | medium-shot % | few-shot % |\n"
            "|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n" + findings(means) + "\n")
    return "\n".join(sections), logs, curves


def findings(means):
    """What the table says against softmax, computed from it (means over seeds)."""
    base, base_groups = means["softmax"]
    lines = []
    for label, (value, groups) in means.items():
        if label == "softmax":
            continue
        few = groups["few"] if groups["few"] is not None else groups["medium"]
        few_base = base_groups["few"] if base_groups["few"] is not None else base_groups["medium"]
        rarest = "few-shot" if groups["few"] is not None else "medium-shot"
        lines.append(f"{label} {100 * (value - base):+.2f} points overall, {100 * (few - few_base):+.2f} {rarest}")
    best = max(means, key=lambda label: means[label][0])
    worse = [label for label, (value, _) in means.items() if label != "softmax" and value < base]
    return (f"Against softmax ({percent(base)}%), mean over seeds: " + "; ".join(lines) + f". Best: {best}. "
            + (f"Below softmax: {', '.join(worse)}." if worse else "No head is below softmax."))


def figure(curves, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure_, axes = plt.subplots(1, len(FACTORS), figsize=(6 * len(FACTORS), 4.5), sharey=True)
    for axis, factor in zip(axes, FACTORS):
        for label, _ in HEADS:
            counts, per_class = curves[(factor, label)]
            axis.plot(counts, [100 * value for value in per_class], marker="o", markersize=3, label=label)
        axis.set_xscale("log")
        axis.set_xlabel("training images of the class (log scale)")
        axis.set_title(f"Fashion-MNIST, exp profile, factor {factor:g}")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy of the class %, mean over seeds")
    axes[-1].legend(fontsize=8, loc="lower right")
    figure_.tight_layout()
    figure_.savefig(path, dpi=110)
    plt.close(figure_)


def resnet_section(arguments):
    factor, label, head = 0.01, "ldam + DRW", HEADS[-1][1]
    epochs = arguments.resnet_epochs
    argv = common_args(factor, 0, epochs, epochs, arguments) + ["--net", "resnet18"] + \
        [value for value in head if value != "--drw"] + ["--backend", "compiled"]
    summary = mnist_results.run(run_name(label, factor, 0, "resnet18"), argv, arguments)
    images = sum(summary["train_class_counts"])
    seconds = [images / entry["samples_per_sec"] for entry in summary["epochs"]]
    return (f"## ResNet-18 (`--net resnet18`)\n\nThe Gluon model zoo's ResNet-18 v1 with its thumbnail stem, "
            f"512-wide embedding, LDAM head, factor 0.01, seed 0, {epochs} epoch(s) without DRW "
            f"(`{' '.join(argv)}`): {min(seconds):.0f} s of training per epoch here "
            f"({summary['train_samples_per_sec']:.0f} samples/s, {summary['machine']['cores']} cores, "
            f"{summary['machine']['processor']}), against "
            f"{arguments.lenet_seconds:.0f} s for LeNet; test accuracy after {epochs} epoch(s): "
            f"{percent(summary['test_accuracy'])}%. The table above uses LeNet: with ResNet-18 it would take "
            f"about {table_hours(min(seconds), arguments):.0f} hours of training here. "
            f"{mnist_results.versions([summary])}\n")


def table_hours(seconds_at_smallest, arguments):
    """The table's training time at ``seconds_at_smallest`` per epoch of the factor-0.01 set."""
    sizes = {factor: sum(mnist_results.train_mnist.long_tailed_counts(6000, 10, "exp", factor)) for factor in FACTORS}
    epochs = sum(sizes[factor] / sizes[0.01] for factor in FACTORS) * arguments.epochs
    return seconds_at_smallest * epochs * len(HEADS) * len(arguments.seeds) / 3600


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=DefaultsFormatter)
    parser.add_argument("--epochs", type=positive_int, default=15, help="epochs of every LeNet run")
    parser.add_argument("--drw-epoch", type=positive_int, default=12,
                        help="DRW and the learning-rate step start after this many epochs")
    parser.add_argument("--seeds", type=non_negative_int, nargs="+", default=[0, 1], help="seeds (subsets and init)")
    parser.add_argument("--resnet-epochs", type=non_negative_int, default=1,
                        help="epochs of the ResNet-18 timing run (0: skip it)")
    parser.add_argument("--train-limit", type=non_negative_int, default=0,
                        help="subsample from the first N training images (0: all)")
    parser.add_argument("--runs-dir", default=os.path.join(ROOT, "docs", "runs", "imbalanced"),
                        help="where each run's --json log goes")
    parser.add_argument("--reuse", action="store_true", help="read back runs whose log has the same settings")
    parser.add_argument("--output", default=os.path.join(ROOT, "docs", "imbalanced.md"), help="the document to write")
    arguments = parser.parse_args(argv)
    if arguments.drw_epoch >= arguments.epochs:
        parser.error(f"--drw-epoch {arguments.drw_epoch} is past the run (--epochs {arguments.epochs})")
    os.makedirs(arguments.runs_dir, exist_ok=True)
    figures = os.path.join(os.path.dirname(os.path.abspath(arguments.output)), "figures")
    os.makedirs(figures, exist_ok=True)
    command = "python examples/imbalanced_results.py " + " ".join(sys.argv[1:] if argv is None else argv)
    body, logs, curves = table(arguments)
    figure(curves, os.path.join(figures, "imbalanced_per_class.png"))
    lenet = [summary for summary in logs if summary["settings"]["imbalance_factor"] == 0.01]
    arguments.lenet_seconds = mean([sum(s["train_class_counts"]) / s["train_samples_per_sec"] for s in lenet])
    document = (
        f"# Long-tailed classes: margins on an imbalanced Fashion-MNIST\n\nMade by `{command}` on this "
        f"project's code; each run's `--json` log is under `{os.path.relpath(arguments.runs_dir, ROOT)}/`.\n\n"
        "LDAM-DRW's experiment (Cao et al., NeurIPS 2019: long-tailed CIFAR-10) on Fashion-MNIST, which these "
        "machines have: the training set keeps n_i = floor(6000 f^(i/9)) images of class i (the 'exp' profile, "
        "seeded per run), the test set stays balanced (1000 per class). LeNet, 256-wide embedding, "
        f"{arguments.epochs} epochs, batch 128, SGD lr 0.01 momentum 0.9 wd 5e-4, lr x0.1 after epoch "
        f"{arguments.drw_epoch}; seeds {', '.join(map(str, arguments.seeds))}. Heads: softmax; L-Softmax with this "
        "example's schedule (beta 100, scale 0.99); CosFace and ArcFace at the 10-class settings of "
        "docs/results.md; LDAM = the cosface kind with a margin per class, m_j proportional to n_j^(-1/4), "
        f"the largest 0.5, s = 30 (the paper's code); LDAM + DRW adds deferred re-weighting after epoch "
        f"{arguments.drw_epoch}: class weights (1 - b)/(1 - b^n_j), b = 0.9999, normalised to sum to 10.\n\n"
        "Groups: many-shot classes have >= 1000 training images, few-shot < 200, medium-shot the rest "
        "(`--many-shot 1000 --few-shot 200`); a group's accuracy is the mean of its classes' (with factor 0.1 "
        "no class is few-shot). Accuracy is on the plain logits of each head after the last epoch.\n\n"
        f"{mnist_results.versions(logs)}\n\n" + body +
        "\n![per-class test accuracy against training count](figures/imbalanced_per_class.png)\n\n"
        + (resnet_section(arguments) if arguments.resnet_epochs else ""))
    with open(arguments.output, "w") as handle:
        handle.write(document)
    print(document)


if __name__ == "__main__":
    main()
