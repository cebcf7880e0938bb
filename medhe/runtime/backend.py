"""The small interface the executor needs from an FHE library.

Server-side backends hold public material only (relinearisation and Galois keys, and for the
model owner a public key to encrypt weights with); decryption lives on the client side
(`ClientBackend`)."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np


class Backend(Protocol):
    slot_count: int

    def encode(self, values: np.ndarray, like: Any, scale: float) -> Any:
        """A plaintext at the level of ciphertext `like`, with the given scale."""

    def rescale_divisor(self, ct: Any) -> float:
        """The prime a rescale of `ct` divides by (plaintexts encoded at this scale keep the
        ciphertext's scale exact through multiply + rescale)."""

    def level_stub(self, level: int, scale: float) -> Any:
        """A stand-in for a ciphertext at this level and scale (for encoding ahead of time)."""

    def scale(self, ct: Any) -> float: ...
    def levels_left(self, ct: Any) -> int: ...
    def components(self, ct: Any) -> int:
        """Polynomials in the ciphertext: 2, or 3 for an unrelinearised product."""

    def add(self, a: Any, b: Any) -> Any: ...
    def add_inplace(self, a: Any, b: Any) -> Any:
        """a += b; returns a. Callers only pass a fresh `a`."""

    def add_plain(self, a: Any, pt: Any) -> Any: ...
    def multiply_plain(self, a: Any, pt: Any) -> Any: ...
    def multiply(self, a: Any, b: Any) -> Any:
        """Ciphertext x ciphertext, NOT relinearised (three components): sums of such products
        share one relinearisation."""

    def relinearize(self, a: Any) -> Any:
        """Back to two components (a no-op on two-component ciphertexts)."""

    def square(self, a: Any) -> Any:
        """Square and relinearise (no rescale)."""

    def rescale(self, a: Any) -> Any: ...
    def rotate(self, a: Any, steps: int) -> Any: ...
    def serialize(self, ct: Any) -> bytes: ...
    def deserialize(self, data: bytes) -> Any: ...


class PublicKeyEncryptor(Protocol):
    """Encrypts under someone else's public key (the model owner encrypting weights)."""

    def encrypt_public(self, values: np.ndarray, like: Any, scale: float) -> Any:
        """A ciphertext of `values` at the level of `like`, with the given scale."""


class ClientBackend(Backend, Protocol):
    def encrypt(self, values: np.ndarray) -> Any: ...
    def encrypt_to_bytes(self, values: np.ndarray) -> bytes:
        """One serialized ciphertext of the client's own input (SEAL: secret-key encryption in
        seeded form, half the bytes of a public-key ciphertext)."""
        ...
    def decrypt(self, ct: Any) -> np.ndarray: ...
    def public_key(self) -> bytes:
        """The serialized public key (for a model owner to encrypt weights under)."""
