"""HTTP service for the diagnosis server (FastAPI). Bytes in, bytes out: the bodies are the same
versioned wire messages the CLI writes to files, so nothing is unpickled and every message is
validated (version, spec digest, key id, checksum, size) before use.

    GET  /health                    liveness; never waits for an evaluation
    GET  /metrics                   counters for the operator (Prometheus text format; no clinic named)
    GET  /v1/models                 the hosted models
    GET  /v1/models/{name}          a model card: the public client spec (no weight) and its digest
    POST /v1/keys                   evaluation keys (streamed to disk)  -> {"model", "key_id"}
    GET  /v1/keys/{key_id}          whether this clinic's key id is registered (and has its model)
    POST /v1/encrypted-model        encrypted model (model owner; encrypted-model mode)
    POST /v1/diagnose               ciphertext -> result (application/octet-stream)
    POST /v1/diagnose-batch         throughput mode: a batch of images (streamed to disk) -> results

Evaluation runs in worker processes (or, with workers=0, on a thread), never on the event loop; at
most workers + queue_size requests are in flight and the next gets 503 with Retry-After. Messages
name their model by spec digest. With a token store, every /v1 call needs `Authorization: Bearer`
and a clinic sees and uses only the key ids it registered. Errors are JSON
{"error": stable code, "message": text}; a peer's bad input is a 4xx, never a 500.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import re
import secrets
import struct
import time
from collections import Counter
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from medhe.errors import ConfigError, InvalidMessage
from medhe.protocol import wire
from medhe.protocol.server import is_key_id
from medhe.service.auth import Principal, TokenStore
from medhe.service.hosting import HostedModel, UploadArea, check_distinct_names, sweep_stale_files
from medhe.service.metrics import Metrics, RateLimiter
from medhe.service.workers import InlinePool, PoolBusy, ProcessPool, WorkerFailed

OCTET = "application/octet-stream"
log = logging.getLogger("medhe.service")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}\Z")


@dataclass(frozen=True)
class Limits:
    """Request size limits (bytes, whole message) and timeouts."""
    ciphertext_bytes: int = 64 * 2**20
    # One seeded ciphertext per input feature (0.45 GB for 28x28, 2.2 GiB for 64x64); streamed to disk.
    batch_bytes: int = 4 * 2**30
    evaluation_keys_bytes: int = 2 * 2**30  # keys at N=16384 are 150-200 MB (N=32768: ~1 GB); never held in memory
    encrypted_model_bytes: int = 2 * 2**30
    idle_upload_timeout_s: float = 30.0  # a stalled upload is dropped after this long without a byte
    upload_deadline_s: float = 1800.0  # and any upload after this long (a trickle of bytes included)
    evaluate_timeout_s: float = 600.0
    queue_size: int = 8  # requests waiting beyond the ones being evaluated
    retry_after_s: int = 2
    requests_per_minute: float = 0.0  # per clinic, for the endpoints that make work; 0: no limit
    burst: int | None = None  # requests a clinic may make at once (default: 10 s worth)


class ServiceError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def _error_response(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status, headers=headers)


async def _receive(request: Request, kind: str, limit: int, *, to_file: Path | None = None,
                   idle_timeout_s: float, deadline_s: float, on_header=None) -> tuple[dict, bytes]:
    """Read a `kind` message body of at most `limit` bytes. Its header is checked as soon as it has
    arrived (a too-large or wrong-kind message is refused before its payload is read), and so is
    `on_header(header)`, the caller's own checks; with `to_file` the body is streamed there and
    never held in memory. Returns (header, body or b"")."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != OCTET:
        raise ServiceError(415, "unsupported_media_type",
                           f"a {kind} message is sent as {OCTET}, not {content_type or 'no content type'}")
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise ServiceError(413, "too_large", f"a {kind} message is at most {limit} bytes")
    buffer, header, expected, total, sink = bytearray(), None, None, 0, None
    digest = hashlib.sha256()
    stream = request.stream().__aiter__()
    deadline = time.monotonic() + deadline_s
    try:
        while True:
            try:
                chunk = await asyncio.wait_for(stream.__anext__(), min(idle_timeout_s, deadline - time.monotonic()))
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                raise ServiceError(408, "upload_timeout", f"no data for {idle_timeout_s:.0f} s, or the upload took "
                                                          f"longer than {deadline_s:.0f} s; dropped") from None
            total += len(chunk)
            if total > limit or (expected is not None and total > expected):
                raise ServiceError(413, "too_large", f"a {kind} message is at most {limit} bytes and as long as its "
                                                     "header says")
            if sink is not None:
                sink.write(chunk)
                digest.update(chunk)
                continue
            buffer += chunk
            if header is None and len(buffer) >= 11:
                header_len = struct.unpack_from(">I", buffer, 7)[0]
                if buffer[:5] != wire.MAGIC or len(buffer) >= 11 + min(header_len, wire.MAX_HEADER_BYTES):
                    header = _checked_header(bytes(buffer), kind)
                    expected = 11 + header_len + header["payload_bytes"]
                    if expected > limit:
                        raise ServiceError(413, "too_large", f"a {kind} message is at most {limit} bytes; this one "
                                                             f"says {expected}")
                    if on_header is not None:
                        on_header(header)
                    if to_file is not None:
                        sink = open(to_file, "xb")
                        sink.write(buffer)
                        digest.update(buffer[11 + header_len:])
                        buffer = bytearray()
        if header is None:
            header = _checked_header(bytes(buffer), kind)
            expected = 11 + struct.unpack_from(">I", buffer, 7)[0] + header["payload_bytes"]
            if on_header is not None:
                on_header(header)
        if total != expected:
            raise ServiceError(400, "invalid_message", f"{kind} message is truncated: {total} of {expected} bytes")
        if sink is not None and digest.hexdigest() != header.get("payload_sha256"):
            # Checked here, while streaming, so a corrupt upload never reaches a worker's memory.
            raise ServiceError(400, "invalid_message", f"{kind} payload does not match its checksum")
    except BaseException:
        if sink is not None:
            sink.close()
            to_file.unlink(missing_ok=True)
        raise
    if sink is not None:
        sink.close()
    return header, bytes(buffer)


