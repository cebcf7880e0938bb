"""Microsoft SEAL CKKS through TenSEAL's low-level `sealapi`. All cryptography happens in SEAL.

`SEALServerBackend` is built from public material only (relinearisation and Galois keys, and
for the model owner a public key to encrypt weights under);
`SEALClientBackend` owns the secret key and never writes it out except through
`export_secret_key()`. Nothing here pickles: SEAL's own binary format is the only encoding.
"""

from __future__ import annotations

import os
import struct
import tempfile
from pathlib import Path

import numpy as np

from medhe.errors import BackendError, InvalidMessage, MissingKeyError
from medhe.params import CKKSParams

try:
    import tenseal.sealapi as seal
except ImportError as exc:  # pragma: no cover - tenseal is a hard dependency
    raise BackendError("tenseal is not installed; pip install tenseal==0.3.18") from exc

def _memory_file():
    """An anonymous in-memory file (Linux memfd): it has no name in any file system, so nothing
    (a secret key least of all) is ever written where another process or a crash could leave it.
    sealapi saves and loads through paths only; /proc/self/fd/N is the path of this file."""
    fd = os.memfd_create("medhe-seal", os.MFD_CLOEXEC)
    return fd, f"/proc/self/fd/{fd}"


def _save(obj) -> bytes:
    if not hasattr(os, "memfd_create"):
        return _save_via_temp_dir(obj)
    fd, path = _memory_file()
    try:
        obj.save(path)
        size = os.fstat(fd).st_size
        chunks, offset = [], 0
        while offset < size:  # one read returns at most about 2 GB
            chunks.append(os.pread(fd, size - offset, offset))
            offset += len(chunks[-1])
        return b"".join(chunks)
    finally:
        os.close(fd)


def _save_via_temp_dir(obj) -> bytes:
    """Where there is no memfd (not Linux): a private temporary directory, removed at once."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "obj")
        obj.save(path)
        return Path(path).read_bytes()


_SEAL_HEADER = struct.Struct("<HBBBBHQ")  # magic, header size, version major/minor, compression, reserved, size
_SEAL_MAGIC = 0xA15E


def _check_seal_header(data: bytes, what: str) -> None:
    """The bytes must be exactly one SEAL object: SEAL itself would read the first object and
    silently ignore anything after it (e.g. 40 ciphertexts sent as one)."""
    if len(data) < _SEAL_HEADER.size:
        raise InvalidMessage(f"{what} is {len(data)} bytes, too short for a SEAL object")
    magic, header_size, _, _, _, _, size = _SEAL_HEADER.unpack_from(data)
    if magic != _SEAL_MAGIC or header_size != _SEAL_HEADER.size:
        raise InvalidMessage(f"{what} is not a SEAL object (bad magic or header)")
    if size != len(data):
        raise InvalidMessage(f"{what} must be exactly one SEAL object: its header says {size} bytes, "
                             f"the message holds {len(data)}")


def _load(obj, context, data: bytes, what: str):
    _check_seal_header(data, what)
    try:
        if hasattr(os, "memfd_create"):
            fd, path = _memory_file()
            try:
                view, written = memoryview(data), 0
                while written < len(view):
                    written += os.write(fd, view[written:])
                obj.load(context, path)
            finally:
                os.close(fd)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "obj")
                Path(path).write_bytes(data)
                obj.load(context, path)
    except Exception as exc:  # SEAL raises plain exceptions on any invalid buffer
        raise InvalidMessage(f"{what} is not valid for these CKKS parameters") from exc
    return obj


def make_context(params: CKKSParams):
    parms = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
    parms.set_poly_modulus_degree(params.poly_modulus_degree)
    parms.set_coeff_modulus(seal.CoeffModulus.Create(params.poly_modulus_degree, list(params.coeff_modulus_bits)))
    level = seal.SEC_LEVEL_TYPE.NONE if params.insecure_for_tests else seal.SEC_LEVEL_TYPE.TC128
    context = seal.SEALContext(parms, True, level)
    if not context.parameters_set():
        raise BackendError(f"SEAL rejected the parameters {params}: {context.parameters_error_message()}")
    return context


def _encrypt_values(encoder, encryptor, values: np.ndarray, scale: float):
    pt = seal.Plaintext()
    encoder.encode(values.tolist(), scale, pt)
    ct = seal.Ciphertext()
    encryptor.encrypt(pt, ct)
    return ct


def encrypt_rows_under_public_key(params: CKKSParams, public_key: bytes, rows: np.ndarray):
    """Rows of slot values -> serialized ciphertexts under `public_key`, one at a time (an
    encryption helper process of a client: medhe.runtime.encrypt_worker)."""
    context = make_context(params)
    encryptor = seal.Encryptor(context, _load(seal.PublicKey(), context, public_key, "public key"))
    encoder = seal.CKKSEncoder(context)
    for row in rows:
        yield _save(_encrypt_values(encoder, encryptor, row, 2.0 ** params.input_scale_bits))


class _LevelStub:
    def __init__(self, parms_id, scale: float) -> None:
        self._parms_id, self.scale = parms_id, scale

    def parms_id(self):
        return self._parms_id


class _SEALWire:
    """Ciphertext (de)serialisation, validated against this side's context."""

    context = None

    def serialize(self, ct) -> bytes:
        return _save(ct)

    def deserialize(self, data: bytes):
        ct = _load(seal.Ciphertext(), self.context, data, "ciphertext")
        if not seal.is_valid_for(ct, self.context):
            raise InvalidMessage("ciphertext is not valid for these CKKS parameters")
        return ct


