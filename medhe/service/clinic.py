"""The clinic web app (`medhe clinic`): a local page for radiology staff.

The page is served by a process on the clinic's own machine (127.0.0.1 by default). That process
holds the secret key (a `RemoteClient` key directory), reads and preprocesses each image, encrypts
it and talks to the remote diagnosis server with ciphertexts only. The browser talks to this process
alone, and four guards keep it so:
- a Content-Security-Policy of 'self': the page loads nothing from elsewhere (no CDN) and cannot
  send an image anywhere but here;
- every /api request carries this session's access token in the `X-MedHE-Clinic` header: the link
  `medhe clinic` prints holds it, so another user of the machine (or a process that can reach
  127.0.0.1) cannot read the studies or use the clinic's keys, and another web site cannot make a
  browser send that header without a CORS preflight this app never grants;
- the Host header must name this machine (a DNS-rebinding site would name itself).
The remote server's token stays in this process; the page never sees it.

    GET  /                          the page; /static/... its script and style, from the package
    GET  /api/status                the server, its models (classes, weights, digest, key state)
    POST /api/models/{name}/keys    make (first use) and upload this clinic's keys -> a task
    POST /api/studies?model=&name=  a file's bytes -> preview and metadata now, the diagnosis as a task
    GET  /api/tasks[/{id}]          key set-up and studies, with their steps and timings
    GET  /api/studies.csv           the studies as CSV
"""

from __future__ import annotations

import base64
import csv
import hmac
import io
import itertools
import secrets
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fastapi import Request

from medhe.data.input_check import typical_cell
from medhe.errors import (ConfigError, ImageLoadError, MedHEError, MissingKeyError, ModelChangedError,
                          RemoteError)
from medhe.plan import ClientSpec
from medhe.protocol.keydir import EVAL_KEYS_FILE, PUBLIC_KEY_FILE
from medhe.protocol.remote import RemoteClient

STATIC_DIR = Path(__file__).with_name("clinic_static")
CLINIC_HEADER = "x-medhe-clinic"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
DEFAULT_MAX_FILE_BYTES = 256 * 2**20  # a large uncompressed DICOM series frame is far below this
MAX_TASKS_KEPT = 5000
STUDY_STEPS = ("preprocess", "encrypt", "upload", "evaluate", "decrypt")
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                           "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'")