def _checked_header(prefix: bytes, kind: str) -> dict:
    try:
        header = wire.peek_header(prefix)
    except InvalidMessage as exc:
        raise ServiceError(400, "invalid_message", str(exc)) from None
    if header["kind"] != kind:
        raise ServiceError(400, "invalid_message", f"expected a {kind} message, got {header['kind']!r}")
    if not is_key_id(header["key_id"]):
        raise ServiceError(400, "invalid_message", f"key id must be {wire.KEY_ID_HEX_DIGITS} lowercase hex digits")
    return header


def create_app(models: list[HostedModel], *, data_dir: str | Path, workers: int = 0, max_key_sets: int | None = 4,
               tokens: TokenStore | None = None, limits: Limits = Limits(), two_processes: bool = False) -> FastAPI:
    """The service for `models` (from `hosting.host_plan`). workers=0 evaluates on a thread of this
    process; workers=N in N worker processes. With `tokens`, every /v1 request needs a token of
    the store, read again per request (an empty store, e.g. after the last token is revoked,
    admits nobody); without, there is no access control: for a server only its operator can reach.
    With `two_processes` (worker processes only), each worker shares each latency-mode evaluation
    with a helper process of its own (medhe.runtime.split)."""
    if not models:
        raise ConfigError("a server hosts at least one model")
    by_name = {m.name: m for m in models}
    by_digest = {m.spec_digest: m for m in models}
    check_distinct_names([m.name for m in models])
    if len(by_digest) != len(models):
        digests = Counter(m.spec_digest for m in models)
        same = [m.name for m in models if digests[m.spec_digest] > 1]
        raise ConfigError(f"hosted models need distinct client specs: {' and '.join(same)} have the same one (the "
                          "same compiled model; it cannot be hosted twice, e.g. with plain and with encrypted "
                          "weights: host it once)")
    instance = secrets.token_hex(4)  # names this server process (or Ray replica) in answers and logs
    removed = sweep_stale_files(data_dir, models)
    if removed:
        log.info("removed %d upload areas and half-written files left by stopped servers", removed)
    uploads = UploadArea(data_dir, instance)
    if two_processes and workers == 0:
        raise ConfigError("two-process evaluation forks a helper from a worker process; it needs --workers >= 1")
    if workers == 0:
        pool = InlinePool(models, max_key_sets=max_key_sets, queue_size=limits.queue_size)
    else:
        pool = ProcessPool(models, workers=workers, max_key_sets=max_key_sets, queue_size=limits.queue_size,
                           two_processes=two_processes)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await pool.start()
        try:
            yield
        finally:
            await pool.close()

    app = FastAPI(title="medhe diagnosis server", version=str(wire.FORMAT_VERSION), lifespan=lifespan,
                  description=__doc__)
    app.state.pool = pool
    app.state.models = by_name
    metrics = Metrics()
    limiter = RateLimiter(limits.requests_per_minute, limits.burst) if limits.requests_per_minute > 0 else None

    # --- errors and logs ------------------------------------------------------------------------
    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError):
        request.state.log["error"] = exc.code
        return _error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error_response(exc.status_code, code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return _error_response(422, "invalid_request", "the request's parameters are not valid")

    @app.middleware("http")
    async def request_log(request: Request, call_next):
        given = request.headers.get("x-request-id", "")
        request_id = given if _REQUEST_ID.match(given) else secrets.token_hex(8)
        request.state.log = {}
        start = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception as exc:  # a bug: logged with its type, answered without internals
            log.exception(json.dumps({"request_id": request_id, "event": "internal_error", "type": type(exc).__name__}))
            response = _error_response(500, "internal", "internal error; the request id is in the server log")
        response.headers["x-request-id"] = request_id
        response.headers["x-medhe-instance"] = instance
        route = request.scope.get("route")  # the template (/v1/keys/{key_id}), never a key id
        metrics.request(request.method, getattr(route, "path", "unmatched"), response.status_code,
                        time.perf_counter() - start)
        # Ids, sizes and timings only: never image, ciphertext or key bytes.
        log.info(json.dumps({"request_id": request_id, "instance": instance, "method": request.method,
                             "path": request.url.path,
                             "status": response.status_code, "latency_s": round(time.perf_counter() - start, 4),
                             **request.state.log}))
        return response

    # --- helpers ------------------------------------------------------------------------------
    def principal(request: Request) -> Principal | None:
        """The caller (None without access control); a missing or wrong token is a 401."""
        if tokens is None:
            return None
        try:
            who = tokens.identify(request.headers.get("authorization"))
        except ConfigError as exc:  # fail closed: an unreadable token store admits nobody
            log.error("token store unreadable: %s", exc)
            raise ServiceError(503, "token_store_unavailable", "the server cannot check tokens right now; "
                                                               "its operator has been told") from None
        if who is None:
            raise ServiceError(401, "unauthorized", "a valid bearer token is required (Authorization: Bearer ...)",
                               {"www-authenticate": "Bearer"})
        request.state.log["clinic"] = who.name
        return who

    def model_for(header: dict) -> HostedModel:
        model = by_digest.get(header["spec_digest"])
        if model is None:
            raise ServiceError(400, "unknown_model", f"the message was made for model spec "
                                                     f"{header['spec_digest'][:16]}, which this server does not host "
                                                     f"(it hosts {', '.join(sorted(by_name))}: GET /v1/models)")
        return model

    def require_own_key(model: HostedModel, key_id: str, who: Principal | None) -> None:
        # Another clinic's key id and an unknown one get the same answer: ids are not disclosed.
        if not model.has_keys(key_id) or (who is not None and not model.owned_by(key_id, who.name)):
            raise ServiceError(404, "unknown_key", f"no evaluation keys registered under key id {key_id} for model "
                                                   f"{model.name}{' by this clinic' if who else ''}; POST /v1/keys")

    def rate_limit(request: Request, who: Principal | None) -> None:
        """A clinic's requests that make work (uploads, evaluations), at most the configured rate."""
        if limiter is None:
            return
        wait_s = limiter.take(who.name if who else f"address:{request.client.host if request.client else '?'}")
        if wait_s > 0:
            metrics.rate_limited()
            raise ServiceError(429, "rate_limited", f"at most {limits.requests_per_minute:g} requests a minute per "
                                                    f"clinic; retry in {math.ceil(wait_s)} s",
                               {"retry-after": str(math.ceil(wait_s))})

    def require_mode(model: HostedModel, mode: str) -> None:
        if model.mode != mode:
            raise ServiceError(409, "wrong_mode", f"model {model.name} runs in {model.mode} mode: send its messages "
                                                  f"to {model.card()['endpoint']}")

    def reserve():
        try:
            return pool.reserve()
        except PoolBusy as exc:
            raise ServiceError(503, "busy", str(exc), {"retry-after": str(limits.retry_after_s)}) from None

    async def run(request: Request, job: dict, payload: bytes = b"") -> tuple[dict, bytes]:
        start = time.perf_counter()
        try:
            reply, out = await pool.call(job, payload, timeout_s=limits.evaluate_timeout_s)
        except WorkerFailed as exc:
            raise ServiceError(503, "worker_failed", str(exc), {"retry-after": str(limits.retry_after_s)}) from None
        request.state.log["server_s"] = round(time.perf_counter() - start, 4)
        if "error" in reply:
            raise ServiceError(int(reply["status"]), reply["error"], reply["message"])
        if job.get("op") in ("diagnose", "diagnose_batch"):
            metrics.evaluation(job["model"], float(reply.get("evaluate_s", 0.0)))
        return reply, out

    timeouts = {"idle_timeout_s": limits.idle_upload_timeout_s, "deadline_s": limits.upload_deadline_s}

    def upload_path() -> Path:
        return uploads.new_file()

    # --- endpoints ----------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "instance": instance, "models": sorted(by_name), "workers": pool.workers,
                "in_flight": pool.pending, "max_in_flight": pool.max_pending}

    @app.get("/metrics")
    async def metrics_text() -> Response:
        gauges = {"medhe_in_flight": ("requests being evaluated or waiting", pool.pending),
                  "medhe_max_in_flight": ("requests beyond which the server answers 503", pool.max_pending),
                  "medhe_workers": ("evaluation worker processes (0: a thread)", pool.workers),
                  "medhe_worker_key_sets": ("the most clinics' key sets one worker holds in memory for one model "
                                            "(at most --key-cache)", pool.key_sets_in_memory()),
                  "medhe_models": ("hosted models", len(models))}
        return Response(metrics.render(gauges), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict:
        principal(request)
        return {"models": [{"name": m.name, "spec_digest": m.spec_digest, "weights": m.card()["weights"],
                            "class_names": list(m.spec.class_names)} for m in models]}

    @app.get("/v1/models/{name}")
    async def model_card(name: str, request: Request) -> dict:
        principal(request)
        if name not in by_name:
            raise ServiceError(404, "unknown_model", f"no model {name!r}; this server hosts {', '.join(sorted(by_name))}")
        return by_name[name].card()

    async def streamed(request: Request, kind: str, limit: int, op: str, check=None):
        """Stream a large body (keys, encrypted model, batch) to a file, then have a worker process
        it from there (valid keys and models are moved into the key store). The model and
        `check(model, header)` are checked on the header, before the payload reaches the disk.
        -> (model, worker reply, reply bytes)."""
        path = upload_path()
        found = {}

        def on_header(header: dict) -> None:
            found["model"] = model = model_for(header)
            request.state.log.update(model=model.name, key_id=header["key_id"])
            if check is not None:
                check(model, header)

        try:
            with reserve():
                header, _ = await _receive(request, kind, limit, to_file=path, on_header=on_header, **timeouts)
                model = found["model"]
                reply, out = await run(request, {"op": op, "model": model.name, "path": str(path),
                                                 "key_id": header["key_id"]})
        finally:
            path.unlink(missing_ok=True)
        return model, reply, out

    @app.post("/v1/keys")
    async def register_keys(request: Request) -> dict:
        who = principal(request)
        rate_limit(request, who)
        def within_the_plans_keys(model: HostedModel, header: dict) -> None:
            bound = model.evaluation_keys_bound_bytes()
            if header["payload_bytes"] > bound:  # the worker checks each part against the plan again
                raise ServiceError(413, "too_large", f"evaluation keys for model {model.name} are at most {bound} "
                                                     f"bytes; this message says {header['payload_bytes']}")

        model, reply, _ = await streamed(request, "evaluation_keys", limits.evaluation_keys_bytes,
                                         "register_evaluation_keys", within_the_plans_keys)
        if who is not None:
            model.add_owner(reply["key_id"], who.name)
        return {"model": model.name, "key_id": reply["key_id"]}

    @app.get("/v1/keys/{key_id}")
    async def key_status(key_id: str, request: Request) -> dict:
        who = principal(request)
        for model in models:
            if model.has_keys(key_id) and (who is None or model.owned_by(key_id, who.name)):
                return {"key_id": key_id, "model": model.name,
                        "encrypted_model": model.has_encrypted_model(key_id) if model.encrypted_model else None}
        raise ServiceError(404, "unknown_key", f"no evaluation keys registered under key id {key_id[:40]!r}"
                                               f"{' by this clinic' if who else ''}")

    @app.post("/v1/encrypted-model")
    async def register_encrypted_model(request: Request) -> dict:
        who = principal(request)
        rate_limit(request, who)
        if who is not None and who.role != "owner":
            raise ServiceError(403, "forbidden", "only a model owner's token may upload encrypted models")
        def encrypted_mode_only(model: HostedModel, header: dict) -> None:
            if not model.encrypted_model:
                raise ServiceError(409, "wrong_mode", f"model {model.name} runs with its weights in clear here")

        model, reply, _ = await streamed(request, "encrypted_model", limits.encrypted_model_bytes,
                                         "register_encrypted_model", encrypted_mode_only)
        return {"model": model.name, "key_id": reply["key_id"]}

    @app.post("/v1/diagnose")
    async def diagnose(request: Request) -> Response:
        who = principal(request)
        rate_limit(request, who)
        with reserve():
            header, body = await _receive(request, "ciphertext", limits.ciphertext_bytes, **timeouts)
            model = model_for(header)
            request.state.log.update(model=model.name, key_id=header["key_id"])
            require_mode(model, "latency")
            require_own_key(model, header["key_id"], who)
            if model.encrypted_model and not model.has_encrypted_model(header["key_id"]):
                raise ServiceError(404, "unknown_key", f"no encrypted model registered for key id {header['key_id']}; "
                                                       "the model owner must upload one")
            reply, result = await run(request, {"op": "diagnose", "model": model.name, "key_id": header["key_id"]},
                                      body)
        return Response(result, media_type=OCTET, headers={"x-evaluate-s": f"{reply['evaluate_s']:.4f}"})

    @app.post("/v1/diagnose-batch")
    async def diagnose_batch(request: Request) -> Response:
        """Throughput mode: one message holding up to N/2 images (one ciphertext per input feature,
        slots across images), streamed to disk; the result holds one ciphertext per class."""
        who = principal(request)
        rate_limit(request, who)

        def own_throughput_key(model: HostedModel, header: dict) -> None:
            require_mode(model, "throughput")
            require_own_key(model, header["key_id"], who)

        _, reply, result = await streamed(request, "batch_ciphertext", limits.batch_bytes, "diagnose_batch",
                                          own_throughput_key)
        return Response(result, media_type=OCTET, headers={"x-evaluate-s": f"{reply['evaluate_s']:.4f}"})

    return app
