"""Input check: which held-out images does the clinic's client flag as unlike the training images?

For each shipped model, its held-out images (Br35H grouped test split at full resolution,
PneumoniaMNIST val) as stored, then the mistakes a clinic can make or meet: the other data set's
images (the wrong modality for this model), uniform noise, inverted intensities (a MONOCHROME1 film read as
MONOCHROME2), the image turned 90 degrees or upside down, and the 13 MedMNIST-C chest X-ray
corruptions pooled by severity (as `medhe evaluate --corruptions` makes them, at 224 px). Per set:
the fraction the input check flags, and the model's plaintext accuracy on all, on the typical and on
the flagged images (n/a for the other modality: its labels are not this model's classes).

The profile and its threshold were fitted on the training and early-stopping images only
(`medhe fit-input-profile`); nothing here tunes them.

    python benchmarks/input_check.py [--data-file PATH.npz]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, print_table, write_json  # noqa: E402


NOISE_IMAGES = 50


def held_out_raw(dataset: str, data_file: str | None) -> tuple[list[np.ndarray], np.ndarray]:
    """Raw [0, 1] images (full resolution for Br35H) and labels of a data set's report split."""
    if dataset == "br35h":
        from medhe.data.br35h import br35h_split_files
        from medhe.data.images import load_image

        files = br35h_split_files("test")
        return [load_image(path) for path, _ in files], np.array([label for _, label in files])
    from medhe.data.medmnist import default_pneumoniamnist_path, load_medmnist_npz

    path = data_file or default_pneumoniamnist_path()
    if path is None:
        raise SystemExit("PneumoniaMNIST npz not found: pass --data-file PATH.npz")
    images, labels = load_medmnist_npz(path, "val")
    return [image.astype(np.float32) / np.float32(255.0) for image in images], labels


def row(model_name: str, name: str, model, card, images, labels) -> dict:
    from medhe.train.loop import predict_logits, softmax_positive

    inputs = card.preprocessing.apply_batch(images)
    typical = card.preprocessing.input_profile.typical(inputs)
    out = {"model": model_name, "set": name, "n": len(images), "flagged_fraction": float((~typical).mean()),
           "accuracy": None, "accuracy_typical": None, "accuracy_flagged": None}
    if labels is not None:
        correct = (softmax_positive(predict_logits(model, inputs)) >= 0.5).astype(int) == labels
        out["accuracy"] = float(correct.mean())
        out["accuracy_typical"] = float(correct[typical].mean()) if typical.any() else None
        out["accuracy_flagged"] = float(correct[~typical].mean()) if (~typical).any() else None
    return out


def model_rows(model_name: str, other: str, data_file: str | None) -> list[dict]:
    from medhe.data.corruptions import SEVERITIES, corrupted_sets
    from medhe.nn.io import load_model, resolve_model_dir

    model, card = load_model(resolve_model_dir(model_name))
    rng = np.random.default_rng(0)
    if card.preprocessing.input_profile is None:
        raise SystemExit(f"{model_name} has no input profile: run `medhe fit-input-profile --model {model_name}`")
    images, labels = held_out_raw(model_name, data_file)
    other_images, _ = held_out_raw(other, data_file)
    rows = [row(model_name, name, model, card, group, group_labels) for name, group, group_labels in (
        ("as stored", images, labels),
        (f"other modality ({other})", other_images, None),
        ("inverted", [1.0 - image for image in images], labels),
        ("rotated 90 degrees", [np.rot90(image).copy() for image in images], labels),
        ("upside down", [image[::-1].copy() for image in images], labels),
        # Not a scan at all: the check is known to pass this for PneumoniaMNIST (README "Input check").
        (f"uniform noise ({NOISE_IMAGES}, 200x160)", [rng.random((200, 160)) for _ in range(NOISE_IMAGES)], None),
    )]
    # MedMNIST-C corruptions at 224 px, pooled over the 13 per severity.
    pooled: dict[int, list[np.ndarray]] = {severity: [] for severity in range(1, SEVERITIES + 1)}
    small = [card.preprocessing.resize(image) for image in images]  # as evaluate --corruptions starts
    for _, severity, corrupted in corrupted_sets(small):
        pooled[severity].extend(corrupted)
    for severity, group in pooled.items():
        group_labels = np.tile(labels, len(group) // len(labels))
        rows.append(row(model_name, f"MedMNIST-C severity {severity} (13 pooled)", model, card, group, group_labels))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-file", default=None, help="PneumoniaMNIST npz (default: ../shared copy)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = model_rows("pneumoniamnist", "br35h", args.data_file) + model_rows("br35h", "pneumoniamnist", args.data_file)
    print_table(rows, [("model", "model", ""), ("set", "images", ""), ("n", "n", "d"),
                       ("flagged_fraction", "flagged", ".3f"), ("accuracy", "ACC", ".4f"),
                       ("accuracy_typical", "ACC typical", ".4f"), ("accuracy_flagged", "ACC flagged", ".4f")])
    write_json("input_check.json", {"machine": machine(), "rows": rows,
                                    "seconds": round(time.perf_counter() - start, 1)}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
