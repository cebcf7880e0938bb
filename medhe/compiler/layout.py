"""Layouts the compiler chooses: the input image's, and the error for layouts that need a larger ring."""

from __future__ import annotations

from medhe.errors import PlanError
from medhe.plan.layout import Layout


class NeedMoreSlots(PlanError):
    """The layout does not fit this ring; a larger N may fit it."""


def next_power_of_two(value: int) -> int:
    """The smallest power of two >= value (1 for value <= 1)."""
    return 1 << max(0, int(value) - 1).bit_length()


def image_layout(shape: tuple[int, int, int], slot_count: int) -> tuple[Layout, int]:
    """Layout of an input image: channels in power-of-two blocks, rows of width W, the whole
    thing copied into every free block (the client does the copying, so the first conv needs
    no channel rotations). Returns the layout and the block size."""
    channels, height, width = shape
    block = next_power_of_two(height * width)
    if channels * block > slot_count:
        raise NeedMoreSlots(
            f"an input of shape {shape} needs {channels * block} slots in blocks of {block}; "
            f"the ciphertext has {slot_count}"
        )
    copies = slot_count // (channels * block)
    replicas = tuple(r * channels * block for r in range(copies))
    return Layout(channels * height * width, 0, (channels, height, width), (block, width, 1), replicas), block
