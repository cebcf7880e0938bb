"""The slot-level instructions of a latency-mode server plan.

Each kind is one class, registered by its `kind`. What differs between kinds lives on the class:
JSON entry and arrays (serialisation), levels and multiplications, rotation steps, the weight
operands it reads and the scale each is encoded at, and which slots may be non-zero after it.
A new kind is one new class here plus one `_run_<kind>` method in the executor.

Weight operands (diagonals, biases, added vectors) are the model's secret: a plan "without
weights" keeps every instruction's structure and drops them; encrypted-model mode supplies them
as ciphertexts instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from medhe.errors import PlanError

INSTRUCTION_KINDS: dict[str, type["Instruction"]] = {}


def register(cls):
    INSTRUCTION_KINDS[cls.kind] = cls
    return cls


@dataclass
class Instruction:
    layer: str = ""

    kind: ClassVar[str] = ""
    # Primes consumed. Only plaintext (or encrypted-weight) multiplies rescale: a square leaves its
    # result at twice the scale and the linear layer after it rescales by a prime twice as large.
    level_cost: ClassVar[int] = 0
    multiplications: ClassVar[int] = 0
    # A linear layer's rescale is deferred until the next instruction that multiplies, so the
    # rotations in between act at the larger scale (less relative key-switching noise).
    multiplies: ClassVar[bool] = False

    @property
    def rotations(self) -> int:
        return 0

    @property
    def steps(self) -> set[int]:
        return set()

    # --- weight operands ------------------------------------------------------------------------
    def operand_names(self) -> list[str]:
        """Names of the weight-bearing vectors this instruction reads, in evaluation order."""
        return []

    def operand(self, name: str) -> np.ndarray:
        raise PlanError(f"{self.kind} has no operand {name!r}")

    @property
    def has_weights(self) -> bool:
        return True

    def operand_scales(self, scale: float, divisor: float, target_scale: float):
        """Given the input's scale and the prime its rescale would divide by: the encoding scale of
        each operand, the scale after this instruction, and whether a rescale is left pending."""
        return [], scale, False

    # --- serialisation --------------------------------------------------------------------------
    def entry(self) -> dict:
        return {"kind": self.kind, "layer": self.layer}

    def arrays(self) -> dict[str, np.ndarray]:
        return {}

    @classmethod
    def from_entry(cls, entry: dict, arrays: dict[str, np.ndarray] | None) -> "Instruction":
        """`arrays` is None for a plan without weights."""
        return cls(entry.get("layer", ""))

    def without_weights(self) -> "Instruction":
        return type(self).from_entry(self.entry(), None)

    # --- compiler support tracking --------------------------------------------------------------
    def support_after(self, support: np.ndarray) -> np.ndarray:
        """Slots that may be non-zero after the instruction, given those before it."""
        return support


def _need(arrays: dict | None, key: str) -> np.ndarray | None:
    if arrays is None:
        return None
    if key not in arrays:
        raise PlanError(f"plan arrays lack {key!r}")
    return arrays[key]


@register
@dataclass
class Linear(Instruction):
    """y = sum_g rot(sum_b w[g,b] * rot(x, b), g) + bias; one level (a single rescale).

    pairs[i] = (g, b) and diagonals[i] the weight vector for it, already rotated by -g.
    """

    babies: list[int] = field(default_factory=list)
    giants: list[int] = field(default_factory=list)
    pairs: list[tuple[int, int]] = field(default_factory=list)
    diagonals: np.ndarray | None = None  # (len(pairs), slots); None without weights
    bias: np.ndarray | None = None
    has_bias: bool = False

    kind: ClassVar[str] = "linear"
    level_cost: ClassVar[int] = 1
    multiplications: ClassVar[int] = 1
    multiplies: ClassVar[bool] = True

    def __post_init__(self) -> None:
        self.has_bias = self.has_bias or self.bias is not None

    @property
    def rotations(self) -> int:
        return sum(1 for b in self.babies if b) + sum(1 for g in self.giants if g)

    @property
    def steps(self) -> set[int]:
        return {s for s in self.babies + self.giants if s}

    def operand_names(self) -> list[str]:
        return [f"d{p}" for p in range(len(self.pairs))] + (["bias"] if self.has_bias else [])

    def operand(self, name: str) -> np.ndarray:
        if not self.has_weights:
            raise PlanError(f"{self.layer}: this plan holds no weights")
        if name == "bias" and self.has_bias:
            return self.bias
        if name.startswith("d") and name[1:].isdigit() and int(name[1:]) < len(self.pairs):
            return self.diagonals[int(name[1:])]
        return super().operand(name)

    @property
    def has_weights(self) -> bool:
        return self.diagonals is not None

    def operand_scales(self, scale, divisor, target_scale):
        # Weights at q * target / scale(x): after the rescale by q the result is back at the base
        # scale exactly, whether x was fresh (scale ~ base) or squared (scale ~ base^2).
        weight_scale = divisor * target_scale / scale
        out_scale = scale * weight_scale
        scales = [(f"d{p}", weight_scale) for p in range(len(self.pairs))]
        if self.has_bias:
            scales.append(("bias", out_scale))
        return scales, out_scale, True

    def entry(self) -> dict:
        return {**super().entry(), "babies": list(self.babies), "giants": list(self.giants),
                "pairs": [list(p) for p in self.pairs], "has_bias": self.has_bias}

    def arrays(self) -> dict[str, np.ndarray]:
        if not self.has_weights:
            return {}
        out = {"diagonals": self.diagonals}
        if self.has_bias:
            out["bias"] = self.bias
        return out

    @classmethod
    def from_entry(cls, entry, arrays):
        has_bias = bool(entry["has_bias"])
        pairs = [tuple(int(v) for v in p) for p in entry["pairs"]]
        diagonals = _need(arrays, "diagonals")
        if diagonals is not None and diagonals.shape[0] != len(pairs):
            raise PlanError(f"{entry.get('layer')}: {diagonals.shape[0]} diagonals for {len(pairs)} pairs")
        return cls(entry.get("layer", ""), [int(b) for b in entry["babies"]], [int(g) for g in entry["giants"]],
                   pairs, diagonals, _need(arrays, "bias") if has_bias else None, has_bias)

    def support_after(self, support):
        out = np.zeros(support.size, dtype=bool)
        for (g, _), diag in zip(self.pairs, self.diagonals):
            out |= np.roll(diag != 0, -g)
        if self.bias is not None:
            out |= self.bias != 0
        return out


@register
@dataclass
class RotSum(Instruction):
    """y = x; for each stage: y = sum over its offsets o of rot(y, o). No level, no weights."""

    stages: list[list[int]] = field(default_factory=list)

    kind: ClassVar[str] = "rotsum"

    @property
    def rotations(self) -> int:
        return sum(sum(1 for o in stage if o) for stage in self.stages)

    @property
    def steps(self) -> set[int]:
        return {o for stage in self.stages for o in stage if o}

    def entry(self) -> dict:
        return {**super().entry(), "stages": [list(s) for s in self.stages]}

    @classmethod
    def from_entry(cls, entry, arrays):
        return cls(entry.get("layer", ""), [[int(o) for o in s] for s in entry["stages"]])

    def support_after(self, support):
        for stage in self.stages:
            new = np.zeros(support.size, dtype=bool)
            for offset in stage:
                new |= np.roll(support, -offset)
            support = new
        return support


@register
@dataclass
class SquareOp(Instruction):
    """y = x * x, relinearised; its rescale is shared with the next linear layer."""

    kind: ClassVar[str] = "square"
    multiplications: ClassVar[int] = 1
    multiplies: ClassVar[bool] = True

    def operand_scales(self, scale, divisor, target_scale):
        return [], scale * scale, False


@register
@dataclass
class AddPlain(Instruction):
    """y = x + vector (a bias that must reach every copy of a replicated layout)."""

    vector: np.ndarray | None = None

    kind: ClassVar[str] = "add_plain"

    def operand_names(self) -> list[str]:
        return ["vector"]

    def operand(self, name: str) -> np.ndarray:
        if name != "vector":
            return super().operand(name)
        if self.vector is None:
            raise PlanError(f"{self.layer}: this plan holds no weights")
        return self.vector

    @property
    def has_weights(self) -> bool:
        return self.vector is not None

    def operand_scales(self, scale, divisor, target_scale):
        return [("vector", scale)], scale, False

    def arrays(self) -> dict[str, np.ndarray]:
        return {"vector": self.vector} if self.vector is not None else {}

    @classmethod
    def from_entry(cls, entry, arrays):
        return cls(entry.get("layer", ""), _need(arrays, "vector"))

    def support_after(self, support):
        return support | (self.vector != 0)


@register
@dataclass
class Branch(Instruction):
    """Ensemble plans: the next member starts here, from the plan's input ciphertext. The previous
    member's output (rescaled) is set aside and the plan's output is the sum of all members'
    outputs; each member's last layer carries a factor 1/members, so the sum is their mean."""

    kind: ClassVar[str] = "branch"

    @property
    def has_weights(self) -> bool:
        return True  # nothing to hold


