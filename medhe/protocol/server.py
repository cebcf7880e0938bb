"""The diagnosis server: public evaluation keys only, evaluates ciphertext messages.

Plain-weight mode: the server holds the server plan (weights in clear) and multiplies by
plaintexts. Encrypted-model mode: the server holds the plan without its weights (the public
architecture) and, per registered clinic, the weights as ciphertexts under that clinic's key, made
by the model owner; it multiplies ciphertext by ciphertext and can read neither image nor model.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from medhe.errors import ConfigError, ConflictError, InvalidMessage, MissingKeyError
from medhe.plan import BatchPlan, Plan
from medhe.protocol import wire
from medhe.protocol.client import spec_ids
from medhe.runtime.batch_executor import BatchExecutor
from medhe.runtime.clear import ClearBackend
from medhe.runtime.executor import EncryptedWeights, Executor, operand_schedule
from medhe.runtime.split import TwoProcessExecutor

_KEY_ID = re.compile(rf"^[0-9a-f]{{{wire.KEY_ID_HEX_DIGITS}}}\Z")
KEYS_SUFFIX = ".keys"
MODEL_SUFFIX = ".model"


def require_key_id(msg: wire.Message) -> str:
    """Key ids name files in the key store: exactly 32 lowercase hex digits, the whole string."""
    if not _KEY_ID.match(msg.key_id):
        raise InvalidMessage(f"key id must be {wire.KEY_ID_HEX_DIGITS} lowercase hex digits")
    return msg.key_id


def is_key_id(text: str) -> bool:
    return isinstance(text, str) and bool(_KEY_ID.match(text))


def operand_label(key: tuple[int, str]) -> str:
    return f"i{key[0]}.{key[1]}"


# Every file medhe writes atomically is first written under a hidden temporary sibling name of this
# shape; a killed writer leaves one behind, which is what the sweeps of stopped servers and batch
# runs look for (TEMPORARY_GLOB).
TEMPORARY_GLOB = ".*.tmp"


def temporary_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = temporary_sibling(path)
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _place_once(path: Path, data: bytes | None = None, *, upload: Path | None = None) -> bool:
    """Put `data` (or the file `upload`) at `path` unless something is there already; atomic
    (a hard link, which fails if the name exists), so of two concurrent writers exactly one wins.
    True when this call placed it."""
    if path.exists():  # the common case on a reload from the store: no copy written
        if upload is not None:
            upload.unlink(missing_ok=True)
        return False
    source = upload
    if source is None:
        source = temporary_sibling(path)
        source.write_bytes(data)
    try:
        os.link(source, path)
        return True
    except FileExistsError:
        return False
    finally:
        source.unlink(missing_ok=True)


@dataclass
class _KeySet:
    """What the server holds for one key id: the clinic's evaluation keys (as a backend), in
    encrypted-model mode its encrypted model, and the executor built from them."""
    backend: object | None = None
    model: EncryptedWeights | None = None
    model_digest: str | None = None
    executor: Executor | BatchExecutor | None = None


class Server:
    """Registers clients' evaluation keys (-> key id, the hash of the keys) and, in encrypted-model
    mode, their encrypted models; evaluates their ciphertexts.

    With `key_dir`, registered keys and encrypted models are kept on disk (public material and
    ciphertexts only; content-addressed, so a file never changes once written) so a restarted
    server still knows them, and at most `max_key_sets` key sets are held in memory (least
    recently used ones are dropped and reloaded from disk on demand). A bad message raises
    InvalidMessage and changes nothing stored.
    """

    def __init__(self, plan: Plan | BatchPlan, *, backend: str = "seal", key_dir: str | Path | None = None,
                 encrypted_model: bool = False, max_key_sets: int | None = None,
                 two_processes: bool = False) -> None:
        """two_processes: each latency-mode evaluation shares its larger linear layers with a
        forked helper process (medhe.runtime.split): lower latency when a core is idle, more
        CPU per request; for a server that evaluates one request at a time, in a process with no
        other threads (a worker process, a session), since the helper is forked from it. One
        helper at a time: the last clinic's (the others are ended when another clinic comes)."""
        if backend not in ("seal", "clear"):
            raise ConfigError(f"backend must be 'seal' or 'clear', got {backend!r}")
        if encrypted_model:
            if isinstance(plan, BatchPlan):
                raise ConfigError("encrypted-model mode evaluates latency plans; throughput mode needs the weights")
            # Keep only the architecture: an encrypted-model server never holds a weight.
            plan = plan.without_weights()
        if max_key_sets is not None and (not key_dir or max_key_sets < 1):
            raise ConfigError("a bound on key sets in memory needs a key store to reload them from, and at least 1")
        self.plan = plan
        self.encrypted_model = encrypted_model
        self.spec = plan.client_spec()
        self.backend_kind = backend
        self.key_dir = Path(key_dir) if key_dir else None
        if self.key_dir:
            if self.key_dir.exists() and not self.key_dir.is_dir():
                raise ConfigError(f"the key store {self.key_dir} exists and is not a directory")
            self.key_dir.mkdir(parents=True, exist_ok=True)
        self.max_key_sets = max_key_sets
        if two_processes and isinstance(plan, BatchPlan):
            raise ConfigError("two-process evaluation is for latency plans; throughput mode has no rotations to share")
        self.two_processes = two_processes
        self._ids = spec_ids(self.spec)
        self._key_sets: OrderedDict[str, _KeySet] = OrderedDict()
        self._plain_cache: dict = {}  # encoded weights depend on the parameters only: shared by key sets
        self._context = None
        self._lock = threading.RLock()

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
        if msg.key_id != wire.derive_key_id(self._ids["params_digest"], relin, galois):
            raise InvalidMessage("the key id of evaluation keys must be the hash of the keys (wire.derive_key_id)")
        if msg.extra.get("backend", "seal") != self.backend_kind:
            raise InvalidMessage(f"evaluation keys are for backend {msg.extra.get('backend')!r}, "
                                 f"this server runs {self.backend_kind!r}")
        if self.backend_kind == "clear":
            return ClearBackend(self.plan.params)
        from medhe.plan.keychains import key_switching_bytes_bound
        from medhe.runtime.seal_backend import SEALServerBackend

        needed = set(self.plan.galois_steps())
        steps = msg.extra.get("rotation_steps", [])
        if not isinstance(steps, list) or not all(type(step) is int for step in steps):
            raise InvalidMessage("evaluation keys must list their rotation steps as integers")
        offered = set(steps)
        if not needed <= offered:
            raise InvalidMessage(f"evaluation keys lack rotation steps {sorted(needed - offered)[:8]}")
        if not relin:
            raise InvalidMessage("evaluation keys lack relinearization keys")
        if needed and not galois:
            raise InvalidMessage("evaluation keys list rotation steps but carry no Galois keys")
        # SEAL expands seeded keys on load (twice the bytes): refuse more than the plan's keys,
        # seeded or not, before any of it is loaded, so an upload cannot claim more memory.
        for name, data, keys in (("relinearization", relin, 1), ("Galois", galois, len(needed))):
            bound = key_switching_bytes_bound(self.plan.params, keys)
            if len(data) > bound:
                raise InvalidMessage(f"{name} keys of {len(data)} bytes exceed the {keys} key(s) this plan needs "
                                     f"(at most {bound} bytes)")
        return SEALServerBackend(self.plan.params, relin, galois or None, context=self._shared_context())

    def _entry(self, key_id: str) -> _KeySet:
        """The cached key set for `key_id` (made if absent), marked most recently used; evicts the
        least recently used ones beyond `max_key_sets`. Call with the lock held."""
        entry = self._key_sets.get(key_id)
        if entry is None:
            entry = self._key_sets[key_id] = _KeySet()
        self._key_sets.move_to_end(key_id)
        while self.max_key_sets is not None and len(self._key_sets) > self.max_key_sets:
            self._key_sets.popitem(last=False)  # on disk; reloaded when next used
        return entry

    def register_keys(self, message: bytes, *, upload: Path | None = None) -> str:
        """Validate a clinic's evaluation keys and keep them; returns their key id. `upload` is the
        file the message was streamed to: it is moved into the key store rather than copied."""
        msg = wire.decode(message, expect_kind="evaluation_keys", **self._ids)
        require_key_id(msg)
        backend = self._make_backend(msg)
        if self.key_dir:
            # Content-addressed: the same id always names the same bytes, so a copy already there is kept.
            _place_once(self.key_dir / f"{msg.key_id}{KEYS_SUFFIX}", bytes(message), upload=upload)
        with self._lock:
            entry = self._entry(msg.key_id)
            if entry.backend is None:
                entry.backend, entry.executor = backend, None
        if not self.encrypted_model:
            self._build_executor(msg.key_id)  # encode the weights now, not during the first request
        return msg.key_id

    def register_encrypted_model(self, message: bytes, *, upload: Path | None = None) -> str:
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
        # One (model, clinic key) pair has one encrypted model: a different one under the same key
        # id would replace the clinic's model, so it is refused (re-uploading is idempotent). The
        # first to be placed in the store wins, also between server processes sharing it.
        with self._lock:
            entry = self._key_sets.get(msg.key_id)
            known = entry.model_digest if entry is not None else None
        if known is None and self.key_dir:
            path = self.key_dir / f"{msg.key_id}{MODEL_SUFFIX}"
            if not _place_once(path, bytes(message), upload=upload):
                known = hashlib.sha256(path.read_bytes()).hexdigest()
        if known is not None and known != digest:
            raise ConflictError(f"an encrypted model is already registered for key id {msg.key_id}; it is not replaced")
        with self._lock:
            entry = self._entry(msg.key_id)
            entry.model, entry.model_digest, entry.executor = weights, digest, None
        return msg.key_id

    def _stored(self, key_id: str, suffix: str) -> bytes | None:
        if not self.key_dir or not is_key_id(key_id):
            return None
        path = self.key_dir / f"{key_id}{suffix}"
        return path.read_bytes() if path.is_file() else None

    def _build_executor(self, key_id: str):
        with self._lock:
            entry = self._key_sets.get(key_id) or _KeySet()
            backend, model = entry.backend, entry.model
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
        if self.two_processes:
            executor = TwoProcessExecutor(executor)  # forked after prepare: it shares the encoded weights
        with self._lock:
            # Keys or model replaced or evicted meanwhile: use this executor once, keep none.
            current = self._key_sets.get(key_id)
            if current is not None and current.backend is backend and current.model is model:
                current.executor = executor
        return executor

    def _executor(self, key_id: str):
        with self._lock:
            entry = self._key_sets.get(key_id)
            if entry is not None:
                self._key_sets.move_to_end(key_id)
                if entry.executor is not None:
                    return entry.executor
            has_backend = entry is not None and entry.backend is not None
            has_model = entry is not None and entry.model is not None
        if not has_backend and (stored := self._stored(key_id, KEYS_SUFFIX)) is not None:
            self.register_keys(stored)
        if self.encrypted_model and not has_model and (stored := self._stored(key_id, MODEL_SUFFIX)) is not None:
            with self._lock:  # the stored model is the known one: no second read of the file
                self._entry(key_id).model_digest = hashlib.sha256(stored).hexdigest()
            self.register_encrypted_model(stored)
        with self._lock:
            entry = self._key_sets.get(key_id)
            if entry is not None and entry.executor is not None:
                return entry.executor
        return self._build_executor(key_id)

    def _end_other_helpers(self, executor) -> None:
        """One helper per server: a helper is a copy of this process as it was when forked (the
        key sets it held then included), so helpers kept for every key set in memory would hold
        several copies. Switching clinics costs a fork (tens of ms) instead."""
        with self._lock:
            others = [entry.executor for entry in self._key_sets.values()
                      if entry.executor is not None and entry.executor is not executor]
        for other in others:
            if other.helper_pid is not None:
                other.close()

    @property
    def key_ids(self) -> list[str]:
        with self._lock:
            known = {k for k, entry in self._key_sets.items() if entry.backend is not None}
        if self.key_dir:
            known |= {p.name[: -len(KEYS_SUFFIX)] for p in self.key_dir.glob(f"*{KEYS_SUFFIX}")}
        return sorted(known)

    @property
    def key_sets_in_memory(self) -> int:
        with self._lock:
            return len(self._key_sets)

    # --- evaluation ---------------------------------------------------------------------------
    def evaluate_batch(self, message: bytes | str | Path) -> bytes:
        """Throughput mode: one ciphertext per input feature in, one per class out. `message` is the
        message itself or a file holding it (as the HTTP service streams uploads to disk); either
        way its ciphertexts are read, checked and evaluated one at a time, never held all at once."""
        if not isinstance(self.plan, BatchPlan):
            raise ConfigError("this server was built from a latency plan; build it from a BatchPlan for batches")
        if isinstance(message, (str, Path)):
            with open(message, "rb") as file:
                return self._evaluate_batch_stream(file)
        if not isinstance(message, (bytes, bytearray, memoryview)):
            raise InvalidMessage(f"expected a batch_ciphertext message as bytes, got {type(message).__name__}")
        return self._evaluate_batch_stream(io.BytesIO(message))  # BytesIO shares bytes' buffer: no copy

    def _fresh_input(self, backend, ct, what: str):
        """`ct` if it is a fresh input as the client makes one (all the plan's levels, 2 components,
        the input scale), else InvalidMessage: a wrong scale would not fail, only give wrong logits."""
        input_scale = 2.0 ** self.plan.params.input_scale_bits
        if backend.levels_left(ct) != self.plan.depth or backend.components(ct) != 2 \
                or abs(backend.scale(ct) / input_scale - 1) > 1e-9:
            raise InvalidMessage(f"{what} must be fresh: {self.plan.depth} levels, 2 components, scale "
                                 f"2^{self.plan.params.input_scale_bits} (got {backend.levels_left(ct)} levels, "
                                 f"{backend.components(ct)} components, scale {backend.scale(ct):.4g})")
        return ct

    def _evaluate_batch_stream(self, file) -> bytes:
        key_id = wire.peek_key_id(file.read(wire.PEEK_BYTES))
        file.seek(0)
        executor = self._executor(key_id)
        extra, parts = wire.stream_parts(file, [f"f{i}" for i in range(self.plan.input_features)],
                                         expect_kind="batch_ciphertext", key_id=key_id,
                                         max_part_bytes=wire.MAX_PAYLOAD_BYTES["ciphertext"], **self._ids)
        backend = executor.backend
        label = wire.batch_label(extra)
        outs = executor.run(self._fresh_input(backend, backend.deserialize(part), "batch ciphertexts")
                            for part in parts)
        result_extra = {"count": extra.get("count", self.plan.batch_size)}
        if label is not None:
            result_extra["label"] = label  # echoed: the client checks its result belongs to this batch
        return wire.encode_parts("batch_result", [backend.serialize(c) for c in outs], key_id=key_id,
                                 extra=result_extra, **self._ids)

    def evaluate(self, message: bytes, *, timings: dict | None = None) -> bytes:
        if isinstance(self.plan, BatchPlan):
            raise ConfigError("this server was built from a BatchPlan; send batches to evaluate_batch")
        key_id = wire.peek_key_id(message)
        executor = self._executor(key_id)
        msg = wire.decode(message, expect_kind="ciphertext", key_id=key_id, **self._ids)
        ct = self._fresh_input(executor.backend, executor.backend.deserialize(msg.payload), "the ciphertext")
        if self.two_processes:  # the helper gets the bytes as they came: no second serialisation
            self._end_other_helpers(executor)
            out = executor.run(ct, timings=timings, input_bytes=msg.payload)
        else:
            out = executor.run(ct, timings=timings)
        return wire.encode("result", executor.backend.serialize(out), key_id=key_id, **self._ids)
