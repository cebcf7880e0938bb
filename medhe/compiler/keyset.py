"""Fewer Galois keys: pick a small set of rotation steps that generates every rotation a plan makes.

Each rotation step a plan uses needs its own Galois key (about 5 MB at N=16384, seeded), and the keys are
what a clinic uploads and a server stores per clinic. With a key budget, a rotation by a step that
has no key is made of several rotations by steps that have one (rotations compose: rotating by a
then by b rotates by a + b, cyclically over the slots). The chooser adds, one at a time, the step
that most lowers the rotations an evaluation then costs, then swaps keys while a swap lowers it;
the compiler weights each step by the key-switching cost of the levels it is used at, so extra
rotations land where they are cheap. Each missing step is then reached by the fewest key rotations
(breadth-first search over the slot positions, medhe.plan.keychains).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping

import numpy as np

from medhe.errors import PlanError
from medhe.plan.keychains import _distances, key_switching_key_bytes
from medhe.plan.keychains import rotation_chains  # noqa: F401  (re-exported for callers of the compiler)

__all__ = ["choose_key_steps", "galois_keys_within", "key_switching_key_bytes", "rotation_chains", "rotation_cost"]


def galois_keys_within(params, max_key_bytes: int) -> int:
    """How many Galois keys fit a budget for all evaluation keys (the relinearization key included)."""
    per_key = key_switching_key_bytes(params)
    keys = (int(max_key_bytes) - per_key) // per_key
    if keys < 1:
        raise PlanError(f"an evaluation-key budget of {max_key_bytes / 2**20:.1f} MB holds no Galois key at "
                        f"these parameters (each key is about {per_key / 2**20:.1f} MB)")
    return keys


def rotation_cost(usage: Mapping[int, int], key_steps: Iterable[int], slots: int) -> tuple[int, int]:
    """(steps that cannot be reached, key rotations per evaluation) for this key set."""
    distance, _, _ = _distances(key_steps, slots)
    unreachable = sum(1 for step in usage if distance[step % slots] < 0)
    cost = sum(count * int(distance[step % slots]) for step, count in usage.items() if distance[step % slots] >= 0)
    return unreachable, cost


_MAX_USES_OF_ONE_KEY = 16  # longest run of one key a chain is scored with while choosing


def _with_key(distance: np.ndarray, targets: np.ndarray, step: int, unreachable: int) -> np.ndarray:
    """Key rotations to each target offset once `step` has a key too: rotations commute, so the
    best chain uses the new key j times and reaches the rest of the offset with the old keys."""
    slots = distance.size
    uses = np.arange(_MAX_USES_OF_ONE_KEY + 1)
    chains = distance[(targets[None, :] - uses[:, None] * step) % slots] + uses[:, None]
    return np.minimum(chains.min(axis=0), unreachable)


def choose_key_steps(usage: Mapping[int, int], slots: int, max_keys: int) -> tuple[int, ...]:
    return _choose_key_steps(tuple(sorted(usage.items())), slots, max_keys)


@functools.lru_cache(maxsize=64)  # about a second a choice; a process compiles the same plans again
def _choose_key_steps(usage_items: tuple[tuple[int, int], ...], slots: int, max_keys: int) -> tuple[int, ...]:
    """At most max_keys rotation steps whose keys generate every step in `usage` (step -> how many
    rotations by it one evaluation makes, or their cost), chosen for the lowest total: greedily,
    one key at a time, then improved by swapping a chosen key for another while that lowers the
    total (greedy additions leave keys that later ones made redundant)."""
    if max_keys < 1:
        raise PlanError(f"the Galois key budget must be at least 1 key, got {max_keys}")
    usage = dict(usage_items)
    if len(usage) <= max_keys:
        return tuple(sorted(usage))
    powers = [1 << k for k in range(int(np.log2(slots)))]
    candidates = sorted(set(usage) | set(powers) | {-p for p in powers})
    targets = np.array([step % slots for step in usage], dtype=np.int64)
    weights = np.array(list(usage.values()), dtype=np.int64)
    unreachable = slots + 1  # more rotations than any chain needs: counts as "cannot reach"

    def exact(keys) -> np.ndarray:
        distance = _distances(keys, slots, _MAX_USES_OF_ONE_KEY)[0]  # longer chains are never worth it
        distance[distance < 0] = unreachable
        return distance

    def score(d: np.ndarray) -> tuple[int, int]:
        missing = d >= unreachable
        return int(missing.sum()), int((weights * np.where(missing, 0, d)).sum())

    def best_addition(distance: np.ndarray, chosen: list[int]):
        return min((score(_with_key(distance, targets, c % slots, unreachable)), abs(c), c)
                   for c in candidates if c not in chosen)

    chosen: list[int] = []
    while len(chosen) < max_keys:
        distance = exact(chosen)
        current, best = score(distance[targets]), best_addition(distance, chosen)
        if chosen and best[0] >= current:
            break  # no candidate lowers the cost any more
        chosen.append(best[2])
    for _ in range(4 * max_keys):  # swaps; each strictly lowers the total, so this ends
        current, swap = score(exact(chosen)[targets]), None
        for key in chosen:
            rest = [c for c in chosen if c != key]
            found = best_addition(exact(rest), chosen)
            if found[0] < current and (swap is None or found[0] < swap[0][0]):
                swap = (found, key)
        if swap is None:
            break
        chosen = sorted([c for c in chosen if c != swap[1]] + [swap[0][2]])
    if rotation_cost(usage, chosen, slots)[0]:
        raise PlanError(f"{max_keys} Galois keys cannot generate every rotation of this plan in a few key "
                        f"rotations each; allow more keys")
    return tuple(sorted(chosen))
