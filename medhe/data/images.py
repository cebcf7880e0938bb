"""Load one medical image file as a 2-D float32 grayscale array in [0, 1].

Training, evaluation and the diagnosis client all read images through
`load_image`, so a picture gives the same numbers everywhere.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from medhe.errors import ImageLoadError

DICOM_MAGIC = b"DICM"
DICOM_MAGIC_OFFSET_BYTES = 128
DICOM_SUFFIXES = (".dcm", ".dicom")

# ITU-R BT.601 luma weights, the same ones Pillow's convert("L") uses; applied in
# float here so that colour images do not lose precision to 8-bit rounding.
LUMA_WEIGHTS_RGB = (0.299, 0.587, 0.114)

UINT8_MAX = 255.0
UINT16_MAX = 65535.0
# Bits a 16-bit container may hold: X-ray and MRI detectors store 10, 12 or 14 significant bits
# (8-bit exports are saved as 16-bit too). Dividing such data by 65535 would hand the model an
# image at 1/4 to 1/256 of its brightness (12-bit chest films: read as pneumonia whatever they show).
STORED_BIT_DEPTHS = (8, 10, 12, 14, 16)

_PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def rgb_to_gray(rgb: np.ndarray) -> np.ndarray:
    """(…, 3) colour array -> (…) float64 luminance with BT.601 weights (value scale kept)."""
    weights = np.asarray(LUMA_WEIGHTS_RGB, dtype=np.float64)
    return rgb[..., :3].astype(np.float64) @ weights



def _finite_or_raise(values: np.ndarray, source: str) -> None:
    if not np.all(np.isfinite(values)):
        n_bad = int(np.count_nonzero(~np.isfinite(values)))
        raise ImageLoadError(
            f"{source}: image contains {n_bad} NaN/inf pixel value(s); expected finite "
            "intensities. Re-export the image from the source system."
        )


def _check_2d_nonempty(values: np.ndarray, source: str) -> None:
    if values.ndim != 2:
        raise ImageLoadError(
            f"{source}: expected a 2-D grayscale image, got an array of shape {values.shape}. "
            "Pass one image (height, width); convert colour images to grayscale first."
        )
    if values.size == 0:
        raise ImageLoadError(
            f"{source}: image is zero-sized (shape {values.shape}); expected at least 1x1 pixels."
        )


def minmax_to_01(values: np.ndarray, source: str = "<array>") -> np.ndarray:
    """Min-max normalise to float32 [0, 1]; a constant image becomes all zeros."""
    values = np.asarray(values, dtype=np.float64)
    _finite_or_raise(values, source)
    low = float(values.min())
    span = float(values.max()) - low
    if span <= 0.0:
        return np.zeros(values.shape, dtype=np.float32)
    return ((values - low) / span).astype(np.float32)


def image_to_gray01(array: np.ndarray, *, source: str = "<array>") -> np.ndarray:
    """Turn an in-memory 2-D image into float32 [0, 1].

    uint8 is divided by 255 and uint16 by 2^bits - 1 for the smallest stored bit depth
    (8, 10, 12, 14 or 16) that holds its maximum, so 12-bit data in a 16-bit container
    spans [0, 1] as an 8-bit export of it would (scaled by bit depth, not min-max, so
    brightness is comparable between images of one depth). Floating-point input is
    taken to be in [0, 1] already and is only checked. `source` names the image in errors.
    """
    array = np.asarray(array)
    _check_2d_nonempty(array, source)
    if array.dtype == np.uint8:
        return (array.astype(np.float32) / np.float32(UINT8_MAX)).astype(np.float32)
    if array.dtype == np.uint16:
        peak = int(array.max())
        bits = next(depth for depth in STORED_BIT_DEPTHS if peak < 2**depth)
        return (array.astype(np.float32) / np.float32(2**bits - 1)).astype(np.float32)
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    if np.issubdtype(array.dtype, np.floating):
        _finite_or_raise(array, source)
        low, high = float(array.min()), float(array.max())
        if low < 0.0 or high > 1.0:
            raise ImageLoadError(
                f"{source}: float image values span [{low:.6g}, {high:.6g}], expected [0, 1]. "
                "Divide 8-bit data by 255 (16-bit by 65535) or pass the integer array itself."
            )
        return array.astype(np.float32)
    raise ImageLoadError(
        f"{source}: unsupported pixel dtype {array.dtype}; expected uint8, uint16 or float "
        "in [0, 1]. Cast the array to one of these first."
    )


def looks_like_dicom(path: str | os.PathLike[str]) -> bool:
    """True if the file has DICOM's magic bytes (how a suffix-less PACS export, IM0001, is told
    apart); False if not, or if it cannot be read."""
    try:
        return _has_dicom_magic(Path(path))
    except ImageLoadError:
        return False


def _has_dicom_magic(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            handle.seek(DICOM_MAGIC_OFFSET_BYTES)
            return handle.read(len(DICOM_MAGIC)) == DICOM_MAGIC
    except OSError as exc:
        raise ImageLoadError(f"{path}: cannot read file ({exc}).") from exc


def _pil_to_gray01(image: Image.Image, source: str) -> np.ndarray:
    mode = image.mode
    if mode in ("1", "L"):
        return image_to_gray01(np.asarray(image.convert("L")), source=source)
    if mode == "LA":
        return image_to_gray01(np.asarray(image)[..., 0], source=source)
    if mode.startswith("I;16"):
        # 16-bit grayscale: scale by the stored bit depth so brightness is comparable across files.
        return image_to_gray01(np.asarray(image).astype(np.uint16), source=source)
    if mode == "I":
        values = np.asarray(image)
        if values.size and (values.min() < 0 or values.max() > UINT16_MAX):
            raise ImageLoadError(
                f"{source}: 32-bit integer image with values in [{values.min()}, {values.max()}]; "
                "expected 16-bit data in [0, 65535]. Save it as 8- or 16-bit grayscale."
            )
        return image_to_gray01(values.astype(np.uint16), source=source)
    if mode == "F":
        values = np.asarray(image, dtype=np.float32)
        _check_2d_nonempty(values, source)
        _finite_or_raise(values, source)
        if values.min() >= 0.0 and values.max() <= 1.0:
            return values.astype(np.float32)
        # Float images carry no bit depth, so outside [0, 1] only min-max is meaningful.
        return minmax_to_01(values, source)
    # Colour and palette modes (RGB, RGBA, P, PA, CMYK, YCbCr, ...): luminance in float.
    rgb = np.asarray(image.convert("RGB"))
    return (rgb_to_gray(rgb) / UINT8_MAX).astype(np.float32)


def _load_pillow(file: Path | BinaryIO, source: str) -> np.ndarray:
    try:
        with Image.open(file) as image:
            image.seek(0)  # multi-page TIFF/GIF: the first page
            image.load()
            image = ImageOps.exif_transpose(image)  # what a viewer shows
            if image.width == 0 or image.height == 0:
                raise ImageLoadError(
                    f"{source}: image is zero-sized ({image.width}x{image.height}); "
                    "expected at least 1x1 pixels."
                )
            gray01 = _pil_to_gray01(image, source)
    except UnidentifiedImageError as exc:
        raise ImageLoadError(
            f"{source}: not a recognised image file; expected PNG, JPEG, BMP, TIFF or DICOM."
        ) from exc
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(f"{source}: image is implausibly large ({exc}).") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Pillow reports truncated/corrupt data as OSError ("image file is truncated") etc.
        raise ImageLoadError(
            f"{source}: image data is truncated or corrupt ({exc}). Re-export or re-download it."
        ) from exc
    _check_2d_nonempty(gray01, source)
    return gray01


def _load_dicom(file: Path | BinaryIO, has_magic: bool, source: str) -> np.ndarray:
    # Imported here: pydicom is only needed for DICOM input.
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import (
        apply_color_lut,
        apply_modality_lut,
        apply_voi_lut,
        pixel_array,
    )

    try:
        # force=True so a .dcm file without the 128-byte preamble (legal in old files) still reads.
        dataset = pydicom.dcmread(file, force=True)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as exc:
        raise ImageLoadError(f"{source}: not a readable DICOM file ({exc}).") from exc

    if not any(keyword in dataset for keyword in _PIXEL_DATA_KEYWORDS):
        if not has_magic:
            # Only the suffix said DICOM; most likely some other file renamed to .dcm.
            raise ImageLoadError(
                f"{source}: not a DICOM image: no 'DICM' marker at byte 128 and no pixel "
                "data found. Expected a DICOM file; check that this is the exported image."
            )
        raise ImageLoadError(
            f"{source}: DICOM file has no pixel data (no Pixel Data element 7FE0,0010); "
            "expected an image object, not a report, structured document or header-only file."
        )
    rows = int(dataset.get("Rows", 0) or 0)
    columns = int(dataset.get("Columns", 0) or 0)
    if rows == 0 or columns == 0:
        raise ImageLoadError(
            f"{source}: DICOM image is zero-sized or lacks Rows/Columns (Rows={rows}, "
            f"Columns={columns}); expected at least 1x1 pixels."
        )

    file_meta = getattr(dataset, "file_meta", None)
    transfer_syntax = getattr(file_meta, "TransferSyntaxUID", None)
    syntax_name = getattr(transfer_syntax, "name", str(transfer_syntax))
    try:
        frame = pixel_array(dataset, index=0)  # multi-frame: decode only the first frame
    except NotImplementedError as exc:
        # pydicom raises this when no decoder exists for the syntax at all.
        raise ImageLoadError(
            f"{source}: unsupported DICOM transfer syntax {syntax_name} ({transfer_syntax}); "
            "expected uncompressed, RLE, JPEG, JPEG-LS or JPEG 2000. Export the image "
            "uncompressed, or install pylibjpeg, pylibjpeg-libjpeg and pylibjpeg-openjpeg."
        ) from exc
    except RuntimeError as exc:
        # A decoder exists but every installed plugin failed: corrupt or unusual encoding.
        raise ImageLoadError(
            f"{source}: could not decode {syntax_name} ({transfer_syntax}) pixel data: {exc}. "
            "The data may be corrupt or use a variant no installed decoder supports; "
            "export the image uncompressed."
        ) from exc
    except (ValueError, AttributeError, KeyError, TypeError, EOFError, OSError) as exc:
        raise ImageLoadError(
            f"{source}: DICOM pixel data is truncated or corrupt ({exc})."
        ) from exc

    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    samples_per_pixel = int(dataset.get("SamplesPerPixel", 1) or 1)
    try:
        if photometric == "PALETTE COLOR":
            values = rgb_to_gray(apply_color_lut(frame, dataset))
        elif samples_per_pixel > 1 or frame.ndim == 3:
            # pydicom already converts YBR_* to RGB by default.
            values = rgb_to_gray(frame)
        else:
            values = apply_modality_lut(frame, dataset)
            values = apply_voi_lut(values, dataset, index=0)
    except (ValueError, AttributeError, KeyError, TypeError, IndexError) as exc:
        raise ImageLoadError(
            f"{source}: DICOM LUT/window attributes are inconsistent ({exc})."
        ) from exc

    values = np.asarray(values, dtype=np.float64)
    _check_2d_nonempty(values, source)
    gray01 = minmax_to_01(values, source)
    if photometric == "MONOCHROME1":
        # MONOCHROME1 means low values are white; flip so bright is always high.
        gray01 = (np.float32(1.0) - gray01).astype(np.float32)
    return gray01


def load_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image file as a 2-D float32 grayscale array in [0, 1].

    PNG/JPEG/BMP/TIFF (Pillow): 8-bit divided by 255; 16-bit ('I;16', or 'I' with
    values in [0, 65535]) divided by 2^bits - 1 for the smallest of 8, 10, 12, 14, 16
    bits that holds the maximum (stored bit depth, not min-max); RGB/RGBA/palette
    to BT.601 luminance (alpha ignored); float ('F') kept if in [0, 1], else
    min-max normalised. EXIF orientation is applied. Multi-page files: first page.

    DICOM (detected by 'DICM' at byte 128 or a .dcm/.dicom suffix, via pydicom):
    pixel data (compressed syntaxes through pylibjpeg), modality LUT (rescale
    slope/intercept), the VOI LUT/window when present, colour to luminance, then
    min-max normalisation to [0, 1] (a constant image gives zeros) and inversion
    of MONOCHROME1. Multi-frame DICOM: only the FIRST frame is used.

    Raises ImageLoadError naming the file for: missing file, not an image,
    truncated/corrupt data, DICOM without pixel data, unsupported transfer syntax,
    NaN/inf values, zero-sized image.
    """
    path = Path(path)
    if not path.exists():
        raise ImageLoadError(f"{path}: file not found. Check the path and the working directory.")
    if not path.is_file():
        raise ImageLoadError(f"{path}: not a regular file; expected an image file path.")
    if path.stat().st_size == 0:
        raise ImageLoadError(f"{path}: file is empty (0 bytes); expected image data.")
    has_magic = _has_dicom_magic(path)
    if has_magic or path.suffix.lower() in DICOM_SUFFIXES:
        return _load_dicom(path, has_magic, str(path))
    return _load_pillow(path, str(path))


