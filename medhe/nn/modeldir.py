"""Model directories without torch: find a model (a path or a shipped name) and read its
validated model.json (for an ensemble directory, its members'). The compiler and the CLI's server
and clinic commands use only this."""

from __future__ import annotations

import json
import math
from pathlib import Path

from medhe.errors import ModelFormatError

MODEL_FORMAT = "medhe-model"
MODEL_FORMAT_VERSION = 1
MODEL_JSON = "model.json"
WEIGHTS_FILE = "weights.safetensors"


ENSEMBLE_FORMAT = "medhe-ensemble"
ENSEMBLE_FORMAT_VERSION = 1
ENSEMBLE_JSON = "ensemble.json"


def ensemble_members(directory: str | Path) -> list[Path] | None:
    """The member model directories of an ensemble directory (`medhe ensemble` writes it: an
    ensemble.json naming subdirectories, each a model directory); None for anything else."""
    directory = Path(directory)
    path = directory / ENSEMBLE_JSON
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelFormatError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != ENSEMBLE_FORMAT \
            or doc.get("format_version") != ENSEMBLE_FORMAT_VERSION:
        raise ModelFormatError(f"{path}: expected format {ENSEMBLE_FORMAT!r} version {ENSEMBLE_FORMAT_VERSION}")
    names = doc.get("members")
    if not isinstance(names, list) or len(names) < 2 or len(set(names)) != len(names) \
            or not all(isinstance(n, str) and n and Path(n).name == n and n not in (".", "..") for n in names):
        raise ModelFormatError(f"{path}: 'members' must list at least two distinct subdirectory names")
    members = [directory / name for name in names]
    if any(member.is_symlink() for member in members):
        raise ModelFormatError(f"{path}: a member directory is a symbolic link; members live inside the ensemble")
    docs = [read_model_json(member) for member in members]
    check_ensemble_agreement(members, docs)
    return members


# What the members of an ensemble must share: what the clinic applies to an image, what the
# logits mean, and the data (so every member's held-out splits are the same images).
ENSEMBLE_AGREEMENT = ("input_shape", "preprocessing", "class_names", "dataset")
# Fitted numbers (the training set's mean and std, the input check's profile) are sums over the same
# images: on another CPU their last bits differ (measured: 1e-10 in a profile), which is no difference.
FITTED_NUMBER_REL_TOL = 1e-6
# ... and a number that is zero but for round-off (the mean of standardised pixels: -1.2e-9) may
# come out as another round-off; no fitted number that means something is this small.
FITTED_NUMBER_ABS_TOL = 1e-8


def first_difference(first, other, where: str) -> str | None:
    """The path of the first field where two model.json values differ (floats within
    FITTED_NUMBER_REL_TOL or FITTED_NUMBER_ABS_TOL count as equal), or None."""
    if isinstance(first, dict) and isinstance(other, dict):
        if first.keys() != other.keys():
            return f"{where} (fields {sorted(set(first) ^ set(other))})"
        return next((found for key in first if (found := first_difference(first[key], other[key], f"{where}.{key}"))),
                    None)
    if isinstance(first, list) and isinstance(other, list):
        if len(first) != len(other):
            return f"{where} (length {len(first)} vs {len(other)})"
        return next((found for i, (a, b) in enumerate(zip(first, other))
                     if (found := first_difference(a, b, f"{where}[{i}]"))), None)
    if isinstance(first, float) or isinstance(other, float):
        both_numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (first, other))
        if both_numbers and math.isclose(first, other, rel_tol=FITTED_NUMBER_REL_TOL, abs_tol=FITTED_NUMBER_ABS_TOL):
            return None
        return f"{where} ({first!r} vs {other!r})"
    return None if first == other and type(first) is type(other) else f"{where} ({first!r} vs {other!r})"


def check_ensemble_agreement(member_dirs: list[Path], docs: list[dict]) -> None:
    """ModelFormatError naming what differs between the first member's model.json and another's."""
    for member, doc in zip(member_dirs[1:], docs[1:]):
        differing = [found for key in ENSEMBLE_AGREEMENT
                     if (found := first_difference(docs[0].get(key), doc.get(key), key))]
        if differing:
            raise ModelFormatError(f"{member} cannot join an ensemble with {member_dirs[0]}: their "
                                   f"{'; '.join(differing)} differ (members must be trained on the same data "
                                   "with the same preprocessing and classes)")


def read_model_json(directory: str | Path) -> dict:
    """The validated model.json of a model directory (no torch needed)."""
    directory = Path(directory)
    path = directory / MODEL_JSON
    if not path.is_file() and (directory / ENSEMBLE_JSON).is_file():
        raise ModelFormatError(f"{directory} is an ensemble ({ENSEMBLE_JSON}); this takes a single model (to "
                               "change the ensemble, change each member directory in it alike)")
    if not path.is_file():
        raise ModelFormatError(f"{directory} is not a medhe model directory: {MODEL_JSON} is missing")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelFormatError(f"{path} is not valid JSON: {exc}") from exc
    if doc.get("format") != MODEL_FORMAT or doc.get("format_version") != MODEL_FORMAT_VERSION:
        raise ModelFormatError(
            f"{path}: expected format {MODEL_FORMAT!r} version {MODEL_FORMAT_VERSION}, "
            f"got {doc.get('format')!r} version {doc.get('format_version')!r}"
        )
    for key in ("arch", "layers", "preprocessing", "class_names"):
        if key not in doc:
            raise ModelFormatError(f"{path} lacks the field {key!r}")
    if not (directory / WEIGHTS_FILE).is_file():
        raise ModelFormatError(f"{directory} lacks {WEIGHTS_FILE}")
    return doc


# The defaults, their two-seed ensembles (`medhe ensemble`) and Br35H at 64x64 (4,4 channels): the
# latter three about twice the server time.
SHIPPED_MODELS = ("br35h", "pneumoniamnist", "br35h-ensemble", "pneumoniamnist-ensemble", "br35h-64")


def shipped_models_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "models"


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """A model directory from a path or the name of a model shipped in the package."""
    path = Path(name_or_path)
    if (path / MODEL_JSON).is_file() or (path / ENSEMBLE_JSON).is_file():
        return path
    if str(name_or_path) in SHIPPED_MODELS:
        shipped = shipped_models_dir() / str(name_or_path)
        if (shipped / MODEL_JSON).is_file() or (shipped / ENSEMBLE_JSON).is_file():
            return shipped
        raise ModelFormatError(f"the shipped model {name_or_path!r} is missing from {shipped}; reinstall medhe")
    raise ModelFormatError(
        f"{name_or_path!r} is neither a model directory (with {MODEL_JSON} or {ENSEMBLE_JSON}) nor a shipped model "
        f"({', '.join(SHIPPED_MODELS)})"
    )
