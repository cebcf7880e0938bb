"""Is this input like the images the model was trained on? A check the clinic runs before encrypting.

A model answers every input, an abdominal CT or a photograph as readily as a chest X-ray, and
the encrypted answer looks as confident either way. The clinic's client holds the plaintext
image, so it can check it before encrypting and warn when the input lies outside what the
model learnt from.

The check compares a few statistics of the MODEL INPUT (after the model's own crop, resize and
normalisation, so an intensity change that normalisation removes is not flagged) with the same
statistics of the training images under the training augmentations (so a brightness or
contrast change the model was trained to absorb is not flagged either): squared Mahalanobis
distance over the mean and std, intensity quantiles, a 4x4 grid of region means, edge strength,
left-right symmetry and the bright mass's spread along rows and columns (27 numbers). The flag
threshold is the FLAG_QUANTILE of the distances of the held-out early-stopping images, so about 1 in 100 images
like the held-out ones is flagged (never chosen on the report split). The profile holds
aggregate statistics of training images (means, scales and the inverse correlation of the 27),
never a model weight or an image; it travels in the public client spec.

A flag is a warning, not a diagnosis: an image can be typical by these statistics and still be
unlike the training data in ways they do not capture.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from medhe.errors import DataError

PROFILE_FORMAT = "medhe-input-profile"
PROFILE_FORMAT_VERSION = 1
FLAG_QUANTILE = 0.99
FEATURE_PERCENTILES = (1, 10, 50, 90, 99)
GRID_CELLS = 4
FEATURE_NAMES = (
    ("mean", "std") + tuple(f"p{p:02d}" for p in FEATURE_PERCENTILES)
    + tuple(f"region_{row}_{col}" for row in range(GRID_CELLS) for col in range(GRID_CELLS))
    + ("edge_strength", "mirror_correlation", "spread_rows", "spread_cols")
)
# Features that barely vary in training (std and mean are constant under per-image normalisation)
# are scaled by at least this, and the correlation matrix gets this ridge, so the inverse exists.
FEATURE_STD_FLOOR = 1e-3
COVARIANCE_RIDGE = 1e-3
MAX_FEATURES = 256


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def flagged_fraction(profile: InputProfile, model_inputs: np.ndarray) -> float:
    """The fraction of the inputs the profile flags as unlike the training images."""
    return float(np.mean(~profile.typical(model_inputs)))


def typical_cell(typical: bool | None) -> str:
    """An input_typical CSV cell: yes / no, empty where no check was made (no profile)."""
    return "" if typical is None else ("yes" if typical else "no")


def input_features(model_inputs: np.ndarray) -> np.ndarray:
    """(n, len(FEATURE_NAMES)) float64 statistics of (n, 1, S, S) or (n, S, S) model inputs."""
    values = np.asarray(model_inputs, dtype=np.float64)
    if values.ndim == 4 and values.shape[1] == 1:
        values = values[:, 0]
    if values.ndim != 3 or values.shape[1] != values.shape[2] or values.shape[1] < GRID_CELLS:
        raise DataError(f"input_features expects model inputs shaped (n, 1, S, S) with S >= {GRID_CELLS}, "
                        f"got {np.shape(model_inputs)}")
    if not np.isfinite(values).all():
        raise DataError("input_features: the model inputs contain NaN or infinity")
    n, size, _ = values.shape
    flat = values.reshape(n, -1)
    mean = flat.mean(axis=1)
    std = flat.std(axis=1)
    percentiles = np.percentile(flat, FEATURE_PERCENTILES, axis=1).T
    # Region means over a GRID_CELLS x GRID_CELLS grid (cells differ by a pixel when S is not a multiple).
    edges = np.linspace(0, size, GRID_CELLS + 1).round().astype(int)
    regions = np.stack([values[:, edges[r]:edges[r + 1], edges[c]:edges[c + 1]].mean(axis=(1, 2))
                        for r in range(GRID_CELLS) for c in range(GRID_CELLS)], axis=1)
    # Edge strength relative to contrast: blur lowers it, noise raises it, whatever the intensity scale.
    gradient = (np.abs(np.diff(values, axis=1)).mean(axis=(1, 2)) + np.abs(np.diff(values, axis=2)).mean(axis=(1, 2)))
    edge_strength = gradient / np.maximum(std, FEATURE_STD_FLOOR)
    centred = flat - mean[:, None]
    mirrored = (values[:, :, ::-1].reshape(n, -1) - mean[:, None])
    mirror = (centred * mirrored).mean(axis=1) / np.maximum(std * std, FEATURE_STD_FLOOR ** 2)
    # Spatial spread of the bright mass along rows and along columns (the object's extent and
    # orientation: a head slice is taller than wide, a radiograph turned by 90 degrees swaps them).
    mass = values - values.min(axis=(1, 2), keepdims=True)
    mass = mass / np.maximum(mass.sum(axis=(1, 2), keepdims=True), FEATURE_STD_FLOOR)
    position = (np.arange(size) - (size - 1) / 2.0) / size
    spread_rows = np.sqrt((mass.sum(axis=2) * position ** 2).sum(axis=1))
    spread_cols = np.sqrt((mass.sum(axis=1) * position ** 2).sum(axis=1))
    return np.column_stack([mean, std, percentiles, regions, edge_strength, mirror, spread_rows, spread_cols])


@dataclass(frozen=True, eq=False)  # numpy fields: compared through to_dict(), see __eq__
class InputProfile:
    """Where training inputs lie in feature space: feature means and scales, the inverse of their
    ridge-regularised correlation matrix, and the distance above which an input is flagged."""

    feature_names: tuple[str, ...]
    mean: np.ndarray
    scale: np.ndarray
    precision: np.ndarray
    threshold: float
    quantile: float
    n_fit: int
    n_threshold: int

    def __post_init__(self) -> None:
        count = len(self.feature_names)
        if not 1 <= count <= MAX_FEATURES:
            raise DataError(f"an input profile needs 1 to {MAX_FEATURES} features, got {count}")
        for name, shape in (("mean", (count,)), ("scale", (count,)), ("precision", (count, count))):
            array = np.asarray(getattr(self, name), dtype=np.float64)
            if array.shape != shape or not np.isfinite(array).all():
                raise DataError(f"input profile {name}: expected finite numbers shaped {shape}, got {array.shape}")
            object.__setattr__(self, name, array)
        if not (self.scale > 0).all():
            raise DataError("input profile scale: every feature scale must be > 0")
        # Positive definite: otherwise distances could be 0 or negative and every input would pass.
        if not np.allclose(self.precision, self.precision.T) or np.linalg.eigvalsh(self.precision).min() <= 0:
            raise DataError("input profile precision must be a symmetric positive definite matrix")
        if not (_is_number(self.threshold) and math.isfinite(self.threshold) and self.threshold > 0):
            raise DataError(f"input profile threshold must be a finite number > 0, got {self.threshold!r}")
        if not (_is_number(self.quantile) and 0.5 <= self.quantile < 1.0):
            raise DataError(f"input profile quantile must lie in [0.5, 1), got {self.quantile!r}")
        for name in ("n_fit", "n_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise DataError(f"input profile {name} must be a count (an int >= 0), got {value!r}")
        object.__setattr__(self, "threshold", float(self.threshold))
        object.__setattr__(self, "quantile", float(self.quantile))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, InputProfile) and self.to_dict() == other.to_dict()

    __hash__ = None  # mutable-looking numpy fields: not hashable

    def distances(self, model_inputs: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance of each input from the training inputs (feature space)."""
        features = input_features(model_inputs)
        if features.shape[1] != len(self.feature_names):
            raise DataError(f"input profile has {len(self.feature_names)} features, the inputs give "
                            f"{features.shape[1]}")
        z = (features - self.mean) / self.scale
        return np.einsum("ni,ij,nj->n", z, self.precision, z)

    def typical(self, model_inputs: np.ndarray) -> np.ndarray:
        """Per input, True when it is within the threshold (like the training images)."""
        return self.distances(model_inputs) <= self.threshold

    def check(self, model_inputs: np.ndarray) -> list[dict]:
        """One {"distance", "threshold", "typical", "uniform"} per input; uniform: every value the
        same (a blank image, or a failed export), which warnings name as such rather than by a
        distance of 1e9."""
        inputs = np.asarray(model_inputs)
        uniform = np.ptp(inputs.reshape(len(inputs), -1), axis=1) == 0
        return [{"distance": round(float(d), 3), "threshold": round(self.threshold, 3),
                 "typical": bool(d <= self.threshold), "uniform": bool(flat)}
                for d, flat in zip(self.distances(inputs), uniform)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PROFILE_FORMAT, "format_version": PROFILE_FORMAT_VERSION,
            "feature_names": list(self.feature_names), "mean": self.mean.tolist(), "scale": self.scale.tolist(),
            "precision": self.precision.tolist(), "threshold": self.threshold, "quantile": self.quantile,
            "n_fit": self.n_fit, "n_threshold": self.n_threshold,
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> InputProfile:
        if not isinstance(doc, Mapping):
            raise DataError(f"an input profile must be a JSON object, got {type(doc).__name__}")
        if doc.get("format") != PROFILE_FORMAT or doc.get("format_version") != PROFILE_FORMAT_VERSION:
            raise DataError(f"expected {PROFILE_FORMAT} version {PROFILE_FORMAT_VERSION}, got "
                            f"{doc.get('format')!r} version {doc.get('format_version')!r}")
        try:
            names = tuple(str(name) for name in doc["feature_names"])
            if names != FEATURE_NAMES:
                raise DataError(f"the input profile's features {list(names)} are not this medhe's "
                                f"{list(FEATURE_NAMES)}: refit it with `medhe fit-input-profile`")
            return cls(feature_names=names, mean=np.asarray(doc["mean"], dtype=np.float64),
                       scale=np.asarray(doc["scale"], dtype=np.float64),
                       precision=np.asarray(doc["precision"], dtype=np.float64),
                       threshold=doc["threshold"], quantile=doc["quantile"],
                       n_fit=doc["n_fit"], n_threshold=doc["n_threshold"])
        except (KeyError, TypeError, ValueError, OverflowError, np.linalg.LinAlgError) as exc:
            raise DataError(f"malformed input profile: {exc!r}") from exc


def fit_input_profile(fit_inputs: np.ndarray, threshold_inputs: np.ndarray,
                      quantile: float = FLAG_QUANTILE) -> InputProfile:
    """Feature statistics of `fit_inputs` (training images), threshold at `quantile` of the distances
    of `threshold_inputs` (held-out images the model should handle, never the report split)."""
    features = input_features(fit_inputs)
    if features.shape[0] <= features.shape[1]:
        raise DataError(f"fit_input_profile needs more than {features.shape[1]} training inputs, "
                        f"got {features.shape[0]}")
    mean = features.mean(axis=0)
    scale = np.maximum(features.std(axis=0), FEATURE_STD_FLOOR)
    z = (features - mean) / scale
    correlation = (z.T @ z) / z.shape[0] + COVARIANCE_RIDGE * np.eye(z.shape[1])
    precision = np.linalg.inv(correlation)
    precision = (precision + precision.T) / 2.0
    partial = InputProfile(FEATURE_NAMES, mean, scale, precision, threshold=1.0, quantile=quantile,
                           n_fit=int(features.shape[0]), n_threshold=0)
    held_out = partial.distances(threshold_inputs)
    if held_out.size == 0:
        raise DataError("fit_input_profile needs held-out inputs to set the threshold")
    return InputProfile(FEATURE_NAMES, mean, scale, precision, threshold=float(np.quantile(held_out, quantile)),
                        quantile=quantile, n_fit=int(features.shape[0]), n_threshold=int(held_out.size))
