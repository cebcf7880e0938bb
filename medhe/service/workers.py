"""Where HE evaluation runs: never on the HTTP event loop.

SEAL's Python bindings hold the GIL, so threads cannot use a second core; `ProcessPool` runs N
worker processes (spawned, each loading the hosted plans from disk and keeping at most
`max_key_sets` key sets per model in memory). `InlinePool` runs the same operations on a thread of
the server process (one at a time): for tests and small deployments.

Requests and replies cross the pipe as a JSON header and raw bytes (`send_bytes`): nothing is
pickled, not even between our own processes. A worker that dies or overruns its time is replaced;
its request fails with a 503, and no stored state is lost (everything registered is on disk).
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import os
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

from medhe.errors import ConfigError, ConflictError, InvalidMessage, MedHEError, MissingKeyError

log = logging.getLogger("medhe.service")


class PoolBusy(MedHEError):
    """More requests are waiting than the queue holds."""


class WorkerFailed(MedHEError):
    """A worker process died or overran its time while handling a request."""


@dataclass(frozen=True)
class ModelRef:
    """What a worker needs to load a hosted model (plain data: it crosses to spawned processes)."""
    name: str
    plan_dir: str
    encrypted_model: bool
    backend: str
    key_dir: str


def model_refs(models) -> list[ModelRef]:
    return [ModelRef(m.name, str(m.plan_dir), m.encrypted_model, m.backend, str(m.key_dir)) for m in models]


def load_servers(refs: list[ModelRef], max_key_sets: int | None, two_processes: bool = False) -> dict:
    """two_processes: latency-mode evaluations are shared with a helper process forked from this
    one (medhe.runtime.split), for a worker process, never for a thread of the server."""
    from medhe.plan import BatchPlan, load_plan_dir
    from medhe.protocol.server import Server

    servers = {}
    for ref in refs:
        plan = load_plan_dir(ref.plan_dir, weights=not ref.encrypted_model)
        servers[ref.name] = Server(plan, backend=ref.backend, key_dir=ref.key_dir, encrypted_model=ref.encrypted_model,
                                   max_key_sets=max_key_sets,
                                   two_processes=two_processes and not isinstance(plan, BatchPlan))
    return servers


# Errors a peer's request can cause, as (HTTP status, stable error code).
ERROR_CODES = {InvalidMessage: (400, "invalid_message"), MissingKeyError: (404, "unknown_key"),
               ConflictError: (409, "conflict"), ConfigError: (409, "wrong_mode")}


def run_operation(servers: dict, request: dict, payload: bytes) -> tuple[dict, bytes]:
    """One operation on the hosted models: (reply header, reply bytes). Never raises for a
    request's fault: errors come back as {"status", "error", "message"}."""
    try:
        server = servers[request["model"]]
        op = request["op"]
        start = time.perf_counter()
        if op in ("register_evaluation_keys", "register_encrypted_model"):
            path = Path(request["path"])
            register = server.register_keys if op == "register_evaluation_keys" else server.register_encrypted_model
            # The upload is moved into the key store when valid (and deleted below either way).
            return {"key_id": register(path.read_bytes(), upload=path), "evaluate_s": time.perf_counter() - start}, b""
        if op == "diagnose":
            result = server.evaluate(payload)
            return {"evaluate_s": time.perf_counter() - start}, result
        if op == "diagnose_batch":  # a whole batch, streamed to a file by the server process
            result = server.evaluate_batch(Path(request["path"]))  # read one ciphertext at a time
            return {"evaluate_s": time.perf_counter() - start}, result
        raise ConfigError(f"unknown operation {op!r}")
    except MedHEError as exc:
        for kind, (status, code) in ERROR_CODES.items():
            if isinstance(exc, kind):
                return {"status": status, "error": code, "message": str(exc)}, b""
        # Toward a peer: no internals beyond the category.
        return {"status": 400, "error": "not_evaluable", "message": "the request could not be evaluated with "
                                                                     "this model"}, b""
    finally:
        path = request.get("path")
        if path:
            Path(path).unlink(missing_ok=True)


