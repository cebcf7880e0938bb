"""Binary classification metrics and the two plots shipped next to each trained model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from medhe.errors import ConfigError


def _as_binary_labels(labels) -> np.ndarray:
    labels = np.asarray(labels).reshape(-1)
    if labels.size and not np.isin(labels, (0, 1)).all():
        raise ConfigError(f"binary labels must be 0 or 1, got values {sorted(set(labels.tolist()))[:10]}")
    return labels.astype(np.int64)


def _as_probabilities(prob, n: int) -> np.ndarray:
    prob = np.asarray(prob, dtype=np.float64).reshape(-1)
    if prob.shape[0] != n:
        raise ConfigError(f"expected {n} probabilities (one per label), got {prob.shape[0]}")
    if prob.size and (np.nanmin(prob) < 0.0 or np.nanmax(prob) > 1.0 or np.isnan(prob).any()):
        raise ConfigError("probabilities must lie in [0, 1]")
    return prob


def _safe_div(num: int, den: int) -> float | None:
    return float(num / den) if den else None


ECE_BINS = 15


def expected_calibration_error(labels, prob_positive, bins: int = ECE_BINS) -> float:
    """ECE: over equal-width bins of the predicted class's confidence, the |accuracy - confidence|
    gap weighted by the bin's share of the images (Guo et al. 2017, 15 bins)."""
    labels = _as_binary_labels(labels)
    prob = _as_probabilities(prob_positive, labels.shape[0])
    if labels.size == 0:
        raise ConfigError("cannot compute calibration on an empty set")
    predicted = (prob >= 0.5).astype(np.int64)
    confidence = np.where(predicted == 1, prob, 1.0 - prob)
    correct = (predicted == labels).astype(np.float64)
    # Confidence lies in [0.5, 1]; bin over [0, 1] as the definition does (lower bins stay empty).
    which = np.minimum((confidence * bins).astype(np.int64), bins - 1)
    gap = 0.0
    for b in np.unique(which):
        members = which == b
        gap += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(gap)


def binary_report(labels, prob_positive, threshold: float = 0.5) -> dict:
    """Accuracy, ROC AUC, sensitivity, specificity and the confusion matrix.

    Class 1 is the positive (disease) class. The confusion matrix is [[TN, FP], [FN, TP]]
    (rows = truth, columns = prediction, as sklearn). AUC is None when only one class is present;
    sensitivity/specificity are None when their denominator is zero.
    """
    labels = _as_binary_labels(labels)
    prob = _as_probabilities(prob_positive, labels.shape[0])
    if labels.size == 0:
        raise ConfigError("cannot report metrics on an empty set")
    pred = (prob >= threshold).astype(np.int64)
    tp = int(((pred == 1) & (labels == 1)).sum())
    tn = int(((pred == 0) & (labels == 0)).sum())
    fp = int(((pred == 1) & (labels == 0)).sum())
    fn = int(((pred == 0) & (labels == 1)).sum())
    auc = float(roc_auc_score(labels, prob)) if len(np.unique(labels)) == 2 else None
    return {
        "n": int(labels.size),
        "n_positive": int(labels.sum()),
        "n_negative": int(labels.size - labels.sum()),
        "threshold": float(threshold),
        "accuracy": float((tp + tn) / labels.size),
        "auc": auc,
        "sensitivity": _safe_div(tp, tp + fn),
        "specificity": _safe_div(tn, tn + fp),
        "confusion_matrix": [[tn, fp], [fn, tp]],
        "ece": expected_calibration_error(labels, prob),
    }


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_roc_png(path: str | Path, labels, prob, title: str = "ROC curve") -> Path:
    """ROC curve with the AUC in the legend and the chance diagonal."""
    labels = _as_binary_labels(labels)
    prob = _as_probabilities(prob, labels.shape[0])
    if len(np.unique(labels)) != 2:
        raise ConfigError("a ROC curve needs both classes in the labels")
    fpr, tpr, _ = roc_curve(labels, prob)
    auc = roc_auc_score(labels, prob)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    try:
        ax.plot(fpr, tpr, lw=2, label=f"model (AUC = {auc:.3f})")
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance (AUC = 0.5)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.set_xlabel("False positive rate (1 - specificity)")
        ax.set_ylabel("True positive rate (sensitivity)")
        ax.set_title(f"{title} (n = {labels.size})")
        ax.legend(loc="lower right")
        return _save(fig, path)
    finally:
        plt.close(fig)


