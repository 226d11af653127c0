#!/usr/bin/env python3
"""Run the comparisons of docs/results.md: softmax vs L-Softmax m = 1..4 on MNIST, and the
margin family on MNIST and Fashion-MNIST.

  figure:   2-D LeNet embeddings on MNIST, one panel per setting (the paper's Fig. 2)
  accuracy: LeNet with a 256-wide embedding, the mx-lsoftmax schedule, per seed
  speed:    training samples/s of softmax, python and compiled (m = 4), batch 128 and 256
  sphere:   3-D LeNet embeddings on Fashion-MNIST on the unit sphere, one panel per kind
  family:   every kind (the papers' settings and a 10-class setting) against softmax and
            L-Softmax m = 2, 4, on Fashion-MNIST and MNIST, per seed, with samples/s

Every run is examples/train_mnist.py; its --json log (and --plot image) is kept
under --runs-dir (committed: docs/runs). With --reuse, a run whose log exists
with the same settings is read back instead of trained again, so the 20-epoch
runs can be done in pieces (or in parallel processes) and the document rebuilt.
Writes docs/results.md, docs/figures/features_2d.png and docs/figures/sphere_3d.png.

Example: python examples/mnist_results.py --epochs 20 --seeds 0 1 --figure-epochs 5 --reuse
"""
import argparse
import json
import os
import sys

import benchmark
from mx_lsoftmax.support.cli import DefaultsFormatter, non_negative_int, positive_int
import train_mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = {"softmax": 99.60, 1: None, 2: 99.68, 3: 99.69, 4: 99.69, "4-caffe": None}
PYTORCH = {"softmax": None, 1: 99.37, 2: 99.60, 3: 99.56, 4: 99.61, "4-caffe": None}
SETTINGS = ["softmax", 1, 2, 3, 4]  # the figure's panels and the table's main rows
# One more accuracy row: m = 4 with the Caffe original's MNIST schedule, which keeps beta
# above ~0.4 for 10000 steps where mx-lsoftmax's (scale 0.99) reaches 0.01 in 917.
ACCURACY_SETTINGS = SETTINGS + ["4-caffe"]
LABELS = {"4-caffe": "4, Caffe schedule"}
# The settings a reused log must match (train_mnist.py's --json "settings"); the head's
# settings (and its backend) only where the loss has them.
COMPARED = ("loss", "dataset", "epochs", "seed", "embed_dim", "train_limit", "net", "batch_size", "lr",
            "lr_steps", "wd", "imbalance", "imbalance_factor", "drw_epoch", "drw_beta", "max_margin")
HEAD_COMPARED = ("backend",) + train_mnist.KIND_SETTINGS
# What logs written before a setting existed meant by its absence.
LEGACY = {"dataset": "mnist", "imbalance": "none", "imbalance_factor": 0.01, "drw_epoch": 0, "drw_beta": 0.9999,
          "max_margin": None}

# The family comparison: (row label, train_mnist.py head arguments). "paper" rows take the
# kind's defaults (the papers' and insightface's, s = 64); "10-class" rows a smaller scale
# and margin, chosen for 10 classes (s = 16: a softmax over 10 classes reaches p = 0.999
# at s ~ 10 on well-separated classes, and s = 64 saturates it from the first step).
FAMILY = [
    ("softmax", ["--loss", "softmax"]),
    ("lsoftmax m=2", ["--loss", "lsoftmax", "--margin", "2"]),
    ("lsoftmax m=4", ["--loss", "lsoftmax", "--margin", "4"]),
    ("sphereface (paper)", ["--loss", "sphereface"]),
    ("cosface (paper)", ["--loss", "cosface"]),
    ("cosface (10-class)", ["--loss", "cosface", "--s", "16", "--margin", "0.2"]),
    ("arcface (paper)", ["--loss", "arcface"]),
    ("arcface (10-class)", ["--loss", "arcface", "--s", "16", "--margin", "0.3"]),
    ("combined (paper)", ["--loss", "combined"]),
    ("combined (10-class)", ["--loss", "combined", "--s", "16", "--m2", "0.2", "--m3", "0.1"]),
]
FAMILY_DATASETS = ("fashion-mnist", "mnist")
# The sphere figure: 3-D embeddings, where s = 64 and the papers' margins do not train from
# scratch (measured: 10% test accuracy after 2 epochs): s = 8, the 10-class margins, and the
# package's beta warm-up (the plain normalised logit first, the margin phased in over ~2 epochs).
WARM_UP = ["--beta", "100", "--scale", "0.995"]
SPHERE = [
    ("softmax", ["--loss", "softmax"]),
    ("sphereface", ["--loss", "sphereface"]),
    ("cosface", ["--loss", "cosface", "--s", "8", "--margin", "0.2"] + WARM_UP),
    ("arcface", ["--loss", "arcface", "--s", "8", "--margin", "0.3"] + WARM_UP),
    ("combined", ["--loss", "combined", "--s", "8", "--m2", "0.2", "--m3", "0.1"] + WARM_UP),
]
# Fashion-MNIST's own README, its table of submitted benchmarks (test accuracy, no
# preprocessing): two conv + pooling layers, the networks nearest to this LeNet.
FASHION_ANCHORS = "2 Conv+pooling: 87.6% (Kashif Rasul) and 91.6% (TensorFlow's layers tutorial)"