WORKER_NICENESS = 10


def _worker_main(conn, refs: list[dict], max_key_sets: int | None, two_processes: bool = False) -> None:
    """A worker process: load the models, then answer requests until the pipe closes."""
    # Evaluations take every core they can get; the server's event loop (and /health) must still
    # be scheduled at once, so workers run at a lower priority. Throughput is unchanged.
    os.nice(WORKER_NICENESS)
    try:
        servers = load_servers([ModelRef(**ref) for ref in refs], max_key_sets, two_processes)
    except Exception as exc:  # reported to the parent, which refuses to start
        conn.send_bytes(json.dumps({"ready": False, "message": f"{type(exc).__name__}: {exc}"}).encode())
        return
    conn.send_bytes(b'{"ready": true}')
    while True:
        try:
            request = json.loads(conn.recv_bytes())
            payload = conn.recv_bytes()
        except (EOFError, OSError):
            return
        try:
            reply, out = run_operation(servers, request, payload)
        except Exception as exc:  # a bug, not the peer's fault: report it, keep serving
            reply, out = {"status": 500, "error": "internal", "message": f"{type(exc).__name__}"}, b""
        reply["key_sets_in_memory"] = most_key_sets(servers)
        conn.send_bytes(json.dumps(reply).encode())
        conn.send_bytes(out)


def most_key_sets(servers: dict) -> int:
    """The most key sets one hosted model holds in this process's memory."""
    return max((server.key_sets_in_memory for server in servers.values()), default=0)


class _Pool:
    """A bounded number of requests in flight (`max_pending`: workers + queue); beyond it
    `reserve` raises PoolBusy at once, before the request body is read."""

    def __init__(self, workers: int, queue_size: int) -> None:
        self.workers = workers
        self.max_pending = workers + queue_size
        self.pending = 0
        self._key_sets: dict[int, int] = {}  # worker index -> key sets it held after its last request

    def key_sets_in_memory(self) -> int:
        """The most key sets any worker held for one model, as of its last request."""
        return max(self._key_sets.values(), default=0)

    def reserve(self) -> "_Reservation":
        if self.pending >= self.max_pending:
            raise PoolBusy(f"{self.pending} requests are in progress or waiting; try again shortly")
        self.pending += 1
        return _Reservation(self)


class _Reservation:
    def __init__(self, pool: _Pool) -> None:
        self._pool = pool

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._pool.pending -= 1


class InlinePool(_Pool):
    """Operations on a thread of this process, one at a time (SEAL holds the GIL anyway)."""

    def __init__(self, models, *, max_key_sets: int | None = None, queue_size: int = 8) -> None:
        super().__init__(1, queue_size)
        self._servers = load_servers(model_refs(models), max_key_sets)
        self._lock = threading.Lock()

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def server(self, name: str):
        return self._servers[name]

    async def call(self, request: dict, payload: bytes = b"", *, timeout_s: float | None = None) -> tuple[dict, bytes]:
        def locked():
            with self._lock:
                reply, out = run_operation(self._servers, request, payload)
                self._key_sets[0] = most_key_sets(self._servers)
                return reply, out

        return await asyncio.to_thread(locked)


class _Worker:
    def __init__(self, context, refs: list[dict], max_key_sets: int | None, index: int,
                 two_processes: bool = False) -> None:
        self.index = index
        self.recent: OrderedDict[tuple, None] = OrderedDict()  # (model, key id) it served lately: likely cached
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(child, refs, max_key_sets, two_processes),
                                       name=f"medhe-worker-{index}", daemon=True)
        self.process.start()
        child.close()

    def wait_ready(self, timeout_s: float) -> None:
        if not self.conn.poll(timeout_s):
            self.kill()
            raise ConfigError(f"worker {self.index} did not start within {timeout_s:.0f} s")
        status = json.loads(self.conn.recv_bytes())
        if not status.get("ready"):
            self.kill()
            raise ConfigError(f"worker {self.index} could not load the models: {status.get('message')}")

    def exchange(self, request: dict, payload: bytes) -> tuple[dict, bytes]:
        self.conn.send_bytes(json.dumps(request).encode())
        self.conn.send_bytes(payload)
        reply = json.loads(self.conn.recv_bytes())
        return reply, self.conn.recv_bytes()

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=10)
        self.conn.close()


