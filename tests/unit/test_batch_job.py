"""Throughput-mode batch jobs as files (`medhe batch encrypt | run | decrypt`), clear backend: the
diagnoses equal the plaintext model's, a job resumes where it stopped, bad jobs are refused with a
clear error, the server side never sees the image names, and on Ray the batches run as tasks in
the cluster's worker processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medhe.errors import ConfigError, InvalidMessage
from medhe.plan import ClientSpec
from medhe.protocol.batch_job import decrypt_job, encrypt_job, read_job, run_job
from medhe.protocol.keydir import load_key_directory
from tests.helpers import shipped_model_logits

IMAGES = 10
PER_BATCH = 4


def medhe(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "medhe.cli.main", *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd)
    return done


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A throughput plan of the shipped PneumoniaMNIST model, a clinic's clear-backend keys and a
    folder of images of several sizes (non-square too)."""
    root = tmp_path_factory.mktemp("batchjob")
    done = medhe("compile", "--model", "pneumoniamnist", "--throughput", "--out", str(root / "bplan"))
    assert done.returncode == 0, done.stderr
    assert "no rotation keys" in done.stdout and "128-bit security" in done.stdout
    done = medhe("keygen", "--spec", str(root / "bplan"), "--out", str(root / "keys"), "--backend", "clear")
    assert done.returncode == 0, done.stderr
    rng = np.random.default_rng(7)
    (root / "studies").mkdir()
    for i in range(IMAGES):
        shape = (28, 28) if i % 3 else (40, 31)
        Image.fromarray((rng.random(shape) * 255).astype(np.uint8)).save(root / "studies" / f"patient{i:02d}.png")
    return root


def _plaintext_logits(spec: ClientSpec, client, images: list[Path]) -> np.ndarray:
    return shipped_model_logits("pneumoniamnist", np.stack([client.preprocess(p) for p in images]))


