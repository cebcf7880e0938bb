"""The wire format: every message is

    b"MEDHE" | format version (u16, big endian) | header length (u32) | header JSON | payload

The header names the message kind, the client spec's digest (which commits to the model's weights
without holding them), the CKKS parameter digest, the key id, and the payload's length and sha256. `decode` checks all of it (and size limits) before anything
touches the payload; a peer's malformed message becomes one InvalidMessage. No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from medhe.errors import InvalidMessage

MAGIC = b"MEDHE"
FORMAT_VERSION = 2  # 2: messages name the client spec (spec_digest), not the server plan
KINDS = ("evaluation_keys", "ciphertext", "result", "secret_key", "batch_ciphertext", "batch_result",
         "public_key", "encrypted_model")
MAX_HEADER_BYTES = 64 * 1024
# A fresh ciphertext at N=16384 is about 2 MB; Galois keys for a plan can reach about 1 GB.
# An encrypted model holds one ciphertext per weight operand (about 1 GB for the default models).
MAX_PAYLOAD_BYTES = {"ciphertext": 64 * 2**20, "result": 64 * 2**20, "evaluation_keys": 4 * 2**30,
                     "secret_key": 64 * 2**20, "batch_ciphertext": 4 * 2**30, "batch_result": 256 * 2**20,
                     "public_key": 64 * 2**20, "encrypted_model": 4 * 2**30}
_PREFIX = struct.Struct(">5sHI")
PEEK_BYTES = _PREFIX.size + MAX_HEADER_BYTES  # enough to read any valid message's header
KEY_ID_HEX_DIGITS = 32
# A batch may carry a label (a batch job's id and batch name) that the server echoes in its result,
# so a result can be matched to the batch it came from.
_BATCH_LABEL = re.compile(r"[A-Za-z0-9._:/-]{1,128}")


def batch_label(extra: dict) -> str | None:
    """The label of a batch message's header (None when it has none); InvalidMessage if malformed."""
    label = extra.get("label")
    if label is not None and (not isinstance(label, str) or not _BATCH_LABEL.fullmatch(label)):
        raise InvalidMessage("a batch label must be 1-128 characters of letters, digits and . _ : / -")
    return label


def derive_key_id(params_digest: str, *key_parts: bytes) -> str:
    """A key id is the hash of the evaluation keys it names (128 bits): registering the same keys
    again gives the same id, and nobody can register other keys under a clinic's id. Each part is
    hashed with its length, so moving bytes from one part to the next changes the id."""
    digest = hashlib.sha256(b"medhe-key-id-v1\0" + params_digest.encode())
    for part in key_parts:
        digest.update(struct.pack(">Q", len(part)))
        digest.update(part)
    return digest.hexdigest()[:KEY_ID_HEX_DIGITS]


@dataclass(frozen=True)
class Message:
    kind: str
    spec_digest: str
    params_digest: str
    key_id: str
    payload: bytes
    extra: dict

    def parts(self, names: list[str]) -> list[bytes]:
        """Split a payload made by `pack_parts`."""
        sizes = self.extra.get("part_sizes")
        if not isinstance(sizes, list) or len(sizes) != len(names) \
                or not all(type(size) is int and size >= 0 for size in sizes) or sum(sizes) != len(self.payload):
            raise InvalidMessage(f"{self.kind} message: expected {len(names)} parts ({', '.join(names[:4])}"
                                 f"{', ...' if len(names) > 4 else ''}) whose sizes add up to the payload")
        out, offset = [], 0
        for size in sizes:
            out.append(self.payload[offset: offset + size])
            offset += size
        return out


def encode(kind: str, payload: bytes, *, spec_digest: str, params_digest: str, key_id: str,
           extra: dict | None = None) -> bytes:
    return _encode(kind, [payload], spec_digest=spec_digest, params_digest=params_digest, key_id=key_id,
                   extra=extra)


def encode_parts(kind: str, parts: list[bytes], *, extra: dict | None = None, **ids) -> bytes:
    extra = dict(extra or {})
    extra["part_sizes"] = [len(p) for p in parts]
    return _encode(kind, parts, extra=extra, **ids)