def setting_args(setting):
    if setting == "softmax":
        return ["--loss", "softmax"]
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
        if same_settings(summary["settings"], wanted):
            print(f"== {name}: reused {os.path.relpath(path, ROOT)}", flush=True)
            return summary
        print(f"== {name}: {os.path.relpath(path, ROOT)} has other settings, running again", flush=True)
    print(f"== {name}: {' '.join(argv)}", flush=True)
    return train_mnist.main(argv)


def same_settings(logged, wanted):
    """Whether a log's settings are the wanted run's (logs older than --loss / --dataset included)."""
    logged = dict(logged)
    if "loss" not in logged:  # before --loss: the backend said softmax, else it was lsoftmax
        logged["loss"] = "softmax" if logged.get("backend") == "softmax" else "lsoftmax"
    for key, value in LEGACY.items():
        logged.setdefault(key, value)
    wanted = dict(wanted)
    if wanted.get("backend") == "auto":  # a run records the backend 'auto' resolved to
        wanted["backend"] = train_mnist.mx_lsoftmax.resolve_backend("auto")
    keys = COMPARED + (HEAD_COMPARED if wanted["loss"] != "softmax" else ())
    return all(logged.get(key) == wanted[key] for key in keys)


def versions(summaries):
    """The code versions the runs' logs record ('not recorded' for logs older than the field)."""
    found = sorted({summary.get("code_version") or "not recorded" for summary in summaries})
    return "Code version of the runs (train_mnist.py's `code_version`): " + ", ".join(found) + "."