def test_cli_job_round_trip_equals_the_plaintext_model_and_resumes(setup, tmp_path):
    root = setup
    job = tmp_path / "job"
    done = medhe("batch", "encrypt", str(root / "studies"), "--spec", str(root / "bplan"), "--keys",
                 str(root / "keys"), "--out", str(job), "--images-per-batch", str(PER_BATCH), "--backend", "clear",
                 "--workers", "1")
    assert done.returncode == 0, done.stderr
    assert f"{IMAGES} images in 3 batches" in done.stdout
    warned = done.stderr
    manifest = json.loads((job / "job.json").read_text())
    assert [b["count"] for b in manifest["batches"]] == [4, 4, 2]
    # The job directory (what the server gets) holds no image name; the index beside it does.
    for path in job.rglob("*"):
        assert b"patient" not in path.read_bytes()
    index = json.loads((tmp_path / "job.index.json").read_text())
    assert [Path(p).name for p in index["images"]] == [f"patient{i:02d}.png" for i in range(IMAGES)]

    done = medhe("batch", "run", "--plan", str(root / "bplan"), "--keys", str(root / "keys" / "evaluation.keys"),
                 "--job", str(job), "--backend", "clear", "--workers", "2")
    assert done.returncode == 0, done.stderr
    assert "3 of 3 batches evaluated (processes" in done.stdout
    run = json.loads((job / "results" / "run.json").read_text())
    pids = {t["pid"] for t in run["tasks"]}
    assert run["runner"] == "processes" and run["driver_pid"] not in pids and os.getpid() not in pids

    done = medhe("batch", "decrypt", "--spec", str(root / "bplan"), "--keys", str(root / "keys"), "--job", str(job),
                 "--csv", str(tmp_path / "diagnoses.csv"), "--backend", "clear")
    assert done.returncode == 0, done.stderr
    assert "warning: no image index" not in done.stderr  # job.index.json is beside the job
    lines = (tmp_path / "diagnoses.csv").read_text().splitlines()
    assert lines[0].startswith("image,label,p_") and len(lines) == IMAGES + 1
    # Without its index the diagnoses are named by position, and the clinic is told so.
    (tmp_path / "job.index.json").rename(tmp_path / "kept.index.json")
    unnamed = medhe("batch", "decrypt", "--spec", str(root / "bplan"), "--keys", str(root / "keys"), "--job",
                    str(job), "--backend", "clear")
    (tmp_path / "kept.index.json").rename(tmp_path / "job.index.json")
    assert unnamed.returncode == 0 and "warning: no image index" in unnamed.stderr, unnamed.stderr
    assert "batch-0000#0" in unnamed.stdout

    spec = ClientSpec.load(root / "bplan")
    client = load_key_directory(spec, root / "keys")
    rows = decrypt_job(client, job)
    images = sorted((root / "studies").iterdir())
    assert [Path(r["image"]).name for r in rows] == [p.name for p in images]
    expected = _plaintext_logits(spec, client, images)
    np.testing.assert_allclose(np.array([r["logits"] for r in rows]), expected, atol=1e-6)
    assert [r["label"] for r in rows] == [spec.class_names[i] for i in expected.argmax(1)]
    assert [line.split(",")[1] for line in lines[1:]] == [r["label"] for r in rows]
    # The input check ran at encryption: kept in the clinic's index (never in the job directory),
    # warned about, and given back per image (noise images are unlike chest films: most are flagged).
    typical = [client.check_input(client.preprocess(p))["typical"] for p in images]
    assert f"warning: {typical.count(False)} of {IMAGES} images are unlike the model's training images" in warned
    assert [r["input_typical"] for r in rows] == typical == index["input_typical"] and not all(typical)
    assert [line.split(",")[-1] for line in lines[1:]] == ["yes" if t else "no" for t in typical]
    assert not any(b"input_typical" in path.read_bytes() for path in job.rglob("*") if path.is_file())

    # Resume: a lost result is made again, the others are kept as they are.
    kept = (job / "results" / "batch-0000.result").read_bytes()
    (job / "results" / "batch-0001.result").unlink()
    summary = run_job(root / "bplan", root / "keys" / "evaluation.keys", job, backend="clear")
    assert summary["evaluated"] == 1 and summary["skipped_with_result"] == ["batch-0000", "batch-0002"]
    assert (job / "results" / "batch-0000.result").read_bytes() == kept
    np.testing.assert_allclose(np.array([r["logits"] for r in decrypt_job(client, job)]), expected, atol=1e-6)

    # Results swapped between batches (same size: batch 0 and 1 both hold 4 images) are refused at
    # decryption, and a resumed run evaluates them again instead of keeping them.
    first, second = (job / "results" / f"batch-000{i}.result" for i in (0, 1))
    a, b = first.read_bytes(), second.read_bytes()
    first.write_bytes(b)
    second.write_bytes(a)
    with pytest.raises(InvalidMessage, match="this result is for batch"):
        decrypt_job(client, job)
    summary = run_job(root / "bplan", root / "keys" / "evaluation.keys", job, backend="clear")
    assert summary["replaced_results"] == ["batch-0000", "batch-0001"] and summary["evaluated"] == 2
    np.testing.assert_allclose(np.array([r["logits"] for r in decrypt_job(client, job)]), expected, atol=1e-6)
    # Another job's index is not used to name this one's images.
    other = tmp_path / "other"
    encrypt_job(client, images[:IMAGES], other, images_per_batch=PER_BATCH, workers=1)
    with pytest.raises(InvalidMessage, match="not the index of this job"):
        decrypt_job(client, job, index_path=tmp_path / "other.index.json")
    # An index written before the input check (no input_typical) still names the images; a
    # damaged one (numbers, text, another length) is refused.
    index_file = tmp_path / "job.index.json"
    saved = json.loads(index_file.read_text())
    index_file.write_text(json.dumps({k: v for k, v in saved.items() if k != "input_typical"}))
    assert [r["input_typical"] for r in decrypt_job(client, job)] == [None] * IMAGES
    for damaged in ([1] * IMAGES, ["yes"] * IMAGES, [True] * (IMAGES - 1), "yes"):
        index_file.write_text(json.dumps({**saved, "input_typical": damaged}))
        with pytest.raises(InvalidMessage, match="input_typical must list true, false or null"):
            decrypt_job(client, job)


