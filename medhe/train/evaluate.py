"""Plaintext evaluation of a saved model directory on a data split (`medhe evaluate`)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from medhe.errors import ConfigError, DataError
from medhe.nn.io import ModelCard, load_model, resolve_model_dir
from medhe.train.loop import predict_logits, softmax_positive
from medhe.train.metrics import binary_report

BR35H_SPLITS = ("train", "val", "test")


def evaluate_plaintext(model_dir: str | Path, images_gray01, labels) -> dict:
    """Report of a model on raw [0, 1] grayscale images (n, h, w), preprocessed by its card.

    Returns binary_report's fields plus encrypted=False, model_dir and the model's dataset card.
    """
    model_dir = resolve_model_dir(model_dir)
    model, card = load_model(model_dir)
    labels = np.asarray(labels).reshape(-1)
    if len(images_gray01) != labels.size:
        raise DataError(f"{len(images_gray01)} images but {labels.size} labels; expected one label per image")
    start = time.perf_counter()
    inputs = card.preprocessing.apply_batch(images_gray01)
    prob = softmax_positive(predict_logits(model, inputs))
    report = binary_report(labels, prob)
    report.update({
        "encrypted": False,
        "per_image": per_image(labels, prob),
        "model_dir": str(Path(model_dir).resolve()),
        "model_dataset": card.dataset,
        "class_names": card.class_names,
        "activation": card.arch.activation,
        "seconds": round(time.perf_counter() - start, 3),
    })
    return add_input_check(report, card, inputs)


# By design the check flags about 1% of held-out images; over half flagged means other data.
MOSTLY_ATYPICAL_FRACTION = 0.5


def add_input_check(report: dict, card: ModelCard, inputs: np.ndarray) -> dict:
    """Add what the clinic's input check says of these images (None without a profile): how many
    it flags as unlike the training images, the accuracy on the typical and on the flagged ones,
    and per image `input_typical` beside its label and probability."""
    profile = card.preprocessing.input_profile
    if profile is None:
        report["input_check"] = None
        return report
    typical = profile.typical(inputs)
    labels = np.asarray(report["per_image"]["label"])
    correct = (np.asarray(report["per_image"]["prob_positive"]) >= 0.5).astype(int) == labels

    def accuracy(mask):
        return round(float(correct[mask].mean()), 4) if mask.any() else None

    flagged_fraction = float((~typical).mean())
    report["input_check"] = {
        "threshold": profile.threshold, "flagged": int((~typical).sum()), "n": int(typical.size),
        "flagged_fraction": round(flagged_fraction, 4),
        "accuracy_typical": accuracy(typical), "accuracy_flagged": accuracy(~typical),
    }
    report["per_image"]["input_typical"] = typical.tolist()
    if flagged_fraction > MOSTLY_ATYPICAL_FRACTION:
        report["warning"] = (
            f"{int((~typical).sum())} of {typical.size} images are unlike the images this model was trained on "
            f"({(card.dataset or {}).get('name', 'its training data')}): is this data of the model's kind "
            "(modality, view, class folders)? Scores of a model on data it is not for mean little")
    return report


def classes_in_turns(labels) -> np.ndarray:
    """Indices taking the classes in turns (the first image of each class, then the second of each,
    ...; each class in its own order, the larger class's rest at the end): the first N of them are
    what `--limit N` evaluates, so that a short encrypted run scores both classes."""
    labels = np.asarray(labels).reshape(-1)
    rank_in_class = np.zeros(labels.size, dtype=np.int64)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        rank_in_class[members] = np.arange(members.size)
    return np.lexsort((labels, rank_in_class))


def per_image(labels, prob_positive) -> dict:
    """Each image's label and P(positive), in evaluation order: what the ROC and confusion plots
    (and a reader looking for the misread images) are drawn from."""
    return {"label": np.asarray(labels).reshape(-1).astype(int).tolist(),
            "prob_positive": [round(float(p), 6) for p in np.asarray(prob_positive).reshape(-1)]}


def evaluate_encrypted_batch(model_dir: str | Path, images_gray01, labels, *, limit: int | None = None,
                             backend: str = "seal") -> dict:
    """Throughput mode: all images in one batch (slots across images; N/2 per batch), the same
    report fields as evaluate_encrypted plus the amortized server time per image."""
    from medhe.compiler.batch import compile_batch
    from medhe.protocol.client import Client
    from medhe.protocol.server import Server

    model_dir = resolve_model_dir(model_dir)
    model, card = load_model(model_dir)
    labels = np.asarray(labels).reshape(-1)
    count = labels.size if limit is None else min(int(limit), labels.size)
    if len(images_gray01) != labels.size or count < 1:
        raise DataError(f"{len(images_gray01)} images, {labels.size} labels, limit {limit}: expected one "
                        "label per image and at least one image")
    inputs = card.preprocessing.apply_batch(images_gray01[:count])
    reference = predict_logits(model, inputs).astype(np.float64)
    plan = compile_batch(model_dir)
    client, server = Client(plan.client_spec(), backend=backend), Server(plan, backend=backend)
    server.register_keys(client.evaluation_keys())
    logits, server_s, upload = [], 0.0, 0
    for start in range(0, count, plan.batch_size):
        message = client.encrypt_batch(inputs[start: start + plan.batch_size])
        upload += len(message)
        t0 = time.perf_counter()
        result = server.evaluate_batch(message)
        server_s += time.perf_counter() - t0
        logits.append(client.decrypt_batch(result))
    logits = np.concatenate(logits)
    prob = softmax_positive(logits)
    report = binary_report(labels[:count], prob)
    report.update({
        "encrypted": True, "mode": "throughput", "backend": backend,
        "per_image": per_image(labels[:count], prob),
        "agreement": float((logits.argmax(1) == reference.argmax(1)).mean()),
        "max_abs_logit_error": float(np.abs(logits - reference).max()),
        "server_s_total": server_s, "server_s_per_image": server_s / count,
        "batches": int(np.ceil(count / plan.batch_size)), "upload_bytes": upload,
        "ckks": {**plan.params.to_dict(), "security_bits": plan.params.security_bits},
        "levels_before": plan.report["levels_before"], "levels_after": plan.report["levels_after"],
        "model_dir": str(Path(model_dir).resolve()), "model_dataset": card.dataset,
        "class_names": card.class_names,
    })
    return add_input_check(report, card, inputs)


def evaluate_encrypted(model_dir: str | Path, images_gray01, labels, *, limit: int | None = None,
                       backend: str = "seal", progress: bool = True, encrypted_model: bool = False) -> dict:
    """The plaintext report's fields measured on encrypted inference (client -> bytes -> server ->
    bytes -> client at 128-bit security), plus agreement with the plaintext model on the same
    images, the largest logit error and the server latency. With `encrypted_model`, the model
    owner encrypts the weights under the client's public key and the server computes with those."""
    from medhe.compiler import compile_model
    from medhe.protocol.local import LocalSession, summarize

    model_dir = resolve_model_dir(model_dir)
    model, card = load_model(model_dir)
    labels = np.asarray(labels).reshape(-1)
    if len(images_gray01) != labels.size:
        raise DataError(f"{len(images_gray01)} images but {labels.size} labels; expected one label per image")
    count = labels.size if limit is None else min(int(limit), labels.size)
    if count < 1:
        raise ConfigError(f"--limit must be at least 1, got {limit}")
    inputs = card.preprocessing.apply_batch(images_gray01[:count])
    reference = predict_logits(model, inputs).astype(np.float64)
    plan = compile_model(model_dir)
    session = LocalSession(plan, backend=backend, encrypted_model=encrypted_model)
    results = session.diagnose_many(inputs, progress=progress)
    logits = np.stack([r.logits for r in results])
    prob = softmax_positive(logits)
    report = binary_report(labels[:count], prob)
    summary = summarize(results, reference, labels[:count])
    report.update({
        "encrypted": True,
        "mode": "latency",
        "per_image": per_image(labels[:count], prob),
        "weights": "encrypted" if encrypted_model else "plain",
        "backend": backend,
        "agreement": summary["agreement"],
        "max_abs_logit_error": summary["max_abs_logit_error"],
        "server_latency_s_median": summary["server_latency_median_s"],
        "server_latency_s_p90": summary["server_latency_p90_s"],
        "client_encrypt_s_median": summary["client_encrypt_median_s"],
        "client_decrypt_s_median": summary["client_decrypt_median_s"],
        "upload_bytes": summary["upload_bytes"],
        "eval_key_bytes": session.eval_key_bytes,
        "keygen_s": round(session.keygen_s, 3),
        **({"encrypted_model_bytes": session.encrypted_model_bytes,
            "model_encrypt_s": round(session.model_encrypt_s, 3)} if encrypted_model else {}),
        "plaintext_accuracy_same_images": summary["plaintext_accuracy_same_images"],
        "ckks": {**plan.params.to_dict(), "security_bits": plan.params.security_bits},
        "levels_before": plan.report["levels_before"],
        "levels_after": plan.report["levels_after"],
        "model_dir": str(Path(model_dir).resolve()),
        "model_dataset": card.dataset,
        "class_names": card.class_names,
    })
    return add_input_check(report, card, inputs)


