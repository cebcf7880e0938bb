"""MedMNIST-C image corruptions for chest X-rays: the field's robustness benchmark, re-implemented.

Definitions and severities follow MedMNIST-C (Di Salvo, Doerrich, Ledig: "MedMNIST-C:
Comprehensive benchmark and improved classifier robustness by simulating realistic image
corruptions", 2024; package `medmnistc` 0.1.0, registry entry `pneumoniamnist`). The package itself
is not a dependency: it pins scikit-image, medmnist and torchvision versions and needs OpenCV and
ImageMagick, none of which medhe uses. Each corruption below reproduces the package's arithmetic
(uint8 in, uint8 out) with numpy, scipy and Pillow.

MedMNIST-C corrupts the 224x224 images; from our 28x28 PneumoniaMNIST we make that size by bicubic
upsampling (a stand-in for MedMNIST+'s 224 version, which we do not have), corrupt, and let the
model's own recipe bring the image back to its input size, as the client does with any scan.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance
from scipy import ndimage

from medhe.errors import ConfigError

SEVERITIES = 5
CORRUPTION_SIZE_PX = 224


def _as_unit(image_uint8: np.ndarray) -> np.ndarray:
    return image_uint8.astype(np.float64) / 255.0


def _to_uint8(unit: np.ndarray) -> np.ndarray:
    # The package multiplies by 255 and truncates (astype), it does not round.
    return (np.clip(unit, 0.0, 1.0) * 255).astype(np.uint8)


def pixelate(image: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    pil = Image.fromarray(image)
    width, height = pil.size
    small = pil.resize((int(width * factor), int(height * factor)), Image.Resampling.BOX)
    return np.asarray(small.resize((width, height), Image.Resampling.BOX))


def jpeg_compression(image: np.ndarray, quality: float, rng: np.random.Generator) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=int(quality))
    buffer.seek(0)
    return np.asarray(Image.open(buffer).convert("L"))


def gaussian_noise(image: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
    unit = _as_unit(image)
    return _to_uint8(unit + rng.normal(size=unit.shape, scale=scale))


def speckle_noise(image: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
    unit = _as_unit(image)
    return _to_uint8(unit + unit * rng.normal(size=unit.shape, scale=scale))


def impulse_noise(image: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    """Salt and pepper: `amount` of the pixels set to 0 or 1, half each (scikit-image's 's&p')."""
    unit = _as_unit(image)
    flat = unit.reshape(-1).copy()
    count = int(np.ceil(amount * flat.size))
    chosen = rng.choice(flat.size, size=count, replace=False)
    salt = rng.random(count) < 0.5
    flat[chosen[salt]] = 1.0
    flat[chosen[~salt]] = 0.0
    return _to_uint8(flat.reshape(unit.shape))


def shot_noise(image: np.ndarray, photons: float, rng: np.random.Generator) -> np.ndarray:
    return _to_uint8(rng.poisson(_as_unit(image) * photons) / photons)


def gaussian_blur(image: np.ndarray, kernel_size: float, rng: np.random.Generator) -> np.ndarray:
    """torchvision's gaussian_blur: sigma = 0.3 * ((k - 1) / 2 - 1) + 0.8, reflect padding, separable."""
    size = int(kernel_size)
    sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8
    offsets = np.arange(size) - (size - 1) / 2
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    blurred = image.astype(np.float64)
    for axis in (0, 1):  # numpy's "reflect" padding is scipy's "mirror"
        blurred = ndimage.correlate1d(blurred, kernel, axis=axis, mode="mirror")
    return np.clip(np.round(blurred), 0, 255).astype(np.uint8)


def brightness(image: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    return np.asarray(ImageEnhance.Brightness(Image.fromarray(image)).enhance(factor))


def contrast(image: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    return np.asarray(ImageEnhance.Contrast(Image.fromarray(image)).enhance(factor))


def gamma_correction(image: np.ndarray, gamma: float, rng: np.random.Generator) -> np.ndarray:
    """torchvision's adjust_gamma on a PIL image: a 256-entry table of (256 - 1e-3) * (x / 255) ** gamma."""
    table = np.array([int(min(255.0, (255 + 1 - 1e-3) * (value / 255.0) ** gamma)) for value in range(256)],
                     np.uint8)
    return table[image]


@dataclass(frozen=True)
class Corruption:
    name: str
    function: Callable[[np.ndarray, float, np.random.Generator], np.ndarray]
    severity_params: tuple[float, ...]

    def apply(self, image_uint8: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
        """A 2-D uint8 image corrupted at severity 1..5."""
        if not 1 <= severity <= SEVERITIES:
            raise ConfigError(f"severity must be 1..{SEVERITIES}, got {severity}")
        if image_uint8.dtype != np.uint8 or image_uint8.ndim != 2:
            raise ConfigError(f"corruptions take 2-D uint8 images, got {image_uint8.dtype} {image_uint8.shape}")
        return self.function(image_uint8, self.severity_params[severity - 1], rng)


# MedMNIST-C's `pneumoniamnist` entry, in its order (blur lists six kernel sizes; severities use the first five).
CHEST_XRAY_CORRUPTIONS = (
    Corruption("pixelate", pixelate, (0.8, 0.7, 0.6, 0.5, 0.40)),
    Corruption("jpeg_compression", jpeg_compression, (50, 30, 15, 10, 7)),
    Corruption("gaussian_noise", gaussian_noise, (0.04, 0.05, 0.06, 0.07, 0.08)),
    Corruption("speckle_noise", speckle_noise, (0.05, 0.07, 0.10, 0.15, 0.20)),
    Corruption("impulse_noise", impulse_noise, (0.005, 0.01, 0.013, 0.017, 0.02)),
    Corruption("shot_noise", shot_noise, (300, 200, 150, 100, 80)),
    Corruption("gaussian_blur", gaussian_blur, (3, 5, 7, 9, 11)),
    Corruption("brightness_up", brightness, (1.1, 1.2, 1.3, 1.4, 1.5)),
    Corruption("brightness_down", brightness, (0.9, 0.8, 0.7, 0.6, 0.5)),
    Corruption("contrast_up", contrast, (1.1, 1.2, 1.3, 1.4, 1.6)),
    Corruption("contrast_down", contrast, (0.9, 0.8, 0.7, 0.6, 0.4)),
    Corruption("gamma_corr_up", gamma_correction, (1.1, 1.2, 1.3, 1.4, 1.6)),
    Corruption("gamma_corr_down", gamma_correction, (0.9, 0.8, 0.7, 0.6, 0.4)),
)


def to_corruption_size(gray01: np.ndarray, size_px: int = CORRUPTION_SIZE_PX) -> np.ndarray:
    """A [0, 1] image -> uint8 at size_px x size_px (bicubic), the resolution MedMNIST-C corrupts at."""
    image = Image.fromarray(np.ascontiguousarray(gray01, dtype=np.float32))
    if image.size != (size_px, size_px):
        image = image.resize((size_px, size_px), Image.Resampling.BICUBIC)
    return (np.clip(np.asarray(image, dtype=np.float64), 0, 1) * 255).round().astype(np.uint8)


def corrupted_sets(images_gray01, *, size_px: int = CORRUPTION_SIZE_PX, seed: int = 0,
                   corruptions=CHEST_XRAY_CORRUPTIONS) -> Iterator[tuple[str, int, list[np.ndarray]]]:
    """(corruption name, severity, [0, 1] float32 images at size_px) for every corruption and severity.

    Seeded per corruption and severity, so a run is reproducible and two models see the same noise.
    """
    base = [to_corruption_size(np.asarray(image), size_px) for image in images_gray01]
    for index, corruption in enumerate(corruptions):
        for severity in range(1, SEVERITIES + 1):
            rng = np.random.default_rng([seed, index, severity])
            yield corruption.name, severity, [
                corruption.apply(image, severity, rng).astype(np.float32) / np.float32(255.0) for image in base]
