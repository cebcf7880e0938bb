"""The diagnosis server: public evaluation keys only, evaluates ciphertext messages.

Plain-weight mode: the server holds the server plan (weights in clear) and multiplies by
plaintexts. Encrypted-model mode: the server holds the plan without its weights (the public
architecture) and, per registered clinic, the weights as ciphertexts under that clinic's key, made
by the model owner; it multiplies ciphertext by ciphertext and can read neither image nor model.
"""

from __future__ import annotations

import hashlib
import re
import threading
from pathlib import Path

from medhe.errors import ConfigError, ConflictError, InvalidMessage, MissingKeyError
from medhe.plan import BatchPlan, Plan
from medhe.protocol import wire
from medhe.protocol.client import spec_ids
from medhe.runtime.batch_executor import BatchExecutor
from medhe.runtime.clear import ClearBackend
from medhe.runtime.executor import EncryptedWeights, Executor, operand_schedule

_KEY_ID = re.compile(r"^[0-9a-f]{16}\Z")
KEYS_SUFFIX = ".keys"
MODEL_SUFFIX = ".model"


def require_key_id(msg: wire.Message) -> str:
    """Key ids name files in the key store: exactly 16 lowercase hex digits."""
    if not _KEY_ID.match(msg.key_id):
        raise InvalidMessage("key id must be 16 lowercase hex digits")
    return msg.key_id


def operand_label(key: tuple[int, str]) -> str:
    return f"i{key[0]}.{key[1]}"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