def _held_out(card: ModelCard, split: str, data_sha256: str | None) -> tuple[bool | None, str]:
    """Whether `split` took no part in training or early stopping of this model."""
    dataset = card.dataset or {}
    if dataset.get("name") == "br35h" and data_sha256 is None:
        used = {dataset.get("train_split"), dataset.get("stop_split")}
        if split in used:
            return False, f"the model was trained / early-stopped on Br35H {split}; this number is optimistic"
        return True, f"Br35H {split} played no part in training or model selection"
    if data_sha256 is not None and data_sha256 == dataset.get("data_file_sha256"):
        if split == dataset.get("report_split"):
            return True, f"{split} of the training file played no part in training or model selection"
        return False, f"{split} of this file was used for training or early stopping; this number is optimistic"
    return None, "not the data the model was trained on; held-out status unknown"


def load_eval_data(card: ModelCard, split: str, data_file: str | Path | None) -> tuple[np.ndarray, np.ndarray]:
    """Raw float32 [0, 1] images (n, h, w) and int64 labels of a split for this model.

    With data_file: that MedMNIST npz's split. Without: Br35H's stored split for Br35H models
    (at the model's image size), or our PneumoniaMNIST copy for PneumoniaMNIST models.
    """
    images, labels, _ = _load_eval_data(card, split, data_file)
    return images, labels


