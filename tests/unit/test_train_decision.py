"""Geometric augmentation, class-balanced loss and the decision threshold folded into the output
layer (unit tier: no HE)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medhe.errors import ConfigError
from medhe.nn.model import HECNN, ArchConfig
from medhe.train.loop import class_weights, geometric_augment_batch, predict_logits, softmax_positive
from medhe.train.metrics import binary_report
from medhe.train.thresholds import fold_decision_cut, youden_cut

SHARED = Path(__file__).parents[2].parent / "shared"
PNEUMONIAMNIST_NPZ = SHARED / "data" / "pneumoniamnist" / "pneumoniamnist.npz"


def _balanced_error(labels, scores, cut) -> float:
    report = binary_report(labels, (np.asarray(scores) >= cut).astype(float))
    return 1.0 - (report["sensitivity"] + report["specificity"]) / 2.0


def test_youden_cut_minimises_balanced_error_over_every_cut():
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(60, int), np.ones(140, int)]
    scores = np.r_[rng.normal(-1.0, 1.0, 60), rng.normal(1.2, 1.0, 140)]
    cut = youden_cut(labels, scores)
    candidates = np.linspace(scores.min() - 1, scores.max() + 1, 4001)
    best = min(_balanced_error(labels, scores, c) for c in candidates)
    assert _balanced_error(labels, scores, cut) == pytest.approx(best, abs=1e-12)
    assert not np.isin(cut, scores)  # midway between two scores, never on one


def test_youden_cut_on_a_hand_checked_example_and_ties_prefer_zero():
    labels = np.array([0, 0, 1, 1])
    assert youden_cut(labels, np.array([-3.0, -1.0, 2.0, 4.0])) == pytest.approx(0.5)  # midway -1 .. 2
    # Separable with a wide gap on both sides of 0: the cut nearest 0 among the optimal ones.
    assert youden_cut(labels, np.array([-5.0, -4.0, 4.0, 6.0]), prefer=0.0) == pytest.approx(0.0)
    with pytest.raises(ConfigError, match="both classes"):
        youden_cut(np.array([1, 1]), np.array([0.1, 0.2]))
    with pytest.raises(ConfigError, match="finite"):
        youden_cut(labels, np.array([0.0, np.nan, 1.0, 2.0]))


def test_folding_the_cut_makes_argmax_the_threshold_decision():
    torch.manual_seed(0)
    model = HECNN(ArchConfig()).eval()
    x = np.random.default_rng(1).normal(size=(64, 1, 28, 28)).astype(np.float32)
    before = predict_logits(model, x).astype(np.float64)
    difference = before[:, 1] - before[:, 0]
    cut = float(np.median(difference))  # half the images on each side
    fold_decision_cut(model, cut)
    after = predict_logits(model, x).astype(np.float64)
    np.testing.assert_allclose(after[:, 1] - after[:, 0], difference - cut, atol=1e-5)
    np.testing.assert_array_equal(after.argmax(1), (difference >= cut).astype(int))
    # Probability >= 0.5 exactly when the positive class is the decision.
    assert ((softmax_positive(after) >= 0.5) == (after.argmax(1) == 1)).all()


def test_geometric_augmentation_crops_and_rotates_within_the_image():
    rng = np.random.default_rng(0)
    images = rng.random((200, 1, 28, 28)).astype(np.float32) - 0.5
    out = geometric_augment_batch(images, np.random.default_rng(3))
    again = geometric_augment_batch(images, np.random.default_rng(3))
    np.testing.assert_array_equal(out, again)
    assert out.shape == images.shape and out.dtype == np.float32
    changed = np.abs(out - images).reshape(200, -1).max(axis=1) > 1e-4
    assert 0.35 < changed.mean() < 0.65  # applied with probability 1/2
    # Bilinear resampling and a background fill: no value outside the image's own range.
    flat_in, flat_out = images.reshape(200, -1), out.reshape(200, -1)
    assert (flat_out.min(axis=1) >= flat_in.min(axis=1) - 1e-6).all()
    assert (flat_out.max(axis=1) <= flat_in.max(axis=1) + 1e-6).all()


def test_geometric_augmentation_moves_a_marker_by_a_bounded_amount():
    images = np.zeros((400, 1, 28, 28), np.float32)
    images[:, :, 13:15, 13:15] = 1.0  # a blob at the centre
    out = geometric_augment_batch(images, np.random.default_rng(0))
    ys, xs = np.mgrid[0:28, 0:28]
    mass = out[:, 0].sum(axis=(1, 2))
    cy = (out[:, 0] * ys).sum(axis=(1, 2)) / mass
    cx = (out[:, 0] * xs).sum(axis=(1, 2)) / mass
    shift = np.hypot(cy - 13.5, cx - 13.5)
    # A crop of >= 80% area (side >= ~0.85) anywhere in the image moves the centre by at most
    # ~ (1 - 0.85) / 0.85 * 14 ~ 2.5 px, plus a little for the aspect ratio.
    assert shift.max() < 4.0 and shift.max() > 0.5


def test_training_projects_the_curvature_after_every_step(monkeypatch):
    import medhe.train.loop as loop

    calls = []
    original = loop.project_curvature
    monkeypatch.setattr(loop, "project_curvature", lambda model: (calls.append(1), original(model)))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 1, 28, 28)).astype(np.float32)
    y = np.r_[np.zeros(20, int), np.ones(20, int)]
    loop.train_model(ArchConfig(), x, y, x[:10], y[[0, 1, 2, 3, 4, 20, 21, 22, 23, 24]], epochs=2, batch_size=8,
                     lr=1e-3, patience=0, seed=0, augment=False, progress=False)
    assert len(calls) == 2 * 5  # 5 steps per epoch


def test_class_weights_make_each_class_count_equally():
    labels = np.array([0] * 25 + [1] * 75)
    weights = class_weights(labels, 2)
    np.testing.assert_allclose(weights, [2.0, 2.0 / 3.0])
    assert weights[0] * 25 == pytest.approx(weights[1] * 75)
    with pytest.raises(ConfigError, match="every class"):
        class_weights(np.ones(10, int), 2)


def test_train_cli_records_and_applies_the_threshold_rule(tmp_path, capsys, pneumoniamnist_npz):
    from medhe.cli.main import main
    from medhe.nn.io import load_model
    from tests.helpers import small_pneumoniamnist_npz

    small = small_pneumoniamnist_npz(pneumoniamnist_npz, tmp_path / "small.npz", 600, 150)
    out = tmp_path / "model"
    code = main(["train", "--dataset", "pneumoniamnist", "--data-file", str(small), "--out", str(out),
                 "--epochs", "2", "--class-balanced", "--geometric-augment", "--threshold-rule", "youden",
                 "--conv-channels", "4,4,4", "--hidden-units", "8", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    decision = metrics["decision"]
    assert decision["rule"] == "youden" and decision["chosen_on"] == "early-stopping split"
    assert metrics["training"]["class_balanced"] is True and metrics["training"]["geometric_augment"] is True
    assert metrics["history"]["class_weights"][0] > metrics["history"]["class_weights"][1]  # fewer normals
    for flag in ("--class-balanced", "--geometric-augment", "--threshold-rule youden", "--conv-channels 4,4,4"):
        assert flag in metrics["command"]
    model, card = load_model(out)
    assert card.arch.conv_channels == (4, 4, 4) and card.arch.hidden_units == 8
    assert card.metrics["decision"] == decision
    # The folded model's argmax is the (bootstrap-medianed) Youden cut on the stop split,
    # recomputed here from the unfolded logits: undo the fold and choose again.
    from medhe.train.thresholds import bootstrap_youden_cut

    from medhe.train.datasets import prepare_dataset

    data = prepare_dataset("pneumoniamnist", data_file=small)
    logits = predict_logits(model, data.stop_images).astype(np.float64)
    unfolded = logits[:, 1] - logits[:, 0] + decision["cut_logit"]
    assert bootstrap_youden_cut(data.stop_labels, unfolded) == pytest.approx(decision["cut_logit"], abs=1e-4)


def test_bootstrap_cut_is_seeded_and_steadier_than_one_sample():
    from medhe.train.thresholds import bootstrap_youden_cut

    single, bagged = [], []
    for seed in range(12):  # equal-variance classes at -1.5 and +1.5: the best cut is 0
        rng = np.random.default_rng(seed)
        labels = np.r_[np.zeros(60, int), np.ones(180, int)]
        scores = np.r_[rng.normal(-1.5, 1.0, 60), rng.normal(1.5, 1.0, 180)]
        single.append(youden_cut(labels, scores))
        bagged.append(bootstrap_youden_cut(labels, scores, resamples=60, seed=1))
        assert bagged[-1] == bootstrap_youden_cut(labels, scores, resamples=60, seed=1)
    assert np.mean(np.square(bagged)) < np.mean(np.square(single))


@pytest.mark.parametrize("name, split, floors", [
    ("pneumoniamnist", "val", {"accuracy": 0.96, "auc": 0.99}),   # issue 8's floors on held-out data
    ("br35h", "test", {"accuracy": 0.97}),
])
def test_shipped_models_meet_the_floors_on_held_out_data_and_match_their_cards(name, split, floors):
    from medhe.nn.io import load_model, resolve_model_dir
    from medhe.train.evaluate import evaluate_split

    data_file = None
    if name == "pneumoniamnist":
        if not PNEUMONIAMNIST_NPZ.is_file():
            pytest.skip(f"{SHARED} is absent")
        data_file = PNEUMONIAMNIST_NPZ
    report = evaluate_split(name, split, data_file)
    assert report["held_out"] is True
    _, card = load_model(resolve_model_dir(name))
    assert report["accuracy"] == pytest.approx(card.metrics["accuracy"], abs=1e-12)
    assert report["auc"] == pytest.approx(card.metrics["auc"], abs=1e-12)
    # At the 3 decimals the issue quotes: its PneumoniaMNIST reference "val 0.960" was 503/524 = 0.9599.
    for metric, floor in floors.items():
        assert round(report[metric], 3) >= floor, (metric, report[metric])
    # The decision threshold was chosen on the early-stopping split and is recorded on the card.
    assert card.metrics["decision"]["rule"] == "youden"
    assert card.metrics["decision"]["chosen_on"] == "early-stopping split"