def panel_figure(arguments, panels, file_name):
    """One run per panel, each drawing its --plot image, side by side in figures/``file_name``;
    ``panels`` is a list of (run name, train_mnist.py arguments). Returns the runs' summaries."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4))
    summaries = []
    for axis, (name, argv) in zip(axes, panels):
        image_path = os.path.join(arguments.runs_dir, name + ".png")
        summaries.append(run(name, limited(argv + ["--plot", image_path], arguments), arguments))
        axis.imshow(plt.imread(image_path))
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(os.path.join(figures_dir(arguments), file_name), dpi=110)
    plt.close(figure)
    return summaries


def figure_section(arguments):
    summaries = panel_figure(arguments, [(f"figure_{setting}", setting_args(setting) + [
        "--epochs", str(arguments.figure_epochs), "--embed-dim", "2"]) for setting in SETTINGS], "features_2d.png")
    rows = [f"| {setting} | {100 * summary['test_accuracy']:.2f} |" for setting, summary in zip(SETTINGS, summaries)]
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
    summaries = []

    def run_one(name, argv):
        summaries.append(run(name, argv, arguments))
        return summaries[-1]

    rows = benchmark.lenet_throughput(backends=backends, run_one=run_one)
    return ("## Training throughput, all three backends\n\nLeNet (256-wide embedding), m = 4, beta 100, scale "
            "0.99: samples/s over the second of two epochs of 12800 images (the first pays for graph building), "
            "from each run's --json (`epochs[-1].samples_per_sec`); `make bench` measures the same in "
            f"docs/benchmarks.md. {versions(summaries)}\n\n" + benchmark.lenet_table(rows, backends) + "\n")


def sphere_section(arguments):
    common = ["--dataset", "fashion-mnist", "--epochs", str(arguments.family_epochs),
              "--lr-steps", str(lr_step(arguments.family_epochs)), "--embed-dim", "3"]
    summaries = panel_figure(arguments, [(f"sphere_{label}", common + head) for label, head in SPHERE],
                             "sphere_3d.png")
    rows = [f"| {label} | `{' '.join(head)}` | {100 * summary['test_accuracy']:.2f} |"
            for (label, head), summary in zip(SPHERE, summaries)]
    return (f"## Fashion-MNIST on the unit sphere: 3-D test features per kind\n\nLeNet with a 3-D "
            f"embedding, {arguments.family_epochs} epochs, seed 0; each panel shows the 10000 test "
            f"features divided by their norm, coloured by class. In three dimensions the papers' s = 64 "
            f"does not train from scratch (10% test accuracy after two epochs, measured), so the "
            f"normalised kinds use s = 8, the 10-class margins, and the package's beta warm-up "
            f"(beta 100, scale 0.995: the plain normalised logit first, the margin phased in over about "
            f"two epochs); sphereface uses its paper's schedule. Unlike the Fashion-MNIST demo this follows, "
            f"the class weights are normalised inside the layer (sphereface, cosface, arcface, combined) "
            f"and SphereFace trains. {versions(summaries)}\n\n![3-D features on the unit sphere]"
            f"(figures/sphere_3d.png)\n\n| head | settings | test accuracy % |\n|---|---|---|\n"
            + "\n".join(rows) + "\n")


def figures_dir(arguments):
    """Figures go beside the document (docs/figures for docs/results.md)."""
    return os.path.join(os.path.dirname(os.path.abspath(arguments.output)), "figures")


def lr_step(epochs):
    """The family runs divide the learning rate by 10 once, at 70% of the run."""
    return max(1, round(0.7 * epochs))


def label_stem(label):
    """A row label as part of a run's file name: 'cosface (10-class)' -> 'cosface_10-class'."""
    return label.replace(" ", "_").replace("(", "").replace(")", "")


def family_speed(label, head, arguments):
    """Training samples/s of one head: LeNet on MNIST, two epochs of 12800 images (the second
    timed, as benchmark.py's LeNet section), in a run of its own, not while other jobs share
    the cores as the accuracy runs may."""
    argv = ["--epochs", "2", "--train-limit", "12800", "--lr-steps"] + head + \
        ([] if head[1] == "softmax" else ["--backend", "compiled"])
    summary = run(f"family_speed_{label_stem(label)}", argv, arguments)
    return summary["epochs"][-1]["samples_per_sec"]


def family_findings(means):
    """Per data set, each head against softmax (means over seeds), computed from the table."""
    lines = []
    for dataset in FAMILY_DATASETS:
        base = means[(dataset, "softmax")]
        above = [f"{label} {means[(dataset, label)] - base:+.2f}" for label, _ in FAMILY[1:]
                 if means[(dataset, label)] > base]
        below = [f"{label} {means[(dataset, label)] - base:+.2f}" for label, _ in FAMILY[1:]
                 if means[(dataset, label)] <= base]
        best = max((label for label, _ in FAMILY), key=lambda label: means[(dataset, label)])
        lines.append(f"- {dataset}: softmax {base:.2f}%; above it: {', '.join(above) or 'none'}; "
                     f"not above it: {', '.join(below) or 'none'}; best: {best}.")
    return "Against softmax, points of mean test accuracy:\n\n" + "\n".join(lines) + "\n"


