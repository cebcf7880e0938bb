"""Preprocessing parity: do scans framed unlike the training images still reach the model alike?

Br35H: the grouped (leakage-free) test split, each raw image also re-framed the ways other
scanners and exports frame a head slice (dark margins, 4:3 or 3:4 canvases, an off-centre head,
a tight crop), scored by the shipped model (its stored crop: foreground_square) and by the same
architecture trained with the old crop (stretch the whole image; everything else the shipped
defaults). The old-crop model is trained here with `medhe train --crop stretch --resize-filter
bilinear` (about 8 minutes), or given with --stretch-model DIR.

PneumoniaMNIST: MedMNIST made each 28x28 image by center-cropping a wider X-ray to its short edge.
The val images are upsampled to 224 and widened to 224x300 with mirrored borders (a stand-in for
the wider source we do not have); the shipped recipe (center_square) recovers the model's input,
stretching the whole canvas does not.

    python benchmarks/preprocessing_parity.py [--stretch-model DIR] [--data-file PATH.npz]
                                              [--extra-models NAME ...] [--no-stretch] [--out PATH.json]

`--extra-models` scores more Br35H models on the same framings (e.g. br35h-64, the 64x64
model); `--no-stretch` leaves out the old-recipe model (nothing is trained).
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, print_table, write_json  # noqa: E402


def _pad(gray: np.ndarray, top: int, bottom: int, left: int, right: int) -> np.ndarray:
    return np.pad(gray, ((top, bottom), (left, right)))


def br35h_framings(gray: np.ndarray):
    """(name, image) pairs: the raw scan and re-framed copies of it."""
    height, width = gray.shape
    yield "as stored", gray
    yield "dark margin 25%", _pad(gray, height // 4, height // 4, width // 4, width // 4)
    side = max(0, 4 * height // 3 - width) // 2 + height // 6
    yield "4:3 canvas", _pad(gray, 0, 0, side, side)
    yield "3:4 canvas", _pad(gray, width // 6, width // 6, 0, 0)
    yield "off-centre head", _pad(gray, 0, height // 3, 0, width // 3)
    yield "tight crop 10%", gray[height // 10: height - height // 10, width // 10: width - width // 10]


def _recipe_label(pre) -> str:
    """crop/filter/normalisation, e.g. head_bbox/area/per_image."""
    return f"{pre.crop}/{pre.resize_filter}/{pre.normalization}"


def _score(model, card, images, labels) -> dict:
    from medhe.train.loop import predict_logits, softmax_positive
    from medhe.train.metrics import binary_report

    prob = softmax_positive(predict_logits(model, np.stack([card.preprocessing.apply(g) for g in images])))
    report = binary_report(labels, prob)
    return {"accuracy": report["accuracy"], "auc": report["auc"]}


def train_stretch_model(out: Path) -> Path:
    command = [sys.executable, "-m", "medhe.cli.main", "train", "--dataset", "br35h", "--out", str(out),
               "--crop", "stretch", "--resize-filter", "bilinear", "--no-progress"]
    print("training the old-recipe model:", " ".join(command[2:]), flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return out


def br35h_rows(stretch_model: Path | None, extra_models: tuple[str, ...] = ()) -> list[dict]:
    from medhe.data.br35h import br35h_split_files
    from medhe.data.images import load_image
    from medhe.nn.io import load_model, resolve_model_dir

    files = br35h_split_files("test")
    labels = np.array([label for _, label in files])
    framed: dict[str, list[np.ndarray]] = {}
    for path, _ in files:
        for name, image in br35h_framings(load_image(path)):
            framed.setdefault(name, []).append(image)
    models = {"shipped": load_model(resolve_model_dir("br35h"))}
    if stretch_model is not None:
        models["stretch"] = load_model(stretch_model)
    for name in extra_models:
        models[name] = load_model(resolve_model_dir(name))
        if models[name][1].dataset.get("name") != "br35h":
            raise SystemExit(f"--extra-models {name}: not a Br35H model")
    rows = []
    for framing, images in framed.items():
        row = {"dataset": "br35h test", "framing": framing, "n": len(images)}
        for key, (model, card) in models.items():
            scores = _score(model, card, images, labels)
            row[f"{key}_accuracy"], row[f"{key}_auc"] = scores["accuracy"], scores["auc"]
            row[f"{key}_recipe"] = _recipe_label(card.preprocessing)
        rows.append(row)
    return rows


def pneumonia_rows(data_file: str | None) -> list[dict]:
    from PIL import Image

    from medhe.data.medmnist import default_pneumoniamnist_path, load_medmnist_npz
    from medhe.data.preprocess import Preprocessing
    from medhe.nn.io import load_model, resolve_model_dir

    path = data_file or default_pneumoniamnist_path()
    if path is None:
        print("PneumoniaMNIST npz not found: its rows are skipped (pass --data-file)")
        return []
    images, labels = load_medmnist_npz(path, "val")
    model, card = load_model(resolve_model_dir("pneumoniamnist"))
    stretch_card = dataclasses.replace(card, preprocessing=Preprocessing.from_dict(
        {**card.preprocessing.to_dict(), "crop": "stretch"}))
    upsampled = [np.asarray(Image.fromarray(image.astype(np.float32) / 255).resize(
        (224, 224), Image.Resampling.BICUBIC)).clip(0, 1) for image in images]
    widened = [np.pad(image, ((0, 0), (38, 38)), mode="reflect") for image in upsampled]
    rows = []
    for framing, group in (("28x28 as stored", [image.astype(np.float32) / 255 for image in images]),
                           ("224x224 upsampled", upsampled), ("224x300 wider source", widened)):
        row = {"dataset": "pneumoniamnist val", "framing": framing, "n": len(group)}
        for key, chosen in (("shipped", card), ("stretch", stretch_card)):
            scores = _score(model, chosen, group, labels)
            row[f"{key}_accuracy"], row[f"{key}_auc"] = scores["accuracy"], scores["auc"]
            row[f"{key}_recipe"] = _recipe_label(chosen.preprocessing)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stretch-model", type=Path, default=None,
                        help="a Br35H model trained with --crop stretch (default: train one now)")
    parser.add_argument("--data-file", default=None, help="PneumoniaMNIST npz (default: ../shared copy)")
    parser.add_argument("--extra-models", nargs="+", default=[], metavar="NAME",
                        help="more Br35H models (directories or shipped names) scored on the same framings")
    parser.add_argument("--no-stretch", action="store_true",
                        help="leave out the old-recipe (stretch) model: nothing is trained")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.no_stretch and args.stretch_model is not None:
        parser.error("--no-stretch and --stretch-model exclude each other")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        stretch_model = None if args.no_stretch else (
            args.stretch_model or train_stretch_model(Path(scratch) / "br35h-stretch"))
        rows = br35h_rows(stretch_model, tuple(args.extra_models)) + pneumonia_rows(args.data_file)
    keys = ["shipped"] + ([] if args.no_stretch else ["stretch"]) + list(args.extra_models)
    print_table(rows, [("dataset", "dataset", ""), ("framing", "framing", ""), ("n", "n", "d")]
                + [(f"{key}_{metric}", f"{key} {metric.replace('accuracy', 'ACC').replace('auc', 'AUC')}", ".4f")
                   for key in keys for metric in ("accuracy", "auc")])
    write_json("preprocessing_parity.json", {"machine": machine(), "rows": rows,
                                             "seconds": round(time.perf_counter() - start, 1)}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
