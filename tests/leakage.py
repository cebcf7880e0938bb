"""Byte searches for model weights in artifacts (confidentiality is tested, not asserted).

The secret values of a model are its trained tensors (float32 in weights.safetensors), every
folded coefficient the compiler derives from them (batch norm folded into convolutions,
polynomial coefficients absorbed into the next layer, merged linear maps), and the values of the
server plan's weight operands (diagonals, biases) as the lowering encodes them.

Each is searched for in the encodings a leak would take:
- float64, little and big endian (8 bytes): in every artifact;
- float32 pairs, two consecutive values of a tensor as stored (8 bytes): in every artifact;
- a single float32 (4 bytes): only in text and JSON artifacts, because four given bytes turn up by
  chance in megabytes of uniformly random ciphertext or key bytes;
- decimal text (shortest repr of the float64 and float32 value, and 6 and 8 significant digits),
  at least 7 characters long so that it cannot occur by chance.
Values that are short dyadic fractions (0, 1, 0.5, 0.25, ...) are not model-specific and skipped.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MIN_TEXT_CHARS = 7
# A decimal number as text: every token is read in one pass and looked up in the set of forms.
_NUMBER = re.compile(rb"-?(?:\d+\.\d*|\.\d+)(?:[eE][-+]?\d+)?|-?\d+[eE][-+]?\d+")


def _interesting(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    return values[np.abs(values * 1024 - np.round(values * 1024)) > 1e-9]


@dataclass
class Secrets:
    float64: np.ndarray = field(default_factory=lambda: np.zeros(0))  # every secret value, as float64
    float32_tensors: list[np.ndarray] = field(default_factory=list)  # tensors as stored (for pairs)

    def add(self, values, *, float32: bool = False) -> None:
        array = np.asarray(values)
        self.float64 = np.unique(np.concatenate([self.float64, _interesting(array)]))
        if float32 and array.size >= 2:
            self.float32_tensors.append(np.ascontiguousarray(array, dtype=np.float32).ravel())

    def __len__(self) -> int:
        return int(self.float64.size)


def op_arrays(op) -> list[np.ndarray]:
    """Every numeric parameter of a compiler IR op (weights, biases, scales, coefficients)."""
    out = []
    for f in dataclasses.fields(op):
        value = getattr(op, f.name)
        if f.name in ("eps", "stride", "padding", "kernel") or isinstance(value, (str, tuple)):
            continue
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            out.append(value)
        elif isinstance(value, float):
            out.append(np.array([value]))
    return out


def secrets_of(tensors: dict[str, np.ndarray], ops: list, plan=None) -> Secrets:
    """Raw tensors (float32), IR ops before and after the passes, and the plan's operand values."""
    secrets = Secrets()
    for tensor in tensors.values():
        if tensor.dtype.kind == "f":
            secrets.add(tensor, float32=True)
    for op in ops:
        for array in op_arrays(op):
            secrets.add(array)
    if plan is not None:
        for ins in plan.instructions:
            for name in ins.operand_names():
                operand = ins.operand(name)
                secrets.add(operand[operand != 0])
    return secrets


def model_dir_secrets(model_dir: Path, plan=None) -> Secrets:
    from safetensors.numpy import load_file

    from medhe.compiler.passes import optimize
    from medhe.compiler.trace import trace_model_dir
    from medhe.nn.modeldir import ensemble_members

    tensors, ops = {}, []
    for number, member in enumerate(ensemble_members(model_dir) or [Path(model_dir)]):
        traced, _ = trace_model_dir(member)
        tensors.update({f"{number}.{key}": value for key, value in load_file(str(member / "weights.safetensors")).items()})
        ops += traced + optimize(traced)
    return secrets_of(tensors, ops, plan)


def torch_secrets(seq, input_shape, plan=None) -> Secrets:
    from medhe.compiler.passes import optimize
    from tests.helpers import trace_torch

    traced = trace_torch(seq, input_shape)
    tensors = {k: v.detach().numpy() for k, v in seq.state_dict().items()}
    return secrets_of(tensors, traced + optimize(traced), plan)