def _load_eval_data(card: ModelCard, split: str, data_file) -> tuple[np.ndarray, np.ndarray, dict]:
    dataset_name = (card.dataset or {}).get("name")
    if data_file is None and dataset_name == "pneumoniamnist":
        from medhe.data.medmnist import default_pneumoniamnist_path

        data_file = default_pneumoniamnist_path()
        if data_file is None:
            raise ConfigError("this model was trained on PneumoniaMNIST: pass --data-file PATH.npz")
    if data_file is not None:
        from medhe.data.medmnist import load_medmnist_npz
        from medhe.train.datasets import sha256_file

        data_file = Path(data_file)
        images_uint8, labels = load_medmnist_npz(data_file, split)
        images = images_uint8.astype(np.float32) / np.float32(255.0)
        info = {"name": data_file.stem, "data_file": str(data_file.resolve()),
                "data_file_sha256": sha256_file(data_file), "split": split}
        return images, labels, info
    if dataset_name == "br35h":
        from medhe.data.br35h import SPLIT_VERSION, load_br35h

        if split not in BR35H_SPLITS:
            raise ConfigError(f"--split must be one of {', '.join(BR35H_SPLITS)} for Br35H, got {split!r}")
        trained_on = card.dataset.get("split_version")
        if trained_on != SPLIT_VERSION:
            raise DataError(
                f"the model was trained on Br35H split {trained_on!r} but this medhe ships "
                f"{SPLIT_VERSION!r}; its {split} split may overlap the model's training data"
            )
        images, labels = load_br35h(split, **card.preprocessing.geometry())
        return images, labels, {"name": "br35h", "split_version": SPLIT_VERSION, "split": split}
    raise ConfigError(
        f"don't know where the data of this model ({dataset_name!r}) lives; pass --data-file PATH.npz"
    )


