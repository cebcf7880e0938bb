"""`medhe evaluate --image-dir`: labelled images from elsewhere, read and preprocessed as a diagnosis would."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medhe.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def test_files():
    from medhe.data.br35h import br35h_split_files

    files = br35h_split_files("test")
    negatives = [item for item in files if item[1] == 0][::25]
    positives = [item for item in files if item[1] == 1][::25]
    return negatives + positives


def _folder(root: Path, files, names=("no", "yes")) -> Path:
    for path, label in files:
        target = root / names[label] / "nested" / path.name  # subfolders are searched recursively
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    return root


def test_a_folder_is_scored_as_the_same_files_run_through_the_model(tmp_path, test_files):
    """Held-out Br35H test scans laid out as no/ and yes/ (the data set's own layout): the report
    equals scoring the same files by hand with the model's preprocessing; an unreadable file is
    listed, not fatal."""
    import torch

    from medhe.data.images import load_image
    from medhe.nn.io import load_model, resolve_model_dir
    from medhe.train.evaluate import evaluate_folder
    from medhe.train.loop import softmax_positive
    from medhe.train.metrics import binary_report

    root = _folder(tmp_path / "scans", test_files)
    (root / "yes" / "notes.png").write_bytes(b"not an image")
    (root / "yes" / "README.txt").write_text("ignored: not an image suffix")
    report = evaluate_folder("br35h", root, ("no", "yes"), progress=False)

    model, card = load_model(resolve_model_dir("br35h"))
    labels = np.array([label for _, label in test_files])
    with torch.no_grad():
        logits = model(torch.tensor(card.preprocessing.apply_batch([load_image(p) for p, _ in test_files])))
    expected = binary_report(labels, softmax_positive(logits.numpy()))
    assert report["n"] == len(test_files) == expected["n"]
    assert report["accuracy"] == pytest.approx(expected["accuracy"])
    assert report["auc"] == pytest.approx(expected["auc"])
    assert report["confusion_matrix"] == expected["confusion_matrix"]
    assert report["dataset"]["n_per_class"] == {"no tumor": int((labels == 0).sum()), "tumor": int((labels == 1).sum())}
    assert [item["file"] for item in report["dataset"]["skipped"]] == ["yes/notes.png"]  # as per_image names files
    assert report["split"] == "folder" and report["held_out"] is None


def test_folder_errors_name_what_was_expected(tmp_path, test_files):
    from medhe.train.evaluate import evaluate_folder

    root = _folder(tmp_path / "scans", test_files[:2] + test_files[-2:])
    with pytest.raises(DataError, match=r"no subfolder 'no tumor'.*\['no', 'yes'\].*--class-dirs"):
        evaluate_folder("br35h", root, progress=False)  # the class names are not the folder names
    with pytest.raises(ConfigError, match="2 folder names"):
        evaluate_folder("br35h", root, ("no",), progress=False)
    with pytest.raises(DataError, match="missing: no such folder"):
        evaluate_folder("br35h", root / "missing", ("no", "yes"), progress=False)
    (root / "scan.png").write_bytes(b"")
    with pytest.raises(DataError, match="scan.png: not a folder"):
        evaluate_folder("br35h", root / "scan.png", ("no", "yes"), progress=False)
    (root / "scan.png").unlink()
    shutil.rmtree(root / "yes")
    (root / "yes").mkdir()
    Image.new("L", (4, 4)).save(root / "yes" / "blank.png")
    (root / "yes" / "blank.png").write_bytes(b"truncated")
    with pytest.raises(DataError, match="every class needs at least one readable image"):
        evaluate_folder("br35h", root, ("no", "yes"), progress=False)


def test_the_cli_writes_the_folder_report(tmp_path, test_files, capsys):
    from medhe.cli.main import main

    root = _folder(tmp_path / "scans", test_files, names=("No_Tumor", "TUMOR"))  # matched case-insensitively
    out = tmp_path / "report.json"
    assert main(["evaluate", "--model", "br35h", "--image-dir", str(root), "--report", str(out), "--no-progress"]) == 0
    report = json.loads(out.read_text())
    assert report["n"] == len(test_files) and report["dataset"]["class_dirs"] == ["no tumor", "tumor"]
    table = capsys.readouterr().out
    assert "accuracy" in table
    counts = ", ".join(f"{name} {n}" for name, n in report["dataset"]["n_per_class"].items())
    assert f"image folder {root.resolve()} (in the folder: {counts})" in table  # where the data came from
    # The encrypted path (clear backend here; the HE tiers cover CKKS), both classes within the limit.
    assert main(["evaluate", "--model", "br35h", "--image-dir", str(root), "--encrypted", "--backend", "clear",
                 "--limit", "4", "--report", str(out), "--no-progress"]) == 0
    report = json.loads(out.read_text())
    assert report["encrypted"] is True and report["n"] == 4 and report["agreement"] == 1.0
    assert sorted(np.asarray(report["confusion_matrix"]).sum(axis=1).tolist()) == [2, 2]
    assert main(["evaluate", "--model", "br35h", "--class-dirs", "no", "yes"]) != 0
    assert "--class-dirs goes with --image-dir" in capsys.readouterr().err
    assert main(["evaluate", "--model", "br35h", "--image-dir", str(root), "--split", "test"]) != 0
    assert "replaces --split" in capsys.readouterr().err


def test_folder_classes_come_in_turns_so_a_limit_runs_both(tmp_path, test_files):
    from medhe.nn.io import load_model, resolve_model_dir
    from medhe.train.evaluate import load_image_folder

    root = _folder(tmp_path / "scans", test_files)
    _, card = load_model(resolve_model_dir("br35h"))
    images, labels, _ = load_image_folder(root, card, ("no", "yes"), progress=False)
    assert labels[:4].tolist() == [0, 1, 0, 1]
    assert all(image.shape == (card.preprocessing.image_size,) * 2 for image in images)  # kept small
    # Unreadable files are dropped before the turns are taken: still one of each class in turn.
    (root / "yes" / "000_broken.png").write_bytes(b"not a png")
    images, labels, info = load_image_folder(root, card, ("no", "yes"), progress=False)
    assert labels[:4].tolist() == [0, 1, 0, 1] and [row["file"] for row in info["skipped"]] == ["yes/000_broken.png"]
    assert [name.split("/")[0] for name in info["files"][:4]] == ["no", "yes", "no", "yes"]


def test_classes_in_turns():
    from medhe.train.evaluate import classes_in_turns

    labels = np.array([1, 1, 1, 0, 1, 0])
    order = classes_in_turns(labels)
    assert order.tolist() == [3, 0, 5, 1, 2, 4]  # 0 1 0 1, then the rest of class 1 in its order
    assert sorted(order.tolist()) == list(range(labels.size))
    assert classes_in_turns(np.array([], dtype=np.int64)).size == 0


def test_the_report_lists_each_file_and_its_plots_are_drawn_from_it(tmp_path, test_files, capsys):
    """Per-image labels and probabilities (with the file names for a folder) reproduce the report's
    figures, and the ROC / confusion PNGs are written beside the JSON unless --no-plots."""
    from PIL import Image as PILImage

    from medhe.cli.main import main
    from medhe.train.metrics import binary_report

    root = _folder(tmp_path / "scans", test_files)
    out = tmp_path / "external.json"
    assert main(["evaluate", "--model", "br35h", "--image-dir", str(root), "--class-dirs", "no", "yes",
                 "--report", str(out), "--no-progress"]) == 0
    report = json.loads(out.read_text())
    rows = report["per_image"]
    assert len(rows["file"]) == len(rows["label"]) == len(rows["prob_positive"]) == report["n"]
    by_name = {Path(path).name: label for path, label in test_files}
    assert [by_name[Path(f).name] for f in rows["file"]] == rows["label"]  # each file beside its own label
    assert all(f.split("/")[0] in ("no", "yes") for f in rows["file"])  # relative to the folder
    again = binary_report(rows["label"], rows["prob_positive"])
    assert again["confusion_matrix"] == report["confusion_matrix"]
    assert again["auc"] == pytest.approx(report["auc"], abs=1e-6)
    printed = capsys.readouterr().out
    for png in (tmp_path / "external.roc.png", tmp_path / "external.confusion.png"):
        assert f"wrote {png}" in printed
        with PILImage.open(png) as image:
            assert image.format == "PNG" and min(image.size) >= 300
    # One class only (an encrypted run of one image): no ROC, still a confusion matrix.
    single = tmp_path / "one.json"
    assert main(["evaluate", "--model", "br35h", "--image-dir", str(root), "--class-dirs", "no", "yes",
                 "--encrypted", "--backend", "clear", "--limit", "1", "--report", str(single), "--no-progress"]) == 0
    assert not (tmp_path / "one.roc.png").exists() and (tmp_path / "one.confusion.png").is_file()
    bare = tmp_path / "bare.json"
    assert main(["evaluate", "--model", "br35h", "--image-dir", str(root), "--class-dirs", "no", "yes",
                 "--report", str(bare), "--no-plots", "--no-progress"]) == 0
    assert sorted(p.name for p in tmp_path.glob("bare*")) == ["bare.json"]


def test_corruptions_run_on_a_folder_and_are_plotted(tmp_path, test_files, capsys):
    """--corruptions --image-dir: the clean row equals the folder's own evaluation, the corruptions
    change what the model says, and the bar chart is written beside the report."""
    from medhe.cli.main import main
    from medhe.data.corruptions import CHEST_XRAY_CORRUPTIONS
    from medhe.train.evaluate import evaluate_folder

    root = _folder(tmp_path / "scans", test_files)
    out = tmp_path / "robust.json"
    assert main(["evaluate", "--model", "br35h", "--image-dir", str(root), "--class-dirs", "no", "yes",
                 "--corruptions", "--corruption-size", "64", "--report", str(out), "--no-progress"]) == 0
    report = json.loads(out.read_text())
    plain = evaluate_folder("br35h", root, ("no", "yes"), progress=False)
    clean = report["models"]["model"]["clean"]
    assert report["split"] == "folder" and report["held_out"] is None and report["n"] == plain["n"]
    assert clean["accuracy"] == pytest.approx(plain["accuracy"]) and clean["auc"] == pytest.approx(plain["auc"])
    assert "files" not in report["dataset"] and report["dataset"]["n_per_class"] == plain["dataset"]["n_per_class"]
    corrupted = report["models"]["model"]["corruptions"]
    assert set(corrupted) == {c.name for c in CHEST_XRAY_CORRUPTIONS}
    assert any(level["accuracy"] != clean["accuracy"] for entry in corrupted.values() for level in entry["severities"])
    assert (tmp_path / "robust.corruptions.png").is_file()
    assert f"wrote {tmp_path / 'robust.corruptions.png'}" in capsys.readouterr().out
    assert main(["evaluate", "--model", "br35h", "--image-dir", str(root), "--corruptions", "--data-file", "x.npz"]) != 0
    assert "replaces --split and --data-file" in capsys.readouterr().err


def test_several_subfolders_can_make_one_class(tmp_path, test_files):
    """A four-class MRI layout (notumor/, glioma/, pituitary/, ...) scores as tumor / no tumor with
    comma-separated --class-dirs: the same files give the same figures as the two-folder layout."""
    from medhe.cli.main import main
    from medhe.train.evaluate import evaluate_folder

    negatives = [item for item in test_files if item[1] == 0]
    positives = [item for item in test_files if item[1] == 1]
    root = tmp_path / "four_class"
    _folder(root, negatives, names=("notumor", "unused"))
    _folder(root, positives[::2], names=("unused", "glioma"))
    _folder(root, positives[1::2], names=("unused", "Pituitary"))
    (root / "meningioma").mkdir()  # a class folder left out of --class-dirs is not read
    Image.new("L", (8, 8)).save(root / "meningioma" / "x.png")
    merged = evaluate_folder("br35h", root, ("notumor", "glioma, pituitary"), progress=False)
    plain = evaluate_folder("br35h", _folder(tmp_path / "two", test_files), ("no", "yes"), progress=False)
    assert merged["dataset"]["n_per_class"] == plain["dataset"]["n_per_class"]
    assert merged["confusion_matrix"] == plain["confusion_matrix"]
    assert merged["auc"] == pytest.approx(plain["auc"])
    assert {f.split("/")[0] for f in merged["per_image"]["file"]} == {"notumor", "glioma", "Pituitary"}
    with pytest.raises(DataError, match="no subfolder 'meningeoma'"):
        evaluate_folder("br35h", root, ("notumor", "glioma,meningeoma"), progress=False)
    # A subfolder named twice (in one class or in both) would count its images twice.
    (root / "gliomas").symlink_to(root / "glioma", target_is_directory=True)
    for twice in (("notumor", "glioma,Glioma"), ("notumor,glioma", "glioma"), ("notumor", "glioma,gliomas")):
        with pytest.raises(DataError, match="'gliomas?' is named twice"):
            evaluate_folder("br35h", root, twice, progress=False)
    assert main(["evaluate", "--model", "br35h", "--image-dir", str(root), "--class-dirs", "notumor",
                 "glioma,pituitary", "--no-progress"]) == 0