def member_segments(instructions) -> list[list]:
    """The instructions (or kind names) of each ensemble member, split at the branches; a plan
    without branches is one member."""
    segments: list[list] = [[]]
    for ins in instructions:
        if (ins if isinstance(ins, str) else ins.kind) == Branch.kind:
            segments.append([])
        else:
            segments[-1].append(ins)
    return segments


def instruction_from_entry(entry: dict, arrays: dict[str, np.ndarray] | None) -> Instruction:
    cls = INSTRUCTION_KINDS.get(entry.get("kind"))
    if cls is None:
        raise PlanError(f"unknown instruction kind {entry.get('kind')!r}; this medhe knows {sorted(INSTRUCTION_KINDS)}")
    try:
        return cls.from_entry(entry, arrays)
    except (KeyError, TypeError, ValueError) as exc:
        raise PlanError(f"malformed {entry.get('kind')} instruction: {exc}") from exc


def rescale_factors(instructions) -> list[int]:
    """For each rescale, the scale just before it in units of the base scale: a multiplication
    that does not rescale (a square) doubles the exponent, and the next rescaling layer divides by
    a prime that much larger. Takes instructions or their kind names. The members of an ensemble
    plan share the primes, so each must rescale alike."""
    segments = member_segments(instructions)
    if not any(segments):
        raise PlanError("a plan without instructions")
    factors = _member_rescale_factors(segments[0])
    for number, segment in enumerate(segments[1:], start=2):
        if _member_rescale_factors(segment) != factors:
            raise PlanError(f"ensemble member {number} rescales differently from the first; the members of one "
                            "plan must share their levels and scales")
    return factors


def _member_rescale_factors(instructions) -> list[int]:
    if not instructions:
        raise PlanError("an ensemble member without instructions")
    factors, factor = [], 1
    for ins in instructions:
        cls = INSTRUCTION_KINDS[ins] if isinstance(ins, str) else type(ins)
        if cls.level_cost:
            factors.append(factor)
            factor = 1
        elif cls.multiplications:
            factor *= 2
    if factor != 1:
        raise PlanError("a plan must end with a linear layer (a trailing square would leave no prime for it)")
    return factors