# Files read from an image folder; files without a suffix are read too (DICOM often has none).
IMAGE_FOLDER_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom", "")


def load_image_folder(root: str | Path, card: ModelCard, class_dirs: tuple[str, ...] | None = None, *,
                      progress: bool = True) -> tuple[list[np.ndarray], np.ndarray, dict]:
    """Labelled images from one subfolder per class (searched recursively), each cropped and resized
    by the model's own recipe (bit depth, DICOM windowing, crop rule and filter as for a diagnosis).

    Subfolders are matched to the model's class names case-insensitively (spaces may be
    underscores), or to `class_dirs` given in class order (e.g. ("no", "yes") for Br35H's layout);
    an entry may name several subfolders, comma-separated, that together make one class.
    A file that does not read as an image is skipped and listed in the info, not fatal; the info's
    "files" are the images read, relative to `root`, in the order of the returned images.
    """
    from tqdm.auto import tqdm

    from medhe.data.images import load_image
    from medhe.errors import ImageLoadError

    root = Path(root)
    names = list(class_dirs) if class_dirs else list(card.class_names)
    if len(names) != len(card.class_names):
        raise ConfigError(f"--class-dirs needs {len(card.class_names)} folder names, one per class "
                          f"{card.class_names}, got {names}")
    if not root.is_dir():
        raise DataError(f"{root}: {'not a folder' if root.exists() else 'no such folder'}; expected a folder with "
                        f"one subfolder per class named {names}")
    subfolders = {child.name.casefold(): child for child in root.iterdir() if child.is_dir()}
    per_class: list[list[tuple[Path, int]]] = []
    used: dict[Path, str] = {}  # subfolder -> the class it was given to
    for label, entry in enumerate(names):
        members = []
        # "glioma,meningioma,pituitary": several subfolders make one class (a 4-class MRI layout).
        for name in (part.strip() for part in entry.split(",")):
            folder = subfolders.get(name.casefold()) or subfolders.get(name.casefold().replace(" ", "_"))
            if folder is None:
                raise DataError(f"{root}: no subfolder {name!r} for class {card.class_names[label]!r} (found "
                                f"{sorted(child.name for child in subfolders.values())}); name them with --class-dirs")
            if folder.resolve() in used:  # resolved: two names linking to one folder count too
                raise DataError(f"{root}: the subfolder {folder.name!r} is named twice in --class-dirs (for class "
                                f"{used[folder.resolve()]!r} and {card.class_names[label]!r}); its images would "
                                f"be counted twice")
            used[folder.resolve()] = card.class_names[label]
            members += [(path, label) for path in sorted(folder.rglob("*"))
                        if path.is_file() and not path.name.startswith(".")
                        and path.suffix.lower() in IMAGE_FOLDER_SUFFIXES]
        per_class.append(members)
    files = [item for members in per_class for item in members]
    images, labels, kept, skipped = [], [], [], []
    for path, label in tqdm(files, desc="reading images", unit="img", disable=not progress):
        try:
            # Kept at the model's size only: a folder of full-resolution films would not fit in memory.
            images.append(card.preprocessing.resize(load_image(path)))
        except ImageLoadError as exc:
            skipped.append({"file": path.relative_to(root).as_posix(), "reason": str(exc)})
            continue
        labels.append(label)
        kept.append(path.relative_to(root).as_posix())
    # Classes taken in turns over the readable images, so that --encrypted --limit N runs both classes.
    order = classes_in_turns(np.asarray(labels, dtype=np.int64))
    images, kept = [images[i] for i in order], [kept[i] for i in order]
    labels_array = np.asarray(labels, dtype=np.int64)[order]
    counts = {card.class_names[label]: int((labels_array == label).sum()) for label in range(len(names))}
    if not all(counts.values()):
        raise DataError(f"{root}: every class needs at least one readable image; read {counts}"
                        + (f", skipped {len(skipped)} (first: {skipped[0]['reason']})" if skipped else ""))
    info = {"name": "image folder", "root": str(root.resolve()), "class_dirs": names, "n_per_class": counts,
            "files": kept, "skipped": skipped}
    return images, labels_array, info


