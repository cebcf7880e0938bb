"""Which training recipe ships: judged on PneumoniaMNIST's early-stopping split only, never on val.

Trains the shipped architecture four ways (the recipe before class balance, + class-balanced loss,
+ geometric augmentation, + both; one seed) and scores each on the early-stopping split (a 10%
stratified holdout of train that only picks the epoch): AUC, balanced error at 0.5, and the mean
balanced error over the 65 MedMNIST-C corruption sets of that split. `medhe/train/run.py` and
README quote this table for the defaults chosen.

    python benchmarks/recipe_stop_split.py [--data-file PATH.npz]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, print_table, write_json  # noqa: E402

VARIANTS = {"before (shift augment only)": {}, "+ class-balanced": {"class_balanced": True},
            "+ geometric": {"geometric_augment": True},
            "+ both": {"class_balanced": True, "geometric_augment": True}}


def main(argv: list[str] | None = None) -> int:
    from medhe.data.corruptions import corrupted_sets
    from medhe.nn.model import ArchConfig
    from medhe.train.datasets import prepare_dataset
    from medhe.train.loop import predict_logits, softmax_positive, train_model
    from medhe.train.robustness import scores_from_probability
    from medhe.train.run import DATASET_DEFAULTS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-file", default=None, help="PneumoniaMNIST npz (default: ../shared copy)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    data = prepare_dataset("pneumoniamnist", data_file=args.data_file)
    pre, settings = data.preprocessing, DATASET_DEFAULTS["pneumoniamnist"]
    stop_gray = np.clip(data.stop_images[:, 0] * pre.std + pre.mean, 0.0, 1.0)
    rows = []
    for name, extra in VARIANTS.items():
        model, history = train_model(
            ArchConfig(image_size=pre.image_size), data.train_images, data.train_labels, data.stop_images,
            data.stop_labels, epochs=settings["epochs"], batch_size=settings["batch_size"], lr=settings["lr"],
            patience=settings["patience"], seed=0, augment=settings["augment"],
            vertical_flip=settings["vertical_flip"], max_shift=settings["max_shift"],
            shift_augment=settings["shift_augment"], pixel_mean_std=(pre.mean, pre.std), stop_metric="loss",
            progress=False, **extra)
        clean = scores_from_probability(data.stop_labels, softmax_positive(predict_logits(model, data.stop_images)))
        corrupted = [scores_from_probability(data.stop_labels,
                                             softmax_positive(predict_logits(model, pre.apply_batch(images))))
                     for _, _, images in corrupted_sets(stop_gray, seed=0)]
        rows.append({"recipe": name, "auc": clean["auc"], "balanced_error": clean["balanced_error"],
                     "corrupted_balanced_error": float(np.mean([c["balanced_error"] for c in corrupted])),
                     "best_epoch": history["best_epoch"]})
        print(f"{name}: done", flush=True)
    print_table(rows, [("recipe", "recipe", ""), ("auc", "stop AUC", ".4f"), ("balanced_error", "stop BE", ".3f"),
                       ("corrupted_balanced_error", "corrupted BE", ".3f"), ("best_epoch", "best epoch", "d")])
    write_json("recipe_stop_split.json", {"machine": machine(), "split": data.card["stop_split"],
                                          "seconds": round(time.perf_counter() - started, 1), "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