def test_bad_jobs_are_refused_with_a_clear_error(setup, tmp_path):
    root = setup
    spec = ClientSpec.load(root / "bplan")
    client = load_key_directory(spec, root / "keys")
    images = sorted((root / "studies").iterdir())[:3]
    job = tmp_path / "job"
    encrypt_job(client, images, job, images_per_batch=2, workers=1)
    keys = root / "keys" / "evaluation.keys"
    with pytest.raises(ConfigError, match="not an empty directory"):
        encrypt_job(client, images, job, workers=1)  # nothing is overwritten
    with pytest.raises(ConfigError, match="index is written once"):
        encrypt_job(client, images, tmp_path / "job-b", index_path=tmp_path / "job.index.json", workers=1)
    assert not (tmp_path / "job-b").exists()
    with pytest.raises(ConfigError, match="outside the job directory"):
        encrypt_job(client, images, tmp_path / "job2", index_path=tmp_path / "job2" / "index.json", workers=1)
    with pytest.raises(ConfigError, match="no result yet"):
        decrypt_job(client, job)
    # Another clinic's evaluation keys: refused before any batch is read.
    from medhe.protocol.keydir import make_key_directory

    make_key_directory(spec, tmp_path / "other", backend="clear")
    with pytest.raises(InvalidMessage, match="key id"):
        run_job(root / "bplan", tmp_path / "other" / "evaluation.keys", job, backend="clear")
    # A plan of another model.
    done = medhe("compile", "--model", "br35h", "--throughput", "--out", str(tmp_path / "br35h"))
    assert done.returncode == 0, done.stderr
    with pytest.raises(InvalidMessage, match="encrypted for model spec"):
        run_job(tmp_path / "br35h", keys, job, backend="clear")
    # A tampered manifest: names that leave the job directory, wrong types, unknown versions.
    original = (job / "job.json").read_text()
    for tamper in ({"batches": [{"name": "../../etc/passwd", "count": 1}]}, {"batches": [{"name": "batch-0000",
                   "count": "2"}]}, {"format_version": 99}, {"batches": []}, {"key_id": "not hex"}, {"images": 5},
                   {"job_id": None}):
        doc = json.loads(original)
        doc.update(tamper)
        (job / "job.json").write_text(json.dumps(doc))
        with pytest.raises(InvalidMessage):
            read_job(job)
    (job / "job.json").write_text("[1, 2")
    with pytest.raises(InvalidMessage, match="not a readable"):
        run_job(root / "bplan", keys, job, backend="clear")
    (job / "job.json").write_text(original)
    # Links: the server reads and writes only the job's own files.
    (tmp_path / "elsewhere").mkdir()
    (job / "results").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(InvalidMessage, match="not a link"):
        run_job(root / "bplan", keys, job, backend="clear")
    (job / "results").unlink()
    # A batch file swapped for garbage: the message checks catch it, the other batch is evaluated.
    (job / "batch-0001.ct").write_bytes(b"garbage")
    with pytest.raises(InvalidMessage, match="batch-0001.ct: not a medhe message"):
        run_job(root / "bplan", keys, job, backend="clear")
    assert (job / "results" / "batch-0000.result").is_file() and not (job / "results" / "batch-0001.result").exists()
    # The CLI says what is wrong in one line, no traceback.
    done = medhe("batch", "run", "--plan", str(root / "bplan"), "--keys", str(keys), "--job", str(tmp_path / "nojob"),
                 "--backend", "clear")
    assert done.returncode == 2 and "no job directory" in done.stderr and "Traceback" not in done.stderr
    done = medhe("batch", "encrypt", str(root / "studies"), "--model", "br35h", "--keys", str(root / "keys"),
                 "--out", str(tmp_path / "j3"), "--backend", "clear")
    assert done.returncode == 2 and "Traceback" not in done.stderr


