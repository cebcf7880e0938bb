"""An ensemble's decision threshold and calibration, plaintext only: is the mean of the members'
cuts good enough, and is the ensemble less calibrated than its members?

An ensemble's plan averages its members' logits, each member's decision cut already folded into
its output bias (medhe.train.thresholds), so the ensemble decides at the mean of the members' cuts.
The alternative is to re-choose the cut for the averaged logits by the members' own rule (median
bootstrap Youden cut) on the early-stopping split they share (a fixed seeded holdout of train for
PneumoniaMNIST, the stored val split for Br35H: neither trained either member). This script scores
both cuts on the report split (PneumoniaMNIST val, Br35H grouped test), next to each member, with
the expected calibration error (15 bins) on the report and stop splits and a bootstrap 95%
interval of ECE(ensemble) - ECE(member 1) on the report split.

    python benchmarks/ensemble_decision.py [--datasets pneumoniamnist br35h] [--data-file PATH.npz]
Writes benchmarks/results/ensemble_decision.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, print_table, write_json  # noqa: E402

ECE_BOOTSTRAP_RESAMPLES = 1000


def logit_difference(model, images: np.ndarray) -> np.ndarray:
    from medhe.train.loop import predict_logits

    logits = predict_logits(model, images).astype(np.float64)
    return logits[:, 1] - logits[:, 0]


def decision_scores(labels: np.ndarray, difference: np.ndarray) -> dict:
    """Decisions at difference > 0 (the argmax the plan and the clinic use), and calibration."""
    from medhe.train.metrics import expected_calibration_error

    predicted = (difference > 0).astype(np.int64)
    sensitivity = float(predicted[labels == 1].mean())
    specificity = float(1.0 - predicted[labels == 0].mean())
    return {"accuracy": float((predicted == labels).mean()), "sensitivity": sensitivity,
            "specificity": specificity, "balanced_error": 1.0 - (sensitivity + specificity) / 2,
            "ece": expected_calibration_error(labels, 1.0 / (1.0 + np.exp(-difference)))}


def ece_difference_interval(labels: np.ndarray, first: np.ndarray, second: np.ndarray) -> list[float]:
    """2.5 / 50 / 97.5 percentiles of ECE(second) - ECE(first) over bootstrap resamples of the images."""
    from medhe.train.metrics import expected_calibration_error

    rng = np.random.default_rng(0)
    to_prob = lambda difference: 1.0 / (1.0 + np.exp(-difference))  # noqa: E731
    gaps = []
    for _ in range(ECE_BOOTSTRAP_RESAMPLES):
        pick = rng.integers(0, labels.size, labels.size)
        gaps.append(expected_calibration_error(labels[pick], to_prob(second[pick]))
                    - expected_calibration_error(labels[pick], to_prob(first[pick])))
    return [float(value) for value in np.percentile(gaps, [2.5, 50.0, 97.5])]


def run_dataset(dataset: str, data_file) -> tuple[list[dict], dict]:
    from medhe.nn.io import load_model
    from medhe.nn.modeldir import ensemble_members, resolve_model_dir
    from medhe.train.datasets import prepare_dataset
    from medhe.train.thresholds import bootstrap_youden_cut

    ensemble_dir = resolve_model_dir(f"{dataset}-ensemble")
    ensemble, card = load_model(ensemble_dir)
    members = [load_model(member) for member in ensemble_members(ensemble_dir)]
    data = prepare_dataset(dataset, data_file=data_file if dataset != "br35h" else None)
    if data.preprocessing != card.preprocessing:
        raise SystemExit(f"{dataset}: the prepared data's preprocessing differs from the shipped model's")
    labels_stop, labels_report = np.asarray(data.stop_labels), np.asarray(data.report_labels)

    rows, differences = [], {}
    member_cuts = []
    for index, (model, member_card) in enumerate(members, start=1):
        cut = float(member_card.metrics["decision"]["cut_logit"])
        member_cuts.append(cut)
        differences[f"member {index}"] = logit_difference(model, data.report_images)
        rows.append({"dataset": dataset, "model": f"member {index}", "cut_logit": cut,
                     **decision_scores(labels_report, differences[f"member {index}"]),
                     "stop_ece": decision_scores(labels_stop, logit_difference(model, data.stop_images))["ece"]})

    mean_cut = float(np.mean(member_cuts))
    stop_folded = logit_difference(ensemble, data.stop_images)
    rechosen_cut = bootstrap_youden_cut(labels_stop, stop_folded + mean_cut)  # on the unfolded scale
    report_folded = logit_difference(ensemble, data.report_images)
    for label, cut in (("ensemble, mean of members' cuts (shipped)", mean_cut),
                       ("ensemble, cut re-chosen on stop split", rechosen_cut)):
        shift = cut - mean_cut
        rows.append({"dataset": dataset, "model": label, "cut_logit": cut,
                     **decision_scores(labels_report, report_folded - shift),
                     "stop_ece": decision_scores(labels_stop, stop_folded - shift)["ece"]})
    summary = {"n_stop": int(labels_stop.size), "n_report": int(labels_report.size),
               "stop_split": data.card.get("stop_split"), "report_split": data.card.get("report_split"),
               "rechosen_minus_mean_cut_logit": rechosen_cut - mean_cut,
               "ece_ensemble_minus_member_1_report_ci95": ece_difference_interval(
                   labels_report, differences["member 1"], report_folded)}
    return rows, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", choices=["pneumoniamnist", "br35h"], default=["pneumoniamnist", "br35h"])
    parser.add_argument("--data-file", default=None, help="PneumoniaMNIST npz (default: ../shared copy)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows, summaries = [], {}
    for dataset in args.datasets:
        dataset_rows, summaries[dataset] = run_dataset(dataset, args.data_file)
        rows += dataset_rows
    print_table(rows, [("dataset", "dataset", ""), ("model", "model", ""), ("cut_logit", "cut", ".3f"),
                       ("accuracy", "ACC", ".4f"), ("sensitivity", "sens", ".4f"), ("specificity", "spec", ".4f"),
                       ("balanced_error", "BE", ".4f"), ("ece", "ECE", ".4f"), ("stop_ece", "stop ECE", ".4f")])
    for dataset, summary in summaries.items():
        low, median, high = summary["ece_ensemble_minus_member_1_report_ci95"]
        print(f"{dataset}: re-chosen cut - mean cut = {summary['rechosen_minus_mean_cut_logit']:+.3f} logits; "
              f"ECE(ensemble) - ECE(member 1) on the report split: median {median:+.4f}, "
              f"95% bootstrap interval [{low:+.4f}, {high:+.4f}]")
    write_json("ensemble_decision.json", {"machine": machine(), "rows": rows, "summaries": summaries}, args.out)


if __name__ == "__main__":
    main()