def _encode(kind: str, parts: list[bytes], *, spec_digest: str, params_digest: str, key_id: str,
            extra: dict | None) -> bytes:
    """The message whose payload is `parts` joined, built with one copy of them (a batch is GBs)."""
    if kind not in KINDS:
        raise ValueError(f"unknown message kind {kind!r}")
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    header = {
        "kind": kind, "spec_digest": spec_digest, "params_digest": params_digest, "key_id": key_id,
        "payload_bytes": sum(len(part) for part in parts), "payload_sha256": digest.hexdigest(),
        "extra": extra or {},
    }
    header_bytes = json.dumps(header, sort_keys=True).encode()
    return b"".join([_PREFIX.pack(MAGIC, FORMAT_VERSION, len(header_bytes)) + header_bytes, *parts])


def _read_header(prefix: bytes, expect_kind: str) -> tuple[dict, int]:
    """(header, header length) from a message's first bytes, before its payload is looked at."""
    if len(prefix) < _PREFIX.size or prefix[:5] != MAGIC:
        raise InvalidMessage(f"not a medhe message (expected it to start with {MAGIC!r})")
    _, version, header_len = _PREFIX.unpack_from(prefix)
    if version != FORMAT_VERSION:
        raise InvalidMessage(f"message format version {version}; this medhe reads version {FORMAT_VERSION}")
    if header_len > MAX_HEADER_BYTES or _PREFIX.size + header_len > len(prefix):
        raise InvalidMessage("message header is truncated or too large")
    try:
        header = json.loads(prefix[_PREFIX.size: _PREFIX.size + header_len])
    except (UnicodeDecodeError, ValueError, RecursionError):
        # ValueError covers invalid JSON and integers too long to parse; RecursionError deep nesting.
        raise InvalidMessage("message header is not valid JSON") from None
    if not isinstance(header, dict):
        raise InvalidMessage("message header must be a JSON object")
    kind = header.get("kind")
    if kind != expect_kind:
        raise InvalidMessage(f"expected a {expect_kind} message, got {kind!r}")
    return header, header_len


def _check_ids(header: dict, spec_digest: str, params_digest: str, key_id: str | None) -> None:
    kind = header["kind"]
    if header.get("spec_digest") != spec_digest:
        raise InvalidMessage(f"{kind} message was made for model spec {str(header.get('spec_digest'))[:12]}, "
                             f"this is spec {spec_digest[:12]}; both sides must use the same compiled model")
    if header.get("params_digest") != params_digest:
        raise InvalidMessage(f"{kind} message was made for other CKKS parameters")
    if key_id is not None and header.get("key_id") != key_id:
        raise InvalidMessage(f"{kind} message is for key id {header.get('key_id')!r}, expected {key_id!r}")