def _save(fig, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path


def save_confusion_png(path: str | Path, labels, pred, class_names, title: str = "Confusion matrix") -> Path:
    """Confusion matrix with counts in the cells (rows = truth, columns = prediction)."""
    labels = _as_binary_labels(labels)
    pred = _as_binary_labels(pred)
    if pred.shape != labels.shape:
        raise ConfigError(f"expected {labels.size} predictions, got {pred.size}")
    if len(class_names) != 2:
        raise ConfigError(f"expected 2 class names, got {list(class_names)}")
    matrix = np.zeros((2, 2), dtype=np.int64)
    np.add.at(matrix, (labels, pred), 1)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.0), dpi=100)
    try:
        ax.imshow(matrix, cmap="Blues")
        threshold = matrix.max() / 2 if matrix.max() else 0.5
        for i in range(2):
            for j in range(2):
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=14,
                        color="white" if matrix[i, j] > threshold else "black")
        ax.set_xticks([0, 1], labels=list(class_names))
        ax.set_yticks([0, 1], labels=list(class_names))
        ax.set_xlabel("Predicted label")
        ax.set_ylabel("True label")
        accuracy = float(np.trace(matrix) / matrix.sum()) if matrix.sum() else float("nan")
        ax.set_title(f"{title}\naccuracy = {accuracy:.3f} (n = {int(matrix.sum())})")
        return _save(fig, path)
    finally:
        plt.close(fig)


def data_title(report: dict) -> str:
    """What an evaluation ran on, for plot titles: "<data set> / <split>", or the folder's name."""
    data = report.get("dataset", {})
    if report.get("split") == "folder":
        return f"folder {Path(data.get('root', '?')).name}"
    return f"{data.get('name', '?')} / {report.get('split', '?')}"


def save_report_plots(report: dict, path_stem: str | Path, title: str) -> list[Path]:
    """ROC and confusion-matrix PNGs of an evaluation report (from its per-image labels and
    probabilities), written as <stem>.roc.png and <stem>.confusion.png; the ROC is left out when
    the report holds one class only (an encrypted run with a small --limit, say)."""
    labels = np.asarray(report["per_image"]["label"], dtype=np.int64)
    prob = np.asarray(report["per_image"]["prob_positive"], dtype=np.float64)
    stem = Path(path_stem)
    written = []
    if len(np.unique(labels)) == 2:
        written.append(save_roc_png(stem.with_name(stem.name + ".roc.png"), labels, prob, title=f"ROC: {title}"))
    pred = (prob >= report.get("threshold", 0.5)).astype(np.int64)
    written.append(save_confusion_png(stem.with_name(stem.name + ".confusion.png"), labels, pred,
                                      report["class_names"], title=f"Confusion: {title}"))
    return written


def save_corruption_png(path: str | Path, report: dict) -> Path:
    """Balanced error per corruption (mean over its severities) for each model of a
    `medhe evaluate --corruptions` report, with each model's clean balanced error as a line."""
    names = list(report["corruptions"])
    keys = sorted(report["models"], key=lambda key: key != "model")  # the model first (JSON sorts keys)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 0.32 * len(names) * max(1, len(keys)) + 1.6), dpi=100)
    try:
        height = 0.8 / len(keys)
        positions = np.arange(len(names))
        for index, key in enumerate(keys):
            result = report["models"][key]
            values = [result["corruptions"][name]["balanced_error"] for name in names]
            bars = ax.barh(positions + (index - (len(keys) - 1) / 2) * height, values, height=height,
                           label=f"{key} ({Path(result['model_dir']).name}): "
                                 f"mean {result['mean']['balanced_error']:.3f}")
            ax.axvline(result["clean"]["balanced_error"], color=bars.patches[0].get_facecolor(), ls="--", lw=1)
        ax.set_yticks(positions, labels=names)
        ax.invert_yaxis()
        ax.set_xlabel("balanced error (mean over 5 severities; dashed: clean)")
        ax.set_title(f"Corruptions on {data_title(report)} (n = {report['n']})")
        ax.legend(loc="best", fontsize=8)
        return _save(fig, path)
    finally:
        plt.close(fig)
