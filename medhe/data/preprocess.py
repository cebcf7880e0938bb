"""Crop, resize and normalise grayscale images: the one code path used by training AND the client.

If the two sides disagreed (another crop, resize filter, other mean/std), the encrypted
model would see inputs unlike its training data and misdiagnose silently. The recipe is
stored with the model (model card -> client spec), so a full-resolution scan given to
`medhe diagnose` goes through exactly the steps its training images went through.

Crop rules (applied before resizing to image_size x image_size):
  stretch            no crop: a non-square image is stretched (older models)
  center_square      the centred square whose side is the short edge (MedMNIST's rule:
                     "center-cropped with a window of the short edge, then resized")
  foreground_square  the bounding box of the non-dark pixels (the head in an MRI slice),
                     widened to a square around its centre (black beyond the image), so
                     scans framed with more or less dark background arrive alike
An image that is already image_size x image_size is taken as already cropped and resized
(MedMNIST's npz images are; so are the cached training images).

Normalisations (applied to the resized [0, 1] pixels):
  dataset    (pixel - mean) / std with the training set's pixel mean and std (older models)
  per_image  each image minus its own mean, over its own std: an image whose brightness or
             contrast was scaled linearly arrives unchanged (MRI intensities have no absolute
             scale: scanners and exports differ by such factors)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from PIL import Image

from medhe.data.images import image_to_gray01
from medhe.data.input_check import InputProfile
from medhe.errors import DataError

MAX_IMAGE_SIZE_PX = 4096
CROP_RULES = ("stretch", "center_square", "foreground_square")
RESIZE_FILTERS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}
NORMALIZATIONS = ("dataset", "per_image")
# What models saved before crop rules (and normalisation choices) existed were trained with.
LEGACY_CROP = "stretch"
LEGACY_RESIZE_FILTER = "bilinear"
LEGACY_NORMALIZATION = "dataset"
# per_image: a constant image (std 0, or range 0 in stretch_per_image) maps to a constant instead of
# dividing by zero. In [0, 1] pixel units on the client; the training loop re-standardises inputs
# already of std 1, where only a near-blank image (std < 1e-3 of its pixels) would scale differently.
PER_IMAGE_STD_FLOOR = 1e-3
# foreground_square: a pixel is foreground above this fraction of the image's 99th percentile; the
# box holds every connected foreground region of at least this fraction of the largest one's area
# (so a burnt-in text label or scanner noise does not widen it, while a head in two pieces stays whole).
FOREGROUND_LEVEL = 0.15
FOREGROUND_REGION_FRACTION = 0.10


def check_recipe(crop: Any, resize_filter: Any) -> None:
    """DataError unless crop and resize_filter name a known rule and filter."""
    _check_choice(crop, CROP_RULES, "crop")
    _check_choice(resize_filter, tuple(RESIZE_FILTERS), "resize_filter")


def _check_choice(value: Any, choices, what: str) -> str:
    if not isinstance(value, str) or value not in choices:
        raise DataError(f"{what} must be one of {', '.join(choices)}; got {value!r}.")
    return value


def center_square(gray01: np.ndarray) -> np.ndarray:
    """The centred square of side min(height, width)."""
    height, width = gray01.shape
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return gray01[top: top + side, left: left + side]


def foreground_box(gray01: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right), exclusive ends, of the non-dark object; the whole image if none."""
    from scipy import ndimage

    height, width = gray01.shape
    level = FOREGROUND_LEVEL * float(np.percentile(gray01, 99))
    if level <= 0.0:
        return 0, height, 0, width
    regions, count = ndimage.label(gray01 > level, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return 0, height, 0, width
    areas = np.bincount(regions.ravel())[1:]
    keep = np.flatnonzero(areas >= FOREGROUND_REGION_FRACTION * areas.max()) + 1
    rows, cols = np.nonzero(np.isin(regions, keep))
    return int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1


def foreground_square(gray01: np.ndarray) -> np.ndarray:
    """The foreground box widened to a square around its centre, black where it leaves the image."""
    top, bottom, left, right = foreground_box(gray01)
    side = max(bottom - top, right - left)
    square = np.zeros((side, side), dtype=np.float32)
    row0 = (top + bottom - side) // 2
    col0 = (left + right - side) // 2
    # Copy the part of the square that lies inside the image.
    src_r0, src_r1 = max(row0, 0), min(row0 + side, gray01.shape[0])
    src_c0, src_c1 = max(col0, 0), min(col0 + side, gray01.shape[1])
    square[src_r0 - row0: src_r1 - row0, src_c0 - col0: src_c1 - col0] = gray01[src_r0:src_r1, src_c0:src_c1]
    return square


def standardize_per_image(images: np.ndarray) -> np.ndarray:
    """float32 images minus their own mean, over their own std (each over its last two axes)."""
    values = np.asarray(images, dtype=np.float32)
    mean = values.mean(axis=(-2, -1), keepdims=True)
    std = values.std(axis=(-2, -1), keepdims=True)
    return ((values - mean) / np.maximum(std, np.float32(PER_IMAGE_STD_FLOOR))).astype(np.float32)


def stretch_per_image(images: np.ndarray) -> np.ndarray:
    """float64 images mapped by their own darkest and brightest pixel to [0, 1] (each over its last
    two axes): the pixel scale of a per_image input, which has none of its own. Constant images
    stay constant (a floor on the range keeps them finite)."""
    values = np.asarray(images, dtype=np.float64)
    darkest = values.min(axis=(-2, -1), keepdims=True)
    span = np.maximum(values.max(axis=(-2, -1), keepdims=True) - darkest, PER_IMAGE_STD_FLOOR)
    return (values - darkest) / span


def crop_gray01(gray01: np.ndarray, crop: str) -> np.ndarray:
    _check_choice(crop, CROP_RULES, "crop")
    if crop == "center_square":
        return center_square(gray01)
    if crop == "foreground_square":
        return foreground_square(gray01)
    return gray01


def resize_gray01(gray01: np.ndarray, image_size_px: int, *, crop: str = LEGACY_CROP,
                  resize_filter: str = LEGACY_RESIZE_FILTER) -> np.ndarray:
    """Crop a 2-D [0, 1] image by `crop`, resize it to (image_size_px, image_size_px) float32.

    Uses Pillow mode 'F' (32-bit float) so no 8-bit rounding happens; Pillow's filters widen
    their support when shrinking, so a 2000-pixel scan is averaged, not aliased, down to 28.
    Already the right size -> returned unchanged (taken as already cropped and resized).
    """
    gray01 = image_to_gray01(gray01)
    _check_choice(resize_filter, tuple(RESIZE_FILTERS), "resize_filter")
    if gray01.shape == (image_size_px, image_size_px):
        return np.ascontiguousarray(gray01, dtype=np.float32)
    cropped = crop_gray01(gray01, crop)
    image = Image.fromarray(np.ascontiguousarray(cropped, dtype=np.float32))
    resized = image.resize((image_size_px, image_size_px), RESIZE_FILTERS[resize_filter])
    # Bicubic and Lanczos overshoot at edges; bilinear round-off too: clip back to [0, 1].
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
    """Crop by `crop`, resize to image_size x image_size with `resize_filter`, then normalise by
    `normalization`: (pixel - mean) / std ("dataset") or each image by its own mean and std ("per_image").

    mean and std are of resized training pixels in [0, 1] (see fit_preprocessing); with per_image
    they are recorded only (and undo nothing: a per_image input has no fixed pixel scale).
    input_profile (optional, models since 2026-12-03) tells inputs unlike the training images
    (medhe.data.input_check); it changes no input.
    """

    image_size: int
    mean: float
    std: float
    crop: str = LEGACY_CROP
    resize_filter: str = LEGACY_RESIZE_FILTER
    normalization: str = LEGACY_NORMALIZATION
    input_profile: InputProfile | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.input_profile is not None and not isinstance(self.input_profile, InputProfile):
            raise DataError(f"Preprocessing.input_profile must be an InputProfile or None, "
                            f"got {type(self.input_profile).__name__}.")
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
        _check_choice(self.crop, CROP_RULES, "Preprocessing.crop")
        _check_choice(self.resize_filter, tuple(RESIZE_FILTERS), "Preprocessing.resize_filter")
        _check_choice(self.normalization, NORMALIZATIONS, "Preprocessing.normalization")

    def to_dict(self) -> dict[str, Any]:
        doc = {"image_size": self.image_size, "mean": self.mean, "std": self.std,
               "crop": self.crop, "resize_filter": self.resize_filter, "normalization": self.normalization}
        if self.input_profile is not None:
            doc["input_profile"] = self.input_profile.to_dict()
        return doc

    def with_input_profile(self, profile: InputProfile | None) -> Preprocessing:
        return replace(self, input_profile=profile)

    def check_input(self, model_input: np.ndarray) -> dict | None:
        """{"distance", "threshold", "typical", "uniform"} of one model input (C, S, S) as apply() made it, or
        None for a model without an input profile."""
        if self.input_profile is None:
            return None
        return self.input_profile.check(np.asarray(model_input)[np.newaxis])[0]

    def geometry(self) -> dict[str, Any]:
        """image_size, crop, resize_filter: the keyword arguments of load_br35h for this recipe."""
        return {"image_size": self.image_size, "crop": self.crop, "resize_filter": self.resize_filter}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Preprocessing:
        if not isinstance(d, Mapping):
            raise DataError(
                f"Preprocessing.from_dict expects a mapping with keys image_size, mean, std "
                f"(and crop, resize_filter, normalization); got {type(d).__name__}."
            )
        required = {"image_size", "mean", "std"}
        # Model cards written before crop rules existed lack these: they mean "stretch, bilinear,
        # dataset" (normalization came later than crop and resize_filter, with the same default rule).
        optional = {"crop", "resize_filter", "normalization", "input_profile"}
        missing = sorted(required - set(d))
        extra = sorted(set(d) - required - optional)
        if missing or extra:
            raise DataError(
                f"Preprocessing.from_dict: expected keys {sorted(required)} and optionally "
                f"{sorted(optional)}; missing {missing}, unexpected {extra}."
            )
        return cls(image_size=d["image_size"], mean=d["mean"], std=d["std"],
                   crop=d.get("crop", LEGACY_CROP), resize_filter=d.get("resize_filter", LEGACY_RESIZE_FILTER),
                   normalization=d.get("normalization", LEGACY_NORMALIZATION),
                   input_profile=None if d.get("input_profile") is None else InputProfile.from_dict(d["input_profile"]))

    def resize(self, gray01: np.ndarray) -> np.ndarray:
        """2-D [0, 1] image -> float32 (image_size, image_size): this recipe's crop, then its filter."""
        return resize_gray01(gray01, self.image_size, crop=self.crop, resize_filter=self.resize_filter)

    def apply(self, gray01: np.ndarray) -> np.ndarray:
        """2-D [0, 1] image -> float32 (1, S, S) normalised model input."""
        resized = self.resize(gray01)
        if self.normalization == "per_image":
            return standardize_per_image(resized)[np.newaxis, :, :]
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
    train_images_gray01: np.ndarray | Sequence[np.ndarray], image_size: int, *,
    crop: str = LEGACY_CROP, resize_filter: str = LEGACY_RESIZE_FILTER, normalization: str = LEGACY_NORMALIZATION,
) -> Preprocessing:
    """Mean and std of the cropped, resized TRAINING pixels (never val/test, which would leak)."""
    image_list = _as_image_list(train_images_gray01, "fit_preprocessing")
    if not image_list:
        raise DataError("fit_preprocessing: got no training images; expected at least one.")
    # Validate image_size before resizing thousands of images with it.
    recipe = Preprocessing(image_size=image_size, mean=0.0, std=1.0, crop=crop, resize_filter=resize_filter,
                           normalization=normalization)
    total = 0.0
    total_sq = 0.0
    n_pixels = 0
    for i, image in enumerate(image_list):
        resized = recipe.resize(image_to_gray01(image, source=f"training image {i}"))
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
    return Preprocessing(image_size=image_size, mean=mean, std=std, crop=crop, resize_filter=resize_filter,
                         normalization=normalization)
