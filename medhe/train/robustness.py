"""Accuracy under the MedMNIST-C corruptions (`medhe evaluate --corruptions`).

Every model in one run sees the same corrupted images (seeded per corruption and severity), so
their mean balanced errors compare directly. Balanced error = 1 - (sensitivity + specificity) / 2,
MedMNIST-C's metric for binary tasks; "mean" = over the 5 severities of a corruption, then over
the corruptions.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from medhe.data.corruptions import CHEST_XRAY_CORRUPTIONS, CORRUPTION_SIZE_PX, SEVERITIES, corrupted_sets
from medhe.data.input_check import flagged_fraction
from medhe.errors import ConfigError
from medhe.nn.io import load_model, resolve_model_dir
from medhe.train.loop import predict_logits, softmax_positive
from medhe.train.metrics import binary_report


def scores_from_probability(labels, prob_positive) -> dict:
    """Accuracy, AUC, ECE and balanced error (MedMNIST-C's binary metric) of P(class 1)."""
    report = binary_report(labels, prob_positive)
    sensitivity, specificity = report["sensitivity"] or 0.0, report["specificity"] or 0.0
    return {"accuracy": report["accuracy"], "auc": report["auc"], "ece": report["ece"],
            "balanced_error": 1.0 - (sensitivity + specificity) / 2.0}


def _scores(model, card, images_gray01, labels) -> dict:
    inputs = card.preprocessing.apply_batch(images_gray01)
    scores = scores_from_probability(labels, softmax_positive(predict_logits(model, inputs)))
    out = {key: scores[key] for key in ("accuracy", "auc", "balanced_error")}
    if card.preprocessing.input_profile is not None:  # what the clinic's input check would flag
        out["flagged_fraction"] = flagged_fraction(card.preprocessing.input_profile, inputs)
    return out


def _mean(values) -> float:
    return float(np.mean([value for value in values if value is not None]))


def evaluate_corruptions(model: str | Path, split: str | None = None, data_file: str | Path | None = None, *,
                         compare: tuple[str | Path, ...] = (), size_px: int = CORRUPTION_SIZE_PX, seed: int = 0,
                         image_dir: str | Path | None = None, class_dirs: tuple[str, ...] | None = None,
                         progress: bool = True) -> dict:
    """Clean and corrupted accuracy, AUC and balanced error of `model` (and each `compare` model,
    which must be trained on the same data set) on a held-out split, or on the labelled images
    under `image_dir` (one subfolder per class, read as `medhe evaluate --image-dir` reads them)."""
    from medhe.train.evaluate import _held_out, _load_eval_data, load_image_folder

    model_dir = resolve_model_dir(model)
    primary = load_model(model_dir)
    if image_dir is not None:
        if split is not None or data_file is not None:
            raise ConfigError("an image folder replaces --split and --data-file")
        images, labels, info = load_image_folder(image_dir, primary[1], class_dirs, progress=progress)
        del info["files"]
        split, held_out = "folder", None
    else:
        if split is None:
            split = "val" if data_file is not None else (primary[1].dataset or {}).get("report_split", "test")
        images, labels, info = _load_eval_data(primary[1], split, data_file)
        held_out, note = _held_out(primary[1], split, info.get("data_file_sha256"))
        if held_out is False:
            raise ConfigError(f"--corruptions reports on held-out data only; {note}")
    models = {"model": (model_dir, *primary)}
    for index, other in enumerate(compare):
        other_dir = resolve_model_dir(other)
        other_model, other_card = load_model(other_dir)
        if (other_card.dataset or {}).get("name") != (primary[1].dataset or {}).get("name"):
            raise ConfigError(f"--compare {other}: trained on {(other_card.dataset or {}).get('name')!r}, "
                              f"not {(primary[1].dataset or {}).get('name')!r} like --model")
        other_held_out, other_note = (None, "") if image_dir is not None else _held_out(
            other_card, split, info.get("data_file_sha256"))
        if other_held_out is False:
            raise ConfigError(f"--compare {other}: {other_note}")
        models[f"compare_{index + 1}"] = (other_dir, other_model, other_card)
    labels = np.asarray(labels).reshape(-1)
    start = time.perf_counter()
    results = {key: {"model_dir": str(Path(directory).resolve()), "clean": _scores(m, card, images, labels),
                     "corruptions": {}} for key, (directory, m, card) in models.items()}
    total = len(CHEST_XRAY_CORRUPTIONS) * SEVERITIES
    sets = corrupted_sets(images, size_px=size_px, seed=seed)
    if progress:
        from tqdm import tqdm

        sets = tqdm(sets, total=total, desc="corruptions", unit="set")
    for name, severity, corrupted in sets:
        for key, (_, m, card) in models.items():
            results[key]["corruptions"].setdefault(name, {"severities": []})["severities"].append(
                {"severity": severity, **_scores(m, card, corrupted, labels)})
    for result in results.values():
        metrics = [m for m in ("accuracy", "auc", "balanced_error", "flagged_fraction") if m in result["clean"]]
        for entry in result["corruptions"].values():
            for metric in metrics:
                entry[metric] = _mean(level[metric] for level in entry["severities"])
        result["mean"] = {metric: _mean(entry[metric] for entry in result["corruptions"].values())
                          for metric in metrics}
    report = {"split": split, "dataset": info, "held_out": held_out, "n": int(labels.size),
              "corruption_size_px": size_px, "seed": seed, "severities": SEVERITIES,
              "corruptions": [c.name for c in CHEST_XRAY_CORRUPTIONS],
              "definitions": "MedMNIST-C (Di Salvo et al. 2024), pneumoniamnist severities, re-implemented",
              "models": results, "seconds": round(time.perf_counter() - start, 1)}
    if (primary[1].dataset or {}).get("name") == "br35h":
        report["note"] = ("MedMNIST-C defines these corruptions for chest X-rays and has none for brain MRI: "
                          "on Br35H they are a proxy; the images are the model's own crop, upsampled, "
                          "corrupted and cropped again by each model's recipe")
    if compare:
        base = results["model"]["mean"]["balanced_error"]
        report["mean_balanced_error_reduction_vs_compare"] = {
            key: (1.0 - base / result["mean"]["balanced_error"]) if result["mean"]["balanced_error"] else None
            for key, result in results.items() if key != "model"}
    return report


def format_corruption_table(report: dict) -> str:
    """Rows: clean, each corruption (mean over severities), mean; columns: ACC / AUC / BE per model."""
    keys = list(report["models"])
    header = f"{'corruption':18s}" + "".join(f"  {key + ' ACC / AUC / BE':>28s}" for key in keys)
    lines = [header, "-" * len(header)]

    def row(label: str, entries: list[dict]) -> str:
        return f"{label:18s}" + "".join(
            f"  {e['accuracy']:>8.4f} / {e['auc']:.4f} / {e['balanced_error']:.4f}" for e in entries)

    lines.append(row("clean", [report["models"][k]["clean"] for k in keys]))
    for name in report["corruptions"]:
        lines.append(row(name, [report["models"][k]["corruptions"][name] for k in keys]))
    lines.append(row("mean (corrupted)", [report["models"][k]["mean"] for k in keys]))
    for key in keys:
        if "flagged_fraction" in report["models"][key]["clean"]:
            lines.append(f"{key}'s input check flags {report['models'][key]['clean']['flagged_fraction']:.1%} of the "
                         f"clean images and {report['models'][key]['mean']['flagged_fraction']:.1%} of the corrupted")
    if "note" in report:
        lines.append(f"note: {report['note']}")
    for key, reduction in report.get("mean_balanced_error_reduction_vs_compare", {}).items():
        lines.append(f"model's mean balanced error is {reduction:.1%} lower than {key}'s "
                     f"({report['models'][key]['model_dir']})")
    return "\n".join(lines)
