"""Where each logical value of a tensor sits in the ciphertext slots."""

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


def image_layout(shape: tuple[int, int, int], slot_count: int) -> tuple[Layout, int]:
    """Layout of an input image: channels in power-of-two blocks, rows of width W, the whole
    thing copied into every free block (the client does the copying, so the first conv needs
    no channel rotations). Returns the layout and the block size."""
    channels, height, width = shape
    block = 1 << int(np.ceil(np.log2(height * width)))
    if channels * block > slot_count:
        from medhe.compiler.lower import NeedMoreSlots

        raise NeedMoreSlots(
            f"an input of shape {shape} needs {channels * block} slots in blocks of {block}; "
            f"the ciphertext has {slot_count}"
        )
    copies = slot_count // (channels * block)
    replicas = tuple(r * channels * block for r in range(copies))
    return Layout(channels * height * width, 0, (channels, height, width), (block, width, 1), replicas), block


def signed_step(step: int, slot_count: int) -> int:
    """A rotation step in (-n/2, n/2]: the same rotation, the smaller number."""
    step %= slot_count
    return step - slot_count if step > slot_count // 2 else step