def evaluate_folder(model: str | Path, root: str | Path, class_dirs: tuple[str, ...] | None = None, *,
                    encrypted: bool = False, limit: int | None = None, backend: str = "seal",
                    encrypted_model: bool = False, progress: bool = True) -> dict:
    """evaluate_plaintext (or evaluate_encrypted) on a folder of labelled images from elsewhere."""
    _check_encrypted_model(encrypted, "latency", encrypted_model)
    model_dir = resolve_model_dir(model)
    _, card = load_model(model_dir)
    images, labels, info = load_image_folder(root, card, class_dirs, progress=progress)
    files = info.pop("files")
    report = _report_on(model_dir, images, labels, encrypted=encrypted, mode="latency", limit=limit,
                        backend=backend, encrypted_model=encrypted_model, progress=progress)
    report["per_image"]["file"] = files[:report["n"]]
    return _with_data(report, info, "folder", None,
                      "images from a folder: whether the model ever saw them is for the caller to know")


def _check_encrypted_model(encrypted: bool, mode: str, encrypted_model: bool) -> None:
    if encrypted_model and (not encrypted or mode != "latency"):
        raise ConfigError("--encrypted-model goes with --encrypted in latency mode")


def _report_on(model_dir: Path, images, labels, *, encrypted: bool, mode: str, limit: int | None, backend: str,
               encrypted_model: bool, progress: bool = True) -> dict:
    """The plaintext, encrypted (latency) or encrypted batch (throughput) report on these images."""
    if encrypted and mode == "throughput":
        return evaluate_encrypted_batch(model_dir, images, labels, limit=limit, backend=backend)
    if encrypted:
        return evaluate_encrypted(model_dir, images, labels, limit=limit, backend=backend,
                                  encrypted_model=encrypted_model, progress=progress)
    return evaluate_plaintext(model_dir, images, labels)


def _with_data(report: dict, info: dict, split: str, held_out: bool | None, note: str) -> dict:
    report.update({"dataset": info, "split": split, "held_out": held_out, "held_out_note": note})
    return report


def evaluate_split(model: str | Path, split: str | None = None, data_file: str | Path | None = None, *,
                   encrypted: bool = False, limit: int | None = None, backend: str = "seal",
                   mode: str = "latency", encrypted_model: bool = False, progress: bool = True) -> dict:
    """evaluate_plaintext (or evaluate_encrypted) on a named split; the library side of `medhe evaluate`.
    With `limit` (encrypted only), the first `limit` images of classes_in_turns; per_image then
    has each one's `index` in the split."""
    model_dir = resolve_model_dir(model)
    _, card = load_model(model_dir)
    if split is None:
        split = "val" if data_file is not None else (card.dataset or {}).get("report_split", "test")
    images, labels, info = _load_eval_data(card, split, data_file)
    _check_encrypted_model(encrypted, mode, encrypted_model)
    picked = None
    if encrypted and limit is not None:
        if limit < 1:
            raise ConfigError(f"--limit must be at least 1, got {limit}")
        picked = classes_in_turns(labels)[:limit]
        images, labels = images[picked], labels[picked]
    report = _report_on(model_dir, images, labels, encrypted=encrypted, mode=mode, limit=None, backend=backend,
                        encrypted_model=encrypted_model, progress=progress)
    if picked is not None:
        report["per_image"]["index"] = picked.astype(int).tolist()
    return _with_data(report, info, split, *_held_out(card, split, info.get("data_file_sha256")))


