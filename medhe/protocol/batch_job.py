"""Throughput-mode batch jobs as files, for screening programmes: the clinic encrypts a folder
into a job directory, a server (or the workers of a Ray cluster that share the directory)
evaluates every batch, and the clinic decrypts the results.

    JOB/job.json                     format, version, job id, spec digest, key id, batches
    JOB/batch-0000.ct                one batch_ciphertext message per batch (up to N/2 images)
    JOB/results/batch-0000.result    the server's batch_result messages, each written atomically
    JOB.index.json (beside JOB/)     which image is where: stays with the clinic (file names can
                                     identify patients; the server never needs them)

Each batch message carries the label JOB_ID/batch-0000, which the server echoes in its result, so
a result copied from another batch or another job is refused when decrypted (and evaluated again
when a job is resumed). A batch whose result exists is not evaluated again, so a job interrupted
by a crash or a lost node is resumed by running it again. Every message is validated as the HTTP
service validates it (format version, digests, key id, sizes) before any ciphertext is used; the
manifest is checked for its structure (it carries no secret and no signature: whoever can write
the job directory can change it, and the labels and digests then refuse the mismatch). Links in
a job directory are refused: the server reads and writes only the job's own files.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from medhe.errors import BackendError, ConfigError, InvalidMessage, MedHEError
from medhe.protocol import wire
from medhe.protocol.server import TEMPORARY_GLOB, _atomic_write

JOB_FORMAT = "medhe-batch-job"
JOB_FORMAT_VERSION = 1
INDEX_FORMAT = "medhe-batch-index"
JOB_FILE = "job.json"
RESULTS_DIR = "results"
MAX_BATCHES = 100_000
LOCK_FILE = ".run.lock"
# What a Ray task reserves: one full batch at N=16384 peaks at 0.72 GB (benchmarks/bench_throughput.py),
# so Ray places no more batches on a node than its memory holds.
RAY_TASK_MEMORY_BYTES = 2**30
_BATCH_NAME = re.compile(r"batch-\d{4,6}")
_MAX_JOB_FILE_BYTES = 16 * 2**20


def default_index_path(job_dir: str | Path) -> Path:
    job_dir = Path(job_dir)
    return job_dir.with_name(job_dir.name + ".index.json")


def _read_json(path: Path, what: str) -> dict:
    try:
        if path.stat().st_size > _MAX_JOB_FILE_BYTES:
            raise InvalidMessage(f"{path} is too large for a {what}")
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"no {what} at {path}") from None
    except (OSError, ValueError) as exc:
        raise InvalidMessage(f"{path} is not a readable {what}: {exc}") from exc
    if not isinstance(doc, dict):
        raise InvalidMessage(f"{path}: a {what} is a JSON object")
    return doc


# --- clinic: encrypt --------------------------------------------------------------------------
def encrypt_job(client, images: Sequence, job_dir: str | Path, *, images_per_batch: int | None = None,
                workers: int | None = None, index_path: str | Path | None = None,
                on_batch: Callable[[int, int], None] | None = None) -> dict:
    """Preprocess and encrypt `images` (paths or arrays) into a new job directory. Returns the job
    manifest plus `input_typical`: per image, the client's input check (None without a profile),
    kept on the clinic's side in the index, never in the job directory. `on_batch(done, total)` is
    called after each batch (for a progress bar)."""
    spec = client.spec
    if spec.mode != "throughput":
        raise ConfigError("a batch job needs a throughput-mode client spec (`medhe compile --throughput`)")
    if len(images) == 0:
        raise ConfigError("a batch job needs at least one image")
    per_batch = spec.slot_count if images_per_batch is None else int(images_per_batch)
    if not 1 <= per_batch <= spec.slot_count:
        raise ConfigError(f"images per batch must be 1..{spec.slot_count} (N/2 slots), got {images_per_batch}")
    job_dir = Path(job_dir)
    if job_dir.exists() and (not job_dir.is_dir() or any(job_dir.iterdir())):
        raise ConfigError(f"{job_dir} exists and is not an empty directory; a job is written into a new one "
                          "(nothing is overwritten)")
    index_path = Path(index_path) if index_path else default_index_path(job_dir)
    if index_path.resolve().is_relative_to(job_dir.resolve()):
        raise ConfigError("the image index names the files: keep it outside the job directory the server gets")
    if not index_path.parent.is_dir():
        raise ConfigError(f"cannot write the index {index_path}: the directory {index_path.parent} does not exist")
    if index_path.exists() or index_path.is_symlink():
        raise ConfigError(f"{index_path} exists; an index is written once (nothing is overwritten)")
    inputs = np.stack([client.preprocess(image) for image in images])
    checks = [client.check_input(x) for x in inputs]
    typical = [None if check is None else check["typical"] for check in checks]
    job_id = secrets.token_hex(16)
    starts = list(range(0, len(inputs), per_batch))
    batches = [{"name": f"batch-{number:04d}", "count": int(min(per_batch, len(inputs) - start))}
               for number, start in enumerate(starts)]
    # The index first: a job that exists always has its names.
    index = {"format": INDEX_FORMAT, "format_version": JOB_FORMAT_VERSION, "job_id": job_id,
             "spec_digest": spec.digest(), "key_id": client.key_id,
             "images": [str(image) if isinstance(image, (str, Path)) else f"#{i}" for i, image in enumerate(images)],
             "input_typical": typical, "batches": batches}
    _atomic_write(index_path, json.dumps(index, indent=1).encode())
    job_dir.mkdir(parents=True, exist_ok=True)
    for number, (entry, start) in enumerate(zip(batches, starts), 1):
        message = client.encrypt_batch(inputs[start: start + per_batch], workers=workers,
                                       label=batch_label(job_id, entry["name"]))
        _atomic_write(job_dir / f"{entry['name']}.ct", message)
        if on_batch:
            on_batch(number, len(batches))
    manifest = {"format": JOB_FORMAT, "format_version": JOB_FORMAT_VERSION, "job_id": job_id,
                "spec_digest": spec.digest(), "key_id": client.key_id, "images": int(len(inputs)),
                "batches": batches}
    # Written last: a directory without job.json is an unfinished encryption, never run.
    _atomic_write(job_dir / JOB_FILE, json.dumps(manifest, indent=1).encode())
    return {**manifest, "input_typical": typical}


# --- both sides: the manifest ---------------------------------------------------------------------
def read_job(job_dir: str | Path, *, slot_count: int | None = None) -> dict:
    """The validated manifest of a job directory (batch names cannot point outside it)."""
    job_dir = Path(job_dir)
    if _is_link(job_dir / JOB_FILE):
        raise InvalidMessage(f"{job_dir / JOB_FILE} is a link; a job's files must be its own")
    doc = _read_json(job_dir / JOB_FILE, "batch job manifest (job.json)")
    if doc.get("format") != JOB_FORMAT or doc.get("format_version") != JOB_FORMAT_VERSION:
        raise InvalidMessage(f"{job_dir}: expected a {JOB_FORMAT} version {JOB_FORMAT_VERSION} manifest")
    for field in ("job_id", "spec_digest", "key_id"):
        if not isinstance(doc.get(field), str) or not re.fullmatch(r"[0-9a-f]{16,64}", doc[field]):
            raise InvalidMessage(f"{job_dir}: job.json field {field!r} must be a hex digest")
    batches = doc.get("batches")
    if not isinstance(batches, list) or not 1 <= len(batches) <= MAX_BATCHES:
        raise InvalidMessage(f"{job_dir}: job.json must list 1..{MAX_BATCHES} batches")
    names = set()
    for entry in batches:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) \
                or not _BATCH_NAME.fullmatch(entry["name"]) or entry["name"] in names:
            raise InvalidMessage(f"{job_dir}: each batch needs a unique name like batch-0000, got {entry!r}"[:300])
        count = entry.get("count")
        if type(count) is not int or not 1 <= count <= (slot_count or 2**20):
            raise InvalidMessage(f"{job_dir}: batch {entry['name']} has an invalid image count")
        names.add(entry["name"])
    if doc.get("images") != sum(entry["count"] for entry in batches):
        raise InvalidMessage(f"{job_dir}: job.json's image count does not add up over its batches")
    return doc


def _is_link(path: Path) -> bool:
    return os.path.islink(path)


def batch_label(job_id: str, name: str) -> str:
    """What a batch message carries and its result echoes: the job's random id and the batch name."""
    return f"{job_id}/{name}"


