"""The server plan (latency mode): slot-level instructions with their weights, layouts and CKKS
parameters. Saved as JSON plus an npz of arrays (never pickle) and hashed.

Two digests:
- `digest()` covers everything, weights included. It is the commitment the public client spec
  carries: the clinic can name the model without holding it.
- `structure_digest()` covers everything but the weights (instruction kinds, rotation pairs,
  layouts, parameters). A plan saved `without_weights()` (the public architecture an
  encrypted-model server runs) can check only this one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medhe.errors import PlanError
from medhe.params import CKKSParams
from medhe.plan.client_spec import ClientSpec
from medhe.plan.files import write_plan_files
from medhe.plan.instructions import Branch, Instruction, instruction_from_entry, member_segments, rescale_factors
from medhe.plan.layout import Layout

PLAN_FORMAT = "medhe-plan"
PLAN_FORMAT_VERSION = 2
PLAN_JSON = "plan.json"
PLAN_ARRAYS = "arrays.npz"



def _checked_key_steps(raw, slot_count: int) -> tuple[int, ...]:
    """A stored Galois key set: distinct plain ints with 0 < |step| < slot_count."""
    if not isinstance(raw, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in raw):
        raise PlanError(f"key_steps must be a list of integers, got {raw!r:.80}")
    if len(set(raw)) != len(raw) or not all(0 < abs(s) < slot_count for s in raw):
        raise PlanError(f"key_steps must be distinct and 0 < |step| < {slot_count}, got {raw!r:.80}")
    return tuple(raw)

@dataclass
class Plan:
    params: CKKSParams
    input_shape: tuple[int, ...]
    input_layout: Layout
    output_layout: Layout
    instructions: list[Instruction]
    class_names: list[str]
    preprocessing: dict
    model_digest: str
    report: dict = field(default_factory=dict)
    # Set on a plan loaded without weights: the full plan's digest, as recorded when it was saved.
    _recorded_digest: str | None = field(default=None, repr=False)
    # The Galois key set when the compiler was given a key budget (medhe.compiler.keyset); empty =
    # one key per rotation step. Other steps are made of several key rotations.
    key_steps: tuple[int, ...] = ()

    @property
    def has_weights(self) -> bool:
        return all(ins.has_weights for ins in self.instructions)

    @property
    def members(self) -> int:
        """Models averaged by this plan (an ensemble has several, split by `branch` instructions)."""
        return 1 + sum(1 for ins in self.instructions if ins.kind == Branch.kind)

    @property
    def depth(self) -> int:
        """Rescales, i.e. levels a fresh input ciphertext must have (an ensemble's members run side
        by side from the same input, so this is one member's)."""
        return len(self.rescale_factors())

    @property
    def multiplicative_depth(self) -> int:
        return sum(i.multiplications for i in member_segments(self.instructions)[0])

    def rescale_factors(self) -> list[int]:
        return rescale_factors(self.instructions)

    def rotation_steps(self) -> list[int]:
        steps: set[int] = set()
        for instruction in self.instructions:
            steps |= instruction.steps
        return sorted(steps)

    def rotation_count(self) -> int:
        """Rotations per evaluation, counting each key rotation a composed step takes (and the
        input rotations an ensemble's later members reuse only once)."""
        chains = self.rotation_chains()
        return sum(self.key_rotations(ins, chains) for ins in self.instructions) \
            - sum(len(chains[step]) for _, step in self.reused_input_rotations())

    def reused_input_rotations(self) -> list[tuple[int, int]]:
        """(instruction index, baby step) for each rotation of the input that a later ensemble
        member's first linear layer takes from an earlier member's (the executor makes it once)."""
        made, reused = set(), []
        for index, ins in enumerate(self.instructions):
            starts_member = index == 0 or self.instructions[index - 1].kind == Branch.kind
            if starts_member and ins.kind == "linear":
                reused += [(index, b) for b in ins.babies if b and b in made]
                made |= {b for b in ins.babies if b}
        return reused

    @staticmethod
    def key_rotations(instruction, chains: dict[int, tuple[int, ...]]) -> int:
        """One instruction's rotations, each composed step counted as its key rotations."""
        return instruction.rotations + sum(len(chains[step]) - 1 for step in instruction.steps)

    def instruction_levels(self) -> list[int]:
        """The level (chain index: primes left - 1) each instruction works at. A linear layer's
        rescale waits for the next instruction that multiplies (as the executor runs it)."""
        levels, level, pending = [], self.depth, False
        for instruction in self.instructions:
            if instruction.kind == Branch.kind:  # the next member starts from the input
                level, pending = self.depth, False
            if pending and instruction.multiplies:
                level, pending = level - 1, False
            levels.append(level)
            pending = pending or bool(instruction.level_cost)
        return levels

    @staticmethod
    def key_switching_weight(level: int) -> int:
        """Relative cost of one rotation at `level`: the level + 1 digits of the ciphertext are each
        lifted to level + 2 primes (the special one included), plus one unit for what every
        rotation pays whatever its size. Measured SEAL times at N=16384 (1.9, 3.8, 8.4, 13.9, 19.4,
        25.2 ms at levels 0-5) are 0.54-0.66 ms a unit."""
        return (level + 1) * (level + 2) + 1

    def rotation_usage(self, *, cost_weighted: bool = False) -> dict[int, int]:
        """Rotation step -> how many rotations by it one evaluation makes (cost_weighted: each
        counted by its key-switching weight at the level it happens)."""
        usage: dict[int, int] = {}
        for instruction, level in zip(self.instructions, self.instruction_levels()):
            weight = self.key_switching_weight(level) if cost_weighted else 1
            for step in instruction.steps:
                usage[step] = usage.get(step, 0) + weight
        return usage

    def key_switching_cost(self) -> int:
        """Key rotations per evaluation, each weighted by its level's key-switching weight."""
        chains = self.rotation_chains()
        top = self.key_switching_weight(self.depth)  # where the input is rotated
        return sum(self.key_switching_weight(level) * self.key_rotations(ins, chains)
                   for ins, level in zip(self.instructions, self.instruction_levels())) \
            - sum(top * len(chains[step]) for _, step in self.reused_input_rotations())

    def galois_steps(self) -> list[int]:
        """The rotation steps the client makes Galois keys for."""
        return sorted(self.key_steps) if self.key_steps else self.rotation_steps()

    def rotation_chains(self) -> dict[int, tuple[int, ...]]:
        """Step -> the key rotations that make it (just the step itself without a key budget)."""
        if not self.key_steps:
            return {step: (step,) for step in self.rotation_steps()}
        from medhe.plan.keychains import rotation_chains

        return rotation_chains(self.rotation_steps(), self.key_steps, self.params.slot_count)

    def weight_operand_count(self) -> int:
        return sum(len(i.operand_names()) for i in self.instructions)

    # --- the two halves ---------------------------------------------------------------------------
    def client_spec(self) -> ClientSpec:
        """The public half: all a clinic needs, no weight in any encoding."""
        summary = {key: self.report[key] for key in ("levels_before", "levels_after", "rescales", "rotations",
                                                     "rotation_keys", "security_bits") if key in self.report}
        return ClientSpec("latency", self.params, tuple(self.input_shape), tuple(self.class_names),
                          self.preprocessing, self.digest(), tuple(self.galois_steps()),
                          self.input_layout, self.output_layout, summary)

    def without_weights(self) -> "Plan":
        """The same plan with every weight operand dropped (what an encrypted-model server holds)."""
        stripped = Plan(self.params, self.input_shape, self.input_layout, self.output_layout,
                        [i.without_weights() for i in self.instructions], self.class_names, self.preprocessing,
                        self.model_digest, dict(self.report), self.digest(), self.key_steps)
        return stripped

    # --- serialisation ----------------------------------------------------------------------------
    def _doc(self) -> dict:
        return {
            "format": PLAN_FORMAT, "format_version": PLAN_FORMAT_VERSION,
            "params": self.params.to_dict(), "input_shape": list(self.input_shape),
            "input_layout": self.input_layout.to_dict(), "output_layout": self.output_layout.to_dict(),
            "instructions": [ins.entry() for ins in self.instructions], "class_names": self.class_names,
            "preprocessing": self.preprocessing, "model_digest": self.model_digest,
            # Only when set, so plans compiled without a key budget keep their digests.
            **({"key_steps": sorted(self.key_steps)} if self.key_steps else {}),
        }

    def _arrays(self) -> dict[str, np.ndarray]:
        return {f"i{index}_{name}": array for index, ins in enumerate(self.instructions)
                for name, array in ins.arrays().items()}

    def structure_digest(self) -> str:
        return hashlib.sha256(json.dumps(self._doc(), sort_keys=True).encode()).hexdigest()

    def digest(self) -> str:
        """sha256 over everything that changes what the server computes, weights included."""
        if self._recorded_digest is not None:
            return self._recorded_digest
        if getattr(self, "_digest", None) is None:
            if not self.has_weights:
                raise PlanError("a plan without weights has no digest of its own")
            h = hashlib.sha256(json.dumps(self._doc(), sort_keys=True).encode())
            arrays = self._arrays()
            for key in sorted(arrays):
                h.update(key.encode())
                h.update(np.ascontiguousarray(arrays[key], dtype=np.float64).tobytes())
            self._digest = h.hexdigest()
        return self._digest

    def save(self, directory: str | Path) -> Path:
        """plan.json (+ arrays.npz when the plan holds weights)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        doc = self._doc()
        doc["digest"] = self.digest()
        doc["structure_digest"] = self.structure_digest()
        doc["has_weights"] = self.has_weights
        doc["report"] = self.report
        if not self.has_weights and (directory / PLAN_ARRAYS).exists():
            # Never leave clear weights beside a plan meant to be published without them.
            raise PlanError(f"{directory} holds a plan with weights ({PLAN_ARRAYS}); write the plan without "
                            "weights to another directory")
        if self.has_weights:
            write_plan_files(directory, PLAN_JSON, doc, PLAN_ARRAYS, self._arrays())
        else:
            write_plan_files(directory, PLAN_JSON, doc)
        return directory

    @classmethod
    def load(cls, directory: str | Path, *, weights: bool = True) -> "Plan":
        """Load a plan directory; with weights=False only plan.json is read (and a plan saved
        without weights loads only this way)."""
        directory = Path(directory)
        try:
            doc = json.loads((directory / PLAN_JSON).read_text())
        except (OSError, ValueError) as exc:
            raise PlanError(f"{directory} is not a readable medhe plan ({PLAN_JSON}): {exc}") from exc
        if not isinstance(doc, dict) or doc.get("format") != PLAN_FORMAT \
                or doc.get("format_version") != PLAN_FORMAT_VERSION:
            raise PlanError(f"{directory}: expected {PLAN_FORMAT} version {PLAN_FORMAT_VERSION}, got "
                            f"{doc.get('format') if isinstance(doc, dict) else doc!r} version "
                            f"{doc.get('format_version') if isinstance(doc, dict) else None!r}; recompile the model")
        arrays = None
        if weights:
            if not doc.get("has_weights", False):
                raise PlanError(f"{directory} holds a plan without weights (the public architecture); "
                                "load it with weights=False or use the full plan from `medhe compile`")
            try:
                with np.load(directory / PLAN_ARRAYS, allow_pickle=False) as npz:
                    arrays = {k: npz[k] for k in npz.files}
            except (OSError, ValueError) as exc:
                raise PlanError(f"{directory}: {PLAN_ARRAYS} is not readable: {exc}") from exc
        try:
            instructions = []
            for index, entry in enumerate(doc["instructions"]):
                prefix = f"i{index}_"
                own = None if arrays is None else {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
                instructions.append(instruction_from_entry(entry, own))
            plan = cls(CKKSParams.from_dict(doc["params"]), tuple(doc["input_shape"]),
                       Layout.from_dict(doc["input_layout"]), Layout.from_dict(doc["output_layout"]),
                       instructions, list(doc["class_names"]), doc["preprocessing"], doc["model_digest"],
                       doc.get("report", {}), None if weights else str(doc["digest"]),
                       _checked_key_steps(doc.get("key_steps", []), CKKSParams.from_dict(doc["params"]).slot_count))
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"{directory}: malformed {PLAN_JSON}: {exc!r}") from exc
        plan.rescale_factors()  # ensemble members must share levels and scales (PlanError if not)
        if plan.key_steps:
            plan.rotation_chains()  # every rotation step must be made from the key set (PlanError if not)
        if plan.structure_digest() != doc.get("structure_digest"):
            raise PlanError(f"{directory}: plan structure digest mismatch; the files were changed or corrupted")
        if weights and plan.digest() != doc.get("digest"):
            raise PlanError(f"{directory}: plan digest mismatch; the weights were changed or corrupted")
        return plan

