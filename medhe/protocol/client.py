"""The clinic's side: holds the secret key, encrypts images, decrypts diagnoses.

It loads only the public client spec (parameters, preprocessing, slot layouts, rotation steps,
class names and a commitment to the weights): never a weight of the model."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import numpy as np

from medhe.errors import ConfigError, InvalidMessage
from medhe.plan import ClientSpec
from medhe.protocol import wire
from medhe.runtime.clear import ClearBackend

BACKENDS = ("seal", "clear")


def _client_backend(kind: str, spec: ClientSpec, secret_key: bytes | None):
    if kind == "seal":
        from medhe.runtime.seal_backend import SEALClientBackend
        return SEALClientBackend(spec.params, secret_key=secret_key)
    if kind == "clear":
        return ClearBackend(spec.params)
    raise ConfigError(f"backend must be one of {BACKENDS}, got {kind!r}")


def spec_ids(spec) -> dict:
    """The digests every message of this model carries."""
    return {"spec_digest": spec.digest(), "params_digest": spec.params.digest()}


def require_spec(spec) -> ClientSpec:
    if not isinstance(spec, ClientSpec):
        raise ConfigError(f"the client takes the public client spec (plan.client_spec() or ClientSpec.load(...)), "
                          f"not a {type(spec).__name__}: a clinic never holds the model's weights")
    return spec


class Client:
    """Keygen, evaluation-key export, encrypt_image, decrypt_logits.

    The secret key stays inside this object; `export_secret_key` / `save_secret_key` are the
    only ways out, and both must be called explicitly.

    The key id is the hash of the evaluation keys (`wire.derive_key_id`): a new client makes them
    the first time it needs its key id or is asked for them; a client loaded from a secret key has
    them already (`medhe keygen` saved them beside it) and cannot make a second set under the same id.
    """

    def __init__(self, spec: ClientSpec, *, backend: str = "seal", secret_key: bytes | None = None,
                 key_id: str | None = None) -> None:
        self.spec = require_spec(spec)
        self.backend_kind = backend
        self._backend = _client_backend(backend, spec, secret_key)
        if secret_key is not None and key_id is None:
            raise ConfigError("a client restored from a secret key needs that key's id")
        if secret_key is None and backend == "seal" and key_id is not None:
            raise ConfigError("a new client gets its key id from its evaluation keys; it cannot be chosen")
        self._key_id = key_id
        self._unsent_evaluation_keys: bytes | None = None
        self._ids = spec_ids(spec)
        self._preprocessing = None

    @property
    def key_id(self) -> str:
        if self._key_id is None:
            self._unsent_evaluation_keys = self._make_evaluation_keys()
        return self._key_id

    def __repr__(self) -> str:
        return f"Client(key_id={self._key_id or 'not made yet'!r}, backend={self.backend_kind!r})"

    # --- keys ---------------------------------------------------------------------------------
    def evaluation_keys(self) -> bytes:
        """Public evaluation material for the server: relinearization keys and Galois keys for
        exactly the rotation steps the plan uses, under the key id that is their hash. Contains no
        secret key. Made once per client: keep the message (`medhe keygen` writes evaluation.keys)."""
        if self._unsent_evaluation_keys is not None:
            message, self._unsent_evaluation_keys = self._unsent_evaluation_keys, None
            return message
        if self._key_id is not None:
            raise ConfigError(f"the evaluation keys of key id {self._key_id} were made when this key was; send "
                              "those again (a new set would have another key id)")
        return self._make_evaluation_keys()

    def _make_evaluation_keys(self) -> bytes:
        steps = list(self.spec.rotation_steps)
        if self.backend_kind == "seal":
            relin, galois = self._backend.evaluation_keys(steps)
        else:
            # No key material without encryption: a random nonce keeps clear-backend key ids apart.
            relin, galois = secrets.token_bytes(32), b""
        self._key_id = wire.derive_key_id(self._ids["params_digest"], relin, galois)
        return wire.encode_parts("evaluation_keys", [relin, galois], key_id=self._key_id,
                                 extra={"rotation_steps": steps, "backend": self.backend_kind}, **self._ids)

    def public_key(self) -> bytes:
        """The public key as a versioned message: what a model owner encrypts the weights under
        (encrypted-model mode). Anyone may encrypt with it; only this client can decrypt."""
        return wire.encode("public_key", self._backend.public_key(), key_id=self.key_id,
                           extra={"backend": self.backend_kind}, **self._ids)

    def export_secret_key(self) -> bytes:
        """The secret key as a versioned message. Keep it on the client machine."""
        key = self._backend.export_secret_key() if self.backend_kind == "seal" else b""
        return wire.encode("secret_key", key, key_id=self.key_id, extra={"backend": self.backend_kind}, **self._ids)

    def save_secret_key(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the secret key to `path`, mode 0600 whatever the umask. It goes to a new file
        beside `path` (created exclusively, never through a link) that then replaces `path`
        atomically, so a symlink planted at `path` is replaced, not followed, and a crash leaves the
        old key or the new one. An existing key is kept unless `overwrite`."""
        path = Path(path)
        if path.is_symlink() or path.exists():
            if not overwrite:
                raise ConfigError(f"{path} already exists; refusing to replace a secret key (pass overwrite=True, "
                                  "or --force on the command line)")
            if path.is_dir():
                raise ConfigError(f"{path} is a directory")
        if not path.parent.is_dir():
            raise ConfigError(f"cannot write {path}: the directory {path.parent} does not exist")
        data = self.export_secret_key()
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.part")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o600)
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def from_secret_key(cls, spec: ClientSpec, data: bytes) -> "Client":
        msg = wire.decode(data, expect_kind="secret_key", **spec_ids(require_spec(spec)))
        backend = msg.extra.get("backend", "seal")
        return cls(spec, backend=backend, secret_key=msg.payload or None, key_id=msg.key_id)

    @classmethod
    def load(cls, spec: ClientSpec, path: str | Path) -> "Client":
        return cls.from_secret_key(spec, Path(path).read_bytes())

    # --- images ---------------------------------------------------------------------------------
    def preprocess(self, image) -> np.ndarray:
        """A file path or a 2-D grayscale array in [0, 1] -> the model input (C, H, W)."""
        from medhe.data.images import image_to_gray01, load_image

        gray = load_image(image) if isinstance(image, (str, Path)) else image_to_gray01(np.asarray(image))
        return self._recipe().apply(gray)

    def _recipe(self):
        from medhe.data.preprocess import Preprocessing

        if self._preprocessing is None:
            self._preprocessing = Preprocessing.from_dict(self.spec.preprocessing)
        return self._preprocessing

    def check_input(self, model_input: np.ndarray) -> dict | None:
        """Is a preprocessed input like the model's training images? {"distance", "threshold",
        "typical", "uniform"} from the spec's input profile (medhe.data.input_check), computed here on the
        plaintext before encryption; None when the model has no profile."""
        return self._recipe().check_input(model_input)

    def pack(self, model_input: np.ndarray) -> np.ndarray:
        """Place a preprocessed input (C, H, W) into the slot vector, copies included."""
        x = np.asarray(model_input, dtype=np.float64)
        if self.spec.mode != "latency":
            raise ConfigError("this client spec is for throughput mode; use encrypt_batch (on the command line: "
                              "diagnose --batch)")
        if x.shape != tuple(self.spec.input_shape):
            raise ConfigError(f"model input must have shape {tuple(self.spec.input_shape)}, got {x.shape}")
        if not np.isfinite(x).all():
            raise ConfigError("model input contains NaN or infinite values")
        n = self.spec.slot_count
        vector = np.zeros(n)
        vector[self.spec.input_layout.replica_slots(n)] = x.reshape(-1)[None, :]
        return vector

    def encrypt_input(self, model_input: np.ndarray) -> bytes:
        """One preprocessed input -> one ciphertext message (encrypted with the secret key, seeded:
        about 0.6 MB at N=16384, half a public-key ciphertext)."""
        payload = self._backend.encrypt_to_bytes(self.pack(model_input))
        return wire.encode("ciphertext", payload, key_id=self.key_id, **self._ids)

    def encrypt_image(self, image) -> bytes:
        """Preprocess (exactly as in training) and encrypt one image: one ciphertext message."""
        return self.encrypt_input(self.preprocess(image))

    def decrypt_logits(self, result: bytes) -> np.ndarray:
        msg = wire.decode(result, expect_kind="result", key_id=self.key_id, **self._ids)
        ct = self._backend.deserialize(msg.payload)
        values = self._backend.decrypt(ct)
        return values[self.spec.output_layout.slots(self.spec.slot_count)]

    # --- throughput mode (a BatchPlan: slots across images) ---------------------------------------
    def encrypt_batch(self, model_inputs: np.ndarray, *, workers: int | None = None, label: str | None = None) -> bytes:
        """Up to N/2 preprocessed inputs (B, C, H, W) -> one message of one ciphertext per feature.
        By default (workers None or 1) encrypted in this process with the secret key, seeded: half
        the bytes. workers > 1 shares the encryption out to that many helper processes, which
        encrypt under the public key: faster on many cores, twice the bytes (0.9 GB instead of
        0.45 GB for a 28x28 batch). A `label` is echoed in the server's result (see
        decrypt_batch's expect_label)."""
        x = np.asarray(model_inputs, dtype=np.float64)
        batch = self.spec.slot_count
        if self.spec.mode != "throughput":
            raise ConfigError("this client spec is for latency mode; use encrypt_input per image")
        if x.ndim != 4 or x.shape[1:] != tuple(self.spec.input_shape) or not 1 <= x.shape[0] <= batch:
            raise ConfigError(f"a batch must have shape (1..{batch}, {', '.join(map(str, self.spec.input_shape))}), "
                              f"got {x.shape}")
        if not np.isfinite(x).all():
            raise ConfigError("batch contains NaN or infinite values")
        features = np.zeros((x.shape[1] * x.shape[2] * x.shape[3], batch))
        features[:, : x.shape[0]] = x.reshape(x.shape[0], -1).T
        extra = {"count": int(x.shape[0])}
        if label is not None:
            extra["label"] = label
            wire.batch_label(extra)  # refuse a malformed label here, not at the server
        helpers = workers is not None and workers > 1
        # One ciphertext per input value: the first one's size (made as the helpers would make it,
        # if they are used) says whether the batch fits one message, before minutes of encryption.
        if helpers:
            first = [self._backend.serialize(self._backend.encrypt(features[0]))]
        else:
            first = [self._backend.encrypt_to_bytes(features[0])]
        limit_bytes = wire.MAX_PAYLOAD_BYTES["batch_ciphertext"]
        if len(first[0]) * features.shape[0] > limit_bytes:
            raise ConfigError(
                f"throughput mode sends one ciphertext per input value: {features.shape[0]} of "
                f"{len(first[0]) / 2**20:.2f} MiB, {len(first[0]) * features.shape[0] / 2**30:.1f} GiB per batch, "
                f"over the {limit_bytes / 2**30:g} GiB batch message limit; "
                + ("encrypt in this process (workers=1, `medhe batch encrypt --workers 1`: seeded, half the bytes) or "
                   if helpers else "")
                + "use latency mode for this model")
        parts = first + self._backend.encrypt_serialized(features[1:], workers=workers or 1)
        return wire.encode_parts("batch_ciphertext", parts, key_id=self.key_id, extra=extra, **self._ids)

    def decrypt_batch(self, result: bytes, *, expect_label: str | None = None) -> np.ndarray:
        """(B, classes) logits from a batch result; with expect_label, only the result of the batch
        encrypted with that label is accepted."""
        msg = wire.decode(result, expect_kind="batch_result", key_id=self.key_id, **self._ids)
        if expect_label is not None and wire.batch_label(msg.extra) != expect_label:
            raise InvalidMessage(f"this result is for batch {msg.extra.get('label')!r}, expected {expect_label!r}")
        classes = len(self.spec.class_names)
        parts = msg.parts([f"class{i}" for i in range(classes)])
        count = int(msg.extra.get("count", 0))
        if not 1 <= count <= self.spec.slot_count:
            raise InvalidMessage("batch result has an invalid image count")
        return np.stack([self._backend.decrypt(self._backend.deserialize(p))[:count] for p in parts], axis=1)

    def diagnosis(self, logits: np.ndarray) -> tuple[str, np.ndarray]:
        """Predicted class name and softmax probabilities."""
        z = np.asarray(logits, dtype=np.float64)
        p = np.exp(z - z.max())
        p /= p.sum()
        return self.spec.class_names[int(np.argmax(p))], p