def _result_is_for(result_file: Path, job: dict, name: str) -> bool:
    """Whether an existing result file is this batch's (header only: the payload is checked when
    the clinic decrypts it)."""
    try:
        with open(result_file, "rb") as f:
            header = wire.peek_header(f.read(wire.PEEK_BYTES))
        extra = header.get("extra") if isinstance(header.get("extra"), dict) else {}
        return header["kind"] == "batch_result" and header["key_id"] == job["key_id"] \
            and wire.batch_label(extra) == batch_label(job["job_id"], name)
    except (OSError, InvalidMessage):
        return False


# --- server: run ----------------------------------------------------------------------------------
def evaluate_batch_file(plan_dir: str, keys_file: str, backend: str, batch_file: str, result_file: str) -> dict:
    """One batch: plan and evaluation keys loaded here (in whichever process or Ray worker runs it),
    the message evaluated as it streams from the file, the result written atomically."""
    from medhe.plan import BatchPlan, load_plan_dir
    from medhe.protocol.server import Server

    start = time.perf_counter()
    plan = load_plan_dir(plan_dir)
    if not isinstance(plan, BatchPlan):
        raise ConfigError(f"{plan_dir} is a latency-mode plan; a batch job needs `medhe compile --throughput`")
    server = Server(plan, backend=backend)
    server.register_keys(Path(keys_file).read_bytes())
    loaded = time.perf_counter()
    try:
        result = server.evaluate_batch(batch_file)
    except MedHEError as exc:  # the same error type, naming the batch
        raise type(exc)(f"{Path(batch_file).name}: {exc}") from exc
    _atomic_write(Path(result_file), result)
    return {"batch": Path(batch_file).stem, "seconds": time.perf_counter() - loaded,
            "setup_seconds": loaded - start, "pid": os.getpid(), "host": socket.gethostname()}