class Server:
    """Registers clients' evaluation keys (-> key id) and, in encrypted-model mode, their encrypted
    models; evaluates their ciphertexts.

    With `key_dir`, registered keys and encrypted models are kept on disk (public material and
    ciphertexts only) so a restarted server still knows them. A bad message raises
    InvalidMessage and changes nothing stored.
    """

    def __init__(self, plan: Plan | BatchPlan, *, backend: str = "seal", key_dir: str | Path | None = None,
                 encrypted_model: bool = False) -> None:
        if backend not in ("seal", "clear"):
            raise ConfigError(f"backend must be 'seal' or 'clear', got {backend!r}")
        if encrypted_model:
            if isinstance(plan, BatchPlan):
                raise ConfigError("encrypted-model mode evaluates latency plans; throughput mode needs the weights")
            # Keep only the architecture: an encrypted-model server never holds a weight.
            plan = plan.without_weights()
        self.plan = plan
        self.encrypted_model = encrypted_model
        self.spec = plan.client_spec()
        self.backend_kind = backend
        self.key_dir = Path(key_dir) if key_dir else None
        if self.key_dir:
            if self.key_dir.exists() and not self.key_dir.is_dir():
                raise ConfigError(f"the key store {self.key_dir} exists and is not a directory")
            self.key_dir.mkdir(parents=True, exist_ok=True)
        self._ids = spec_ids(self.spec)
        self._backends: dict = {}
        self._models: dict[str, EncryptedWeights] = {}
        self._model_digests: dict[str, str] = {}
        self._executors: dict[str, Executor | BatchExecutor] = {}
        self._plain_cache: dict = {}  # encoded weights depend on the parameters only: shared by key sets
        self._context = None
        self._lock = threading.Lock()

    # --- keys ---------------------------------------------------------------------------------
    def _shared_context(self):
        from medhe.runtime.seal_backend import make_context

        if self._context is None:
            self._context = make_context(self.plan.params)
        return self._context

    def _bare_backend(self):
        """A backend with no keys: to read ciphertexts and to walk levels and scales."""
        if self.backend_kind == "clear":
            return ClearBackend(self.plan.params)
        from medhe.runtime.seal_backend import SEALServerBackend

        return SEALServerBackend(self.plan.params, context=self._shared_context())

    def _make_backend(self, msg: wire.Message):
        relin, galois = msg.parts(["relin_keys", "galois_keys"])
        if msg.extra.get("backend", "seal") != self.backend_kind:
            raise InvalidMessage(f"evaluation keys are for backend {msg.extra.get('backend')!r}, "
                                 f"this server runs {self.backend_kind!r}")
        if self.backend_kind == "clear":
            return ClearBackend(self.plan.params)
        from medhe.runtime.seal_backend import SEALServerBackend

        needed = set(self.plan.rotation_steps())
        steps = msg.extra.get("rotation_steps", [])
        if not isinstance(steps, list) or not all(type(step) is int for step in steps):
            raise InvalidMessage("evaluation keys must list their rotation steps as integers")
        offered = set(steps)
        if not needed <= offered:
            raise InvalidMessage(f"evaluation keys lack rotation steps {sorted(needed - offered)[:8]}")
        if not relin:
            raise InvalidMessage("evaluation keys lack relinearization keys")
        return SEALServerBackend(self.plan.params, relin, galois or None, context=self._shared_context())

    def register_keys(self, message: bytes) -> str:
        msg = wire.decode(message, expect_kind="evaluation_keys", **self._ids)
        require_key_id(msg)
        backend = self._make_backend(msg)
        with self._lock:
            self._backends[msg.key_id] = backend
            self._executors.pop(msg.key_id, None)
            if self.key_dir:
                _atomic_write(self.key_dir / f"{msg.key_id}{KEYS_SUFFIX}", bytes(message))
        if not self.encrypted_model:
            self._build_executor(msg.key_id)  # encode the weights now, not during the first request
        return msg.key_id

    def register_encrypted_model(self, message: bytes) -> str:
        """Store a model owner's encrypted model for the clinic whose key id it names. Every
        operand is checked against the plan (names, levels, scales) before anything is kept."""
        if not self.encrypted_model:
            raise ConfigError("this server runs the model in clear; start it in encrypted-model mode")
        msg = wire.decode(message, expect_kind="encrypted_model", **self._ids)
        require_key_id(msg)
        if msg.extra.get("structure_digest") != self.plan.structure_digest():
            raise InvalidMessage("the encrypted model was made for another architecture than this server's plan")
        if msg.extra.get("backend", "seal") != self.backend_kind:
            raise InvalidMessage(f"the encrypted model is for backend {msg.extra.get('backend')!r}, "
                                 f"this server runs {self.backend_kind!r}")
        reader = self._bare_backend()
        schedule = list(operand_schedule(self.plan, reader))
        labels = [operand_label(key) for key, _, _ in schedule]
        if msg.extra.get("operands") != labels:
            raise InvalidMessage(f"the encrypted model must hold the plan's {len(labels)} operands in plan order")
        operands = {}
        for (key, like, scale), part in zip(schedule, msg.parts(labels)):
            operands[key] = reader.deserialize(part)
            if reader.components(operands[key]) != 2:
                raise InvalidMessage(f"encrypted operand {operand_label(key)} must be a two-component ciphertext")
        weights = EncryptedWeights(operands, reader)
        for key, like, scale in schedule:
            weights.get(key, like, scale)  # raises InvalidMessage on a wrong level or scale
        digest = hashlib.sha256(bytes(message)).hexdigest()
        with self._lock:
            # One (model, clinic key) pair has one encrypted model: a different one under the same
            # key id would replace the clinic's model, so it is refused (re-uploading is idempotent).
            known = self._model_digests.get(msg.key_id) or self._stored_digest(msg.key_id)
            if known is not None and known != digest:
                raise ConflictError(f"an encrypted model is already registered for key id {msg.key_id}; "
                                    "it is not replaced")
            self._models[msg.key_id] = weights
            self._model_digests[msg.key_id] = digest
            self._executors.pop(msg.key_id, None)
            if self.key_dir and known is None:
                _atomic_write(self.key_dir / f"{msg.key_id}{MODEL_SUFFIX}", bytes(message))
        return msg.key_id

    def _stored_digest(self, key_id: str) -> str | None:
        stored = self._stored(key_id, MODEL_SUFFIX)
        return hashlib.sha256(stored).hexdigest() if stored is not None else None

    def _stored(self, key_id: str, suffix: str) -> bytes | None:
        if not self.key_dir or not _KEY_ID.match(key_id):
            return None
        path = self.key_dir / f"{key_id}{suffix}"
        return path.read_bytes() if path.is_file() else None

    def _build_executor(self, key_id: str):
        with self._lock:
            backend, model = self._backends.get(key_id), self._models.get(key_id)
        if backend is None:
            raise MissingKeyError(f"no evaluation keys registered under key id {key_id!r}; register them first")
        if isinstance(self.plan, BatchPlan):
            executor = BatchExecutor(self.plan, backend)
        elif self.encrypted_model:
            if model is None:
                raise MissingKeyError(f"no encrypted model registered for key id {key_id!r}; the model owner must "
                                      "encrypt the model under this clinic's public key and upload it")
            executor = Executor(self.plan, backend, weights=model.with_backend(backend))
        else:
            executor = Executor(self.plan, backend, cache=self._plain_cache)
            executor.prepare()
        with self._lock:
            # Keys or model re-registered meanwhile: this executor is stale; use it once, keep none.
            if self._backends.get(key_id) is backend and self._models.get(key_id) is model:
                self._executors[key_id] = executor
        return executor

    def _executor(self, key_id: str):
        with self._lock:
            executor = self._executors.get(key_id)
        if executor is not None:
            return executor
        if key_id not in self._backends and (stored := self._stored(key_id, KEYS_SUFFIX)) is not None:
            self.register_keys(stored)
        if self.encrypted_model and key_id not in self._models \
                and (stored := self._stored(key_id, MODEL_SUFFIX)) is not None:
            with self._lock:  # the stored model is the known one: no second read of the file
                self._model_digests.setdefault(key_id, hashlib.sha256(stored).hexdigest())
            self.register_encrypted_model(stored)
        return self._executors.get(key_id) or self._build_executor(key_id)

    @property
    def key_ids(self) -> list[str]:
        with self._lock:
            known = set(self._backends)
        if self.key_dir:
            known |= {p.name[: -len(KEYS_SUFFIX)] for p in self.key_dir.glob(f"*{KEYS_SUFFIX}")}
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
        if isinstance(self.plan, BatchPlan):
            raise ConfigError("this server was built from a BatchPlan; send batches to evaluate_batch")
        key_id = wire.peek_key_id(message)
        executor = self._executor(key_id)
        msg = wire.decode(message, expect_kind="ciphertext", key_id=key_id, **self._ids)
        ct = executor.backend.deserialize(msg.payload)
        if executor.backend.levels_left(ct) != self.plan.depth:
            raise InvalidMessage(f"ciphertext has {executor.backend.levels_left(ct)} levels, the plan needs "
                                 f"a fresh one with {self.plan.depth}")
        out = executor.run(ct, timings=timings)
        return wire.encode("result", executor.backend.serialize(out), key_id=key_id, **self._ids)
