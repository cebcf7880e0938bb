"""Encrypt rows of slot values in helper processes of the client (throughput-mode batches).

SEAL's Python bindings hold the GIL, so a batch's hundreds of ciphertexts are encrypted faster by
processes. Each helper is `python -m medhe.runtime.encrypt_worker`, started afresh (no fork of a
process that has run SEAL, no re-import of the caller's main module), and given on its stdin the
CKKS parameters, the client's public key (never the secret key) and its rows; it answers on stdout
with one serialized ciphertext per row. Frames are length-prefixed bytes: nothing is pickled.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import threading

import numpy as np

from medhe.errors import BackendError

_LENGTH = struct.Struct(">Q")


def _write_frame(stream, data: bytes) -> None:
    stream.write(_LENGTH.pack(len(data)))
    stream.write(data)


def _read_frame(stream) -> bytes:
    header = stream.read(_LENGTH.size)
    if len(header) != _LENGTH.size:
        raise EOFError("the stream ended before a frame")
    size = _LENGTH.unpack(header)[0]
    data = stream.read(size)
    if len(data) != size:
        raise EOFError("the stream ended inside a frame")
    return data


def encrypt_rows_in_processes(params_doc: dict, public_key: bytes, rows: np.ndarray, workers: int) -> list[bytes]:
    """Rows (n, slots) -> n serialized ciphertexts, in order, made by `workers` helper processes."""
    chunks = [chunk for chunk in np.array_split(np.ascontiguousarray(rows, dtype="<f8"), workers) if len(chunk)]
    processes = [subprocess.Popen([sys.executable, "-m", "medhe.runtime.encrypt_worker"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in chunks]
    results: list[list[bytes] | None] = [None] * len(chunks)
    errors: list[bytes] = [b""] * len(chunks)

    def collect(index: int, process: subprocess.Popen, count: int) -> None:
        try:
            results[index] = [_read_frame(process.stdout) for _ in range(count)]
        except EOFError:
            errors[index] = process.stderr.read()[-2000:]

    readers = []
    for index, (process, chunk) in enumerate(zip(processes, chunks)):
        # Read every helper's answers while feeding the others: a full pipe must never stall one.
        reader = threading.Thread(target=collect, args=(index, process, len(chunk)), daemon=True)
        reader.start()
        readers.append(reader)
        try:
            _write_frame(process.stdin, json.dumps({"params": params_doc, "rows": chunk.shape[0],
                                                    "slots": chunk.shape[1]}).encode())
            _write_frame(process.stdin, public_key)
            _write_frame(process.stdin, chunk.tobytes())
            process.stdin.close()
        except BrokenPipeError:
            pass  # the helper died; its reader reports why
    for reader, process in zip(readers, processes):
        reader.join()
        process.wait()
    for index, process in enumerate(processes):
        if results[index] is None or process.returncode != 0:
            raise BackendError(f"an encryption helper process failed (exit {process.returncode}): "
                               f"{errors[index].decode(errors='replace').strip() or 'no message'}")
    return [part for chunk in results for part in chunk]


def main() -> int:
    from medhe.params import CKKSParams
    from medhe.runtime.seal_backend import encrypt_rows_under_public_key

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    request = json.loads(_read_frame(stdin))
    public_key = _read_frame(stdin)
    rows = np.frombuffer(_read_frame(stdin), dtype="<f8").reshape(int(request["rows"]), int(request["slots"]))
    for part in encrypt_rows_under_public_key(CKKSParams.from_dict(request["params"]), public_key, rows):
        _write_frame(stdout, part)
    stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
