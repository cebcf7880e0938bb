"""The three roles as separate processes with only files between them (clear backend here; the
slow tier repeats it with real SEAL keys)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medhe.compiler import compile_model
from medhe.nn.io import load_model, resolve_model_dir
from medhe.train.loop import predict_logits


def medhe(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medhe.cli.main", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def run_roles(tmp_path: Path, backend: str, *, encrypted_model: bool = False) -> tuple[dict, np.ndarray]:
    """Model owner compiles (and, with encrypted_model, encrypts under the clinic's public key);
    the clinic sees only the client spec; the server gets the plan or the encrypted model."""
    image = (np.random.rand(40, 36) * 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "scan.png")
    clinic = ["--spec", "plan/client_spec.json", "--backend", backend]
    server = ["--encrypted-model", "enc"] if encrypted_model else ["--plan", "plan"]
    steps = [
        ["compile", "--model", "pneumoniamnist", "--out", "plan"],
        ["keygen", *clinic, "--out", "keys"],
        *([["encrypt-model", "--plan", "plan", "--public-key", "keys/public.key", "--backend", backend,
            "--out", "enc"]]
          if encrypted_model else []),
        ["encrypt", "scan.png", *clinic, "--keys", "keys", "--out", "scan.ct"],
        ["evaluate-ciphertext", *server, "--backend", backend, "--keys", "keys/evaluation.keys", "--in", "scan.ct",
         "--out", "scan.result", "--key-store", "server"],
        ["decrypt", *clinic, "--keys", "keys", "--in", "scan.result"],
    ]
    for step in steps:
        done = medhe(*step, cwd=tmp_path)
        assert done.returncode == 0, (step, done.stderr)
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    model, card = load_model(resolve_model_dir("pneumoniamnist"))
    from medhe.data.images import load_image

    expected = predict_logits(model, card.preprocessing.apply(load_image(tmp_path / "scan.png"))[None])[0]
    return answer, expected


@pytest.mark.parametrize("encrypted_model", [False, True], ids=["plain-weights", "encrypted-model"])
def test_three_processes_with_files_between_them(tmp_path, encrypted_model):
    answer, expected = run_roles(tmp_path, "clear", encrypted_model=encrypted_model)
    np.testing.assert_allclose(answer["logits"], expected, atol=1e-5)
    assert answer["label"] == load_model(resolve_model_dir("pneumoniamnist"))[1].class_names[int(np.argmax(expected))]
    assert (tmp_path / "keys" / "secret.key").stat().st_mode & 0o077 == 0, "secret key must be private"
    assert list((tmp_path / "server").glob("*.keys")), "the server keeps the registered keys"
    if encrypted_model:
        assert list((tmp_path / "server").glob("*.model")), "the server keeps the encrypted model"
        assert not (tmp_path / "enc" / "arrays.npz").exists(), "the encrypted model directory holds no clear weights"


def test_cli_reports_a_corrupted_ciphertext_clearly(tmp_path):
    run_roles(tmp_path, "clear")
    data = bytearray((tmp_path / "scan.ct").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "bad.ct").write_bytes(bytes(data))
    done = medhe("evaluate-ciphertext", "--plan", "plan", "--backend", "clear", "--keys",
                 "keys/evaluation.keys", "--in", "bad.ct", "--out", "bad.result", cwd=tmp_path)
    assert done.returncode == 2
    assert "checksum" in done.stderr and "Traceback" not in done.stderr


def test_compile_prints_levels_before_and_after(tmp_path):
    done = medhe("compile", "--model", "br35h", "--out", "plan", "--architecture", "arch", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "levels before" in done.stdout and "128-bit security" in done.stdout
    assert not (tmp_path / "arch" / "arrays.npz").exists() and (tmp_path / "arch" / "client_spec.json").is_file()
    total = next(line for line in done.stdout.splitlines() if line.startswith("total"))
    assert total.split()[1:3] == ["15", "7"]
    plan = compile_model(resolve_model_dir("br35h"))
    from medhe.compiler import Plan

    assert Plan.load(tmp_path / "plan").digest() == plan.digest()
    assert Plan.load(tmp_path / "arch", weights=False).structure_digest() == plan.structure_digest()


def test_compile_refuses_parameters_that_cannot_fit(tmp_path):
    done = medhe("compile", "--model", "br35h", "--out", "plan", "--poly-modulus-degree", "8192", cwd=tmp_path)
    assert done.returncode == 2
    assert "128-bit" in done.stderr and "levels" in done.stderr


@pytest.mark.parametrize("mode", ["latency", "throughput"])
def test_evaluate_encrypted_report(tmp_path, pneumoniamnist_npz, mode):
    done = medhe("evaluate", "--model", "pneumoniamnist", "--data-file", str(pneumoniamnist_npz), "--split", "val",
                 "--encrypted", "--mode", mode, "--backend", "clear", "--limit", "40", "--report", "r.json",
                 cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["encrypted"] is True and report["mode"] == mode and report["n"] == 40
    assert report["agreement"] == 1.0 and report["max_abs_logit_error"] < 1e-4
    for key in ("accuracy", "auc", "sensitivity", "specificity"):
        assert 0.0 <= report[key] <= 1.0
    if mode == "latency":
        assert report["server_latency_s_median"] > 0
    # --limit takes the classes in turns and names each image's place in the split.
    from medhe.data.medmnist import load_medmnist_npz

    _, val_labels = load_medmnist_npz(pneumoniamnist_npz, "val")
    index = report["per_image"]["index"]
    assert len(set(index)) == 40 and report["per_image"]["label"] == val_labels[index].tolist()
    assert report["per_image"]["label"][:6] == [0, 1, 0, 1, 0, 1]
    assert index[:2] == [int(np.flatnonzero(val_labels == 0)[0]), int(np.flatnonzero(val_labels == 1)[0])]
    assert "backend clear" in done.stdout and "nothing encrypted" in done.stdout


def test_evaluate_limit_without_progress_bar(tmp_path, capsys):
    """`--no-progress` reaches the encrypted evaluation of a stored split too (no tqdm bar on stderr)."""
    from medhe.cli.main import main

    assert main(["evaluate", "--model", "br35h", "--split", "test", "--encrypted", "--backend", "clear",
                 "--limit", "4", "--no-progress", "--report", str(tmp_path / "r.json")]) == 0
    captured = capsys.readouterr()
    assert "encrypted inference" not in captured.err, captured.err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["per_image"]["label"] == [0, 1, 0, 1] and (tmp_path / "r.roc.png").is_file()


def test_cli_path_mistakes_and_private_models_get_clear_errors(tmp_path):
    run_roles(tmp_path, "clear")
    shipped_dir = str(resolve_model_dir("pneumoniamnist"))
    cases = [
        (["keygen", "--model", shipped_dir, "--backend", "clear", "--out", "k2"], "client spec"),
        (["encrypt-model", "--plan", "plan", "--public-key", "keys", "--backend", "clear", "--out", "plan"],
         "weights in clear"),
        (["evaluate-ciphertext", "--plan", "plan", "--backend", "clear", "--keys", "keys", "--in", "scan.ct",
          "--out", "missing/scan.result"], "does not exist"),
        (["evaluate-ciphertext", "--plan", "plan", "--backend", "clear", "--keys", "keys", "--in", "keys",
          "--out", "x.result"], "keys is a folder; ciphertext file expected"),
        (["keygen", "--model", "br35", "--backend", "clear", "--out", "k3"], "'br35' is not a shipped model"),
        (["diagnose", "keys", "--server", "http://127.0.0.1:9", "--backend", "clear"],
         "keys is a folder; image file expected (diagnose --batch --server takes folders)"),
        (["decrypt", "--spec", "plan", "--backend", "clear", "--keys", "nowhere", "--in", "scan.result"],
         "no key directory"),
        # Outputs onto a file, under a file and onto a directory; a server's store that is a file.
        (["compile", "--model", "pneumoniamnist", "--out", "scan.ct"], "File exists: scan.ct"),
        (["keygen", "--spec", "plan", "--backend", "clear", "--out", "scan.ct/keys"], "Not a directory: scan.ct/keys"),
        (["evaluate-ciphertext", "--plan", "plan", "--backend", "clear", "--keys", "keys", "--in", "scan.ct",
          "--out", "plan"], "plan is a directory"),
        (["token", "add", "clinic-a", "--data-dir", "scan.ct"], "File exists: scan.ct"),
    ]
    for args, pattern in cases:
        done = medhe(*args, cwd=tmp_path)
        assert done.returncode == 2, (args, done.stderr)
        assert pattern in done.stderr and "Traceback" not in done.stderr, (args, done.stderr)
    # A key directory where a file is expected is read through its default file name.
    done = medhe("evaluate-ciphertext", "--plan", "plan", "--backend", "clear", "--keys", "keys", "--in", "scan.ct",
                 "--out", "again.result", cwd=tmp_path)
    assert done.returncode == 0, done.stderr


def test_keygen_refuses_to_replace_a_key_and_keeps_the_directory_private(tmp_path):
    keygen = f"umask 000; {sys.executable} -m medhe.cli.main keygen --model pneumoniamnist --backend clear --out keys"
    first = subprocess.run(["bash", "-c", keygen], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "keys").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "keys" / "secret.key").stat().st_mode & 0o777 == 0o600
    key = (tmp_path / "keys" / "secret.key").read_bytes()
    again = subprocess.run(["bash", "-c", keygen], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "--force" in again.stderr and "Traceback" not in again.stderr
    assert (tmp_path / "keys" / "secret.key").read_bytes() == key
    forced = subprocess.run(["bash", "-c", keygen + " --force"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600)
    assert forced.returncode == 0, forced.stderr
    assert (tmp_path / "keys" / "secret.key").read_bytes() != key


def test_the_demo_runs_every_role_and_agrees_with_plaintext(tmp_path):
    """`medhe demo` (README's main job) on the clear backend: six held-out Br35H scans, encrypted
    labels equal to plaintext in both modes, and the input check passes the scans but flags an
    inverted one. (CI runs it on real 128-bit keys from the README's first command.)"""
    done = medhe("demo", "--backend", "clear", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    rows = [line for line in lines if line.startswith(("no/", "yes/"))]
    assert sorted(row.split("/")[0] for row in rows) == ["no"] * 3 + ["yes"] * 3  # both classes
    assert "encrypted = plaintext on 6/6 (weights in clear on the server) and 6/6 (encrypted model)" in done.stdout
    assert lines[-1].startswith("input check on the clinic: 6/6 test scans like the training images")
    assert "inverted: flagged" in lines[-1]


def test_the_demo_says_when_a_model_has_no_input_profile(tmp_path):
    """A Br35H model trained before input profiles existed still runs the demo, which says so."""
    import shutil

    model = tmp_path / "old-br35h"
    shutil.copytree(resolve_model_dir("br35h"), model)
    doc = json.loads((model / "model.json").read_text())
    del doc["preprocessing"]["input_profile"]
    (model / "model.json").write_text(json.dumps(doc))
    done = medhe("demo", "--model", str(model), "--backend", "clear", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "encrypted = plaintext on 6/6" in done.stdout
    assert done.stdout.splitlines()[-1] == "input check: old-br35h has no input profile (add one with `medhe fit-input-profile`)"


def test_diagnose_goes_on_past_an_unreadable_image_and_says_which(tmp_path: Path) -> None:
    """`medhe diagnose` (all roles in one process) diagnoses every readable image, lists the ones it
    could not read on stderr and exits 3, so no good scan is lost to a bad one beside it. None
    readable is an error (2), as is a mistyped path, refused before any key is made."""
    for name in ("a.png", "c.png"):
        Image.fromarray((np.random.rand(40, 36) * 255).astype(np.uint8)).save(tmp_path / name)
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (tmp_path / "d.png").write_bytes(b"")
    done = medhe("diagnose", "a.png", "b.png", "c.png", "--model", "pneumoniamnist", "--backend", "clear", cwd=tmp_path)
    assert done.returncode == 3, done.stderr
    rows = [line.split()[0] for line in done.stdout.splitlines() if line.endswith(tuple("0123456789"))]
    assert rows[-2:] == ["a.png", "c.png"], done.stdout
    assert "b.png" in done.stderr and "not diagnosed" in done.stderr
    assert "1 of 3 images could not be read and were not diagnosed: b.png" in done.stderr
    none = medhe("diagnose", "b.png", "d.png", "--model", "pneumoniamnist", "--backend", "clear", cwd=tmp_path)
    assert none.returncode == 2, none.stderr
    assert "error: none of the 2 images could be read: b.png, d.png" in none.stderr
    typo = medhe("diagnose", "a.png", "e.png", "--model", "pneumoniamnist", "--backend", "clear", cwd=tmp_path)
    assert typo.returncode == 2 and "no image file at e.png" in typo.stderr and "keys generated" not in typo.stdout


def test_folders_expand_to_their_images_and_suffixless_dicom(tmp_path: Path) -> None:
    """`diagnose --batch` and `batch encrypt` take folders: image suffixes, and suffix-less files
    with DICOM's magic bytes (PACS exports: IM0001); not notes, not hidden files (._scan.png)."""
    from medhe.cli.he_cmd import _image_files
    from medhe.errors import ConfigError

    studies = tmp_path / "studies"
    (studies / "series").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(studies / "a.png")
    (studies / "series" / "IM0001").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)
    (studies / "series" / "notes").write_text("report to follow")
    (studies / "series" / "1.2.840.113619.2.55.3.6").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)
    (studies / "._a.png").write_bytes(b"\0\5\26\7")
    (studies / ".thumbs").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(studies / ".thumbs" / "t.png")
    assert _image_files([str(studies)]) == [str(studies / "a.png"), str(studies / "series" / "1.2.840.113619.2.55.3.6"),
                                            str(studies / "series" / "IM0001")]
    for name in ("a.png", "series/IM0001", "series/1.2.840.113619.2.55.3.6"):
        (studies / name).unlink()
    with pytest.raises(ConfigError, match="or DICOM without a suffix"):
        _image_files([str(studies)])


def test_a_closed_output_pipe_ends_a_command_quietly(tmp_path: Path) -> None:
    """`medhe compile ... | head -0`: the reader is gone before the first line; the command stops
    with exit code 1 and no traceback or 'error' line on stderr."""
    process = subprocess.Popen([sys.executable, "-m", "medhe.cli.main", "compile", "--model", "br35h", "--out",
                                str(tmp_path / "plan")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=300) == 1, stderr
    assert "Traceback" not in stderr and "error" not in stderr, stderr


def test_a_repeated_list_flag_adds_to_the_first():
    """`serve --model a --model b` serves both (argparse's default keeps only the last), as do the
    other flags that take several models."""
    from medhe.cli.main import build_parser

    parser = build_parser()
    assert parser.parse_args(["serve", "--model", "br35h", "--model", "pneumoniamnist", "x=dir"]).model == [
        "br35h", "pneumoniamnist", "x=dir"]
    assert parser.parse_args(["serve", "--plan", "a", "--plan", "b"]).plan == ["a", "b"]
    assert parser.parse_args(["compile", "--model", "a", "--model", "b", "--out", "p"]).model == ["a", "b"]
    assert parser.parse_args(["ensemble", "--model", "a", "--model", "b", "--out", "e"]).model == ["a", "b"]
    evaluate = parser.parse_args(["evaluate", "--model", "br35h", "--corruptions", "--compare", "a", "--compare", "b"])
    assert evaluate.compare == ["a", "b"]
    assert parser.parse_args(["evaluate", "--model", "br35h"]).compare == []