class SEALServerBackend(_SEALWire):
    """Evaluation with public material only."""

    def __init__(self, params: CKKSParams, relin_keys: bytes | None = None, galois_keys: bytes | None = None,
                 *, context=None, public_key: bytes | None = None) -> None:
        # The context is public (parameters only) and can be shared by many key sets.
        self.params = params
        self.context = context or make_context(params)
        self.encoder = seal.CKKSEncoder(self.context)
        self.evaluator = seal.Evaluator(self.context)
        self.slot_count = self.encoder.slot_count()
        self.relin_keys = _load(seal.RelinKeys(), self.context, relin_keys, "relinearization keys") if relin_keys else None
        self.galois_keys = _load(seal.GaloisKeys(), self.context, galois_keys, "Galois keys") if galois_keys else None
        self.encryptor = None
        if public_key:
            self.encryptor = seal.Encryptor(self.context, _load(seal.PublicKey(), self.context, public_key, "public key"))
        self.rotations = 0

    # --- encoding and bookkeeping -----------------------------------------------------------
    def encode(self, values: np.ndarray, like, scale: float):
        pt = seal.Plaintext()
        self.encoder.encode(np.asarray(values, dtype=np.float64).tolist(), like.parms_id(), float(scale), pt)
        return pt

    def encode_scalar(self, value: float, like, scale: float):
        pt = seal.Plaintext()
        self.encoder.encode(float(value), like.parms_id(), float(scale), pt)
        return pt

    def level_stub(self, level: int, scale: float):
        """Something with a ciphertext's parms_id and scale at `level`, to encode ahead of time."""
        data = self.context.first_context_data()
        while data.chain_index() > level:
            data = data.next_context_data()
        if data.chain_index() != level:
            raise BackendError(f"no level {level} in this modulus chain")
        return _LevelStub(data.parms_id(), scale)

    def rescale_divisor(self, ct) -> float:
        return float(self.context.get_context_data(ct.parms_id()).parms().coeff_modulus()[-1].value())

    def scale(self, ct) -> float:
        return ct.scale

    def levels_left(self, ct) -> int:
        return self.context.get_context_data(ct.parms_id()).chain_index()

    def components(self, ct) -> int:
        return ct.size()

    # --- evaluation ---------------------------------------------------------------------------
    @staticmethod
    def _call(what: str, fn, *args):
        try:
            return fn(*args)
        except (ValueError, RuntimeError) as exc:
            raise BackendError(f"SEAL {what} failed: {exc}") from exc

    def _run(self, what: str, fn, *args):
        out = seal.Ciphertext()
        self._call(what, fn, *args, out)
        return out

    def add(self, a, b):
        return self._run("add", self.evaluator.add, a, b)

    def add_inplace(self, a, b):
        """a += b, returning a (saves an allocation in long sums)."""
        self._call("add", self.evaluator.add_inplace, a, b)
        return a

    def add_plain(self, a, pt):
        return self._run("add_plain", self.evaluator.add_plain, a, pt)

    def multiply_plain(self, a, pt):
        return self._run("multiply_plain", self.evaluator.multiply_plain, a, pt)

    def multiply(self, a, b):
        return self._run("multiply", self.evaluator.multiply, a, b)

    def relinearize(self, a):
        if a.size() <= 2:
            return a
        if self.relin_keys is None:
            raise MissingKeyError("relinearization needs relinearization keys; register the client's evaluation keys")
        self._call("relinearize", self.evaluator.relinearize_inplace, a, self.relin_keys)
        return a

    def square(self, a):
        if self.relin_keys is None:
            raise MissingKeyError("squaring needs relinearization keys; register the client's evaluation keys")
        out = self._run("square", self.evaluator.square, a)
        self.evaluator.relinearize_inplace(out, self.relin_keys)
        return out

    def encrypt_public(self, values: np.ndarray, like, scale: float):
        """Encrypt under the public key this backend was given, at `like`'s level.

        Public-key encryption noise (u*e + s*e' in SEAL) is about 2^15 in the slots at N=16384,
        so a weight encrypted at a 2^30 scale would carry a 2^-15 error. Where the chain has a
        level above `like`, the weight is encrypted there at scale * q and rescaled by q: the
        rescale divides that noise by q and leaves only its own rounding noise (about 2^11)."""
        if self.encryptor is None:
            raise MissingKeyError("encrypting weights needs the clinic's public key")
        values = np.asarray(values, dtype=np.float64)
        if values.shape != (self.slot_count,):
            raise BackendError(f"expected {self.slot_count} slot values, got shape {values.shape}")
        level = self.levels_left(like)
        top = self.context.first_context_data().chain_index()
        above = self.level_stub(level + 1, scale) if level < top else None
        divisor = self.rescale_divisor(above) if above is not None else 1.0
        pt = self.encode(values, above or like, scale * divisor)
        ct = seal.Ciphertext()
        self._call("encrypt", self.encryptor.encrypt, pt, ct)
        if above is not None:
            self._call("rescale", self.evaluator.rescale_to_next_inplace, ct)
            ct.scale = float(scale)  # (scale * q) / q, without the last bit of rounding
        return ct

    def rescale(self, a):
        return self._run("rescale", self.evaluator.rescale_to_next, a)

    def rotate(self, a, steps: int):
        if self.galois_keys is None:
            raise MissingKeyError("rotations need Galois keys; register the client's evaluation keys")
        self.rotations += 1
        try:
            return self._run(f"rotation by {steps}", self.evaluator.rotate_vector, a, int(steps), self.galois_keys)
        except BackendError as exc:
            raise MissingKeyError(f"no Galois key for rotation step {steps}; the keys do not match the plan") from exc


