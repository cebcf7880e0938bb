"""Model directories without torch: find a model (a path or a shipped name) and read its
validated model.json. The compiler and the CLI's server and clinic commands use only this."""

from __future__ import annotations

import json
from pathlib import Path

from medhe.errors import ModelFormatError

MODEL_FORMAT = "medhe-model"
MODEL_FORMAT_VERSION = 1
MODEL_JSON = "model.json"
WEIGHTS_FILE = "weights.safetensors"


def read_model_json(directory: str | Path) -> dict:
    """The validated model.json of a model directory (no torch needed)."""
    directory = Path(directory)
    path = directory / MODEL_JSON
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


SHIPPED_MODELS = ("br35h", "pneumoniamnist")


def shipped_models_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "models"


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """A model directory from a path or the name of a model shipped in the package."""
    path = Path(name_or_path)
    if (path / MODEL_JSON).is_file():
        return path
    if str(name_or_path) in SHIPPED_MODELS:
        shipped = shipped_models_dir() / str(name_or_path)
        if (shipped / MODEL_JSON).is_file():
            return shipped
        raise ModelFormatError(f"the shipped model {name_or_path!r} is missing from {shipped}; reinstall medhe")
    raise ModelFormatError(
        f"{name_or_path!r} is neither a model directory (with {MODEL_JSON}) nor a shipped model "
        f"({', '.join(SHIPPED_MODELS)})"
    )
