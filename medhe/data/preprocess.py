"""Resize and normalise grayscale images: the one code path used by training AND the client.

If the two sides disagreed (another resize filter, other mean/std), the encrypted
model would see inputs unlike its training data and misdiagnose silently.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from medhe.data.images import image_to_gray01
from medhe.errors import DataError

MAX_IMAGE_SIZE_PX = 4096


def resize_gray01(gray01: np.ndarray, image_size_px: int) -> np.ndarray:
    """Resize a 2-D [0, 1] image to (image_size_px, image_size_px) float32, bilinear.

    Uses Pillow mode 'F' (32-bit float) so no 8-bit rounding happens; non-square
    images are stretched, not cropped. Already the right size -> returned unchanged.
    """
    gray01 = image_to_gray01(gray01)
    if gray01.shape == (image_size_px, image_size_px):
        return np.ascontiguousarray(gray01, dtype=np.float32)
    image = Image.fromarray(np.ascontiguousarray(gray01, dtype=np.float32))
    resized = image.resize((image_size_px, image_size_px), Image.Resampling.BILINEAR)
    # Bilinear filtering cannot leave [0, 1] in exact arithmetic; clip float round-off.
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def _as_image_list(images: np.ndarray | Sequence[np.ndarray], what: str) -> list[np.ndarray]:
    if isinstance(images, np.ndarray):
        if images.ndim != 3:
            raise DataError(
                f"{what}: expected a batch shaped (n, height, width), got shape {images.shape}. "
                "Stack 2-D grayscale images along a new first axis."
            )
        return [images[i] for i in range(images.shape[0])]
    return [np.asarray(image) for image in images]


@dataclass(frozen=True)
class Preprocessing:
    """Resize to image_size x image_size, then (pixel - mean) / std.

    mean and std are of resized training pixels in [0, 1] (see fit_preprocessing).
    """

    image_size: int
    mean: float
    std: float

    def __post_init__(self) -> None:
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int):
            raise DataError(
                f"Preprocessing.image_size must be an int, got {type(self.image_size).__name__}."
            )
        if not 1 <= self.image_size <= MAX_IMAGE_SIZE_PX:
            raise DataError(
                f"Preprocessing.image_size must be in [1, {MAX_IMAGE_SIZE_PX}] pixels, "
                f"got {self.image_size}."
            )
        for name in ("mean", "std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise DataError(
                    f"Preprocessing.{name} must be a number, got {type(value).__name__}."
                )
            if not math.isfinite(value):
                raise DataError(f"Preprocessing.{name} must be finite, got {value}.")
            # Store plain floats so to_dict() is JSON-safe even if numpy scalars came in.
            object.__setattr__(self, name, float(value))
        if not 0.0 <= self.mean <= 1.0:
            raise DataError(
                f"Preprocessing.mean is of [0, 1] pixels and must lie in [0, 1], got {self.mean}."
            )
        if not self.std > 0.0:
            raise DataError(
                f"Preprocessing.std must be > 0 (it divides the pixels), got {self.std}. "
                "Fit it on training images that are not all constant."
            )

    def to_dict(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "mean": self.mean, "std": self.std}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Preprocessing:
        if not isinstance(d, Mapping):
            raise DataError(
                f"Preprocessing.from_dict expects a mapping with keys image_size, mean, std; "
                f"got {type(d).__name__}."
            )
        expected = {"image_size", "mean", "std"}
        missing = sorted(expected - set(d))
        extra = sorted(set(d) - expected)
        if missing or extra:
            raise DataError(
                f"Preprocessing.from_dict: expected exactly keys {sorted(expected)}; "
                f"missing {missing}, unexpected {extra}."
            )
        return cls(image_size=d["image_size"], mean=d["mean"], std=d["std"])

    def resize(self, gray01: np.ndarray) -> np.ndarray:
        """2-D [0, 1] image -> float32 (image_size, image_size), Pillow bilinear."""
        return resize_gray01(gray01, self.image_size)

    def apply(self, gray01: np.ndarray) -> np.ndarray:
        """2-D [0, 1] image -> float32 (1, S, S) normalised model input."""
        resized = self.resize(gray01)
        normalised = (resized - np.float32(self.mean)) / np.float32(self.std)
        return normalised.astype(np.float32)[np.newaxis, :, :]

    def apply_batch(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """(n, h, w) uint8 or float [0, 1] (or a list of 2-D images) -> float32 (n, 1, S, S)."""
        image_list = _as_image_list(images, "Preprocessing.apply_batch")
        size = self.image_size
        batch = np.empty((len(image_list), 1, size, size), dtype=np.float32)
        for i, image in enumerate(image_list):
            batch[i] = self.apply(image_to_gray01(image, source=f"batch image {i}"))
        return batch


def fit_preprocessing(
    train_images_gray01: np.ndarray | Sequence[np.ndarray], image_size: int
) -> Preprocessing:
    """Mean and std of the resized TRAINING pixels (never val/test, which would leak)."""
    image_list = _as_image_list(train_images_gray01, "fit_preprocessing")
    if not image_list:
        raise DataError("fit_preprocessing: got no training images; expected at least one.")
    # Validate image_size before resizing thousands of images with it.
    Preprocessing(image_size=image_size, mean=0.0, std=1.0)
    total = 0.0
    total_sq = 0.0
    n_pixels = 0
    for i, image in enumerate(image_list):
        resized = resize_gray01(image_to_gray01(image, source=f"training image {i}"), image_size)
        values = resized.astype(np.float64)
        total += float(values.sum())
        total_sq += float(np.square(values).sum())
        n_pixels += values.size
    mean = total / n_pixels
    variance = max(total_sq / n_pixels - mean * mean, 0.0)
    std = math.sqrt(variance)
    if std <= 0.0:
        raise DataError(
            "fit_preprocessing: all training pixels are equal (std 0); expected varied "
            "images. Check that the images loaded correctly."
        )
    return Preprocessing(image_size=image_size, mean=mean, std=std)
