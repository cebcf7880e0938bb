"""The model owner: compiled the model, holds the server plan in clear, and deploys it to a server
either in clear or encrypted.

Encrypted deployment: every weight-bearing operand of the server plan (diagonals, biases, folded
activation coefficients, replicated biases) becomes a CKKS ciphertext under a public key, at the
level and scale where the server will consume it. The key is the clinic's (the server stores one
encrypted model per clinic) or the owner's own (a hospital that outsources inference encrypts its
images and its model under its own key). The server then sees only shapes, the architecture and
the CKKS parameters.

An encrypted model directory holds:
  plan.json            the plan without weights (public architecture the server runs)
  client_spec.json     the public client spec (the clinic's view)
  encrypted_model.bin  the encrypted_model wire message (one ciphertext per operand)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from medhe.errors import ConfigError, InvalidMessage, PlanError
from medhe.plan import Plan
from medhe.protocol import wire
from medhe.protocol.client import spec_ids
from medhe.protocol.server import _atomic_write, operand_label, require_key_id
from medhe.runtime.clear import ClearBackend
from medhe.runtime.executor import operand_schedule

ENCRYPTED_MODEL_FILE = "encrypted_model.bin"


@dataclass
class EncryptionReport:
    operands: int
    size_bytes: int
    encrypt_s: float


class ModelOwner:
    """Encrypts a server plan's weights under a public key (`encrypt_model`). The backend is the
    owner's choice, never the key message's: "clear" (no encryption) is for tests and debugging."""

    def __init__(self, *, backend: str = "seal", progress: bool = False) -> None:
        if backend not in ("seal", "clear"):
            raise ConfigError(f"backend must be 'seal' or 'clear', got {backend!r}")
        self.backend = backend
        self.progress = progress
        self.last_report: EncryptionReport | None = None

    def encrypt_model(self, server_plan: Plan, public_key: bytes) -> bytes:
        """An encrypted_model message for the key id of `public_key` (a `public_key` message from
        `Client.public_key()`)."""
        if not isinstance(server_plan, Plan) or not server_plan.has_weights:
            raise ConfigError("encrypt_model needs the full server plan (from `medhe compile`), weights included")
        spec = server_plan.client_spec()
        msg = wire.decode(public_key, expect_kind="public_key", **spec_ids(spec))
        require_key_id(msg)
        backend_kind = self.backend
        if msg.extra.get("backend", "seal") != backend_kind:
            raise InvalidMessage(f"the public key is for backend {msg.extra.get('backend')!r}; this model owner "
                                 f"encrypts with {backend_kind!r}")
        start = time.perf_counter()
        if backend_kind == "clear":
            encryptor = ClearBackend(server_plan.params)
        else:
            from medhe.runtime.seal_backend import SEALServerBackend

            if not msg.payload:
                raise InvalidMessage("the public key message holds no key")
            encryptor = SEALServerBackend(server_plan.params, public_key=msg.payload)
        schedule = list(operand_schedule(server_plan, encryptor))
        parts, labels = [], []
        for key, like, scale in tqdm(schedule, desc="encrypting model", disable=not self.progress, leave=False):
            index, name = key
            ct = encryptor.encrypt_public(server_plan.instructions[index].operand(name), like, scale)
            parts.append(encryptor.serialize(ct))
            labels.append(operand_label(key))
        message = wire.encode_parts(
            "encrypted_model", parts, key_id=msg.key_id,
            extra={"operands": labels, "structure_digest": server_plan.structure_digest(), "backend": backend_kind},
            **spec_ids(spec))
        self.last_report = EncryptionReport(len(parts), len(message), time.perf_counter() - start)
        return message


def save_encrypted_model(directory: str | Path, server_plan: Plan, message: bytes) -> Path:
    """Write an encrypted model directory: public architecture, client spec, encrypted weights."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"{directory} exists and is not a directory")
    if (directory / "arrays.npz").exists():
        raise ConfigError(f"{directory} holds a plan with its weights in clear; write the encrypted model to a "
                          "directory of its own (it is what the server gets)")
    directory.mkdir(parents=True, exist_ok=True)
    server_plan.without_weights().save(directory)
    server_plan.client_spec().save(directory)
    _atomic_write(directory / ENCRYPTED_MODEL_FILE, message)
    return directory


def load_encrypted_model(directory: str | Path) -> tuple[Plan, bytes]:
    """(plan without weights, encrypted_model message) from an encrypted model directory."""
    directory = Path(directory)
    path = directory / ENCRYPTED_MODEL_FILE
    if not path.is_file():
        raise PlanError(f"{directory} is not an encrypted model directory: {ENCRYPTED_MODEL_FILE} is missing "
                        "(make one with `medhe encrypt-model`)")
    return Plan.load(directory, weights=False), path.read_bytes()
