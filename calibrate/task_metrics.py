"""Scores of a labelled task from per-example label scores (pure): recall, balanced accuracy, AUC, bootstrap CI."""

from __future__ import annotations

import numpy as np

BOOTSTRAP = 1000
LEVEL = 0.95


def recalls(truth: np.ndarray, predicted: np.ndarray, n_labels: int) -> np.ndarray:
    """Per-label recall (the fraction of each label's examples predicted as it); labels are 0..n-1."""
    return np.array([(predicted[truth == k] == k).mean() if (truth == k).any() else np.nan for k in range(n_labels)])


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``, ties sharing their average rank."""
    order = np.argsort(x, kind="mergesort")
    _, first, counts = np.unique(x[order], return_index=True, return_counts=True)
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)
    return ranks


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a positive example's margin > a negative one's), ties counting half (Mann-Whitney U)."""
    ranks = average_ranks(np.concatenate([positive, negative]))
    n_pos, n_neg = len(positive), len(negative)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def balanced_accuracy(truth: np.ndarray, predicted: np.ndarray, n_labels: int) -> float:
    return float(np.nanmean(recalls(truth, predicted, n_labels)))


def bootstrap_intervals(truth: np.ndarray, predicted: np.ndarray, margin: np.ndarray | None, n_labels: int,
                        seed: int, resamples: int = BOOTSTRAP, level: float = LEVEL) -> dict[str, tuple[float, float]]:
    """Percentile intervals of balanced accuracy (and of the AUC of ``margin``, label n-1 positive),
    resampling each label's examples with replacement (stratified: every resample keeps the label counts)."""
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(truth == k) for k in range(n_labels)]
    accuracy, areas = [], []
    for _ in range(resamples):
        picked = [rng.choice(g, len(g)) for g in groups if len(g)]
        accuracy.append(np.mean([(predicted[g] == truth[g]).mean() for g in picked]))
        if margin is not None:
            areas.append(auc(margin[picked[-1]], margin[np.concatenate(picked[:-1])]))
    tail = (1 - level) / 2 * 100
    out = {"balanced_accuracy": tuple(float(v) for v in np.percentile(accuracy, [tail, 100 - tail]))}
    if margin is not None:
        out["auc"] = tuple(float(v) for v in np.percentile(areas, [tail, 100 - tail]))
    return out
