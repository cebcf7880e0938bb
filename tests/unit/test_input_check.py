"""The clinic's input check (medhe.data.input_check): inputs unlike the training images are flagged,
inputs like them are not, and the profile travels in the model card and the public client spec."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from medhe.data.input_check import FEATURE_NAMES, InputProfile, fit_input_profile, flagged_fraction, input_features
from medhe.data.preprocess import Preprocessing
from medhe.errors import DataError, PlanError


def _heads(n: int, rng: np.random.Generator, size: int = 28) -> np.ndarray:
    """Model inputs (n, 1, S, S): a bright upright ellipse on a dark background, jittered in place,
    size, brightness and noise: a stand-in for one kind of scan."""
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
    out = np.empty((n, 1, size, size))
    for i in range(n):
        cy, cx = rng.normal(0, 0.03, 2)
        ry, rx = rng.uniform(0.3, 0.4), rng.uniform(0.18, 0.25)
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
        image = 0.05 + inside * rng.uniform(0.5, 0.8) * (1 - 0.5 * (xx - cx) ** 2 / rx ** 2)
        out[i, 0] = np.clip(image + rng.normal(0, 0.03, (size, size)), 0, 1)
    return out


@pytest.fixture(scope="module")
def heads():
    rng = np.random.default_rng(0)
    fit, threshold, held_out = _heads(800, rng), _heads(300, rng), _heads(300, rng)
    return fit_input_profile(fit, threshold), held_out


def _flagged(profile: InputProfile, inputs) -> float:
    return flagged_fraction(profile, inputs)


def test_images_like_the_training_ones_pass_and_inverted_or_turned_ones_are_flagged(heads):
    profile, held_out = heads
    assert profile.quantile == 0.99 and profile.n_fit == 800 and profile.n_threshold == 300
    assert _flagged(profile, held_out) <= 0.05  # about 1 in 100 by construction; 300 images vary
    assert _flagged(profile, 1.0 - held_out) >= 0.95  # intensities inverted
    assert _flagged(profile, np.swapaxes(held_out, 2, 3)) >= 0.95  # turned by 90 degrees
    check = profile.check(held_out[:1])[0]
    assert set(check) == {"distance", "threshold", "typical", "uniform"}
    assert check["typical"] == (check["distance"] <= check["threshold"])


def test_the_profile_round_trips_through_json_and_scores_alike(heads):
    profile, held_out = heads
    again = InputProfile.from_dict(json.loads(json.dumps(profile.to_dict())))
    np.testing.assert_array_equal(again.distances(held_out), profile.distances(held_out))
    assert again.threshold == profile.threshold


@pytest.mark.parametrize("change, message", [
    ({"format_version": 2}, "expected medhe-input-profile version 1"),
    ({"format": "something-else"}, "expected medhe-input-profile"),
    ({"feature_names": list(FEATURE_NAMES[:-1]) + ["renamed"]}, "refit it with `medhe fit-input-profile`"),
    ({"mean": [0.0] * (len(FEATURE_NAMES) - 1)}, "mean: expected finite numbers shaped"),
    ({"mean": [float("nan")] * len(FEATURE_NAMES)}, "mean: expected finite numbers"),
    ({"precision": [[1.0]]}, "precision: expected finite numbers shaped"),
    ({"precision": [[0.0] * len(FEATURE_NAMES)] * len(FEATURE_NAMES)}, "positive definite"),
    ({"scale": [0.0] * len(FEATURE_NAMES)}, "scale must be > 0"),
    ({"threshold": -1.0}, "threshold must be a finite number > 0"),
    ({"threshold": True}, "threshold must be a finite number > 0"),
    ({"threshold": "large"}, "threshold must be a finite number > 0"),
    ({"quantile": 1.5}, r"quantile must lie in \[0.5, 1\)"),
    ({"n_fit": float("inf")}, "n_fit must be a count"),
    ({"n_threshold": "many"}, "n_threshold must be a count"),
], ids=lambda value: next(iter(value)) if isinstance(value, dict) else None)
def test_a_malformed_profile_is_refused_naming_what_is_wrong(heads, change, message):
    doc = {**heads[0].to_dict(), **change}
    with pytest.raises(DataError, match=message):
        InputProfile.from_dict(doc)


def test_an_empty_profile_in_a_recipe_is_refused_not_ignored():
    with pytest.raises(DataError, match="must be a JSON object|expected medhe-input-profile"):
        Preprocessing.from_dict({"image_size": 28, "mean": 0.2, "std": 0.2, "input_profile": {}})


def test_a_client_spec_with_a_bad_profile_is_refused_when_loaded(heads):
    """A spec whose profile is malformed (its digest recomputed to match) is refused by
    ClientSpec.from_dict, before a clinic pins it or makes keys."""
    from medhe.compiler import compile_model
    from medhe.nn.io import resolve_model_dir
    from medhe.plan.client_spec import ClientSpec

    spec = compile_model(resolve_model_dir("br35h")).client_spec()
    doc = json.loads(json.dumps(spec.to_dict()))
    doc["preprocessing"]["input_profile"]["precision"] = [[0.0] * len(FEATURE_NAMES)] * len(FEATURE_NAMES)
    tampered = ClientSpec(**{**spec.__dict__, "preprocessing": doc["preprocessing"]})
    with pytest.raises(PlanError, match="preprocessing: input profile precision"):
        ClientSpec.from_dict(tampered.card())
    assert InputProfile.from_dict(heads[0].to_dict()) == heads[0]


def test_features_refuse_nan_and_wrong_shapes():
    with pytest.raises(DataError, match="NaN"):
        input_features(np.full((2, 1, 28, 28), np.nan))
    with pytest.raises(DataError, match=r"\(n, 1, S, S\)"):
        input_features(np.zeros((2, 1, 28, 30)))
    with pytest.raises(DataError, match="more than"):
        fit_input_profile(np.zeros((5, 1, 28, 28)), np.zeros((5, 1, 28, 28)))


def test_the_recipe_carries_the_profile_and_older_recipes_are_unchanged(heads):
    profile, held_out = heads
    plain = Preprocessing(image_size=28, mean=0.2, std=0.2)
    assert "input_profile" not in plain.to_dict()  # older cards and their digests stay as they were
    assert plain.check_input(held_out[0]) is None
    with_profile = plain.with_input_profile(profile)
    doc = json.loads(json.dumps(with_profile.to_dict()))
    again = Preprocessing.from_dict(doc)
    assert again.input_profile is not None and again.check_input(held_out[0]) == profile.check(held_out[:1])[0]
    with pytest.raises(DataError, match="InputProfile"):
        Preprocessing(image_size=28, mean=0.2, std=0.2, input_profile=doc["input_profile"])


# --- the shipped models ----------------------------------------------------------------------------
def _br35h_test_scans(step: int = 1):
    from medhe.data.br35h import br35h_split_files
    from medhe.data.images import load_image

    return [load_image(path) for path, _ in br35h_split_files("test")[::step]]


def _card(name: str):
    from medhe.nn.io import load_model, resolve_model_dir

    return load_model(resolve_model_dir(name))[1]


def test_the_shipped_models_pass_their_held_out_scans_and_flag_the_other_modality():
    br35h, pneumonia = _card("br35h").preprocessing, _card("pneumoniamnist").preprocessing
    assert br35h.input_profile is not None and pneumonia.input_profile is not None
    scans = _br35h_test_scans()
    assert _flagged(br35h.input_profile, br35h.apply_batch(scans)) <= 0.03
    assert _flagged(br35h.input_profile, br35h.apply_batch([1.0 - scan for scan in scans[::4]])) >= 0.95
    # A brain MRI sent to the chest X-ray model.
    assert _flagged(pneumonia.input_profile, pneumonia.apply_batch(scans[::2])) >= 0.9


def test_pneumoniamnist_val_passes_and_chest_films_sent_to_the_brain_model_are_flagged(pneumoniamnist_npz):
    from medhe.data.medmnist import load_medmnist_npz

    images, _ = load_medmnist_npz(pneumoniamnist_npz, "val")
    gray = images.astype(np.float32) / 255
    pneumonia, br35h = _card("pneumoniamnist").preprocessing, _card("br35h").preprocessing
    assert _flagged(pneumonia.input_profile, pneumonia.apply_batch(gray)) <= 0.03
    assert _flagged(pneumonia.input_profile, pneumonia.apply_batch(1.0 - gray)) >= 0.95
    assert _flagged(br35h.input_profile, br35h.apply_batch(gray[::2])) >= 0.95


def test_fit_input_profile_reproduces_the_shipped_profile_and_refuses_other_data(tmp_path):
    from medhe.nn.io import resolve_model_dir
    from medhe.train.input_profile import add_profile_to_model

    model_dir = tmp_path / "br35h"
    shutil.copytree(resolve_model_dir("br35h"), model_dir)
    shipped = _card("br35h").preprocessing.input_profile
    refitted = add_profile_to_model(model_dir, log=lambda line: None)
    # Equal but for the last bits: sums over 2,098 images run in another order on another CPU
    # (measured 2026-12-04 on an AVX-512 machine: threshold 70.84599293145116 against ...125).
    assert refitted.threshold == pytest.approx(shipped.threshold, rel=1e-9)
    np.testing.assert_allclose(refitted.precision, shipped.precision, rtol=1e-7, atol=1e-9 * np.abs(shipped.precision).max())
    # A card whose training statistics are not those of the data: nothing is written.
    doc = json.loads((model_dir / "model.json").read_text())
    doc["preprocessing"]["std"] = 0.3
    (model_dir / "model.json").write_text(json.dumps(doc))
    before = (model_dir / "model.json").read_bytes()
    with pytest.raises(DataError, match="not the training data"):
        add_profile_to_model(model_dir, log=lambda line: None)
    assert (model_dir / "model.json").read_bytes() == before


def test_the_client_spec_carries_the_profile_under_its_digest_and_the_client_checks_inputs():
    from medhe.compiler import compile_model
    from medhe.nn.io import resolve_model_dir
    from medhe.plan.client_spec import ClientSpec
    from medhe.protocol.local import LocalSession

    plan = compile_model(resolve_model_dir("br35h"))
    spec = plan.client_spec()
    assert spec.preprocessing["input_profile"]["threshold"] == _card("br35h").preprocessing.input_profile.threshold
    card = json.loads(json.dumps(spec.card()))
    card["preprocessing"]["input_profile"]["threshold"] *= 10  # a server hiding atypical inputs
    with pytest.raises(PlanError, match="digest mismatch"):
        ClientSpec.from_dict(card)
    session = LocalSession(plan, backend="clear")
    scan = _br35h_test_scans(step=100)[0]
    assert session.diagnose_image(scan).input_check["typical"] is True
    assert session.diagnose_image(1.0 - scan).input_check["typical"] is False


def test_medhe_encrypt_warns_on_stderr_about_an_atypical_image(tmp_path):
    from PIL import Image

    from medhe.data.br35h import br35h_split_files

    scan = br35h_split_files("test")[0][0]
    Image.fromarray((255 - np.asarray(Image.open(scan).convert("L"))).astype(np.uint8)).save(tmp_path / "inv.png")

    def medhe(*args):
        done = subprocess.run([sys.executable, "-m", "medhe.cli.main", *args], cwd=tmp_path, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        return done

    medhe("compile", "--model", "br35h", "--out", "plan")
    clinic = ["--spec", "plan/client_spec.json", "--backend", "clear"]
    medhe("keygen", *clinic, "--out", "keys")
    typical = medhe("encrypt", str(scan), *clinic, "--keys", "keys", "--out", "a.ct")
    assert "warning" not in typical.stderr
    atypical = medhe("encrypt", "inv.png", *clinic, "--keys", "keys", "--out", "b.ct")
    assert "inv.png is unlike the model's training images" in atypical.stderr
    assert "warning" not in atypical.stdout  # the stdout line stays as it was
    # A blank image (per-image normalisation makes it all zeros) is named blank, not by its distance.
    Image.fromarray(np.zeros((60, 50), np.uint8)).save(tmp_path / "blank.png")
    blank = medhe("encrypt", "blank.png", *clinic, "--keys", "keys", "--out", "c.ct")
    assert "blank.png is blank (every pixel the same value)" in blank.stderr and "distance" not in blank.stderr


def test_the_check_names_a_uniform_input_and_only_that():
    from medhe.nn.io import resolve_model_dir

    profile = Preprocessing.from_dict(json.loads((resolve_model_dir("pneumoniamnist") / "model.json").read_text())
                                      ["preprocessing"]).input_profile
    flat, textured = np.full((1, 28, 28), -0.3), np.random.default_rng(0).normal(size=(1, 28, 28))
    checks = profile.check(np.stack([flat, textured]))
    assert [c["uniform"] for c in checks] == [True, False] and checks[0]["typical"] is False


def test_evaluate_reports_the_flagged_images_and_their_accuracy():
    from medhe.data.br35h import br35h_split_files
    from medhe.train.evaluate import evaluate_plaintext, format_report_table

    files = br35h_split_files("test")[::10]
    scans = _br35h_test_scans(step=10)
    labels = np.array([label for _, label in files])
    images = scans + [1.0 - scan for scan in scans]
    report = evaluate_plaintext("br35h", images, np.concatenate([labels, labels]))
    check, typical = report["input_check"], np.array(report["per_image"]["input_typical"])
    assert check["n"] == len(images) and check["flagged"] == int((~typical).sum())
    assert typical[len(scans):].mean() <= 0.05 and typical[:len(scans)].mean() >= 0.9
    # The accuracy on the flagged images is that of a report on those images alone.
    flagged = [image for image, keep in zip(images, typical) if not keep]
    alone = evaluate_plaintext("br35h", flagged, np.concatenate([labels, labels])[~typical])
    assert check["accuracy_flagged"] == pytest.approx(alone["accuracy"], abs=1e-4)
    assert alone["input_check"]["flagged"] == len(flagged)
    assert f"{check['flagged']} of {check['n']} flagged" in format_report_table(report)
    # Data mostly unlike the training images (here all inverted) is called out, by the data set's name.
    assert "unlike the images this model was trained on (br35h)" in alone["warning"]
    assert "WARNING" in format_report_table(alone)
    own = evaluate_plaintext("br35h", scans, labels)
    assert "warning" not in own and "WARNING" not in format_report_table(own)


def test_remote_diagnoses_carry_the_check_in_latency_and_throughput_mode(tmp_path):
    """Over HTTP (clear backend): RemoteClient.diagnose and diagnose_batch (one image per batch
    too) give each result the client's input check of that image."""
    from fastapi.testclient import TestClient

    from medhe.compiler import compile_model
    from medhe.compiler.batch import compile_batch
    from medhe.nn.io import resolve_model_dir
    from medhe.protocol.remote import RemoteClient
    from medhe.service.app import create_app
    from medhe.service.hosting import host_plan

    model_dir = resolve_model_dir("br35h")
    data = tmp_path / "srv"
    app = create_app([host_plan(data, "br35h", compile_model(model_dir), backend="clear"),
                      host_plan(data, "br35h-batch", compile_batch(model_dir), backend="clear")], data_dir=data)
    remote = RemoteClient("http://testserver", key_home=tmp_path / "clinic", backend="clear",
                          transport=TestClient(app)._transport)
    scans = _br35h_test_scans(step=150)
    images = scans + [1.0 - scan for scan in scans]
    expected = [True] * len(scans) + [False] * len(scans)
    assert [remote.diagnose(image, "br35h").input_check["typical"] for image in images] == expected
    for per_batch in (None, 1):
        results = remote.diagnose_batch(images, "br35h-batch", slots_per_batch=per_batch)
        assert [r.input_check["typical"] for r in results] == expected
    remote.close()
