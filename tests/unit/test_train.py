"""Training, metrics, model round trip and the train/evaluate CLI (unit tier: no HE, < 1 min)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from medhe.cli.main import main
from medhe.data.preprocess import fit_preprocessing
from medhe.errors import UnsupportedLayerError
from medhe.nn.io import SUPPORTED_LAYERS, ModelCard, describe_layers, load_model, save_model
from medhe.nn.layers import PolyAct, relu_quadratic_fit
from medhe.nn.model import HECNN, ArchConfig
from medhe.train.datasets import stratified_holdout
from medhe.train.loop import augment_batch, predict_logits, softmax_positive, train_model
from medhe.train.metrics import binary_report, save_confusion_png, save_roc_png

SHARED = Path(__file__).parents[2].parent / "shared"
PNEUMONIAMNIST_NPZ = SHARED / "data" / "pneumoniamnist" / "pneumoniamnist.npz"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPORT_KEYS = {"n", "accuracy", "auc", "sensitivity", "specificity", "encrypted", "model_dir", "dataset"}


def _small_real_subset():
    """(name, train_gray01, train_labels, val_gray01, val_labels): PneumoniaMNIST, else Br35H."""
    if PNEUMONIAMNIST_NPZ.is_file():
        from medhe.data.medmnist import load_medmnist_npz

        x, y = load_medmnist_npz(PNEUMONIAMNIST_NPZ, "train")
        xv, yv = load_medmnist_npz(PNEUMONIAMNIST_NPZ, "val")
        return "pneumoniamnist", x[:800] / 255.0, y[:800], xv[:300] / 255.0, yv[:300]
    try:
        from medhe.data.br35h import load_br35h

        x, y = load_br35h("train", 32)
        xv, yv = load_br35h("val", 32)
    except Exception as exc:  # noqa: BLE001 - any missing data set means: nothing to train on
        pytest.skip(f"no training data: {SHARED} is absent and Br35H is unavailable ({exc})")
    rng = np.random.default_rng(0)
    keep = rng.choice(y.size, 800, replace=False)
    return "br35h", x[keep], y[keep], xv, yv


@pytest.fixture(scope="module")
def trained():
    """A short real training run shared by the tests below (about 2 s on 2 cores)."""
    name, x, y, xv, yv = _small_real_subset()
    size = x.shape[-1]
    pre = fit_preprocessing(np.asarray(x, dtype=np.float32), size)
    train_x, val_x = pre.apply_batch(np.asarray(x, np.float32)), pre.apply_batch(np.asarray(xv, np.float32))
    arch = ArchConfig(image_size=size)
    model, history = train_model(arch, train_x, y, val_x, yv, epochs=4, batch_size=64, lr=3e-3,
                                 patience=0, seed=0, augment=False, progress=False)
    return {"name": name, "arch": arch, "pre": pre, "model": model, "history": history,
            "train": (train_x, y), "val": (val_x, yv)}


# ----------------------------------------------------------------------------- training


def test_short_training_loss_falls_and_beats_chance(trained):
    history = trained["history"]
    losses = [epoch["train_loss"] for epoch in history["epochs"]]
    assert losses[-1] < losses[0], losses
    val_x, val_y = trained["val"]
    report = binary_report(val_y, softmax_positive(predict_logits(trained["model"], val_x)))
    majority = max(val_y.mean(), 1 - val_y.mean())  # "chance" = always predicting the larger class
    assert report["accuracy"] > majority + 0.03, (report, majority)
    assert report["auc"] > 0.85, report
    assert history["seed"] == 0 and 1 <= history["best_epoch"] <= history["epochs_run"] == 4


def test_training_is_deterministic_for_a_seed(trained):
    train_x, train_y = trained["train"]
    val_x, val_y = trained["val"]
    kwargs = dict(epochs=1, batch_size=64, lr=3e-3, patience=0, seed=7, augment=True, progress=False)
    first, _ = train_model(trained["arch"], train_x[:256], train_y[:256], val_x, val_y, **kwargs)
    second, _ = train_model(trained["arch"], train_x[:256], train_y[:256], val_x, val_y, **kwargs)
    for (key, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), key


def test_augment_batch_flips_and_shifts_without_new_values():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(16, 1, 8, 8)).astype(np.float32)
    out = augment_batch(images, np.random.default_rng(1), max_shift=2, vertical_flip=True)
    assert out.shape == images.shape and out.dtype == np.float32
    assert not np.array_equal(out, images)
    for original, augmented in zip(images, out):  # only moved pixels and the image's own minimum
        assert np.isin(augmented, original).all()


def test_shift_augmentation_changes_intensity_within_real_pixel_values():
    from medhe.train.loop import shift_augment_batch

    mean, std = 0.45, 0.2
    pixels = np.random.default_rng(0).random((64, 1, 12, 12))
    images = ((pixels - mean) / std).astype(np.float32)
    out = shift_augment_batch(images, np.random.default_rng(1), mean, std)
    again = shift_augment_batch(images, np.random.default_rng(1), mean, std)
    assert out.shape == images.shape and out.dtype == np.float32
    np.testing.assert_array_equal(out, again)
    back = out.astype(np.float64) * std + mean
    assert back.min() >= -1e-6 and back.max() <= 1 + 1e-6  # still [0, 1] pixels once un-normalised
    changed = np.abs(out - images).reshape(64, -1).max(axis=1) > 1e-3
    assert 0.8 < changed.mean() < 1.0  # each of 5 shifts with probability 1/2: 1/32 left as they were
    # Brightness, contrast and gamma move the per-image means both ways.
    delta = back.reshape(64, -1).mean(axis=1) - pixels.reshape(64, -1).mean(axis=1)
    assert delta.min() < -0.05 and delta.max() > 0.05


def test_shift_augmentation_of_per_image_inputs_returns_standardised_images():
    """per_image inputs carry no pixel scale: the shifts act on each image stretched to [0, 1], and
    each image comes back with mean 0 and std 1, as the client would standardise it."""
    from medhe.data.preprocess import standardize_per_image
    from medhe.train.loop import shift_augment_batch

    pixels = np.random.default_rng(0).random((64, 1, 12, 12))
    images = standardize_per_image(pixels)
    out = shift_augment_batch(images, np.random.default_rng(1), per_image=True)  # no pixel mean / std needed
    assert out.shape == images.shape and out.dtype == np.float32
    np.testing.assert_allclose(out.mean(axis=(1, 2, 3)), 0.0, atol=1e-5)
    np.testing.assert_allclose(out.std(axis=(1, 2, 3)), 1.0, atol=1e-4)
    changed = np.abs(out - images).reshape(64, -1).max(axis=1) > 1e-3
    assert 0.6 < changed.mean() < 1.0  # a linear shift alone (brightness down, contrast down) is undone
    # Each image is stretched by its own range, whatever scale it came at: the same draws on the
    # pixels and on a dimmer, offset copy give the same augmented input.
    from_pixels = shift_augment_batch(pixels, np.random.default_rng(1), per_image=True)
    from_dimmer = shift_augment_batch(0.1 + 0.5 * pixels, np.random.default_rng(1), per_image=True)
    np.testing.assert_allclose(from_dimmer, from_pixels, atol=1e-4)
    np.testing.assert_allclose(from_pixels, out, atol=1e-4)


def test_per_image_training_feeds_the_network_standardised_batches(trained, monkeypatch):
    """With per_image, every augmented batch reaches the network with mean 0 and std 1 per image
    (flips and shifts fill with the image's minimum, which moves both), as the client's inputs do.
    Shift augmentation of per-image inputs needs no training pixel mean / std."""
    from medhe.data.preprocess import standardize_per_image

    seen = []
    original_forward = HECNN.forward

    def recording_forward(self, x):
        if self.training:
            seen.append(x.detach().numpy().copy())
        return original_forward(self, x)

    monkeypatch.setattr(HECNN, "forward", recording_forward)
    train_x, train_y = trained["train"]
    inputs = standardize_per_image(train_x[:128])
    train_model(trained["arch"], inputs, train_y[:128], inputs[:32], train_y[:32], epochs=1, batch_size=64,
                lr=1e-3, patience=0, seed=0, augment=True, max_shift=3, progress=False, per_image=True,
                shift_augment=True)
    assert len(seen) == 2
    for batch in seen:
        np.testing.assert_allclose(batch.mean(axis=(1, 2, 3)), 0.0, atol=1e-5)
        np.testing.assert_allclose(batch.std(axis=(1, 2, 3)), 1.0, atol=1e-4)


def test_shift_augmentation_needs_the_normalisation(trained):
    from medhe.errors import ConfigError

    x = np.zeros((4, 1, trained["arch"].image_size, trained["arch"].image_size), np.float32)
    with pytest.raises(ConfigError, match="pixel_mean_std"):
        train_model(trained["arch"], x, np.array([0, 1, 0, 1]), x, np.array([0, 1, 0, 1]), epochs=1, batch_size=4,
                    lr=1e-3, patience=0, seed=0, augment=False, progress=False, shift_augment=True)
    from medhe.train.loop import shift_augment_batch

    with pytest.raises(ConfigError, match="pixel mean and std"):
        shift_augment_batch(x, np.random.default_rng(0))


def test_ema_returns_the_moving_average_of_the_steps_weights(trained, monkeypatch):
    """--ema-decay: the model returned is d-weighted average of the weights after each step (and of
    the batch-norm statistics), computed here by hand from the same seeded run's raw trajectory."""
    from medhe.errors import ConfigError
    from medhe.nn.layers import PolyAct
    from medhe.train import loop
    from medhe.train.run import TrainOptions

    train_x, train_y = trained["train"]
    val_x, val_y = trained["val"]
    steps: list[dict] = []
    original_project = loop.project_curvature

    def recording_project(model):  # runs right after every optimizer step
        original_project(model)
        steps.append({key: value.detach().clone() for key, value in model.state_dict().items()})

    monkeypatch.setattr(loop, "project_curvature", recording_project)
    decay = 0.8
    kwargs = dict(epochs=1, batch_size=64, lr=3e-3, patience=0, seed=3, augment=True, progress=False)
    averaged, history = train_model(trained["arch"], train_x[:320], train_y[:320], val_x, val_y,
                                    ema_decay=decay, **kwargs)
    assert len(steps) == 5 and history["ema_decay"] == decay
    expected = {key: value.double() for key, value in steps[0].items()}
    for state in steps[1:]:
        expected = {key: decay * expected[key] + (1 - decay) * value.double() for key, value in state.items()}
    got = averaged.state_dict()
    for key, value in expected.items():
        if "num_batches_tracked" not in key:
            torch.testing.assert_close(got[key].double(), value, rtol=1e-5, atol=1e-6, msg=key)
    raw, raw_history = train_model(trained["arch"], train_x[:320], train_y[:320], val_x, val_y, **kwargs)
    # Averaging leaves the raw trajectory alone: the run without EMA takes the same five steps, and
    # ends at the weights the EMA run averaged last.
    assert len(steps) == 10
    for ema_step, raw_step in zip(steps[:5], steps[5:]):
        for key, value in ema_step.items():
            assert torch.equal(value, raw_step[key]), key
    for key, value in raw.state_dict().items():
        assert torch.equal(value, steps[4][key]) or "num_batches_tracked" in key, key
    assert raw_history["ema_decay"] == 0.0
    assert not torch.allclose(got["layers.0.weight"], raw.state_dict()["layers.0.weight"])
    # Early stopping scored the average: its recorded stop loss is the returned model's.
    assert history["epochs"][0]["stop_loss"] == pytest.approx(loop._evaluate(averaged, val_x, val_y)["loss"])
    for module in averaged.modules():  # the average stays above the compiler's curvature floor
        if isinstance(module, PolyAct):
            a, b = (float(value) for value in module.coef.detach()[:2])
            assert a >= max(PolyAct.MIN_CURVATURE, abs(b) / (2 * PolyAct.MAX_SQUARE_SHIFT)) - 1e-7
    for bad in (1.0, -0.1):
        with pytest.raises(ConfigError, match="ema_decay"):
            train_model(trained["arch"], train_x[:64], train_y[:64], val_x, val_y, ema_decay=bad, **kwargs)
    options = TrainOptions(dataset="br35h", out=Path("m"), ema_decay=0.995)
    assert "--ema-decay 0.995" in options.as_command() and options.settings()["ema_decay"] == 0.995
    assert TrainOptions(dataset="br35h", out=Path("m")).settings()["ema_decay"] == 0.0


def test_mixup_and_label_smoothing_change_the_training_batches_and_loss_only(trained, monkeypatch):
    """--mixup: the batch the network trains on is lam * x + (1 - lam) * x[partner] with lam and partner
    drawn from the run's seeded stream, and the loss mixes the two labels' losses by lam;
    --label-smoothing: the loss is the smoothed cross-entropy. Replayed by hand for one step."""
    from medhe.errors import ConfigError
    from medhe.train import loop
    from medhe.train.run import TrainOptions

    train_x, train_y = trained["train"]
    val_x, val_y = trained["val"]
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    class RecordingCNN(loop.HECNN):
        def forward(self, x):
            logits = super().forward(x)
            if self.training:
                seen.append((x.detach().clone(), logits.detach().clone()))
            return logits

    monkeypatch.setattr(loop, "HECNN", RecordingCNN)
    batch = 64  # one batch, one step
    kwargs = dict(epochs=1, batch_size=batch, lr=3e-3, patience=0, seed=5, augment=False, progress=False)
    x, y = train_x[:batch], train_y[:batch]
    rng = np.random.default_rng(5)
    order = rng.permutation(batch)
    lam = float(rng.beta(0.2, 0.2))
    partner = rng.permutation(batch)
    labels = torch.from_numpy(y[order])

    _, history = train_model(trained["arch"], x, y, val_x, val_y, mixup_alpha=0.2, **kwargs)
    inputs, logits = seen[-1]
    np.testing.assert_allclose(inputs.numpy(), lam * x[order] + (1 - lam) * x[order][partner], rtol=1e-6, atol=1e-6)
    expected = (lam * nn.functional.cross_entropy(logits, labels)
                + (1 - lam) * nn.functional.cross_entropy(logits, labels[torch.from_numpy(partner)]))
    assert history["epochs"][0]["train_loss"] == pytest.approx(float(expected), rel=1e-5)
    assert history["mixup_alpha"] == 0.2 and 0.0 < lam < 1.0

    _, history = train_model(trained["arch"], x, y, val_x, val_y, label_smoothing=0.1, **kwargs)
    inputs, logits = seen[-1]
    assert torch.equal(inputs, torch.from_numpy(x[order]))  # off: no draw, the batch is unmixed
    smoothed = nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)
    assert history["epochs"][0]["train_loss"] == pytest.approx(float(smoothed), rel=1e-5)
    assert float(smoothed) != pytest.approx(float(nn.functional.cross_entropy(logits, labels)), rel=1e-3)
    assert history["label_smoothing"] == 0.1 and history["mixup_alpha"] == 0.0

    for bad in ({"mixup_alpha": -0.1}, {"mixup_alpha": float("nan")}, {"label_smoothing": 1.0},
                {"label_smoothing": -0.1}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            train_model(trained["arch"], x, y, val_x, val_y, **bad, **kwargs)
    options = TrainOptions(dataset="pneumoniamnist", out=Path("m"), mixup_alpha=0.2, label_smoothing=0.1)
    assert "--mixup 0.2 --label-smoothing 0.1" in options.as_command()
    assert options.settings()["mixup_alpha"] == 0.2 and options.settings()["label_smoothing"] == 0.1
    defaults = TrainOptions(dataset="br35h", out=Path("m")).settings()
    assert defaults["mixup_alpha"] == 0.0 and defaults["label_smoothing"] == 0.0


def test_train_model_rejects_unpreprocessed_images(trained):
    from medhe.errors import ConfigError

    raw = np.zeros((10, trained["arch"].image_size, trained["arch"].image_size), np.float32)
    with pytest.raises(ConfigError, match="apply_batch"):
        train_model(trained["arch"], raw, np.zeros(10), raw, np.zeros(10), epochs=1, batch_size=4,
                    lr=1e-3, patience=0, seed=0, augment=False, progress=False)


def test_stratified_holdout_is_disjoint_seeded_and_stratified():
    labels = np.array([0] * 100 + [1] * 300)
    keep, holdout = stratified_holdout(labels, 0.1, seed=0)
    assert np.intersect1d(keep, holdout).size == 0 and keep.size + holdout.size == labels.size
    assert (labels[holdout] == 0).sum() == 10 and (labels[holdout] == 1).sum() == 30
    assert np.array_equal(holdout, stratified_holdout(labels, 0.1, seed=0)[1])
    assert not np.array_equal(holdout, stratified_holdout(labels, 0.1, seed=1)[1])


# --------------------------------------------------------------------- model directory


def test_save_load_round_trip_gives_identical_logits(trained, tmp_path):
    model = trained["model"]
    card = ModelCard(arch=trained["arch"], preprocessing=trained["pre"], class_names=["a", "b"],
                     dataset={"name": trained["name"]}, metrics={"accuracy": 0.5})
    save_model(tmp_path / "m", model, card)
    loaded, loaded_card = load_model(tmp_path / "m")
    x = torch.from_numpy(trained["val"][0][:32])
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded(x))
    assert loaded_card.preprocessing == trained["pre"]
    assert loaded_card.arch == trained["arch"] and loaded_card.metrics == {"accuracy": 0.5}


