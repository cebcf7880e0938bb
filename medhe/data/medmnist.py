"""Read MedMNIST-layout .npz files (`<split>_images`, `<split>_labels`)."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from medhe.data.images import rgb_to_gray
from medhe.errors import DataError

PNEUMONIAMNIST_ENV_VAR = "MEDHE_PNEUMONIAMNIST"
PNEUMONIAMNIST_FILE_NAME = "pneumoniamnist.npz"
# Relative to the repository root (the folder holding the `medhe` package).
PNEUMONIAMNIST_SHARED_PATH = Path("..") / "shared" / "data" / "pneumoniamnist" / PNEUMONIAMNIST_FILE_NAME

IMAGES_SUFFIX = "_images"
LABELS_SUFFIX = "_labels"


def _available_splits(keys: list[str]) -> list[str]:
    return sorted(
        key[: -len(IMAGES_SUFFIX)]
        for key in keys
        if key.endswith(IMAGES_SUFFIX) and key[: -len(IMAGES_SUFFIX)] + LABELS_SUFFIX in keys
    )


def _to_gray_uint8(images: np.ndarray, path: Path, key: str) -> np.ndarray:
    if images.dtype != np.uint8:
        raise DataError(
            f"{path}: '{key}' has dtype {images.dtype}, expected uint8 (MedMNIST stores 0-255 "
            "pixels). Convert with np.clip(x, 0, 255).astype(np.uint8) when writing the file."
        )
    if images.ndim == 3:
        return images
    if images.ndim == 4 and images.shape[-1] == 1:
        return images[..., 0]
    if images.ndim == 4 and images.shape[-1] == 3:
        # Colour MedMNIST sets: same BT.601 luminance as load_image, rounded back to 8 bits.
        return np.clip(np.rint(rgb_to_gray(images)), 0, 255).astype(np.uint8)
    raise DataError(
        f"{path}: '{key}' has shape {images.shape}; expected (n, h, w), (n, h, w, 1) or "
        "(n, h, w, 3)."
    )


def load_medmnist_npz(path: str | os.PathLike[str], split: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 (n, h, w), labels int64 (n,)) of one split of a MedMNIST npz.

    Colour (n, h, w, 3) images are converted to grayscale; labels may be (n, 1) or (n,).
    Raises DataError for a missing file, a missing split (listing the splits present),
    wrong dtypes/shapes, or differing image and label counts.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"{path}: MedMNIST file not found. Pass the path of an .npz with "
            f"'<split>{IMAGES_SUFFIX}' and '<split>{LABELS_SUFFIX}' arrays"
            f" (or set {PNEUMONIAMNIST_ENV_VAR} for PneumoniaMNIST)."
        )
    images_key = f"{split}{IMAGES_SUFFIX}"
    labels_key = f"{split}{LABELS_SUFFIX}"
    if not zipfile.is_zipfile(path):  # else numpy reads it as a pickle and says so
        raise DataError(f"{path}: not an .npz file (a zip archive of arrays, as MedMNIST ships); expected "
                        f"'{images_key}' and '{labels_key}' arrays")
    try:
        # allow_pickle=False: an .npz from elsewhere must not be able to run code on load.
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.files)
            if images_key not in keys or labels_key not in keys:
                raise DataError(
                    f"{path}: split '{split}' not found (need arrays '{images_key}' and "
                    f"'{labels_key}'); the file has splits {_available_splits(keys)} "
                    f"(arrays: {sorted(keys)})."
                )
            images = archive[images_key]
            labels = archive[labels_key]
    except DataError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise DataError(
            f"{path}: not a readable .npz of plain numeric arrays ({exc}). Expected the "
            "MedMNIST layout saved with np.savez, without Python objects."
        ) from exc

    images = _to_gray_uint8(images, path, images_key)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise DataError(
            f"{path}: '{labels_key}' has shape {labels.shape}; expected (n,) or (n, 1) "
            "(one class index per image; multi-label sets are not supported)."
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{path}: '{labels_key}' has dtype {labels.dtype}; expected integer class indices."
        )
    if labels.shape[0] != images.shape[0]:
        raise DataError(
            f"{path}: split '{split}' has {images.shape[0]} images but {labels.shape[0]} "
            "labels; expected one label per image."
        )
    if images.shape[0] == 0 or images.shape[1] == 0 or images.shape[2] == 0:
        raise DataError(f"{path}: split '{split}' images have shape {images.shape}; expected non-empty.")
    if labels.size and labels.min() < 0:
        raise DataError(
            f"{path}: '{labels_key}' contains negative class index {labels.min()}; expected >= 0."
        )
    return np.ascontiguousarray(images), labels.astype(np.int64)


def _repo_root() -> Path:
    # medhe/data/medmnist.py -> parents[2] is the folder holding the `medhe` package.
    return Path(__file__).resolve().parents[2]


def default_pneumoniamnist_path() -> Path | None:
    """Our shared PneumoniaMNIST copy if present, else None (the product never needs it).

    Looks at $MEDHE_PNEUMONIAMNIST (a file, or a folder holding pneumoniamnist.npz)
    first, then `<repo root>/../shared/data/pneumoniamnist/pneumoniamnist.npz`.
    """
    candidates: list[Path] = []
    from_env = os.environ.get(PNEUMONIAMNIST_ENV_VAR, "").strip()
    if from_env:
        env_path = Path(from_env).expanduser()
        candidates.append(env_path / PNEUMONIAMNIST_FILE_NAME if env_path.is_dir() else env_path)
    candidates.append(_repo_root() / PNEUMONIAMNIST_SHARED_PATH)
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    return None
