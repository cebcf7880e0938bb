"""Bad input of every kind the issue lists, as (path, body, extra headers, expected status) cases:
the same list is sent to the in-process app (tests/unit/test_service.py) and to a real server
process with worker processes (tests/unit/test_service_process.py)."""

from __future__ import annotations

import json
import struct


def header_of(message: bytes) -> tuple[dict, int]:
    header_len = struct.unpack_from(">I", message, 7)[0]
    return json.loads(message[11: 11 + header_len]), header_len


def with_header(message: bytes, header: bytes) -> bytes:
    _, header_len = header_of(message)
    return message[:11 - 4] + struct.pack(">I", len(header)) + header + message[11 + header_len:]


def changed(message: bytes, **changes) -> bytes:
    header, _ = header_of(message)
    return with_header(message, json.dumps({**header, **changes}).encode())


def bad_input_cases(*, good: bytes, keys: bytes, foreign: bytes, unknown_key: bytes, other_clinics: bytes,
                    secret_key: bytes, own_key_id: str) -> dict[str, tuple[str, object, dict, int]]:
    """`good`: a ciphertext the server answers; `keys`: evaluation keys of a clinic that never
    registered (their ciphertext: `unknown_key`); `foreign`: a ciphertext for a model the server
    does not host; `other_clinics`: a ciphertext under another clinic's registered keys."""
    diagnose, register = "/v1/diagnose", "/v1/keys"
    return {
        "garbage": (diagnose, b"\x00garbage" * 10, {}, 400),
        "empty": (diagnose, b"", {}, 400),
        "truncated": (diagnose, good[:-100], {}, 400),
        "wrong kind": (diagnose, keys, {}, 400),
        "wrong plan": (diagnose, foreign, {}, 400),
        "unknown key id": (diagnose, unknown_key, {}, 404),
        "another clinic's key id": (diagnose, other_clinics, {}, 404),
        "forged payload digest": (diagnose, changed(good, payload_sha256="0" * 64), {}, 400),
        "forged spec digest": (diagnose, changed(good, spec_digest="f" * 64), {}, 400),
        "oversized (declared)": (diagnose, b"x", {"content-length": str(10**12)}, 413),
        "oversized (claimed in header)": (diagnose, changed(good, payload_bytes=10**9), {}, 413),
        "oversized (streamed)": (register, iter([keys[:2**16]] + [b"\0" * 2**16] * 40), {}, 413),
        "header field of the wrong type": (diagnose, changed(good, key_id={"a": 1}), {}, 400),
        "huge number": (diagnose, with_header(good, b'{"payload_bytes": ' + b"9" * 20000 + b"}"), {}, 400),
        "deep nesting": (diagnose, with_header(good, b"[" * 5000 + b"]" * 5000), {}, 400),
        "secret key offered": (register, secret_key, {}, 400),
        "path-like key id": (register, changed(keys, key_id="../../etc/passwd"), {}, 400),
        "key id not the hash of the keys": (register, changed(keys, key_id=own_key_id), {}, 400),
        "40 ciphertexts in one message": (diagnose, good * 40, {}, 413),
        "wrong content type": (diagnose, good, {"content-type": "application/json"}, 415),
        "wrong token": (diagnose, good, {"authorization": "Bearer nope"}, 401),
    }