def test_one_run_of_a_job_at_a_time_and_a_killed_runs_files_are_swept(setup, tmp_path):
    """A second `batch run` of a job that is being run is refused (the first holds a lock on the
    job's results until it exits); the next run removes what a killed run left half-written."""
    import fcntl

    root = setup
    client = load_key_directory(ClientSpec.load(root / "bplan"), root / "keys")
    job = tmp_path / "job"
    encrypt_job(client, sorted((root / "studies").iterdir())[:3], job, images_per_batch=2, workers=1)
    keys = root / "keys" / "evaluation.keys"
    (job / "results").mkdir()
    leftover = job / "results" / ".batch-0000.result.0123456789ab.tmp"  # as a killed worker leaves it
    leftover.write_bytes(b"half a result")
    with open(job / "results" / ".run.lock", "a") as running:  # another run holds the job
        fcntl.flock(running, fcntl.LOCK_EX)
        with pytest.raises(ConfigError, match="another `medhe batch run` is evaluating this job"):
            run_job(root / "bplan", keys, job, backend="clear")
        done = medhe("batch", "run", "--plan", str(root / "bplan"), "--keys", str(keys), "--job", str(job),
                     "--backend", "clear")
        assert done.returncode == 2 and "another `medhe batch run`" in done.stderr and "Traceback" not in done.stderr
        assert leftover.exists() and not (job / "results" / "batch-0000.result").exists()  # untouched while held
    summary = run_job(root / "bplan", keys, job, backend="clear")
    assert summary["evaluated"] == 2 and not leftover.exists()
    assert not list((job / "results").glob("*.tmp")) and len(decrypt_job(client, job)) == 3


def test_a_latency_spec_or_plan_is_refused(setup, tmp_path):
    from medhe.compiler import compile_model
    from medhe.nn.modeldir import resolve_model_dir
    from medhe.protocol.client import Client

    latency = compile_model(resolve_model_dir("pneumoniamnist"))
    with pytest.raises(ConfigError, match="throughput-mode client spec"):
        encrypt_job(Client(latency.client_spec(), backend="clear"), ["x.png"], tmp_path / "job")
    client = load_key_directory(ClientSpec.load(setup / "bplan"), setup / "keys")
    encrypt_job(client, sorted((setup / "studies").iterdir())[:2], tmp_path / "job", workers=1)
    latency.save(tmp_path / "latency-plan")
    with pytest.raises(ConfigError, match="latency-mode plan"):
        run_job(tmp_path / "latency-plan", setup / "keys" / "evaluation.keys", tmp_path / "job", backend="clear")
    with pytest.raises(ConfigError, match="images per batch"):
        encrypt_job(client, ["x.png"], tmp_path / "job0", images_per_batch=0)


@pytest.mark.xdist_group("ray")  # the ray_cluster fixture stops every Ray process
def test_batches_run_as_tasks_on_a_ray_cluster(setup, ray_cluster, tmp_path):
    """The same job on a local Ray cluster: every batch a task in a Ray worker process (not this
    one), the same results as in this process."""
    root = setup
    spec = ClientSpec.load(root / "bplan")
    client = load_key_directory(spec, root / "keys")
    images = sorted((root / "studies").iterdir())
    job = tmp_path / "job"
    encrypt_job(client, images, job, images_per_batch=PER_BATCH, workers=1)
    done = medhe("batch", "run", "--plan", str(root / "bplan"), "--keys", str(root / "keys" / "evaluation.keys"),
                 "--job", str(job), "--backend", "clear", "--ray", ray_cluster)
    assert done.returncode == 0, done.stderr
    assert "3 of 3 batches evaluated (ray" in done.stdout
    run = json.loads((job / "results" / "run.json").read_text())
    assert run["runner"] == "ray" and len(run["tasks"]) == 3
    assert run["driver_pid"] not in {t["pid"] for t in run["tasks"]}  # Ray's worker processes did the work
    np.testing.assert_allclose(np.array([r["logits"] for r in decrypt_job(client, job)]),
                               _plaintext_logits(spec, client, images), atol=1e-6)
    # A bad batch fails on the cluster with the same typed error as locally.
    (job / "results" / "batch-0002.result").unlink()
    (job / "batch-0002.ct").write_bytes(b"garbage")
    done = medhe("batch", "run", "--plan", str(root / "bplan"), "--keys", str(root / "keys" / "evaluation.keys"),
                 "--job", str(job), "--backend", "clear", "--ray", ray_cluster)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "error: batch-0002.ct: not a medhe message" in done.stderr, done.stderr
