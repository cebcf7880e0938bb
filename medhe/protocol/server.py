"""The diagnosis server: public evaluation keys only, evaluates ciphertext messages."""

from __future__ import annotations

import re
import threading
from pathlib import Path

from medhe.compiler.batch import BatchPlan
from medhe.compiler.plan import Plan
from medhe.errors import ConfigError, InvalidMessage, MissingKeyError
from medhe.protocol import wire
from medhe.runtime.clear import ClearBackend
from medhe.runtime.batch_executor import BatchExecutor
from medhe.runtime.executor import Executor

_KEY_ID = re.compile(r"^[0-9a-f]{16}$")


class Server:
    """Registers clients' evaluation keys (-> key id) and evaluates their ciphertexts.

    With `key_dir`, registered keys are kept on disk (public material only) so a restarted
    server still knows them. A bad message raises InvalidMessage and changes nothing stored.
    """

    def __init__(self, plan: Plan | BatchPlan, *, backend: str = "seal", key_dir: str | Path | None = None) -> None:
        if backend not in ("seal", "clear"):
            raise ConfigError(f"backend must be 'seal' or 'clear', got {backend!r}")
        self.plan = plan
        self.backend_kind = backend
        self.key_dir = Path(key_dir) if key_dir else None
        if self.key_dir:
            self.key_dir.mkdir(parents=True, exist_ok=True)
        self._ids = {"plan_digest": plan.digest(), "params_digest": plan.params.digest()}
        self._executors: dict[str, Executor] = {}
        self._plain_cache: dict = {}  # encoded weights depend on the parameters only: shared by key sets
        self._context = None
        self._lock = threading.Lock()

    # --- keys ---------------------------------------------------------------------------------
    def _make_backend(self, msg: wire.Message):
        relin, galois = msg.parts(["relin_keys", "galois_keys"])
        if msg.extra.get("backend", "seal") != self.backend_kind:
            raise InvalidMessage(f"evaluation keys are for backend {msg.extra.get('backend')!r}, "
                                 f"this server runs {self.backend_kind!r}")
        if self.backend_kind == "clear":
            return ClearBackend(self.plan.params)
        from medhe.runtime.seal_backend import SEALServerBackend, make_context

        if self._context is None:
            self._context = make_context(self.plan.params)
        needed = set(self.plan.rotation_steps())
        offered = set(msg.extra.get("rotation_steps", []))
        if not needed <= offered:
            raise InvalidMessage(f"evaluation keys lack rotation steps {sorted(needed - offered)[:8]}")
        if not relin:
            raise InvalidMessage("evaluation keys lack relinearization keys")
        return SEALServerBackend(self.plan.params, relin, galois or None, context=self._context)

    def register_keys(self, message: bytes) -> str:
        msg = wire.decode(message, expect_kind="evaluation_keys", **self._ids)
        if not _KEY_ID.match(msg.key_id):
            raise InvalidMessage("key id must be 16 lowercase hex digits")
        backend = self._make_backend(msg)
        with self._lock:
            if isinstance(self.plan, BatchPlan):
                self._executors[msg.key_id] = BatchExecutor(self.plan, backend)
            else:
                executor = Executor(self.plan, backend, cache=self._plain_cache)
                executor.prepare()  # encode the weights now, not during the first request
                self._executors[msg.key_id] = executor
            if self.key_dir:
                tmp = self.key_dir / f".{msg.key_id}.tmp"
                tmp.write_bytes(bytes(message))
                tmp.replace(self.key_dir / f"{msg.key_id}.keys")
        return msg.key_id

    def _executor(self, key_id: str) -> Executor:
        with self._lock:
            executor = self._executors.get(key_id)
        if executor is not None:
            return executor
        stored = self.key_dir / f"{key_id}.keys" if self.key_dir and _KEY_ID.match(key_id) else None
        if stored is not None and stored.is_file():
            self.register_keys(stored.read_bytes())
            return self._executors[key_id]
        raise MissingKeyError(f"no evaluation keys registered under key id {key_id!r}; register them first")

    @property
    def key_ids(self) -> list[str]:
        known = set(self._executors)
        if self.key_dir:
            known |= {p.stem for p in self.key_dir.glob("*.keys")}
        return sorted(known)

    # --- evaluation ---------------------------------------------------------------------------
    def evaluate_batch(self, message: bytes) -> bytes:
        """Throughput mode: one ciphertext per input feature in, one per class out."""
        if not isinstance(self.plan, BatchPlan):
            raise ConfigError("this server was built from a latency plan; build it from a BatchPlan for batches")
        key_id = wire.peek_key_id(message)
        executor = self._executor(key_id)
        msg = wire.decode(message, expect_kind="batch_ciphertext", key_id=key_id, **self._ids)
        parts = msg.parts([f"f{i}" for i in range(self.plan.input_features)])
        cts = [executor.backend.deserialize(p) for p in parts]
        if any(executor.backend.levels_left(c) != self.plan.depth for c in cts):
            raise InvalidMessage(f"batch ciphertexts must be fresh, with {self.plan.depth} levels")
        outs = executor.run(cts)
        return wire.encode_parts("batch_result", [executor.backend.serialize(c) for c in outs], key_id=key_id,
                                 extra={"count": msg.extra.get("count", self.plan.batch_size)}, **self._ids)

    def evaluate(self, message: bytes, *, timings: dict | None = None) -> bytes:
        key_id = wire.peek_key_id(message)
        executor = self._executor(key_id)
        msg = wire.decode(message, expect_kind="ciphertext", key_id=key_id, **self._ids)
        ct = executor.backend.deserialize(msg.payload)
        if executor.backend.levels_left(ct) != self.plan.depth:
            raise InvalidMessage(f"ciphertext has {executor.backend.levels_left(ct)} levels, the plan needs "
                                 f"a fresh one with {self.plan.depth}")
        out = executor.run(ct, timings=timings)
        return wire.encode("result", executor.backend.serialize(out), key_id=key_id, **self._ids)