def run_job(plan_dir: str | Path, keys_file: str | Path, job_dir: str | Path, *, backend: str = "seal",
            workers: int = 1, ray_address: str | None = None,
            on_batch: Callable[[dict, int, int], None] | None = None) -> dict:
    """Evaluate every batch of a job that has no result yet: in this process (workers=1), in
    `workers` local processes, or as Ray tasks on the cluster at `ray_address` ("local" starts
    one here), one CPU each. Paths must be readable by every worker: on several machines, a
    shared file system at the same path. Returns a summary (also written to results/run.json)."""
    from medhe.plan import BatchPlan, load_plan_dir
    from medhe.protocol.server import Server

    plan_dir, keys_file, job_dir = (Path(p).resolve() for p in (plan_dir, keys_file, job_dir))
    plan = load_plan_dir(plan_dir)
    if not isinstance(plan, BatchPlan):
        raise ConfigError(f"{plan_dir} is a latency-mode plan; a batch job needs `medhe compile --throughput`")
    job = read_job(job_dir, slot_count=plan.params.slot_count)
    if job["spec_digest"] != plan.client_spec().digest():
        raise InvalidMessage(f"the job was encrypted for model spec {job['spec_digest'][:16]}, this plan's is "
                             f"{plan.client_spec().digest()[:16]}")
    if not keys_file.is_file():
        raise ConfigError(f"no evaluation keys file at {keys_file}")
    key_id = Server(plan, backend=backend).register_keys(keys_file.read_bytes())  # validated once, here
    if key_id != job["key_id"]:
        raise InvalidMessage(f"the job was encrypted under key id {job['key_id'][:16]}; these evaluation keys are "
                             f"{key_id[:16]}")
    results = job_dir / RESULTS_DIR
    if _is_link(results) or (results.exists() and not results.is_dir()):
        raise InvalidMessage(f"{results} must be a directory of the job's own, not a link or a file")
    results.mkdir(exist_ok=True)
    if workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")
    with _run_lock(results):
        return _run_unlocked(job, plan_dir, keys_file, job_dir, results, backend=backend, workers=workers,
                             ray_address=ray_address, on_batch=on_batch)


