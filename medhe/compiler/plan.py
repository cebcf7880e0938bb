"""The compiled plan: slot-level instructions, layouts and CKKS parameters. Frozen, versioned,
hashed; saved as JSON plus an npz of arrays (never pickle)."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medhe.compiler.layout import Layout
from medhe.errors import PlanError
from medhe.params import CKKSParams

PLAN_FORMAT = "medhe-plan"
PLAN_FORMAT_VERSION = 1
PLAN_JSON = "plan.json"
PLAN_ARRAYS = "arrays.npz"


@dataclass
class Linear:
    """y = sum_g rot(sum_b pt[g,b] * rot(x, b), g) + bias; one level (a single rescale).

    pairs[i] = (g, b) and diagonals[i] the plaintext for it, already rotated by -g.
    """

    babies: list[int]
    giants: list[int]
    pairs: list[tuple[int, int]]
    diagonals: np.ndarray  # (len(pairs), slots)
    bias: np.ndarray | None
    layer: str = ""
    kind: str = "linear"

    @property
    def rotations(self) -> int:
        return sum(1 for b in self.babies if b) + sum(1 for g in self.giants if g)

    @property
    def steps(self) -> set[int]:
        return {s for s in self.babies + self.giants if s}


@dataclass
class RotSum:
    """y = x; for each stage: y = sum over its offsets o of rot(y, o). No level."""

    stages: list[list[int]]
    layer: str = ""
    kind: str = "rotsum"

    @property
    def rotations(self) -> int:
        return sum(sum(1 for o in stage if o) for stage in self.stages)

    @property
    def steps(self) -> set[int]:
        return {o for stage in self.stages for o in stage if o}


@dataclass
class SquareOp:
    """y = x * x, relinearised and rescaled: one level."""

    layer: str = ""
    kind: str = "square"
    rotations: int = 0
    steps: set = field(default_factory=set)


@dataclass
class AddPlain:
    vector: np.ndarray
    layer: str = ""
    kind: str = "add_plain"
    rotations: int = 0
    steps: set = field(default_factory=set)


Instruction = Linear | RotSum | SquareOp | AddPlain
# Primes consumed: only plaintext multiplies rescale. A square leaves its result at twice the
# scale and the linear layer after it rescales by a prime twice as large, so a square and the
# layer that follows share one prime (one rescale) instead of two.
LEVEL_COST = {"linear": 1, "square": 0, "rotsum": 0, "add_plain": 0}
MULTIPLICATIONS = {"linear": 1, "square": 1, "rotsum": 0, "add_plain": 0}


def rescale_factors(kinds: list[str]) -> list[int]:
    """For each rescale (linear op), the scale just before it in units of the base scale."""
    factors, factor = [], 1
    for kind in kinds:
        if kind == "square":
            factor *= 2
        elif kind == "linear":
            factors.append(factor)
            factor = 1
    if factor != 1:
        raise PlanError("a plan must end with a linear layer (a trailing square would leave no prime for it)")
    return factors


@dataclass
class Plan:
    params: CKKSParams
    input_shape: tuple[int, ...]
    input_layout: Layout
    output_layout: Layout
    instructions: list
    class_names: list[str]
    preprocessing: dict
    model_digest: str
    report: dict = field(default_factory=dict)

    @property
    def depth(self) -> int:
        """Rescales, i.e. levels a fresh input ciphertext must have."""
        return sum(LEVEL_COST[i.kind] for i in self.instructions)

    @property
    def multiplicative_depth(self) -> int:
        return sum(MULTIPLICATIONS[i.kind] for i in self.instructions)

    def rescale_factors(self) -> list[int]:
        return rescale_factors([i.kind for i in self.instructions])

    def rotation_steps(self) -> list[int]:
        steps: set[int] = set()
        for instruction in self.instructions:
            steps |= instruction.steps
        return sorted(steps)

    def rotation_count(self) -> int:
        return sum(i.rotations for i in self.instructions)

    # --- serialisation -------------------------------------------------------------------
    def _doc_and_arrays(self) -> tuple[dict, dict[str, np.ndarray]]:
        arrays: dict[str, np.ndarray] = {}
        instructions = []
        for index, ins in enumerate(self.instructions):
            entry = {"kind": ins.kind, "layer": ins.layer}
            if ins.kind == "linear":
                entry.update(babies=ins.babies, giants=ins.giants, pairs=[list(p) for p in ins.pairs],
                             has_bias=ins.bias is not None)
                arrays[f"i{index}_diagonals"] = ins.diagonals
                if ins.bias is not None:
                    arrays[f"i{index}_bias"] = ins.bias
            elif ins.kind == "rotsum":
                entry["stages"] = ins.stages
            elif ins.kind == "add_plain":
                arrays[f"i{index}_vector"] = ins.vector
            instructions.append(entry)
        doc = {
            "format": PLAN_FORMAT, "format_version": PLAN_FORMAT_VERSION,
            "params": self.params.to_dict(), "input_shape": list(self.input_shape),
            "input_layout": self.input_layout.to_dict(), "output_layout": self.output_layout.to_dict(),
            "instructions": instructions, "class_names": self.class_names,
            "preprocessing": self.preprocessing, "model_digest": self.model_digest,
        }
        return doc, arrays

    def digest(self) -> str:
        """sha256 over everything that changes what the server computes or the client sends."""
        if getattr(self, "_digest", None) is None:
            doc, arrays = self._doc_and_arrays()
            h = hashlib.sha256(json.dumps(doc, sort_keys=True).encode())
            for key in sorted(arrays):
                h.update(key.encode())
                h.update(np.ascontiguousarray(arrays[key], dtype=np.float64).tobytes())
            self._digest = h.hexdigest()
        return self._digest

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        doc, arrays = self._doc_and_arrays()
        doc["digest"] = self.digest()
        doc["report"] = self.report
        np.savez_compressed(directory / PLAN_ARRAYS, **arrays)
        (directory / PLAN_JSON).write_text(json.dumps(doc, indent=1))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "Plan":
        directory = Path(directory)
        try:
            doc = json.loads((directory / PLAN_JSON).read_text())
            with np.load(directory / PLAN_ARRAYS, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (OSError, ValueError) as exc:
            raise PlanError(f"{directory} is not a readable medhe plan ({PLAN_JSON} + {PLAN_ARRAYS}): {exc}") from exc
        if doc.get("format") != PLAN_FORMAT or doc.get("format_version") != PLAN_FORMAT_VERSION:
            raise PlanError(f"{directory}: expected {PLAN_FORMAT} version {PLAN_FORMAT_VERSION}, "
                            f"got {doc.get('format')!r} version {doc.get('format_version')!r}")
        instructions = []
        for index, entry in enumerate(doc["instructions"]):
            kind, layer = entry["kind"], entry.get("layer", "")
            if kind == "linear":
                instructions.append(Linear(
                    [int(b) for b in entry["babies"]], [int(g) for g in entry["giants"]],
                    [tuple(int(v) for v in p) for p in entry["pairs"]], arrays[f"i{index}_diagonals"],
                    arrays[f"i{index}_bias"] if entry["has_bias"] else None, layer))
            elif kind == "rotsum":
                instructions.append(RotSum([[int(o) for o in s] for s in entry["stages"]], layer))
            elif kind == "square":
                instructions.append(SquareOp(layer))
            elif kind == "add_plain":
                instructions.append(AddPlain(arrays[f"i{index}_vector"], layer))
            else:
                raise PlanError(f"{directory}: unknown instruction kind {kind!r}")
        plan = cls(CKKSParams.from_dict(doc["params"]), tuple(doc["input_shape"]),
                   Layout.from_dict(doc["input_layout"]), Layout.from_dict(doc["output_layout"]),
                   instructions, list(doc["class_names"]), doc["preprocessing"], doc["model_digest"],
                   doc.get("report", {}))
        if plan.digest() != doc.get("digest"):
            raise PlanError(f"{directory}: plan digest mismatch; the files were changed or corrupted")
        return plan