class ClinicError(Exception):
    """An answer of the local app: HTTP status, a stable code and a message for the clinician."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def explain(exc: BaseException, server_url: str) -> ClinicError:
    """The clinician-facing message for an exception raised while talking to the server."""
    if isinstance(exc, ClinicError):
        return exc
    if isinstance(exc, ImageLoadError):
        return ClinicError(422, "unreadable_file", str(exc))
    if isinstance(exc, ModelChangedError):
        return ClinicError(409, "model_changed", str(exc).replace(
            "accept it with --accept-new-model", "accept it with the button below"))
    if isinstance(exc, RemoteError):
        if exc.code == "unreachable":
            return ClinicError(502, "server_unreachable", f"The diagnosis server at {server_url} cannot be reached. "
                                                          "Check the network and that the server is running.")
        if exc.status == 401:
            return ClinicError(502, "wrong_token", f"The diagnosis server at {server_url} refused this clinic's access "
                                                   "token. Restart `medhe clinic` with the token your operator "
                                                   "issued (--token or MEDHE_TOKEN).")
        # The server's own 404 (no such model) stays a 404; any other refusal (or a card that does not
        # match its own digest) is a bad gateway here.
        return ClinicError(404 if exc.status == 404 else 502, f"server_{exc.code}", str(exc))
    if isinstance(exc, MissingKeyError):
        return ClinicError(409, "missing_key", str(exc))
    if isinstance(exc, MedHEError):
        return ClinicError(400, type(exc).__name__, str(exc))
    return ClinicError(500, "internal", f"unexpected {type(exc).__name__}: {exc}")


def preview_png(model_input: np.ndarray, preprocessing) -> str:
    """The model input (C, H, W) as a PNG data URL: what the model sees, pixel for pixel, with the
    normalisation undone so that it shows as the cropped and resized grayscale image (a per_image
    input has no pixel scale to undo: it shows stretched from its darkest to its brightest pixel)."""
    from PIL import Image

    from medhe.data.preprocess import stretch_per_image

    values = np.asarray(model_input, dtype=np.float64)[0]
    if preprocessing.normalization == "per_image":
        pixels = stretch_per_image(values)
    else:
        pixels = np.clip(values * preprocessing.std + preprocessing.mean, 0.0, 1.0)
    buffer = io.BytesIO()
    Image.fromarray(np.round(pixels * 255).astype(np.uint8), mode="L").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


@dataclass
class Task:
    id: str
    kind: str  # "keys" or "study"
    model: str
    name: str
    state: str = "queued"  # queued, running, done, failed
    step: str = ""
    message: str = ""
    timings_s: dict[str, float] = field(default_factory=dict)
    result: dict | None = None
    error: dict | None = None
    preview: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    created: float = field(default_factory=time.time)

    def to_dict(self) -> dict:
        return {"id": self.id, "kind": self.kind, "model": self.model, "name": self.name, "state": self.state,
                "step": self.step, "message": self.message, "timings_s": self.timings_s, "result": self.result,
                "error": self.error, "preview": self.preview, "metadata": self.metadata}


def check_study_name(name: str) -> None:
    if not name or len(name) > 512 or any(ch in name for ch in "\x00\r\n"):
        raise ClinicError(400, "bad_name", "a study needs its file name (at most 512 characters, one line)")


def _csv_cell(value) -> str:
    """A spreadsheet cell that a file name cannot turn into a formula."""
    text = "" if value is None else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


class ClinicApp:
    """The local process behind the page: tasks run one at a time on a worker thread (encryption
    is quick; the server's evaluation is the wait) so the page stays responsive."""

    def __init__(self, remote: RemoteClient, *, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
                 access_token: str | None = None) -> None:
        self.remote = remote
        self.access_token = access_token or secrets.token_urlsafe(24)  # for this run of the app only
        self.max_file_bytes = max_file_bytes
        self._tasks: OrderedDict[str, Task] = OrderedDict()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clinic")
        self._cards: dict[str, tuple[ClientSpec, str | None]] = {}

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # --- models ---------------------------------------------------------------------------------
    def status(self) -> dict:
        server = {"url": self.remote.server_url, "reachable": False, "error": None}
        try:
            models = self.remote.models()
            server["reachable"] = True
        except Exception as exc:  # shown on the page; the app keeps running
            server["error"] = explain(exc, self.remote.server_url).__dict__
            return {"server": server, "models": []}
        described = []
        for entry in models:
            name = entry["name"]
            spec = ClientSpec.from_dict(self.remote.model_card(name))
            pinned = self.remote.pinned_digest(name)
            if pinned is not None and pinned != spec.digest():
                keys = "changed"
            elif self.remote.has_local_keys(name, spec):
                keys = "ready"
            else:
                keys = "none"
            described.append({"name": name, "class_names": list(spec.class_names), "weights": entry.get("weights"),
                              "mode": spec.mode, "spec_digest": spec.digest(), "keys": keys,
                              "input_shape": list(spec.input_shape)})
        return {"server": server, "models": described}

    def _card(self, model: str) -> tuple[ClientSpec, str | None]:
        """(client spec, where the weights are: "plain" or "encrypted"), fetched once per model."""
        if model not in self._cards:
            spec = self.remote.spec(model)
            if spec.mode != "latency":
                raise ClinicError(400, "throughput_model", f"model {model} runs in throughput mode (batches of "
                                                           "images in one message); use `medhe diagnose --batch`")
            self._cards[model] = (spec, self.remote.model_card(model).get("weights"))
        return self._cards[model]

    # --- tasks ----------------------------------------------------------------------------------
    def _new_task(self, kind: str, model: str, name: str) -> Task:
        task = Task(id=f"t{next(self._ids)}", kind=kind, model=model, name=name)
        with self._lock:
            self._tasks[task.id] = task
            while len(self._tasks) > MAX_TASKS_KEPT:
                oldest = next(iter(self._tasks))
                if self._tasks[oldest].state in ("queued", "running"):
                    break
                del self._tasks[oldest]
        return task

    def tasks(self, *, previews: bool = True) -> list[dict]:
        with self._lock:
            listed = [task.to_dict() for task in self._tasks.values()]
        if not previews:  # the page polls this list: a preview is fetched once per study
            for task in listed:
                task["preview"] = ""
        return listed

    def task(self, task_id: str) -> dict:
        with self._lock:
            if task_id not in self._tasks:
                raise ClinicError(404, "unknown_task", f"no task {task_id!r}")
            return self._tasks[task_id].to_dict()

    def _run(self, task: Task, work) -> None:
        def guarded() -> None:
            task.state = "running"
            try:
                work(task)
                task.state = "done"
            except Exception as exc:
                error = explain(exc, self.remote.server_url)
                task.error, task.state = {"code": error.code, "message": error.message}, "failed"
            task.step = ""

        self._executor.submit(guarded)

    def prepare_keys(self, model: str, *, accept_new: bool = False) -> dict:
        """Make this clinic's keys for `model` on first use (then reuse them) and upload the
        evaluation keys once; `accept_new` accepts a model that changed since first use."""
        task = self._new_task("keys", model, model)

        def work(task: Task) -> None:
            start = time.perf_counter()
            if accept_new:
                self._cards.pop(model, None)
                self.remote.forget_client(model)

            def progress(text: str) -> None:
                task.step, task.message = ("upload", text) if text.startswith("uploading") else ("keygen", text)

            task.step, task.message = "check", "checking the model card"
            client = self.remote.client(model, accept_new=accept_new, progress=progress)
            spec = client.spec
            keys_file = self.remote.key_dir(model, spec) / EVAL_KEYS_FILE
            task.timings_s["keys"] = time.perf_counter() - start
            task.result = {"key_id": client.key_id, "spec_digest": spec.digest(),
                           "evaluation_keys_bytes": keys_file.stat().st_size if keys_file.is_file() else 0}
            task.message = f"keys ready (key id {client.key_id[:12]})"

        self._run(task, work)
        return task.to_dict()

    def add_study(self, data: bytes, name: str, model: str) -> dict:
        """Read and preprocess a file now (its preview and metadata are answered at once; a file
        that cannot be read is refused here, naming it), then diagnose it on the worker thread."""
        from medhe.data.images import describe_image_bytes, load_image_bytes
        from medhe.data.preprocess import Preprocessing

        check_study_name(name)
        spec, weights = self._card(model)
        start = time.perf_counter()
        metadata = describe_image_bytes(data, name)
        preprocessing = Preprocessing.from_dict(spec.preprocessing)
        model_input = preprocessing.apply(load_image_bytes(data, name))
        preview = preview_png(model_input, preprocessing)
        task = self._new_task("study", model, name)
        task.metadata, task.preview = metadata, preview
        task.timings_s["preprocess"] = time.perf_counter() - start

        def work(task: Task) -> None:
            def on_step(step: str) -> None:
                task.step = "upload" if step == "server" else step

            task.step = "keys"
            self.remote.client(model, progress=lambda text: setattr(task, "message", text))
            task.message = ""
            result = self._diagnose(model_input, model, name, spec, weights, on_step)
            evaluate_s = result.evaluate_s if np.isfinite(result.evaluate_s) else 0.0
            task.timings_s.update({"encrypt": result.encrypt_s, "upload": max(result.server_s - evaluate_s, 0.0),
                                   "evaluate": evaluate_s, "decrypt": result.decrypt_s})
            task.result = {"label": result.label, "probability": float(result.probabilities.max()),
                           "probabilities": dict(zip(spec.class_names, map(float, result.probabilities))),
                           "logits": [float(v) for v in result.logits], "spec_digest": spec.digest(),
                           "key_id": self.remote.client(model).key_id, "weights": weights,
                           "ciphertext_bytes": result.upload_bytes, "input_check": result.input_check}

        self._run(task, work)
        return task.to_dict()

    def _diagnose(self, model_input, model: str, name: str, spec: ClientSpec, weights, on_step):
        """One encrypted diagnosis, recovering from what a long-running app meets: a server that
        lost this clinic's keys (they are uploaded again) and a model replaced on the server (told
        as a changed model, so that the page offers to accept it)."""
        for attempt in range(2):
            try:
                return self.remote.diagnose_input(model_input, model, name=name, on_step=on_step)
            except MissingKeyError as exc:
                client = self.remote.client(model)
                if attempt == 0 and self.remote.key_status(client.key_id) is None:
                    self.remote.forget_client(model)  # the next client() uploads the keys again
                    self.remote.client(model)
                    continue
                if weights != "encrypted":
                    raise
                public_key = self.remote.key_dir(model, spec) / PUBLIC_KEY_FILE
                raise ClinicError(409, "no_encrypted_model", f"{exc}. This model's weights are encrypted per clinic: "
                                                             f"send the model owner this clinic's public key "
                                                             f"({public_key}); it holds no secret.") from None
            except RemoteError as exc:
                if exc.code != "unknown_model":
                    raise
                self._cards.pop(model, None)
                self.remote.forget_client(model)
                self.remote.spec(model)  # raises ModelChangedError when the card changed since the keys
                raise
        raise ClinicError(502, "missing_key", f"the server at {self.remote.server_url} keeps losing this clinic's keys")

    def record_failure(self, name: str, model: str, error: ClinicError) -> dict:
        """A file refused before its diagnosis could start: kept as a failed study (for the table
        and the CSV export)."""
        task = self._new_task("study", model, name)
        task.state, task.error = "failed", {"code": error.code, "message": error.message}
        return task.to_dict()

    def studies_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["file", "model", "spec_digest", "state", "label", "probability", "probabilities",
                         "input_typical", *[f"{step}_s" for step in STUDY_STEPS], "total_s", "error"])
        for task in self.tasks():
            if task["kind"] != "study":
                continue
            result, timings = task["result"] or {}, task["timings_s"]
            probabilities = _csv_cell("; ".join(f"{k}={v:.6f}" for k, v in (result.get("probabilities") or {}).items()))
            writer.writerow([_csv_cell(task["name"]), task["model"], result.get("spec_digest", ""), task["state"],
                             _csv_cell(result.get("label", "")),
                             f"{result['probability']:.6f}" if result else "", probabilities,
                             typical_cell((result.get("input_check") or {}).get("typical")),
                             *[f"{timings[s]:.4f}" if s in timings else "" for s in STUDY_STEPS],
                             f"{sum(timings.values()):.4f}" if result else "",
                             _csv_cell((task["error"] or {}).get("message", ""))])
        return out.getvalue()