def _is_dicom_bytes(data: bytes, name: str) -> tuple[bool, bool]:
    """(read as DICOM, has the 'DICM' marker) for file contents named `name`."""
    end = DICOM_MAGIC_OFFSET_BYTES + len(DICOM_MAGIC)
    has_magic = data[DICOM_MAGIC_OFFSET_BYTES:end] == DICOM_MAGIC
    return has_magic or Path(name).suffix.lower() in DICOM_SUFFIXES, has_magic


def _require_data(data: bytes, name: str) -> None:
    if not data:
        raise ImageLoadError(f"{name}: file is empty (0 bytes); expected image data.")


def load_image_bytes(data: bytes, name: str) -> np.ndarray:
    """`load_image` for a file's contents held in memory (an upload), with the same numbers and the
    same errors; `name` (the file's name) is what errors cite and whose suffix may say DICOM."""
    _require_data(data, name)
    dicom, has_magic = _is_dicom_bytes(data, name)
    if dicom:
        return _load_dicom(io.BytesIO(data), has_magic, name)
    return _load_pillow(io.BytesIO(data), name)


def mask_identifier(value: str, *, visible_chars: int = 2) -> str:
    """A patient identifier for display: its last characters only, behind a fixed-width mask."""
    value = value.strip()
    return "" if not value else "\u2022" * 4 + value[-visible_chars:] if len(value) > visible_chars else "\u2022" * 4