@contextmanager
def _run_lock(results: Path) -> Iterator[None]:
    """One `batch run` of a job at a time (a second would only duplicate work, but it would also
    take the first one's half-written files for a killed run's). Held by the driver for the whole
    run; the kernel releases it when the driver dies, however it dies."""
    path = results / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise InvalidMessage(f"cannot open the job's lock file {path}: {exc}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another `medhe batch run` is evaluating this job ({path} is locked); wait for it "
                              "to finish, or stop it and run again to resume") from None
        except OSError as exc:
            raise ConfigError(f"cannot lock {path} ({exc.strerror}): the job must be on a file system with "
                              "file locks (local, or NFSv4)") from None
        # Holding the lock, every temporary file in results/ is a killed run's unfinished write.
        for leftover in results.glob(TEMPORARY_GLOB):
            leftover.unlink(missing_ok=True)
        yield
    finally:
        os.close(fd)


def _run_unlocked(job: dict, plan_dir: Path, keys_file: Path, job_dir: Path, results: Path, *, backend: str,
                  workers: int, ray_address: str | None, on_batch) -> dict:
    tasks, skipped, replaced = [], [], []
    for entry in job["batches"]:
        batch_file, result_file = job_dir / f"{entry['name']}.ct", results / f"{entry['name']}.result"
        if _is_link(batch_file) or _is_link(result_file):
            raise InvalidMessage(f"{entry['name']}: links are refused in a job directory")
        if result_file.exists() and _result_is_for(result_file, job, entry["name"]):
            skipped.append(entry["name"])
            continue
        if result_file.exists():
            replaced.append(entry["name"])  # another batch's or job's result, or a damaged one
        if not batch_file.is_file():
            raise ConfigError(f"the job lists {entry['name']} but {batch_file} is missing")
        tasks.append((str(plan_dir), str(keys_file), backend, str(batch_file), str(result_file)))
    start = time.perf_counter()
    if ray_address:
        done = _run_on_ray(tasks, ray_address, on_batch)
    elif workers > 1 and len(tasks) > 1:
        done = _run_in_processes(tasks, workers, on_batch)
    else:
        done = []
        for task in tasks:
            done.append(evaluate_batch_file(*task))
            if on_batch:
                on_batch(done[-1], len(done), len(tasks))
    summary = {"batches": len(job["batches"]), "evaluated": len(done), "skipped_with_result": skipped,
               "replaced_results": replaced, "wall_seconds": time.perf_counter() - start,
               "runner": "ray" if ray_address else ("processes" if workers > 1 and len(tasks) > 1 else "this process"),
               "driver_pid": os.getpid(), "tasks": done}
    _atomic_write(results / "run.json", json.dumps(summary, indent=1).encode())
    return summary


def _run_in_processes(tasks: list[tuple], workers: int, on_batch) -> list[dict]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    # spawn: SEAL objects and threads of the parent are not inherited half-made.
    pool = ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=multiprocessing.get_context("spawn"))
    done = []
    try:
        futures = [pool.submit(evaluate_batch_file, *task) for task in tasks]
        for future in as_completed(futures):
            done.append(future.result())
            if on_batch:
                on_batch(done[-1], len(done), len(tasks))
    except BrokenProcessPool as exc:
        raise BackendError(f"a worker process died while evaluating a batch ({exc}); finished batches are kept: "
                           "run the job again to resume") from None
    finally:
        # On the first failure, batches not yet started are dropped (as on Ray); running ones finish.
        pool.shutdown(wait=True, cancel_futures=True)
    return done


