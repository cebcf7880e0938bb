"""MedMNIST-C corruptions (re-implemented) and `medhe evaluate --corruptions`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from medhe.data.corruptions import (
    CHEST_XRAY_CORRUPTIONS,
    SEVERITIES,
    corrupted_sets,
    gamma_correction,
    gaussian_blur,
    impulse_noise,
    to_corruption_size,
)
from medhe.errors import ConfigError

SHARED_NPZ = Path(__file__).resolve().parents[3] / "shared" / "data" / "pneumoniamnist" / "pneumoniamnist.npz"


def _xray(size: int = 64) -> np.ndarray:
    rows, cols = np.mgrid[0:size, 0:size] / size
    image = 0.5 + 0.35 * np.sin(6 * rows) * np.cos(5 * cols)
    return (image * 255).astype(np.uint8)


def test_all_thirteen_chest_xray_corruptions_at_five_severities_grow_with_severity() -> None:
    image = _xray()
    assert [c.name for c in CHEST_XRAY_CORRUPTIONS] == [
        "pixelate", "jpeg_compression", "gaussian_noise", "speckle_noise", "impulse_noise", "shot_noise",
        "gaussian_blur", "brightness_up", "brightness_down", "contrast_up", "contrast_down",
        "gamma_corr_up", "gamma_corr_down"]
    for corruption in CHEST_XRAY_CORRUPTIONS:
        changes = []
        for severity in range(1, SEVERITIES + 1):
            out = corruption.apply(image, severity, np.random.default_rng(7))
            assert out.dtype == np.uint8 and out.shape == image.shape, corruption.name
            changes.append(float(np.abs(out.astype(float) - image).mean()))
        assert changes[-1] > changes[0] > 0, (corruption.name, changes)


def test_definitions_match_the_libraries_medmnist_c_calls() -> None:
    image = _xray(48)
    rng = np.random.default_rng(0)
    # Brightness and contrast are Pillow's ImageEnhance, as in the package.
    by_name = {c.name: c for c in CHEST_XRAY_CORRUPTIONS}
    expected = np.asarray(ImageEnhance.Contrast(Image.fromarray(image)).enhance(0.4))
    np.testing.assert_array_equal(by_name["contrast_down"].apply(image, 5, rng), expected)
    # torchvision's adjust_gamma on PIL: (256 - 1e-3) * (x / 255) ** gamma, truncated.
    assert gamma_correction(np.array([[0, 64, 255]], np.uint8), 0.5, rng).tolist() == [[0, 128, 255]]
    # torchvision's gaussian_blur: sigma from the kernel size, reflect padding, rounded.
    k, sigma = 5, 0.3 * ((5 - 1) * 0.5 - 1) + 0.8
    weights = np.exp(-0.5 * ((np.arange(k) - 2) / sigma) ** 2)
    kernel = np.outer(weights, weights) / weights.sum() ** 2
    padded = np.pad(image.astype(float), 2, mode="reflect")
    direct = np.array([[(padded[r:r + k, c:c + k] * kernel).sum() for c in range(48)] for r in range(48)])
    np.testing.assert_array_equal(gaussian_blur(image, 5, rng), np.clip(np.round(direct), 0, 255).astype(np.uint8))
    # Salt and pepper replaces `amount` of the pixels with 0 or 255.
    big = np.full((200, 200), 128, np.uint8)
    noisy = impulse_noise(big, 0.02, rng)
    changed = noisy != 128
    assert changed.mean() == pytest.approx(0.02, abs=1e-4) and set(np.unique(noisy[changed])) == {0, 255}


def test_bad_severity_or_image_is_refused() -> None:
    with pytest.raises(ConfigError, match="severity"):
        CHEST_XRAY_CORRUPTIONS[0].apply(_xray(), 6, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="uint8"):
        CHEST_XRAY_CORRUPTIONS[0].apply(_xray().astype(np.float32), 1, np.random.default_rng(0))


def test_corrupted_sets_are_complete_seeded_and_at_the_corruption_size() -> None:
    images = [_xray(28).astype(np.float32) / 255, _xray(28)[::-1].astype(np.float32) / 255]
    first = list(corrupted_sets(images, size_px=56, seed=3))
    assert len(first) == len(CHEST_XRAY_CORRUPTIONS) * SEVERITIES
    assert all(len(batch) == 2 and batch[0].shape == (56, 56) for _, _, batch in first)
    again = list(corrupted_sets(images, size_px=56, seed=3))
    other = list(corrupted_sets(images, size_px=56, seed=4))
    noise = [i for i, (name, _, _) in enumerate(first) if name == "gaussian_noise"][0]
    np.testing.assert_array_equal(first[noise][2][0], again[noise][2][0])
    assert np.abs(first[noise][2][0] - other[noise][2][0]).max() > 0
    assert to_corruption_size(images[0], 56).dtype == np.uint8


@pytest.mark.skipif(not SHARED_NPZ.is_file(), reason="PneumoniaMNIST not in ../shared")
def test_evaluate_corruptions_cli_reports_each_corruption_and_the_mean(tmp_path) -> None:
    import subprocess
    import sys

    with np.load(SHARED_NPZ) as archive:
        pick = np.r_[0:30, -30:0]
        small = tmp_path / "small.npz"
        np.savez(small, train_images=archive["train_images"][:4], train_labels=archive["train_labels"][:4],
                 val_images=archive["val_images"][pick], val_labels=archive["val_labels"][pick])
    report_path = tmp_path / "r.json"
    # The twin is the shipped model without its input profile (as a model trained before profiles).
    import shutil

    from medhe.nn.io import resolve_model_dir

    twin_dir = tmp_path / "twin"
    shutil.copytree(resolve_model_dir("pneumoniamnist"), twin_dir)
    doc = json.loads((twin_dir / "model.json").read_text())
    del doc["preprocessing"]["input_profile"]
    (twin_dir / "model.json").write_text(json.dumps(doc))
    done = subprocess.run([sys.executable, "-m", "medhe.cli.main", "evaluate", "--model", "pneumoniamnist",
                           "--data-file", str(small), "--corruptions", "--compare", str(twin_dir),
                           "--corruption-size", "28", "--no-progress", "--report", str(report_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "gamma_corr_down" in done.stdout and "mean (corrupted)" in done.stdout
    report = json.loads(report_path.read_text())
    model, twin = report["models"]["model"], report["models"]["compare_1"]
    assert set(model["corruptions"]) == {c.name for c in CHEST_XRAY_CORRUPTIONS}
    assert all(len(entry["severities"]) == SEVERITIES for entry in model["corruptions"].values())
    # The same model on the same corrupted images scores the same.
    assert {k: v for k, v in model["mean"].items() if k != "flagged_fraction"} == twin["mean"]
    assert report["mean_balanced_error_reduction_vs_compare"]["compare_1"] == 0
    assert "flagged_fraction" not in twin["clean"] and "compare_1's input check" not in done.stdout
    # The corruptions change what the model says on some of the 60 images.
    levels = [level for entry in model["corruptions"].values() for level in entry["severities"]]
    assert any(level["accuracy"] != model["clean"]["accuracy"] for level in levels)
    assert all(0 <= level["balanced_error"] <= 1 for level in levels)
    # What the clinic's input check flags, per set: the fraction of those images it marks atypical.
    from medhe.data.input_check import flagged_fraction
    from medhe.nn.io import load_model, resolve_model_dir

    card = load_model(resolve_model_dir("pneumoniamnist"))[1]
    with np.load(small) as archive:
        clean_inputs = card.preprocessing.apply_batch(archive["val_images"])
    assert model["clean"]["flagged_fraction"] == flagged_fraction(card.preprocessing.input_profile, clean_inputs)
    assert model["mean"]["flagged_fraction"] == pytest.approx(
        np.mean([np.mean([lv["flagged_fraction"] for lv in e["severities"]]) for e in model["corruptions"].values()]))
    assert f"model's input check flags {model['clean']['flagged_fraction']:.1%} of the clean images" in done.stdout


def test_corruptions_refuse_the_training_split(tmp_path) -> None:
    from medhe.train.robustness import evaluate_corruptions

    with pytest.raises(ConfigError, match="held-out"):
        evaluate_corruptions("br35h", split="train", progress=False)