def describe_image_bytes(data: bytes, name: str) -> dict[str, str]:
    """What a clinician checks before a diagnosis: for DICOM the modality, body part, masked patient
    id, study date, size, bit depth and encoding (the patient's name is never read out); for other
    images the format and size. Values are strings; absent DICOM fields are left out."""
    _require_data(data, name)
    dicom, _ = _is_dicom_bytes(data, name)
    if not dicom:
        try:
            with Image.open(io.BytesIO(data)) as image:
                return {"format": image.format or "image", "size": f"{image.width} x {image.height} px",
                        "mode": image.mode}
        except Image.DecompressionBombError as exc:
            raise ImageLoadError(f"{name}: image is implausibly large ({exc}).") from exc
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            # (Pillow's message names the in-memory buffer, nothing the user gave.)
            raise ImageLoadError(f"{name}: not a recognised image file; expected PNG, JPEG, BMP, TIFF or DICOM "
                                 f"({type(exc).__name__}).") from exc
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        dataset = pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=True)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as exc:
        raise ImageLoadError(f"{name}: not a readable DICOM file ({exc}).") from exc

    def text(keyword: str) -> str:
        try:
            return str(dataset.get(keyword, "") or "").strip()
        except (ValueError, TypeError, KeyError):  # a malformed element: shown as absent
            return ""

    info = {"format": "DICOM", "modality": text("Modality"), "body part": text("BodyPartExamined"),
            "patient id": mask_identifier(text("PatientID")), "study date": text("StudyDate")}
    rows, columns = text("Rows"), text("Columns")
    if rows and columns:
        info["size"] = f"{columns} x {rows} px"
    if text("BitsStored"):
        info["bits stored"] = text("BitsStored")
    syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is not None:
        try:
            info["encoding"] = f"{syntax.name}{' (compressed)' if syntax.is_compressed else ''}"
        except ValueError:  # a private or malformed transfer syntax: named, and load_image judges it
            info["encoding"] = str(syntax)
    return {key: value for key, value in info.items() if value}