class ProcessPool(_Pool):
    """N worker processes; each request goes to an idle one."""

    START_TIMEOUT_S = 300.0

    def __init__(self, models, *, workers: int, max_key_sets: int | None = None, queue_size: int = 8,
                 two_processes: bool = False) -> None:
        if workers < 1:
            raise ConfigError(f"a process pool needs at least 1 worker, got {workers}")
        super().__init__(workers, queue_size)
        self._refs = [asdict(ref) for ref in model_refs(models)]
        self._max_key_sets = max_key_sets
        self._two_processes = two_processes
        self._context = multiprocessing.get_context("spawn")  # no fork of a threaded server
        self._idle: list[_Worker] = []
        self._available: asyncio.Condition | None = None
        self._all: list[_Worker] = []

    def _spawn(self, index: int) -> _Worker:
        worker = _Worker(self._context, self._refs, self._max_key_sets, index, self._two_processes)
        worker.wait_ready(self.START_TIMEOUT_S)
        return worker

    async def start(self) -> None:
        workers = [_Worker(self._context, self._refs, self._max_key_sets, i, self._two_processes)
                   for i in range(self.workers)]
        try:
            for worker in workers:
                await asyncio.to_thread(worker.wait_ready, self.START_TIMEOUT_S)
        except BaseException:
            for worker in workers:
                worker.kill()
            raise
        self._all = workers
        self._idle = list(workers)
        self._available = asyncio.Condition()

    async def close(self) -> None:
        for worker in self._all:
            await asyncio.to_thread(worker.kill)
        self._all = []

    async def _acquire(self, affinity: tuple | None) -> _Worker:
        """An idle worker, preferably one that served this clinic lately (its keys are likely in
        that worker's memory: no reload from disk, no second copy in another worker)."""
        async with self._available:
            await self._available.wait_for(lambda: bool(self._idle))
            worker = next((w for w in self._idle if affinity in w.recent), self._idle[0])
            self._idle.remove(worker)
        if affinity is not None:
            worker.recent[affinity] = None
            worker.recent.move_to_end(affinity)
            while len(worker.recent) > (self._max_key_sets or 4):
                worker.recent.popitem(last=False)
        return worker

    async def _release(self, worker: _Worker) -> None:
        async with self._available:
            self._idle.append(worker)
            self._available.notify()

    async def call(self, request: dict, payload: bytes = b"", *, timeout_s: float | None = None) -> tuple[dict, bytes]:
        key_id = request.get("key_id")
        worker = await self._acquire((request["model"], key_id) if key_id else None)
        try:
            reply, out = await asyncio.wait_for(asyncio.to_thread(worker.exchange, request, payload), timeout_s)
            self._key_sets[worker.index] = int(reply.pop("key_sets_in_memory", 0))
            return reply, out
        except (asyncio.TimeoutError, EOFError, OSError) as exc:
            what = "overran its time" if isinstance(exc, asyncio.TimeoutError) else "stopped"
            log.error(json.dumps({"event": "worker_failed", "worker": worker.index, "reason": what}))
            await asyncio.to_thread(worker.kill)
            self._key_sets.pop(worker.index, None)  # its replacement starts with none
            worker = await asyncio.to_thread(self._spawn, worker.index)
            self._all = [w for w in self._all if w.index != worker.index] + [worker]
            raise WorkerFailed(f"the evaluation {what}; the request can be sent again") from None
        finally:
            await self._release(worker)

    def worker_pids(self) -> list[int]:
        return [w.process.pid for w in self._all]