def demo_test_files(n_per_class: int = 3) -> list[tuple[Path, int]]:
    """n_per_class held-out Br35H test files per class, evenly spaced in sorted order (deterministic)."""
    from medhe.data.br35h import br35h_test_files

    files = br35h_test_files()
    chosen: list[tuple[Path, int]] = []
    for label in (0, 1):
        members = [item for item in files if item[1] == label]
        if len(members) < n_per_class:
            raise DataError(f"Br35H test split has {len(members)} files of class {label}, need {n_per_class}")
        picks = np.linspace(0, len(members) - 1, n_per_class).round().astype(int)
        chosen += [members[i] for i in picks]
    return chosen


def _data_cell(report: dict) -> str:
    """'br35h / test', or for an image folder its path and its readable images per class (all of
    them: with --limit, n says how many were evaluated)."""
    dataset = report.get("dataset", {})
    if dataset.get("name") == "image folder":
        counts = ", ".join(f"{name} {count}" for name, count in dataset.get("n_per_class", {}).items())
        return f"image folder {dataset.get('root', '?')} (in the folder: {counts})"
    return f"{dataset.get('name', '?')} / {report.get('split', '?')}"


def format_report_table(report: dict) -> str:
    """A short human-readable table of an evaluation report."""
    def fmt(value):
        return "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)

    cm = report.get("confusion_matrix", [[0, 0], [0, 0]])
    rows = [
        ("model", report.get("model_dir", "?")),
        ("data", _data_cell(report)
                 + ("" if report.get("held_out") else "  (NOT held out)" if report.get("held_out") is False
                    else "  (held-out status unknown)")),
        ("encrypted", str(report.get("encrypted")) + ("  (backend clear: the same steps on plain numbers, "
                                                      "nothing encrypted)" if report.get("backend") == "clear"
                                                      else "")),
        ("n", fmt(report.get("n"))),
        ("accuracy", fmt(report.get("accuracy"))),
        ("AUC", fmt(report.get("auc"))),
        ("sensitivity", fmt(report.get("sensitivity"))),
        ("specificity", fmt(report.get("specificity"))),
        ("ECE (15 bins)", fmt(report.get("ece"))),
        ("confusion", f"TN {cm[0][0]}  FP {cm[0][1]}  FN {cm[1][0]}  TP {cm[1][1]}"),
    ]
    check = report.get("input_check")
    if check:
        rows.append(("atypical inputs", f"{check['flagged']} of {check['n']} flagged as unlike the training images "
                                        f"(accuracy {fmt(check['accuracy_typical'])} on the rest, "
                                        f"{fmt(check['accuracy_flagged'])} on the flagged)"))
    if report.get("warning"):
        rows.append(("WARNING", report["warning"]))
    if report.get("encrypted"):
        rows += [
            ("agreement", fmt(report.get("agreement"))),
            ("max |logit error|", f"{report.get('max_abs_logit_error', 0):.2e}"),
            ("server s (median)" if report.get("mode") == "latency" else "server s / image (amortized)",
             f"{report.get('server_latency_s_median', report.get('server_s_per_image', 0)):.4f}"),
            ("CKKS", f"N={report['ckks']['poly_modulus_degree']}, {report['ckks']['security_bits']}-bit security, "
                     f"levels {report.get('levels_before')} -> {report.get('levels_after')}"),
        ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
