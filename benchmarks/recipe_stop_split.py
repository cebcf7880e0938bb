"""Which training recipe ships: judged on each data set's early-stopping split only, never on the report split.

Trains the shipped architecture several ways and scores each on the early-stopping split (Br35H
val; for PneumoniaMNIST a 10% stratified holdout of train), which otherwise only picks the epoch:
AUC, balanced error at 0.5, and the mean balanced error over the 65 MedMNIST-C corruption sets of
that split (13 corruptions x 5 severities, the same corrupted images for every recipe).
`medhe/train/run.py` and README quote these tables for the defaults chosen.

    PneumoniaMNIST: the recipe before class balance, + class-balanced loss, + geometric augmentation,
                    + both; per-image standardised with class balance, and with both
                    (writes results/recipe_stop_split.json); the shipped recipe with a moving
                    average of the weights ("+ EMA": decay 0.995 per step, early stopping on the
                    average).
    Br35H:          the recipe before shift augmentation, + shift augmentation (80 and 160
                    epochs), + geometric augmentation, + both; each image standardised by its own
                    mean and std instead of the training set's (normalization per_image), alone
                    and with shift augmentation (80 and 160 epochs), the last (shipped) also with
                    "+ EMA" (writes results/recipe_stop_split_br35h.json).

Weight averaging (2026-12-03; rule written before its rows were run, the one used for per-image
standardisation): "+ EMA" ships for a data set if, over seeds 0 1 2 on the stop split, the mean
corrupted balanced error is >= 10% lower than the shipped recipe's, without a clean BE more than
0.003 higher or an AUC more than 0.002 lower; the floors are then checked on the report split once.
Only decay 0.995 (about 3 epochs of PneumoniaMNIST steps, 6 of Br35H's) is tried.

Mixup and label smoothing (2026-12-04; the same rule, written before their rows were run): "+ mixup"
(image pairs mixed with lam ~ Beta(0.2, 0.2) per batch, their losses mixed alike) and "+ label
smoothing" (torch's label_smoothing 0.1: targets 0.95 / 0.05) each ship for a data set under the EMA rule above, against the
shipped recipe's rows of the same run. Only alpha 0.2 and eps 0.1 are tried. If both qualify, the
one with the lower mean corrupted balanced error ships.

    python benchmarks/recipe_stop_split.py [--dataset pneumoniamnist|br35h] [--seeds 0 ...] [--data-file PATH.npz]
                                           [--recipes NAME ...] [--out PATH.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, print_table, write_json  # noqa: E402

# Per data set: recipe name -> settings changed from the base (the data set's defaults with these
# keys set as below), and the result file. "normalization" is the Preprocessing's, not a training setting.
BASES = {"pneumoniamnist": {"class_balanced": False, "geometric_augment": False},
         "br35h": {"shift_augment": False, "geometric_augment": False, "epochs": 80, "patience": 20}}
VARIANTS = {
    "pneumoniamnist": {"before (shift augment only)": {}, "+ class-balanced": {"class_balanced": True},
                       "+ geometric": {"geometric_augment": True},
                       "+ both": {"class_balanced": True, "geometric_augment": True},
                       "per-image + class-balanced": {"class_balanced": True, "normalization": "per_image"},
                       "per-image + both": {"class_balanced": True, "geometric_augment": True,
                                            "normalization": "per_image"},
                       "+ class-balanced + EMA": {"class_balanced": True, "ema_decay": 0.995},
                       "+ class-balanced + mixup": {"class_balanced": True, "mixup_alpha": 0.2},
                       "+ class-balanced + label smoothing": {"class_balanced": True, "label_smoothing": 0.1}},
    "br35h": {"before (flips and shifts only)": {}, "+ shift augment": {"shift_augment": True},
              "+ shift augment, 160 epochs": {"shift_augment": True, "epochs": 160, "patience": 40},
              "+ geometric": {"geometric_augment": True},
              "+ both": {"shift_augment": True, "geometric_augment": True},
              "per-image standardised": {"normalization": "per_image"},
              "per-image + shift augment": {"normalization": "per_image", "shift_augment": True},
              "per-image + shift augment, 160 epochs": {"normalization": "per_image", "shift_augment": True,
                                                        "epochs": 160, "patience": 40},
              "per-image + shift augment, 160 epochs + EMA": {"normalization": "per_image", "shift_augment": True,
                                                              "epochs": 160, "patience": 40, "ema_decay": 0.995},
              "per-image + shift augment, 160 epochs + mixup": {"normalization": "per_image", "shift_augment": True,
                                                                "epochs": 160, "patience": 40, "mixup_alpha": 0.2},
              "per-image + shift augment, 160 epochs + label smoothing": {
                  "normalization": "per_image", "shift_augment": True, "epochs": 160, "patience": 40,
                  "label_smoothing": 0.1}},
}
RESULT_FILES = {"pneumoniamnist": "recipe_stop_split.json", "br35h": "recipe_stop_split_br35h.json"}


def main(argv: list[str] | None = None) -> int:
    from medhe.data.corruptions import corrupted_sets
    from medhe.data.preprocess import standardize_per_image
    from medhe.nn.model import ArchConfig
    from medhe.train.datasets import prepare_dataset
    from medhe.train.loop import predict_logits, softmax_positive, train_model
    from medhe.train.robustness import scores_from_probability
    from medhe.train.run import DATASET_DEFAULTS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=sorted(VARIANTS), default="pneumoniamnist")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds per recipe")
    parser.add_argument("--data-file", default=None, help="PneumoniaMNIST npz (default: ../shared copy)")
    parser.add_argument("--recipes", nargs="+", default=None, metavar="NAME",
                        help="train only these recipes (default: all of the data set's)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    names = args.recipes or list(VARIANTS[args.dataset])
    unknown = sorted(set(names) - set(VARIANTS[args.dataset]))
    if unknown:
        parser.error(f"unknown recipe(s) {unknown}; {args.dataset} has {list(VARIANTS[args.dataset])}")
    started = time.perf_counter()
    # Loaded normalised by the dataset's mean and std; the per_image recipes standardise from there.
    data = prepare_dataset(args.dataset, data_file=args.data_file if args.dataset == "pneumoniamnist" else None,
                           normalization="dataset")
    pre = data.preprocessing
    settings = {**DATASET_DEFAULTS[args.dataset], **BASES[args.dataset]}
    # A per-image standardisation of the dataset-normalised inputs equals that of the pixels.
    recipes = {name: {**settings, **VARIANTS[args.dataset][name]} for name in names}
    preprocessings = {name: dataclasses.replace(pre, normalization=recipe.get("normalization", "dataset"))
                      for name, recipe in recipes.items()}

    def as_normalised(name: str, inputs: np.ndarray) -> np.ndarray:
        return standardize_per_image(inputs) if preprocessings[name].normalization == "per_image" else inputs

    models = {}
    for name, recipe in recipes.items():
        for seed in args.seeds:
            models[name, seed] = train_model(
                ArchConfig(image_size=pre.image_size), as_normalised(name, data.train_images), data.train_labels,
                as_normalised(name, data.stop_images), data.stop_labels, epochs=recipe["epochs"],
                batch_size=recipe["batch_size"], lr=recipe["lr"], patience=recipe["patience"], seed=seed,
                augment=recipe["augment"], vertical_flip=recipe["vertical_flip"], max_shift=recipe["max_shift"],
                shift_augment=recipe["shift_augment"], pixel_mean_std=(pre.mean, pre.std), stop_metric="loss",
                geometric_augment=recipe["geometric_augment"], class_balanced=recipe["class_balanced"],
                ema_decay=recipe["ema_decay"], mixup_alpha=recipe["mixup_alpha"],
                label_smoothing=recipe["label_smoothing"],
                per_image=preprocessings[name].normalization == "per_image", progress=False)
            print(f"{name}, seed {seed}: trained ({time.perf_counter() - started:.0f} s)", flush=True)

    def scores(model, inputs) -> dict:
        return scores_from_probability(data.stop_labels, softmax_positive(predict_logits(model, inputs)))

    clean = {(name, seed): scores(model, as_normalised(name, data.stop_images))
             for (name, seed), (model, _) in models.items()}
    corrupted_be: dict = {key: [] for key in models}
    stop_gray = np.clip(data.stop_images[:, 0] * pre.std + pre.mean, 0.0, 1.0)
    for _, _, images in corrupted_sets(stop_gray, seed=0):
        inputs = {}  # one preprocessing of this set per normalisation
        for (name, seed), (model, _) in models.items():
            recipe_pre = preprocessings[name]
            if recipe_pre not in inputs:
                inputs[recipe_pre] = recipe_pre.apply_batch(images)
            corrupted_be[name, seed].append(scores(model, inputs[recipe_pre])["balanced_error"])
    rows = []
    for name in names:
        for seed in args.seeds:
            key = (name, seed)
            rows.append({"recipe": name, "seed": seed, "normalization": preprocessings[name].normalization,
                         "auc": clean[key]["auc"],
                         "balanced_error": clean[key]["balanced_error"],
                         "corrupted_balanced_error": float(np.mean(corrupted_be[key])),
                         "ema_decay": recipes[name]["ema_decay"], "mixup_alpha": recipes[name]["mixup_alpha"],
                         "label_smoothing": recipes[name]["label_smoothing"], "best_epoch": models[key][1]["best_epoch"]})
        if len(args.seeds) > 1:
            own = rows[-len(args.seeds):]  # this recipe's rows, one per seed
            rows.append({"recipe": name, "seed": "mean", "best_epoch": "",
                         **{field: float(np.mean([row[field] for row in own]))
                            for field in ("auc", "balanced_error", "corrupted_balanced_error")}})
    print_table(rows, [("recipe", "recipe", ""), ("seed", "seed", ""), ("auc", "stop AUC", ".4f"),
                       ("balanced_error", "stop BE", ".3f"), ("corrupted_balanced_error", "corrupted BE", ".3f"),
                       ("best_epoch", "best epoch", "")])
    write_json(RESULT_FILES[args.dataset], {
        "machine": machine(), "dataset": args.dataset, "split": data.card["stop_split"],
        "n": int(data.stop_labels.size), "base_settings": settings, "seeds": args.seeds,
        "seconds": round(time.perf_counter() - started, 1), "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