def create_clinic_app(clinic: ClinicApp, *, allowed_hosts: tuple[str, ...] = ("127.0.0.1", "localhost", "[::1]")):
    from fastapi import FastAPI
    from fastapi.responses import FileResponse, JSONResponse, Response
    from fastapi.staticfiles import StaticFiles
    from starlette.concurrency import run_in_threadpool
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    app = FastAPI(title="medhe clinic", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))
    app.state.clinic = clinic
    token = clinic.access_token.encode()

    @app.middleware("http")
    async def guard(request: Request, call_next):
        given = request.headers.get(CLINIC_HEADER, "")
        if request.url.path.startswith("/api/") and not hmac.compare_digest(given.encode(), token):
            response = JSONResponse({"error": "forbidden", "message": "this page needs the access token of this run of "
                                     "`medhe clinic`: open the link it printed"}, status_code=403)
        elif request.url.path.startswith("/api/") or request.method in ("GET", "HEAD"):
            response = await call_next(request)
        else:
            response = JSONResponse({"error": "method_not_allowed", "message": "only the page's API changes state"},
                                    status_code=405)
        response.headers["content-security-policy"] = CONTENT_SECURITY_POLICY
        response.headers["x-content-type-options"] = "nosniff"
        response.headers["referrer-policy"] = "no-referrer"
        response.headers["cache-control"] = "no-store"
        return response

    @app.exception_handler(ClinicError)
    async def clinic_error(_: Request, exc: ClinicError):
        return JSONResponse({"error": exc.code, "message": exc.message}, status_code=exc.status)

    @app.exception_handler(MedHEError)
    async def medhe_error(_: Request, exc: MedHEError):
        error = explain(exc, clinic.remote.server_url)
        return JSONResponse({"error": error.code, "message": error.message}, status_code=error.status)

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/api/status")
    def status() -> dict:
        return clinic.status()

    @app.post("/api/models/{name}/keys")
    def prepare_keys(name: str, accept_new: bool = False) -> dict:
        return clinic.prepare_keys(name, accept_new=accept_new)

    @app.post("/api/studies")
    async def add_study(request: Request, model: str, name: str):
        check_study_name(name)
        try:
            declared = request.headers.get("content-length")
            if declared is not None and (not declared.isdigit() or int(declared) > clinic.max_file_bytes):
                raise ClinicError(413, "too_large", f"{name}: files up to {clinic.max_file_bytes // 2**20} MiB "
                                                    "are read")
            body = bytearray()
            async for chunk in request.stream():
                body += chunk
                if len(body) > clinic.max_file_bytes:
                    raise ClinicError(413, "too_large", f"{name}: files up to {clinic.max_file_bytes // 2**20} MiB "
                                                        "are read")
            return await run_in_threadpool(clinic.add_study, bytes(body), name, model)
        except Exception as exc:
            error = explain(exc, clinic.remote.server_url)
            task = clinic.record_failure(name, model, error)
            return JSONResponse({"error": error.code, "message": error.message, "task": task},
                                status_code=error.status)

    @app.get("/api/tasks")
    def tasks(previews: bool = True) -> dict:
        return {"tasks": clinic.tasks(previews=previews)}

    @app.get("/api/tasks/{task_id}")
    def task(task_id: str) -> dict:
        return clinic.task(task_id)

    @app.get("/api/studies.csv")
    def studies_csv():
        return Response(clinic.studies_csv(), media_type="text/csv",
                        headers={"content-disposition": 'attachment; filename="medhe-studies.csv"'})

    return app


def check_clinic_host(host: str) -> None:
    """The app holds the secret key: it listens on this machine unless told otherwise."""
    if host not in LOCAL_HOSTS:
        raise ConfigError(f"medhe clinic listens on 127.0.0.1 (the page holds no key, but it can use this "
                          f"clinic's keys): {host} would expose it to the network. Pass --allow-remote-host to "
                          "do so anyway, behind your own access control")