class SEALClientBackend(_SEALWire):
    """Holds the secret key: encrypts, decrypts, and makes the evaluation keys the server needs."""

    def __init__(self, params: CKKSParams, *, secret_key: bytes | None = None) -> None:
        self.params = params
        self.context = make_context(params)
        self.encoder = seal.CKKSEncoder(self.context)
        self.slot_count = self.encoder.slot_count()
        if secret_key is not None:
            self._keygen = seal.KeyGenerator(self.context, _load(seal.SecretKey(), self.context, secret_key, "secret key"))
        else:
            self._keygen = seal.KeyGenerator(self.context)
        self._secret_key = self._keygen.secret_key()
        self._public_key = seal.PublicKey()
        self._keygen.create_public_key(self._public_key)
        self.encryptor = seal.Encryptor(self.context, self._public_key)
        # The client's own inputs are encrypted with its secret key (SEAL's symmetric encryption):
        # the ciphertext's uniformly random half is sent as the seed that makes it, so the bytes
        # are half those of a public-key ciphertext, and a fresh one carries less noise.
        self._symmetric = seal.Encryptor(self.context, self._secret_key)
        self.decryptor = seal.Decryptor(self.context, self._secret_key)

    def __repr__(self) -> str:
        return f"SEALClientBackend(N={self.params.poly_modulus_degree}, secret key held)"

    def evaluation_keys(self, rotation_steps: list[int]) -> tuple[bytes, bytes]:
        """Serialized relinearization keys and Galois keys for exactly these rotation steps.

        SEAL's seeded form: each key's uniformly random half is stored as the seed that generates
        it, and SEAL regenerates it on load, so the bytes are half the size (N=16384: about 5.1 MB
        per key instead of 10.3) for the same keys in the server's memory."""
        galois_bytes = b""
        if rotation_steps:
            elements = self.context.key_context_data().galois_tool().get_elts_from_steps(list(rotation_steps))
            galois_bytes = _save(self._keygen.create_galois_keys(elements))
        return _save(self._keygen.create_relin_keys()), galois_bytes

    def public_key(self) -> bytes:
        """The serialized public key: anyone may encrypt under it, only this client decrypts."""
        return _save(self._public_key)

    def export_secret_key(self) -> bytes:
        """The secret key, serialized. Only this explicit call ever writes it out."""
        return _save(self._secret_key)

    def _slot_values(self, values: np.ndarray) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        if values.shape != (self.slot_count,):
            raise BackendError(f"expected {self.slot_count} slot values, got shape {values.shape}")
        return values

    def encrypt(self, values: np.ndarray):
        """A public-key ciphertext object (what a helper process, or the model owner, makes)."""
        return _encrypt_values(self.encoder, self.encryptor, self._slot_values(values),
                               2.0 ** self.params.input_scale_bits)

    def encrypt_to_bytes(self, values: np.ndarray) -> bytes:
        """Slot values -> one serialized ciphertext, encrypted with the secret key in SEAL's seeded
        form (about half the bytes of `serialize(encrypt(values))`; it loads as any ciphertext)."""
        pt = seal.Plaintext()
        self.encoder.encode(self._slot_values(values).tolist(), 2.0 ** self.params.input_scale_bits, pt)
        return _save(self._symmetric.encrypt_symmetric(pt))

    def encrypt_serialized(self, rows: np.ndarray, *, workers: int = 1) -> list[bytes]:
        """Rows of slot values -> serialized ciphertexts, in order: in this process, seeded
        (encrypt_to_bytes). With workers > 1 the rows are shared out to that many helper processes
        of this machine instead, which encrypt under the public key (the secret key is not given
        to them), so their ciphertexts are twice the bytes."""
        rows = np.asarray(rows, dtype=np.float64)
        if rows.ndim != 2 or rows.shape[1] != self.slot_count:
            raise BackendError(f"expected rows of {self.slot_count} slot values, got shape {rows.shape}")
        if workers <= 1 or len(rows) < 4 * workers:
            return [self.encrypt_to_bytes(row) for row in rows]
        from medhe.runtime.encrypt_worker import encrypt_rows_in_processes

        return encrypt_rows_in_processes(self.params.to_dict(), self.public_key(), rows, workers)

    def decrypt(self, ct) -> np.ndarray:
        pt = seal.Plaintext()
        self.decryptor.decrypt(ct, pt)
        return np.asarray(self.encoder.decode_double(pt))