def test_unsupported_layer_error_lists_supported_layers(tmp_path):
    model = HECNN(ArchConfig(image_size=16))
    model.layers[1] = nn.MaxPool2d(2)
    with pytest.raises(UnsupportedLayerError) as info:
        describe_layers(model.layers)
    message = str(info.value)
    assert "MaxPool2d" in message
    for name in SUPPORTED_LAYERS:
        assert name in message
    card = ModelCard(arch=model.arch, preprocessing=fit_preprocessing(np.random.rand(2, 16, 16), 16),
                     class_names=["a", "b"])
    with pytest.raises(UnsupportedLayerError, match="supported layers"):
        save_model(tmp_path / "bad", model, card)


def test_describe_lists_every_layer_of_the_default_network():
    kinds = [layer["type"] for layer in describe_layers(HECNN(ArchConfig(image_size=28)).layers)]
    assert kinds == ["conv2d", "avgpool2d", "batchnorm", "poly"] * 2 + [
        "flatten", "linear", "batchnorm", "poly", "linear"]


def test_architecture_options_pool_sizes_and_no_hidden_layer(tmp_path):
    from medhe.errors import ConfigError
    from medhe.train.run import TrainOptions

    arch = ArchConfig(image_size=28, conv_channels=(8, 8), pool_sizes=(2, 4), hidden_units=0)
    assert arch.feature_size() == 3
    kinds = [layer["type"] for layer in describe_layers(HECNN(arch).layers)]
    assert kinds == ["conv2d", "avgpool2d", "batchnorm", "poly"] * 2 + ["flatten", "linear"]
    assert HECNN(arch)(torch.zeros(2, 1, 28, 28)).shape == (2, 2)
    assert ArchConfig.from_dict(arch.to_dict()) == arch
    # Cards written before pool sizes existed (no key) read as 2 per block.
    assert "pool_sizes" not in ArchConfig().to_dict() and ArchConfig().block_pools() == (2, 2)
    for bad in ({"pool_sizes": (2,)}, {"pool_sizes": (2, 0)}, {"hidden_units": -1}):
        with pytest.raises(ConfigError):
            ArchConfig(**bad)
    options = TrainOptions(dataset="br35h", out=tmp_path, pool_sizes=(2, 4), hidden_units=0)
    assert "--pool-sizes 2,4 --hidden-units 0" in options.as_command()
    assert options.arch(32, "poly").pool_sizes == (2, 4)