def family_section(arguments):
    header = ("| head | " + " | ".join(f"{dataset} per seed % | {dataset} mean %" for dataset in FAMILY_DATASETS)
              + " | training samples/s (ratio to softmax) |\n|---|" + "---|---|" * len(FAMILY_DATASETS) + "---|\n")
    rows, logs, means = [], [], {}
    softmax_speed = family_speed(*FAMILY[0], arguments)
    for label, head in FAMILY:
        cells = []
        for dataset in FAMILY_DATASETS:
            accuracies = []
            for seed in arguments.seeds:
                name = f"family_{dataset}_{label_stem(label)}_seed{seed}"
                summary = run(name, limited(["--dataset", dataset, "--epochs", str(arguments.family_epochs),
                                             "--lr-steps", str(lr_step(arguments.family_epochs)),
                                             "--seed", str(seed)] + head
                                            + ([] if head[1] == "softmax" else ["--backend", "compiled"]),
                                            arguments), arguments)
                logs.append(summary)
                accuracies.append(100 * summary["test_accuracy"])
            cells.append(f"{' / '.join(f'{a:.2f}' for a in accuracies)} | {sum(accuracies) / len(accuracies):.2f}")
            means[(dataset, label)] = sum(accuracies) / len(accuracies)
        speed = family_speed(label, head, arguments)
        rows.append(f"| {label} `{' '.join(head)}` | " + " | ".join(cells) + f" | {speed:.0f} ({speed / softmax_speed:.2f}x) |")
    limit = f" Training on the first {arguments.train_limit} images." if arguments.train_limit else ""
    return ("## The margin family on Fashion-MNIST and MNIST\n\nLeNet with a 256-wide embedding, "
            f"{arguments.family_epochs} epochs, seeds {', '.join(map(str, arguments.seeds))}, batch 128, SGD lr "
            f"0.01 momentum 0.9 wd 5e-4, lr x0.1 at epoch {lr_step(arguments.family_epochs)}, Xavier init, the "
            "compiled backend; test accuracy on the plain logits of each head after the last epoch (the "
            "normalised classifier for the normalised kinds). \"paper\" rows use each kind's defaults "
            "(the papers' and insightface's: s = 64; cosface m = 0.35, arcface m = 0.5, combined 1, 0.3, 0.2; "
            "sphereface m = 4 with its lambda schedule 1000 -> 5); \"10-class\" rows use s = 16 and smaller "
            "margins, chosen for 10 classes before these runs and not tuned on the test set; L-Softmax uses "
            "this example's schedule (beta 100, scale 0.99). Samples/s: LeNet on MNIST, the second of two epochs "
            f"of 12800 images, one run per head on otherwise idle cores (`family_speed_*` logs).{limit} "
            f"{versions(logs)}\n\n"
            f"Anchors for Fashion-MNIST, from its README's table of submitted benchmarks (no preprocessing): "
            f"{FASHION_ANCHORS}.\n\n" + header + "\n".join(rows) + "\n\n" + family_findings(means))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=DefaultsFormatter)
    parser.add_argument("--epochs", type=positive_int, default=20, help="epochs of the accuracy runs")
    parser.add_argument("--figure-epochs", type=positive_int, default=10, help="epochs of the 2-D figure runs")
    parser.add_argument("--family-epochs", type=positive_int, default=10,
                        help="epochs of the margin-family runs (table and sphere figure)")
    parser.add_argument("--seeds", type=non_negative_int, nargs="+", default=[0, 1], help="seeds of the accuracy runs")
    parser.add_argument("--train-limit", type=non_negative_int, default=0, help="train on the first N images (0: all)")
    parser.add_argument("--parts", nargs="*", default=list(PARTS), choices=list(PARTS),
                        help="which parts to (re)make, in this order")
    parser.add_argument("--runs-dir", default=os.path.join(ROOT, "docs", "runs"),
                        help="where each run's --json log and plot go")
    parser.add_argument("--reuse", action="store_true", help="read back runs whose log has the same settings")
    parser.add_argument("--output", default=os.path.join(ROOT, "docs", "results.md"), help="the document to write")
    arguments = parser.parse_args(argv)
    os.makedirs(arguments.runs_dir, exist_ok=True)
    os.makedirs(figures_dir(arguments), exist_ok=True)
    command = "python examples/mnist_results.py " + " ".join(sys.argv[1:] if argv is None else argv)
    sections = [f"# MNIST and Fashion-MNIST results\n\nMade by `{command}` on this project's code; each run's log (its "
                f"`--json`, with per-epoch loss, accuracy, beta and samples/s) is under "
                f"`{os.path.relpath(arguments.runs_dir, ROOT)}/`.\n"]
    for part in PARTS:
        if part in arguments.parts:
            sections.append(PARTS[part](arguments))
    document = "\n".join(sections)
    with open(arguments.output, "w") as handle:
        handle.write(document)
    print(document)


PARTS = {"figure": figure_section, "accuracy": lambda arguments: accuracy_section(arguments)[0],
         "speed": speed_section, "sphere": sphere_section, "family": family_section}


if __name__ == "__main__":
    main()
