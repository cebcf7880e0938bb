"""Where each logical value of a tensor sits in the ciphertext slots (part of the plan format:
the client packs and unpacks with it, the compiler lowers onto it)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medhe.errors import PlanError


@dataclass(frozen=True)
class Layout:
    """Logical index i (row-major over the tensor) -> slot base + sum(digit_k * steps_k) mod n,
    with the digits of i in the mixed radix `dims`. `replicas` are offsets holding full copies."""

    size: int
    base: int
    dims: tuple[int, ...]
    steps: tuple[int, ...]
    replicas: tuple[int, ...] = (0,)

    def __post_init__(self) -> None:
        if len(self.dims) != len(self.steps) or int(np.prod(self.dims)) < self.size:
            raise PlanError(f"invalid layout dims {self.dims} steps {self.steps} for {self.size} values")

    def slots(self, slot_count: int) -> np.ndarray:
        index = np.arange(self.size)
        slot = np.full(self.size, self.base, dtype=np.int64)
        for dim, step in zip(reversed(self.dims), reversed(self.steps)):
            slot += (index % dim) * step
            index //= dim
        return slot % slot_count

    def replica_slots(self, slot_count: int) -> np.ndarray:
        """(replicas, size) slot indices of every copy."""
        base = self.slots(slot_count)
        return (base[None, :] + np.asarray(self.replicas, dtype=np.int64)[:, None]) % slot_count

    def to_dict(self) -> dict:
        return {"size": self.size, "base": self.base, "dims": list(self.dims), "steps": list(self.steps),
                "replicas": list(self.replicas)}

    @classmethod
    def from_dict(cls, d: dict) -> "Layout":
        return cls(int(d["size"]), int(d["base"]), tuple(int(v) for v in d["dims"]),
                   tuple(int(v) for v in d["steps"]), tuple(int(v) for v in d["replicas"]))


def signed_step(step: int, slot_count: int) -> int:
    """A rotation step in (-n/2, n/2]: the same rotation, the smaller number."""
    step %= slot_count
    return step - slot_count if step > slot_count // 2 else step