def _run_on_ray(tasks: list[tuple], address: str, on_batch) -> list[dict]:
    try:
        import ray
    except ImportError:
        raise ConfigError("running on Ray needs the optional extra: pip install 'medhe[cluster]'") from None
    ray.init(address=None if address == "local" else address, ignore_reinit_error=True,
             log_to_driver=False)
    if ray.cluster_resources().get("memory", 0) < RAY_TASK_MEMORY_BYTES:  # else the tasks wait for ever
        raise ConfigError(f"the Ray cluster offers {ray.cluster_resources().get('memory', 0) / 2**30:.1f} GiB of "
                          f"task memory; a batch task needs {RAY_TASK_MEMORY_BYTES / 2**30:.0f} GiB")
    # A lost node's batch runs again; each task reserves the memory a batch needs.
    remote = ray.remote(num_cpus=1, memory=RAY_TASK_MEMORY_BYTES, max_retries=2)(evaluate_batch_file)
    pending = [remote.remote(*task) for task in tasks]
    done = []
    while pending:
        finished, pending = ray.wait(pending, num_returns=1)
        try:
            done.append(ray.get(finished[0]))
        except ray.exceptions.RayError as exc:  # a task's own error, or a lost worker, node or memory
            for ref in pending:
                ray.cancel(ref)
            cause = getattr(exc, "cause", None)
            if isinstance(cause, MedHEError):
                raise cause from None  # a bad message or file: the same error as without Ray
            raise BackendError(f"a batch failed on the Ray cluster ({type(exc).__name__}: {cause or exc}); "
                               "finished batches are kept: run the job again to resume") from None
        if on_batch:
            on_batch(done[-1], len(done), len(tasks))
    return done


# --- clinic: decrypt ----------------------------------------------------------------------------
def decrypt_job(client, job_dir: str | Path, *, index_path: str | Path | None = None) -> list[dict]:
    """Per image, in the order encrypted: name, label, probabilities, logits and input_typical
    (the input check at encryption; None without a profile or an index). Without an index
    (or with none at the default place) images are named by batch and position."""
    job_dir = Path(job_dir)
    job = read_job(job_dir, slot_count=client.spec.slot_count)
    if job["spec_digest"] != client.spec.digest() or job["key_id"] != client.key_id:
        raise InvalidMessage("this job was not encrypted with this client spec and key (spec or key id differ)")
    names, typical = None, None
    path = Path(index_path) if index_path else default_index_path(job_dir)
    if index_path or path.is_file():
        index = _read_json(path, "batch job index")
        images = index.get("images")
        if index.get("format") != INDEX_FORMAT or index.get("job_id") != job["job_id"] \
                or not isinstance(images, list) or len(images) != job["images"]:
            raise InvalidMessage(f"{path} is not the index of this job (another job's, or damaged)")
        names = [str(name) for name in images]
        typical = index.get("input_typical")  # absent in indexes written before the input check
        if typical is not None and (not isinstance(typical, list) or len(typical) != job["images"]
                                    or any(not (flag is None or isinstance(flag, bool)) for flag in typical)):
            raise InvalidMessage(f"{path}: input_typical must list true, false or null per image")
    results = job_dir / RESULTS_DIR
    missing = [e["name"] for e in job["batches"] if not (results / f"{e['name']}.result").is_file()]
    if missing:
        raise ConfigError(f"{len(missing)} of {len(job['batches'])} batches have no result yet "
                          f"({', '.join(missing[:5])}{'...' if len(missing) > 5 else ''}); run the job first")
    rows, position = [], 0
    for entry in job["batches"]:
        logits = client.decrypt_batch((results / f"{entry['name']}.result").read_bytes(),
                                      expect_label=batch_label(job["job_id"], entry["name"]))
        if len(logits) != entry["count"]:
            raise InvalidMessage(f"{entry['name']}: the result holds {len(logits)} images, the job {entry['count']}")
        for offset, row in enumerate(logits):
            label, probabilities = client.diagnosis(row)
            name = names[position] if names else f"{entry['name']}#{offset}"
            rows.append({"image": name, "batch": entry["name"], "label": label,
                         "probabilities": dict(zip(client.spec.class_names, probabilities.tolist())),
                         "logits": row.tolist(), "input_typical": typical[position] if typical else None})
            position += 1
    return rows