def test_polyact_starts_at_the_relu_fit():
    fit = relu_quadratic_fit()
    as_float32 = torch.tensor(fit, dtype=torch.float32)
    assert torch.equal(PolyAct().coef.detach(), as_float32)
    polys = [m for m in HECNN(ArchConfig(image_size=28)).modules() if isinstance(m, PolyAct)]
    assert len(polys) == 3
    for poly in polys:
        assert torch.equal(poly.coef.detach(), as_float32)
    # Least squares under N(0, 1) in closed form: ReLU(x) = x/2 + |x|/2 and the projection of |x|
    # on {1, x^2} is sqrt(2/pi)/2 * (x^2 + 1), so a = c = 1 / (2 sqrt(2 pi)) ~ 0.1995, b = 1/2.
    # Gauss-Hermite quadrature of the kink at 0 is not exact, hence the 5e-3 tolerance.
    closed_form = (1 / (2 * math.sqrt(2 * math.pi)), 0.5, 1 / (2 * math.sqrt(2 * math.pi)))
    assert fit == pytest.approx(closed_form, abs=5e-3)


# ------------------------------------------------------------------------------ metrics


def test_binary_report_on_a_hand_checked_example():
    labels = [0, 0, 0, 1, 1]
    prob = [0.1, 0.6, 0.2, 0.4, 0.5]  # 0.5 is at the threshold, so predicted positive
    report = binary_report(labels, prob)
    # pred = [0, 1, 0, 0, 1] -> TN 2, FP 1, FN 1, TP 1
    assert report["confusion_matrix"] == [[2, 1], [1, 1]]
    assert report["n"] == 5 and report["accuracy"] == pytest.approx(3 / 5)
    assert report["sensitivity"] == pytest.approx(1 / 2)
    assert report["specificity"] == pytest.approx(2 / 3)
    # AUC = share of (positive, negative) pairs ranked correctly: 0.4 and 0.5 each beat 0.1 and
    # 0.2 but not 0.6, so 4 of 6 pairs.
    assert report["auc"] == pytest.approx(4 / 6)
    # ECE, 15 bins of the predicted class's confidence [0.9, 0.6, 0.8, 0.6, 0.5], correct [1, 0, 1, 0, 1]:
    # 0.2 * |1 - 0.9| + 0.4 * |0 - 0.6| + 0.2 * |1 - 0.8| + 0.2 * |1 - 0.5| = 0.40
    assert report["ece"] == pytest.approx(0.40)
    assert binary_report([0, 1], [0.0, 1.0])["ece"] == 0.0