# --- searching ------------------------------------------------------------------------------------
def _word_patterns(secrets: Secrets) -> np.ndarray:
    """8-byte patterns (as little-endian uint64): float64 both endians, float32 pairs both endians."""
    f64 = secrets.float64
    patterns = [f64.astype("<f8").view("<u8"), f64.astype(">f8").view("<u8")]
    for tensor in secrets.float32_tensors:
        pairs = np.lib.stride_tricks.sliding_window_view(tensor, 2)
        keep = (np.abs(pairs * 1024 - np.round(pairs * 1024)) > 1e-9).any(axis=1)  # not e.g. (1.0, 0.0)
        for dtype in ("<f4", ">f4"):
            patterns.append(np.ascontiguousarray(pairs[keep].astype(dtype)).view("<u8").ravel())
    return np.unique(np.concatenate(patterns))


def _text_patterns(secrets: Secrets) -> set[bytes]:
    out = set()
    for v in secrets.float64:
        v32 = np.float32(v)
        for text in (repr(float(v)), repr(float(v32)), str(v32), f"{v:.6g}", f"{v:.8g}"):
            if len(text.lstrip("-")) >= MIN_TEXT_CHARS:
                out.add(text.encode())
    return out


_CHUNK = 1 << 24


def _scan_words(blob: bytes, patterns: np.ndarray, width: int) -> int:
    """Occurrences of any `width`-byte pattern at any byte offset. A table of the patterns' first
    three bytes picks the few candidate offsets; only those are compared whole."""
    data = np.frombuffer(blob, dtype=np.uint8)
    if data.size < width:
        return 0
    first = np.ascontiguousarray(patterns).view(np.uint8).reshape(-1, width)[:, :3].astype(np.uint32)
    table = np.zeros(1 << 24, dtype=bool)
    table[first[:, 0] | (first[:, 1] << 8) | (first[:, 2] << 16)] = True
    windows = np.lib.stride_tricks.sliding_window_view(data, width)
    hits = 0
    for start in range(0, windows.shape[0], _CHUNK):
        w = windows[start: start + _CHUNK]
        prefix = w[:, 0].astype(np.uint32) | (w[:, 1].astype(np.uint32) << 8) | (w[:, 2].astype(np.uint32) << 16)
        candidates = np.ascontiguousarray(w[table[prefix]]).view("<u8" if width == 8 else "<u4").ravel()
        hits += int(np.isin(candidates, patterns).sum())
    return hits


def _decimal_tokens(blob: bytes) -> set[bytes]:
    """Every decimal number with a point in `blob` (text or binary), read around each '.' that
    touches a digit: a single pass over the bytes, then a short regex per candidate."""
    data = np.frombuffer(blob, dtype=np.uint8)
    if data.size < 2:
        return set()
    digit = (data >= 0x30) & (data <= 0x39)
    dots = np.flatnonzero(data == 0x2E)
    before = np.zeros(dots.size, dtype=bool)
    before[dots > 0] = digit[dots[dots > 0] - 1]
    after = np.zeros(dots.size, dtype=bool)
    inside = dots + 1 < data.size
    after[inside] = digit[dots[inside] + 1]
    tokens = set()
    for p in dots[before | after]:
        for match in _NUMBER.finditer(blob, max(0, int(p) - 40), int(p) + 40):
            if match.start() <= p < match.end():
                tokens.add(match.group())
    return tokens


class LeakSearch:
    def __init__(self, secrets: Secrets) -> None:
        if len(secrets) == 0:
            raise ValueError("no secret values to search for")
        self.secrets = secrets
        self._words = _word_patterns(secrets)
        self._texts = _text_patterns(secrets)
        f32 = secrets.float64.astype(np.float32)
        self._singles32 = np.unique(np.concatenate([f32.astype("<f4").view("<u4"), f32.astype(">f4").view("<u4")]))

    def find(self, blob: bytes, *, text: bool = False) -> list[str]:
        """What was found in `blob` (empty when nothing). `text`: the blob is JSON or text, so
        single float32 values are searched too."""
        found = []
        if _scan_words(blob, self._words, 8):
            found.append("float64 or float32-pair bytes")
        if text and _scan_words(blob, self._singles32, 4):
            found.append("float32 bytes")
        texts = _decimal_tokens(blob) & self._texts
        if texts:
            found.append(f"decimal text {sorted(texts)[0].decode()!r}")
        return found

    def find_in_files(self, root: Path) -> dict[str, list[str]]:
        leaks = {}
        for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
            data = path.read_bytes()
            found = self.find(data, text=path.suffix in (".json", ".txt"))
            if found:
                leaks[str(path)] = found
        return leaks
