"""A backend with no encryption: numpy slot vectors with the same level and scale bookkeeping as
CKKS, so plans run slot-exactly in fast tests and level/rotation errors show up without SEAL."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from medhe.errors import BackendError, InvalidMessage
from medhe.params import CKKSParams

_MAGIC = b"MHCL"


@dataclass
class ClearCiphertext:
    values: np.ndarray
    level: int  # index of the last prime still in the chain (0: only the result prime left)
    scale: float
    size: int = 2  # components: 3 after a ciphertext product until relinearised


@dataclass
class ClearPlaintext:
    values: np.ndarray
    level: int
    scale: float


class ClearBackend:
    """Also a client backend and a public-key encryptor: encrypt/decrypt just wrap/unwrap the
    vector. Levels, scales and ciphertext sizes are checked as SEAL would check them."""

    def __init__(self, params: CKKSParams, public_key: bytes | None = None) -> None:
        self.params = params
        self.slot_count = params.slot_count
        # Nominal primes: the real ones are within a fraction of a percent of 2**bits.
        self._primes = [2.0 ** b for b in params.coeff_modulus_bits[:-1]]
        self.rotations = 0

    def encrypt(self, values: np.ndarray) -> ClearCiphertext:
        values = np.asarray(values, dtype=np.float64)
        if values.shape != (self.slot_count,):
            raise BackendError(f"expected {self.slot_count} slot values, got shape {values.shape}")
        return ClearCiphertext(values.copy(), len(self._primes) - 1, 2.0 ** self.params.input_scale_bits)

    def decrypt(self, ct: ClearCiphertext) -> np.ndarray:
        return ct.values.copy()

    def public_key(self) -> bytes:
        return b""

    def encrypt_public(self, values: np.ndarray, like: ClearCiphertext, scale: float) -> ClearCiphertext:
        values = np.asarray(values, dtype=np.float64)
        if values.shape != (self.slot_count,):
            raise BackendError(f"expected {self.slot_count} slot values, got shape {values.shape}")
        return ClearCiphertext(values.copy(), like.level, float(scale))

    def encode(self, values: np.ndarray, like: ClearCiphertext, scale: float) -> ClearPlaintext:
        return ClearPlaintext(np.asarray(values, dtype=np.float64), like.level, scale)

    def encode_scalar(self, value: float, like: ClearCiphertext, scale: float) -> ClearPlaintext:
        return ClearPlaintext(np.full(self.slot_count, float(value)), like.level, scale)

    def level_stub(self, level: int, scale: float) -> ClearCiphertext:
        return ClearCiphertext(np.zeros(0), level, scale)

    def rescale_divisor(self, ct: ClearCiphertext) -> float:
        return self._primes[ct.level]

    def scale(self, ct: ClearCiphertext) -> float:
        return ct.scale

    def levels_left(self, ct: ClearCiphertext) -> int:
        return ct.level

    def components(self, ct: ClearCiphertext) -> int:
        return ct.size

    def _same_level(self, a, b, what: str) -> None:
        if a.level != b.level:
            raise BackendError(f"{what}: operands at levels {a.level} and {b.level}")
        if abs(a.scale / b.scale - 1) > 1e-9:
            raise BackendError(f"{what}: operand scales {a.scale:.6g} and {b.scale:.6g} differ")

    def add(self, a, b):
        self._same_level(a, b, "add")
        return ClearCiphertext(a.values + b.values, a.level, a.scale, max(a.size, b.size))

    def add_inplace(self, a, b):
        self._same_level(a, b, "add")
        a.values = a.values + b.values
        a.size = max(a.size, b.size)
        return a

    def add_plain(self, a, pt):
        self._same_level(a, pt, "add_plain")
        return ClearCiphertext(a.values + pt.values, a.level, a.scale, a.size)

    def multiply_plain(self, a, pt):
        if a.level != pt.level:
            raise BackendError(f"multiply_plain: ciphertext at level {a.level}, plaintext at {pt.level}")
        return ClearCiphertext(a.values * pt.values, a.level, a.scale * pt.scale, a.size)

    def multiply(self, a, b):
        if a.level != b.level:
            raise BackendError(f"multiply: ciphertexts at levels {a.level} and {b.level}")
        if a.size != 2 or b.size != 2:
            raise BackendError("multiply: relinearise the operands first")
        return ClearCiphertext(a.values * b.values, a.level, a.scale * b.scale, 3)

    def relinearize(self, a):
        return ClearCiphertext(a.values, a.level, a.scale, 2)

    def square(self, a):
        if a.size != 2:
            raise BackendError("square: relinearise the operand first")
        return ClearCiphertext(a.values * a.values, a.level, a.scale * a.scale)

    def rescale(self, a):
        if a.level == 0:
            raise BackendError("rescale: no levels left (the plan is deeper than the parameters)")
        return ClearCiphertext(a.values, a.level - 1, a.scale / self._primes[a.level], a.size)

    def rotate(self, a, steps: int):
        if a.size != 2:
            raise BackendError("rotate: the ciphertext has 3 components; relinearise it first")
        self.rotations += 1
        return ClearCiphertext(np.roll(a.values, -int(steps)), a.level, a.scale)

    def encrypt_to_bytes(self, values: np.ndarray) -> bytes:
        """One serialized "ciphertext" (SEAL's counterpart is seeded; here there is no seed to send)."""
        return self.serialize(self.encrypt(values))

    def encrypt_serialized(self, rows: np.ndarray, *, workers: int = 1) -> list[bytes]:
        """Rows of slot values -> serialized "ciphertexts" (no encryption to share out: `workers` is
        accepted for the interface and ignored)."""
        return [self.encrypt_to_bytes(row) for row in np.asarray(rows, dtype=np.float64)]

    def serialize(self, ct: ClearCiphertext) -> bytes:
        if ct.size != 2:
            raise BackendError("serialize: relinearise the ciphertext first")
        return _MAGIC + struct.pack("<id", ct.level, ct.scale) + ct.values.astype("<f8").tobytes()

    def deserialize(self, data: bytes) -> ClearCiphertext:
        expected = 4 + 12 + 8 * self.slot_count
        if len(data) != expected or data[:4] != _MAGIC:
            raise InvalidMessage(f"clear ciphertext must be {expected} bytes starting with {_MAGIC!r}")
        level, scale = struct.unpack("<id", data[4:16])
        values = np.frombuffer(data[16:], dtype="<f8").astype(np.float64)
        if not (0 <= level < len(self._primes)) or not np.isfinite(values).all():
            raise InvalidMessage("clear ciphertext has an invalid level or non-finite values")
        return ClearCiphertext(values, level, scale)