def test_binary_report_single_class_has_no_auc():
    report = binary_report([1, 1], [0.9, 0.2])
    assert report["auc"] is None and report["specificity"] is None and report["sensitivity"] == 0.5


def test_plots_are_pngs(tmp_path):
    labels = np.array([0, 0, 1, 1, 1])
    prob = np.array([0.2, 0.7, 0.6, 0.9, 0.3])
    save_roc_png(tmp_path / "roc.png", labels, prob)
    save_confusion_png(tmp_path / "cm.png", labels, (prob >= 0.5).astype(int), ["neg", "pos"])
    for name in ("roc.png", "cm.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC


# ---------------------------------------------------------------------------------- CLI


def test_cli_version(capsys):
    assert main(["--version"]) == 0
    assert "medhe 0.1.0" in capsys.readouterr().out


def test_cli_error_is_a_message_and_exit_code_2(tmp_path, capsys):
    code = main(["evaluate", "--model", str(tmp_path / "missing"), "--split", "test"])
    err = capsys.readouterr().err
    assert code == 2
    assert "error" in err and "model.json" in err and "Traceback" not in err


@pytest.mark.parametrize("size,channels,fits", [
    (64, "8,8", False),  # 8 maps of 4096 pixels: 32768 slots, N=32768 has 16384
    (64, "4,8", False),  # pooling keeps a map's 4096-slot block, so the second block counts too
    (64, "4,4", True),
    (40, "8,8", True),   # 1600 pixels take a 2048-slot block: 8 x 2048 = 16384
])
def test_train_refuses_a_network_one_ciphertext_cannot_hold_before_loading_data(tmp_path, capsys, size,
                                                                                  channels, fits):
    missing = tmp_path / "missing.npz"  # the slot check comes first, so a fitting network fails on this
    code = main(["train", "--dataset", "pneumoniamnist", "--data-file", str(missing), "--out", str(tmp_path / "m"),
                 "--image-size", str(size), "--conv-channels", channels])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    if fits:
        assert "slots" not in err and "missing.npz" in err
    else:
        assert f"of {size}x{size} need 32768 slots" in err and "at most 4 channels per conv block" in err, err
        assert not (tmp_path / "m").exists()


def test_cli_evaluate_shipped_pneumoniamnist_writes_report(tmp_path, capsys):
    if not PNEUMONIAMNIST_NPZ.is_file():
        pytest.skip(f"{SHARED} is absent")
    out = tmp_path / "report.json"
    code = main(["evaluate", "--model", "pneumoniamnist", "--data-file", str(PNEUMONIAMNIST_NPZ),
                 "--split", "val", "--report", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert REPORT_KEYS <= set(report)
    assert report["encrypted"] is False and report["n"] == 524 and report["held_out"] is True
    assert report["dataset"]["split"] == "val"
    assert 0.0 <= report["accuracy"] <= 1.0 and "accuracy" in capsys.readouterr().out


def test_cli_train_writes_a_model_directory(tmp_path, capsys, pneumoniamnist_npz):
    from tests.helpers import small_pneumoniamnist_npz

    small = small_pneumoniamnist_npz(pneumoniamnist_npz, tmp_path / "small.npz", 400, 100)
    out = tmp_path / "model"
    code = main(["train", "--dataset", "pneumoniamnist", "--data-file", str(small), "--out", str(out),
                 "--epochs", "2", "--relu-twin", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    for name in ("model.json", "weights.safetensors", "metrics.json", "roc.png", "confusion.png"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 100 and metrics["report_split"] == "val"
    assert "accuracy_gap_relu_minus_poly_points" in metrics and "accuracy" in metrics["relu_twin"]
    _, card = load_model(out)
    assert card.dataset["n"] == {"train": 360, "stop": 40, "report": 100}
    assert len(card.dataset["data_file_sha256"]) == 64
    assert card.metrics["split"] == "val" and "train_seconds" in card.metrics
    # The input profile: fitted on the 360 training images, its threshold on the 40 stop images;
    # `medhe fit-input-profile` on the same data recomputes it exactly.
    profile = card.preprocessing.input_profile
    assert (profile.n_fit, profile.n_threshold) == (360, 40)
    from medhe.data.input_check import flagged_fraction
    from medhe.data.medmnist import load_medmnist_npz

    val_images, _ = load_medmnist_npz(small, "val")
    assert metrics["input_profile"]["report_flagged_fraction"] == round(
        flagged_fraction(profile, card.preprocessing.apply_batch(val_images)), 4)
    assert main(["fit-input-profile", "--model", str(out), "--data-file", str(small)]) == 0
    refitted = load_model(out)[1].preprocessing.input_profile
    assert refitted.threshold == profile.threshold
    np.testing.assert_array_equal(refitted.mean, profile.mean)
    # Another data file than the one the card names is refused.
    capsys.readouterr()
    assert main(["fit-input-profile", "--model", str(out), "--data-file", str(pneumoniamnist_npz)]) == 2
    assert "this one's sha256 is" in capsys.readouterr().err  # refused by the file's hash, before its pixels


def _cpu_capability_in_fresh_python(code: str, **env_changes: str | None) -> str:
    import os
    import subprocess
    import sys

    env = {key: value for key, value in os.environ.items() if key not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")}
    env.update({key: value for key, value in env_changes.items() if value is not None})
    done = subprocess.run([sys.executable, "-c", code + "\nimport torch; print(torch.backends.cpu.get_cpu_capability())"],
                          env=env, capture_output=True, text=True, timeout=120, check=True)
    return done.stdout.split()[-1]


def test_the_medhe_command_pins_torch_to_avx2_kernels_before_importing_torch():
    """Training bits depend on the kernels' vector width (an AVX-512 run drifts from the shipped AVX2
    weights); pin_cpu_kernels holds ATen to AVX2 when it still can, and leaves a caller's choice alone."""
    import platform
    import sys

    from medhe.train.cpu_kernels import _cpu_has_avx2, pin_cpu_kernels

    if platform.machine().lower() not in ("x86_64", "amd64") or not _cpu_has_avx2():
        pytest.skip("pinning applies to x86-64 CPUs with AVX2 only")
    pin = "from medhe.train.cpu_kernels import pin_cpu_kernels\nassert pin_cpu_kernels()"
    assert _cpu_capability_in_fresh_python(pin) == "AVX2"
    assert _cpu_capability_in_fresh_python(pin.replace("assert ", ""), ATEN_CPU_CAPABILITY="default") == "DEFAULT"
    # The command line pins before building its parser (which imports torch through the train command).
    command = ("import contextlib, io; from medhe.cli.main import main\n"
               "with contextlib.redirect_stdout(io.StringIO()): main(['train', '--help'])")
    assert _cpu_capability_in_fresh_python(command) == "AVX2"
    assert "torch" in sys.modules and pin_cpu_kernels() is False  # too late in this process: says so
