"""Preprocessing parity: a full-resolution, non-square scan reaches the model the way the training
images did (the crop rule and resize filter stored with the model), on the client as in training."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

from medhe.data.preprocess import (
    CROP_RULES,
    Preprocessing,
    center_square,
    fit_preprocessing,
    foreground_box,
    resize_gray01,
    standardize_per_image,
)
from medhe.errors import DataError


def _chest_like(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A non-square textured image whose left and right borders are unlike its centre."""
    rng = np.random.default_rng(seed)
    rows = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    cols = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    image = 0.4 + 0.3 * np.sin(12 * rows) * np.cos(9 * cols) + 0.05 * rng.random((height, width), dtype=np.float32)
    image[:, : width // 8] = 1.0  # a bright band only a stretch would squeeze into view
    return np.clip(image, 0, 1).astype(np.float32)


def _head(side: int) -> np.ndarray:
    """An elliptical textured 'head' filling a side x side box, on black."""
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / (side - 1) * 2 - 1
    inside = (yy / 0.98) ** 2 + (xx / 0.8) ** 2 <= 1.0
    texture = 0.5 + 0.3 * np.sin(7 * yy + 3 * xx) + 0.15 * (np.abs(xx) < 0.1)
    return np.where(inside, np.clip(texture, 0.3, 1), 0).astype(np.float32)


@pytest.mark.parametrize("shape", [(1400, 1800), (1800, 1400), (384, 2000)])
def test_center_square_is_the_short_edge_window_then_resized(shape) -> None:
    height, width = shape
    image = _chest_like(height, width)
    recipe = Preprocessing(image_size=28, mean=0.5, std=0.25, crop="center_square", resize_filter="bicubic")
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    by_hand = Image.fromarray(image[top: top + side, left: left + side]).resize((28, 28), Image.Resampling.BICUBIC)
    np.testing.assert_allclose(recipe.resize(image), np.clip(np.asarray(by_hand), 0, 1), atol=1e-6)
    assert center_square(image).shape == (side, side)
    # The old rule stretched the whole image: a visibly different input.
    stretched = resize_gray01(image, 28)
    assert np.abs(stretched - recipe.resize(image)).max() > 0.2


def test_center_square_of_a_square_image_is_a_plain_resize() -> None:
    image = _chest_like(300, 300)
    recipe = Preprocessing(image_size=28, mean=0.5, std=0.25, crop="center_square", resize_filter="bilinear")
    np.testing.assert_array_equal(recipe.resize(image), resize_gray01(image, 28))


@pytest.mark.parametrize("filter_name", ["bilinear", "bicubic", "lanczos", "box"])
def test_every_filter_stays_in_range_and_differs_from_the_others(filter_name) -> None:
    image = _chest_like(500, 700)
    out = resize_gray01(image, 32, crop="center_square", resize_filter=filter_name)
    assert out.shape == (32, 32) and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1
    others = [resize_gray01(image, 32, crop="center_square", resize_filter=f)
              for f in ("bilinear", "bicubic", "lanczos", "box") if f != filter_name]
    assert all(np.abs(out - other).max() > 1e-4 for other in others)


def test_foreground_square_frames_a_head_the_same_whatever_the_margins() -> None:
    head = _head(240)
    tight = head
    with_margins = np.pad(head, ((60, 200), (300, 40)))  # off-centre, non-square, mostly black
    noisy = with_margins + 0.03 * np.random.default_rng(1).random(with_margins.shape, dtype=np.float32)
    noisy[5:12, 5:120] = 1.0  # a burnt-in text label in a corner must not widen the box
    recipe = Preprocessing(image_size=32, mean=0.3, std=0.3, crop="foreground_square", resize_filter="bicubic")
    reference = recipe.resize(tight)
    for framed in (with_margins, noisy):
        assert np.abs(recipe.resize(framed) - reference).max() < 0.08
        assert np.abs(recipe.resize(framed) - reference).mean() < 0.02
    # Stretching the framed image gives a different picture altogether.
    assert np.abs(resize_gray01(with_margins, 32) - reference).mean() > 0.1
    top, bottom, left, right = foreground_box(tight)
    assert bottom - top > 225 and abs((right - left) - 192) <= 2  # the ellipse, 0.8 as wide as tall
    assert foreground_box(noisy) == (top + 60, bottom + 60, left + 300, right + 300)


def test_foreground_square_pads_a_wide_object_with_black_not_neighbouring_pixels() -> None:
    wide = np.zeros((100, 300), np.float32)
    wide[40:60, 20:280] = 0.8
    square = resize_gray01(wide, 26, crop="foreground_square", resize_filter="box")
    # The object is 260 wide and 20 tall: centred rows hold it, the top and bottom stay black.
    assert square[:8].max() == 0 and square[-8:].max() == 0 and square[12:14].min() > 0.5


def test_foreground_square_of_a_blank_image_keeps_the_whole_image() -> None:
    blank = np.zeros((40, 60), np.float32)
    assert foreground_box(blank) == (0, 40, 0, 60)
    assert resize_gray01(blank, 16, crop="foreground_square").shape == (16, 16)


def test_recipe_round_trips_and_older_cards_mean_stretch_bilinear() -> None:
    recipe = Preprocessing(image_size=32, mean=0.25, std=0.2, crop="foreground_square", resize_filter="lanczos")
    assert Preprocessing.from_dict(recipe.to_dict()) == recipe
    older = Preprocessing.from_dict({"image_size": 32, "mean": 0.25, "std": 0.2})
    assert (older.crop, older.resize_filter) == ("stretch", "bilinear")
    image = _chest_like(90, 150)
    np.testing.assert_array_equal(older.resize(image), resize_gray01(image, 32))


@pytest.mark.parametrize("bad", [{"crop": "centre"}, {"crop": 3}, {"resize_filter": "nearest"},
                                 {"resize_filter": None}])
def test_unknown_crop_or_filter_is_refused_by_name(bad) -> None:
    with pytest.raises(DataError, match="crop|resize_filter"):
        Preprocessing.from_dict({"image_size": 32, "mean": 0.25, "std": 0.2, **bad})


def test_per_image_normalisation_undoes_an_intensity_scale() -> None:
    """An MRI exported brighter (every pixel times a factor, none clipped) arrives as the same model
    input per image; normalising by the training set's mean and std it does not."""
    head = np.pad(_head(120), ((20, 20), (60, 60))) * 0.6
    brighter = 1.4 * head  # stays within [0, 1], resize overshoot included
    per_image = Preprocessing(image_size=32, mean=0.25, std=0.2, crop="foreground_square", resize_filter="bicubic",
                              normalization="per_image")
    dataset = Preprocessing(**{**per_image.to_dict(), "normalization": "dataset"})
    model_input = per_image.apply(head)
    assert model_input.shape == (1, 32, 32) and model_input.dtype == np.float32
    assert abs(float(model_input.mean())) < 1e-5 and float(model_input.std()) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(per_image.apply(brighter), model_input, atol=1e-4)
    assert np.abs(dataset.apply(brighter) - dataset.apply(head)).max() > 0.5
    assert Preprocessing.from_dict(per_image.to_dict()) == per_image
    assert Preprocessing.from_dict({"image_size": 32, "mean": 0.25, "std": 0.2}).normalization == "dataset"


def test_per_image_normalisation_of_a_blank_image_is_zeros_not_nan() -> None:
    blank = np.full((40, 40), 0.3, np.float32)
    recipe = Preprocessing(image_size=16, mean=0.25, std=0.2, normalization="per_image")
    np.testing.assert_array_equal(recipe.apply(blank), np.zeros((1, 16, 16), np.float32))
    batch = standardize_per_image(np.stack([blank[:16, :16], _head(16)])[:, None])
    assert np.isfinite(batch).all() and batch.shape == (2, 1, 16, 16)


@pytest.mark.parametrize("bad", ["z-score", None, 1])
def test_unknown_normalisation_is_refused_by_name(bad) -> None:
    with pytest.raises(DataError, match="normalization must be one of dataset, per_image"):
        Preprocessing.from_dict({"image_size": 32, "mean": 0.25, "std": 0.2, "normalization": bad})


def test_fit_preprocessing_fits_mean_and_std_after_the_crop() -> None:
    images = [np.pad(_head(120), ((0, 0), (100, 100))), np.pad(_head(80), ((40, 40), (10, 90)))]
    stretch = fit_preprocessing(images, 16)
    framed = fit_preprocessing(images, 16, crop="foreground_square", resize_filter="bicubic")
    assert (framed.crop, framed.resize_filter) == ("foreground_square", "bicubic")
    cropped = np.stack([framed.resize(image) for image in images])
    assert framed.mean == pytest.approx(float(cropped.mean()), abs=1e-6)
    assert framed.mean > stretch.mean + 0.05  # less black background counted


def test_shipped_models_store_their_recipe_and_clinics_receive_it() -> None:
    from medhe.compiler import compile_model
    from medhe.nn.io import load_model, resolve_model_dir

    expected = {"pneumoniamnist": "center_square", "br35h": "foreground_square"}
    for name, crop in expected.items():
        _, card = load_model(resolve_model_dir(name))
        assert card.preprocessing.crop == crop and card.preprocessing.crop in CROP_RULES
        spec = compile_model(resolve_model_dir(name)).client_spec()
        assert Preprocessing.from_dict(spec.preprocessing) == card.preprocessing


def test_a_full_resolution_non_square_scan_is_diagnosed_as_its_recipe_says(tmp_path) -> None:
    """Client (clear backend) on an 1800x1400 PNG: the same input and logits as the plaintext model
    given the by-hand centre crop; the stretched image would give another input."""
    import torch

    from medhe.compiler import compile_model
    from medhe.nn.io import load_model, resolve_model_dir
    from medhe.protocol.client import Client
    from medhe.protocol.server import Server

    model_dir = resolve_model_dir("pneumoniamnist")
    model, card = load_model(model_dir)
    image = _chest_like(1400, 1800, seed=3)
    path = tmp_path / "xray.png"
    Image.fromarray((image * 255).round().astype(np.uint8)).save(path)
    plan = compile_model(model_dir)
    client, server = Client(plan.client_spec(), backend="clear"), Server(plan, backend="clear")
    server.register_keys(client.evaluation_keys())
    model_input = client.preprocess(path)
    gray = np.asarray(Image.open(path), dtype=np.float32) / 255
    by_hand = card.preprocessing.apply(center_square(gray))
    np.testing.assert_allclose(model_input, by_hand, atol=1e-5)
    stretched = Preprocessing.from_dict({**card.preprocessing.to_dict(), "crop": "stretch"}).apply(gray)
    assert np.abs(model_input - stretched).max() > 0.1
    logits = client.decrypt_logits(server.evaluate(client.encrypt_input(model_input)))
    with torch.no_grad():
        reference = model(torch.tensor(by_hand[None])).double().numpy()[0]
    np.testing.assert_allclose(logits, reference, atol=1e-5)  # float32 torch vs float64 clear backend


def test_a_per_image_model_is_trained_stored_and_applied_by_the_client(tmp_path) -> None:
    """`medhe train` for Br35H (per_image by default): the card and the client spec carry the rule,
    the client standardises a full-resolution scan by its own mean and std, and the (clear)
    encrypted path gives the plaintext model's logits for it. `--normalization dataset` overrides."""
    import json

    import torch

    from medhe.cli.main import main
    from medhe.compiler import compile_model
    from medhe.nn.io import load_model
    from medhe.protocol.client import Client
    from medhe.protocol.server import Server

    out = tmp_path / "model"
    assert main(["train", "--dataset", "br35h", "--out", str(out), "--epochs", "1", "--no-progress"]) == 0
    model, card = load_model(out)
    assert card.preprocessing.normalization == "per_image" and card.preprocessing.crop == "foreground_square"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["preprocessing"]["normalization"] == "per_image" and metrics["history"]["per_image"] is True
    by_dataset = tmp_path / "by-dataset"
    assert main(["train", "--dataset", "br35h", "--out", str(by_dataset), "--epochs", "1", "--normalization",
                 "dataset", "--no-progress"]) == 0
    assert load_model(by_dataset)[1].preprocessing.normalization == "dataset"
    overridden = json.loads((by_dataset / "metrics.json").read_text())
    assert "--normalization dataset" in overridden["command"] and overridden["history"]["per_image"] is False
    plan = compile_model(out)
    assert Preprocessing.from_dict(plan.client_spec().preprocessing) == card.preprocessing
    scan = np.pad(_head(300), ((50, 50), (150, 90))) * 0.7
    path = tmp_path / "scan.png"
    Image.fromarray((scan * 255).round().astype(np.uint8)).save(path)
    client, server = Client(plan.client_spec(), backend="clear"), Server(plan, backend="clear")
    server.register_keys(client.evaluation_keys())
    model_input = client.preprocess(path)
    gray = np.asarray(Image.open(path), dtype=np.float32) / 255
    np.testing.assert_allclose(model_input, standardize_per_image(card.preprocessing.resize(gray))[None], atol=1e-5)
    logits = client.decrypt_logits(server.evaluate(client.encrypt_input(model_input)))
    with torch.no_grad():
        reference = model(torch.tensor(model_input[None])).double().numpy()[0]
    np.testing.assert_allclose(logits, reference, atol=1e-5)


def test_the_shipped_br35h_model_diagnoses_a_dimmer_export_of_a_scan_alike() -> None:
    """Br35H ships with per-image standardisation: held-out test scans at 60% of their intensity
    (another scanner's gain) get the same logits, up to the resize's clipping at white."""
    import torch

    from medhe.data.br35h import br35h_split_files
    from medhe.data.images import load_image
    from medhe.nn.io import load_model, resolve_model_dir

    model, card = load_model(resolve_model_dir("br35h"))
    assert card.preprocessing.normalization == "per_image"
    scans = [load_image(path) for path, _ in br35h_split_files("test")[::20]]
    dimmer = [0.6 * scan for scan in scans]
    with torch.no_grad():
        logits = model(torch.tensor(card.preprocessing.apply_batch(scans))).numpy()
        logits_dimmer = model(torch.tensor(card.preprocessing.apply_batch(dimmer))).numpy()
    # Not exact: where bicubic overshoots white in a full-intensity scan it is clipped (0.048 measured).
    np.testing.assert_allclose(logits_dimmer, logits, atol=0.15)
    np.testing.assert_array_equal(logits_dimmer.argmax(1), logits.argmax(1))
    # A real change of input: by the training set's mean and std the dimmer scans are far apart.
    dataset_rule = dataclasses.replace(card.preprocessing, normalization="dataset")
    assert np.abs(dataset_rule.apply_batch(dimmer) - dataset_rule.apply_batch(scans)).mean() > 0.3


def test_the_shipped_pneumoniamnist_model_reads_a_12_bit_png_as_its_8_bit_export(tmp_path, pneumoniamnist_npz) -> None:
    """Chest detectors store 12 bits, often in a 16-bit PNG. PneumoniaMNIST normalises by the
    training set's mean and std, so the file must reach it as bright as the 8-bit films it learnt
    from: held-out val films saved both ways get the same logits."""
    import torch

    from medhe.data.images import load_image
    from medhe.nn.io import load_model, resolve_model_dir

    model, card = load_model(resolve_model_dir("pneumoniamnist"))
    assert card.preprocessing.normalization == "dataset"
    with np.load(pneumoniamnist_npz) as data:
        films = data["val_images"][::10]  # 53 held-out films, uint8
    eight_bit, twelve_bit = [], []
    for i, film in enumerate(films):
        Image.fromarray(film).save(tmp_path / f"film{i}_8.png")
        stored = np.round(film.astype(np.float64) * 4095 / 255).astype(np.uint16)
        Image.fromarray(stored).save(tmp_path / f"film{i}_12.png")
        eight_bit.append(load_image(tmp_path / f"film{i}_8.png"))
        twelve_bit.append(load_image(tmp_path / f"film{i}_12.png"))
    with torch.no_grad():
        logits = model(torch.tensor(card.preprocessing.apply_batch(eight_bit))).numpy()
        logits_12 = model(torch.tensor(card.preprocessing.apply_batch(twelve_bit))).numpy()
        # What dividing by 65535 would give: 1/16 of the brightness.
        logits_dark = model(torch.tensor(card.preprocessing.apply_batch([g * 4095 / 65535 for g in twelve_bit]))).numpy()
    np.testing.assert_allclose(logits_12, logits, atol=0.05)  # rounding to 12 bits only
    np.testing.assert_array_equal(logits_12.argmax(1), logits.argmax(1))
    assert (logits.argmax(1) == 0).sum() >= 5  # some films are read as normal (14 measured) ...
    assert (logits_dark.argmax(1) == 0).sum() == 0  # ... none of them at 1/16 brightness
