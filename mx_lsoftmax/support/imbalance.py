"""Long-tailed data, for the imbalanced-data example: LDAM-DRW's definitions.

Cao et al., "Learning Imbalanced Datasets with Label-Distribution-Aware Margin Loss"
(NeurIPS 2019) and its code: class i of C keeps n_i training images,

    'exp'   n_i = floor(n_max f^(i / (C - 1)))
    'step'  n_i = n_max for the first half of the classes (i < C // 2), floor(n_max f) after,

f the imbalance factor in (0, 1] (0.1: a ratio of 10 between the largest and smallest
class, 0.01: of 100). The test set stays balanced. Deferred re-weighting (DRW) weighs
class j by (1 - beta) / (1 - beta^n_j), beta = 0.9999, normalised to sum to C.
"""
import numpy as np

__all__ = ["PROFILES", "long_tailed_counts", "long_tailed_indices", "drw_class_weights", "shot_groups"]

PROFILES = ("exp", "step")


def long_tailed_counts(n_max, classes, profile, factor):
    """Training images per class, a list of C ints; ValueError naming a bad setting."""
    if profile not in PROFILES:
        raise ValueError(f"imbalance profile must be one of {PROFILES}, got {profile!r}")
    if not (0.0 < factor <= 1.0):
        raise ValueError(f"imbalance factor must be in (0, 1], got {factor!r}")
    if classes < 2 or n_max < 1:
        raise ValueError(f"a long-tailed set needs >= 2 classes and n_max >= 1, got {classes} and {n_max}")
    if profile == "exp":
        counts = [int(n_max * factor ** (i / (classes - 1))) for i in range(classes)]
    else:
        counts = [n_max if i < classes // 2 else int(n_max * factor) for i in range(classes)]
    if min(counts) < 1:
        raise ValueError(f"imbalance factor {factor!r} leaves class {counts.index(min(counts))} with no "
                         f"training sample (n_max = {n_max}); use a factor >= {1 / n_max:.3g}")
    return counts


def long_tailed_indices(labels, profile, factor, seed):
    """Indices of a seeded long-tailed subset of ``labels`` (classes 0..C-1), sorted.

    n_max is the smallest class's size in ``labels`` (the balanced count for MNIST and
    Fashion-MNIST); class i keeps a random n_i of its images.
    Returns (indices, counts)."""
    labels = np.asarray(labels)
    classes = int(labels.max()) + 1
    available = np.bincount(labels, minlength=classes)
    counts = long_tailed_counts(int(available.min()), classes, profile, factor)
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(labels == index), size=count, replace=False)
              for index, count in enumerate(counts)]
    return np.sort(np.concatenate(chosen)), counts


def drw_class_weights(counts, beta=0.9999):
    """Class weights (1 - beta) / (1 - beta^n_j), normalised to sum to C (float64 (C,))."""
    counts = np.asarray(counts, dtype=np.float64)
    if not (0.0 <= beta < 1.0):
        raise ValueError(f"DRW beta must be in [0, 1), got {beta!r}")
    weights = (1.0 - beta) / (1.0 - np.power(beta, counts))
    return weights * (len(counts) / weights.sum())


def shot_groups(counts, many=1000, few=200):
    """'many' (n >= many), 'medium' or 'few' (n < few) for each class's training count."""
    if not few <= many:
        raise ValueError(f"shot thresholds must have few <= many, got few {few!r}, many {many!r}")
    return ["many" if n >= many else "few" if n < few else "medium" for n in counts]