def decode(data: bytes, *, expect_kind: str, spec_digest: str, params_digest: str,
           key_id: str | None = None) -> Message:
    """Parse and validate a message. Raises InvalidMessage saying what was expected."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidMessage(f"expected a {expect_kind} message as bytes, got {type(data).__name__}")
    data = bytes(data)
    header, header_len = _read_header(data, expect_kind)
    kind = header["kind"]
    payload = data[_PREFIX.size + header_len:]
    if header.get("payload_bytes") != len(payload):
        raise InvalidMessage(f"{kind} message is truncated: header says {header.get('payload_bytes')} "
                             f"payload bytes, got {len(payload)}")
    if len(payload) > MAX_PAYLOAD_BYTES[kind]:
        raise InvalidMessage(f"{kind} payload of {len(payload)} bytes exceeds the limit of {MAX_PAYLOAD_BYTES[kind]}")
    if header.get("payload_sha256") != hashlib.sha256(payload).hexdigest():
        raise InvalidMessage(f"{kind} payload does not match its checksum (corrupted in transit)")
    _check_ids(header, spec_digest, params_digest, key_id)
    extra = header.get("extra") if isinstance(header.get("extra"), dict) else {}
    return Message(kind, spec_digest, params_digest, str(header.get("key_id")), payload, extra)


def stream_parts(file: BinaryIO, names: list[str], *, expect_kind: str, spec_digest: str, params_digest: str,
                 key_id: str | None = None, max_part_bytes: int | None = None) -> tuple[dict, Iterator[bytes]]:
    """A parts message (from `encode_parts`) read from a binary file one part at a time, so its
    payload is never held whole: -> (header extra, iterator over the parts). The header, the ids
    and the part sizes are checked before the first part is read; the checksum is checked as the
    parts are read, and a mismatch (or a file that ends early or goes on) raises InvalidMessage from
    the iterator once the last part has been read, so no result can come from a corrupt message. A
    seekable file of the wrong length is refused before any part is read; no part may be larger
    than `max_part_bytes`."""
    prefix = file.read(_PREFIX.size)
    if len(prefix) == _PREFIX.size and prefix[:5] == MAGIC:
        prefix += file.read(min(_PREFIX.unpack_from(prefix)[2], MAX_HEADER_BYTES + 1))
    header, _ = _read_header(prefix, expect_kind)
    kind = header["kind"]
    total = header.get("payload_bytes")
    if type(total) is not int or total < 0 or total > MAX_PAYLOAD_BYTES[kind]:
        raise InvalidMessage(f"{kind} payload must be 0 to {MAX_PAYLOAD_BYTES[kind]} bytes")
    _check_ids(header, spec_digest, params_digest, key_id)
    extra = header.get("extra") if isinstance(header.get("extra"), dict) else {}
    sizes = extra.get("part_sizes")
    if not isinstance(sizes, list) or len(sizes) != len(names) \
            or not all(type(size) is int and size >= 0 for size in sizes) or sum(sizes) != total:
        raise InvalidMessage(f"{kind} message: expected {len(names)} parts ({', '.join(names[:4])}"
                             f"{', ...' if len(names) > 4 else ''}) whose sizes add up to the payload")

    if max_part_bytes is not None and max(sizes, default=0) > max_part_bytes:
        raise InvalidMessage(f"{kind} message: a part is larger than {max_part_bytes} bytes")
    if file.seekable():
        start = file.tell()
        remaining = file.seek(0, 2) - start
        file.seek(start)
        if remaining != total:
            problem = "truncated" if remaining < total else "longer than its header says"
            raise InvalidMessage(f"{kind} message is {problem}: header says {total} payload bytes, {remaining} follow")

    def parts() -> Iterator[bytes]:
        digest = hashlib.sha256()
        for size in sizes:
            part = file.read(size)
            if len(part) != size:
                raise InvalidMessage(f"{kind} message is truncated: header says {total} payload bytes")
            digest.update(part)
            yield part
        if file.read(1):
            raise InvalidMessage(f"{kind} message is longer than its header says ({total} payload bytes)")
        if header.get("payload_sha256") != digest.hexdigest():
            raise InvalidMessage(f"{kind} payload does not match its checksum (corrupted in transit)")

    return extra, parts()


def peek_header(data: bytes) -> dict:
    """A message's header, read from its first PEEK_BYTES before the payload has arrived or been
    checked (to route it and refuse it early); `decode` still validates the whole message."""
    try:
        magic, version, header_len = _PREFIX.unpack_from(data)
        if magic != MAGIC or version != FORMAT_VERSION or header_len > MAX_HEADER_BYTES:
            raise ValueError
        header = json.loads(data[_PREFIX.size: _PREFIX.size + header_len])
        if not isinstance(header, dict):
            raise TypeError
    except (struct.error, ValueError, TypeError, UnicodeDecodeError, RecursionError):
        raise InvalidMessage(f"not a medhe message of format version {FORMAT_VERSION} "
                             f"(expected it to start with {MAGIC!r} and a JSON header)") from None
    for field in ("kind", "spec_digest", "key_id"):
        if not isinstance(header.get(field), str):
            raise InvalidMessage(f"message header lacks a string {field!r}")
    if type(header.get("payload_bytes")) is not int or header["payload_bytes"] < 0:
        raise InvalidMessage("message header lacks a payload size")
    return header


def peek_key_id(data: bytes) -> str:
    """The key id a message claims, read before full validation (to find the key set)."""
    try:
        _, _, header_len = _PREFIX.unpack_from(data)
        if header_len > MAX_HEADER_BYTES:
            raise ValueError
        header = json.loads(data[_PREFIX.size: _PREFIX.size + header_len])
        key_id = header["key_id"]
        if not isinstance(key_id, str):
            raise TypeError
        return key_id
    except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
        raise InvalidMessage("not a medhe message with a key id") from None
