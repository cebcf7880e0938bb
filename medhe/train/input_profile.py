"""Fit a model's input profile (medhe.data.input_check) from its training data, as it was trained.

The profile's statistics are of the training inputs under the same augmentations the training
loop applied (flips and shifts, geometric warps, acquisition shifts, per the settings), so an
input within what training showed the model is typical; the threshold comes from the clean
early-stopping split. `medhe train` calls this for every model; `medhe fit-input-profile` adds a
profile to a model trained before profiles existed (its weights unchanged).
"""

from __future__ import annotations

import numpy as np

from medhe.data.input_check import FLAG_QUANTILE, InputProfile, fit_input_profile, flagged_fraction
from medhe.data.preprocess import standardize_per_image
from medhe.train.datasets import PreparedData
from medhe.train.loop import augment_batch, geometric_augment_batch, shift_augment_batch

PROFILE_SEED = 0


def augmented_inputs(data: PreparedData, settings: dict, seed: int = PROFILE_SEED) -> np.ndarray:
    """The training inputs as one epoch of the training loop would see them (same augmentation order)."""
    rng = np.random.default_rng(seed)
    inputs = data.train_images
    per_image = data.preprocessing.normalization == "per_image"
    if settings.get("augment"):
        inputs = augment_batch(inputs, rng, max_shift=settings["max_shift"], vertical_flip=settings["vertical_flip"])
    if settings.get("geometric_augment"):
        inputs = geometric_augment_batch(inputs, rng)
    if settings.get("shift_augment"):
        inputs = shift_augment_batch(inputs, rng, data.preprocessing.mean, data.preprocessing.std,
                                     per_image=per_image)
    return standardize_per_image(inputs) if per_image else inputs


def fit_profile(data: PreparedData, settings: dict, seed: int = PROFILE_SEED,
                quantile: float = FLAG_QUANTILE) -> InputProfile:
    """The input profile of a model trained on `data` with `settings` (the training-loop flags)."""
    return fit_input_profile(augmented_inputs(data, settings, seed), data.stop_images, quantile)


def describe_profile(profile: InputProfile, data: PreparedData, log=print) -> dict:
    """The profile's threshold and counts, and the fraction of the report split it flags (a
    measurement: nothing is chosen on it); logged in one line."""
    flagged = flagged_fraction(profile, data.report_images)
    log(f"input profile: threshold {profile.threshold:.1f} (the {profile.quantile:.0%} quantile of "
        f"{profile.n_threshold} early-stopping images); flags {flagged:.1%} of the {data.card['report_split']} images")
    return {"threshold": profile.threshold, "quantile": profile.quantile, "n_fit": profile.n_fit,
            "n_threshold": profile.n_threshold, "report_flagged_fraction": round(flagged, 4)}


def add_profile_to_model(model_dir, data_file=None, log=print) -> InputProfile:
    """Fit the input profile of a trained model from the data set its card names, with its
    recorded training settings, and write it into its model.json (weights untouched).

    The data set is prepared with the card's own recipe; if its training-pixel mean and std differ
    from the card's, this is not the data the model was trained on and nothing is written."""
    import json
    from pathlib import Path

    from medhe.data.preprocess import Preprocessing
    from medhe.errors import DataError
    from medhe.nn.modeldir import MODEL_JSON, read_model_json
    from medhe.train.datasets import prepare_dataset
    from medhe.train.run import DATASET_DEFAULTS, METRICS_JSON

    model_dir = Path(model_dir)
    doc = read_model_json(model_dir)
    # An existing profile is replaced (and may be of features an older medhe computed).
    recipe = Preprocessing.from_dict({k: v for k, v in doc["preprocessing"].items() if k != "input_profile"})
    dataset = (doc.get("dataset") or {}).get("name")
    if dataset not in DATASET_DEFAULTS:
        raise DataError(f"{model_dir}: its card names the data set {dataset!r}; an input profile can be fitted "
                        f"for {', '.join(DATASET_DEFAULTS)}")
    metrics_file = model_dir / METRICS_JSON
    settings = dict(DATASET_DEFAULTS[dataset])
    if metrics_file.is_file():
        try:
            settings.update(json.loads(metrics_file.read_text()).get("training", {}))
        except (ValueError, AttributeError) as exc:
            raise DataError(f"{metrics_file} is not a readable metrics.json (its training settings are "
                            f"needed): {exc}") from exc
    data = prepare_dataset(dataset, data_file=data_file, image_size=recipe.image_size, crop=recipe.crop,
                           resize_filter=recipe.resize_filter, normalization=recipe.normalization)
    trained_sha256 = (doc.get("dataset") or {}).get("data_file_sha256")
    if trained_sha256 and data.card.get("data_file_sha256") != trained_sha256:
        raise DataError(f"{model_dir} was trained on a data file with sha256 {trained_sha256[:16]}...; this one's "
                        f"sha256 is {str(data.card.get('data_file_sha256'))[:16]}...: not the training data "
                        f"(another --data-file?)")
    if abs(data.preprocessing.mean - recipe.mean) > 1e-6 or abs(data.preprocessing.std - recipe.std) > 1e-6:
        raise DataError(f"{model_dir} was trained on pixels of mean {recipe.mean:.6f}, std {recipe.std:.6f}; "
                        f"this {dataset} data gives {data.preprocessing.mean:.6f}, {data.preprocessing.std:.6f}: "
                        f"not the training data (another --data-file?)")
    profile = fit_profile(data, settings)
    describe_profile(profile, data, log)
    doc["preprocessing"] = recipe.with_input_profile(profile).to_dict()
    target = model_dir / MODEL_JSON
    part = target.with_name(target.name + ".part")
    part.write_text(json.dumps(doc, indent=2, sort_keys=True))
    part.replace(target)
    log(f"wrote the input profile into {target} (weights unchanged)")
    return profile
