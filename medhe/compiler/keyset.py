"""Fewer Galois keys: pick a small set of rotation steps that generates every rotation a plan makes.

Each rotation step a plan uses needs its own Galois key (about 5 MB at N=16384, seeded), and the keys are
what a clinic uploads and a server stores per clinic. With a key budget, a rotation by a step that
has no key is made of several rotations by steps that have one (rotations compose: rotating by a
then by b rotates by a + b, cyclically over the slots). The chooser adds, one at a time, the step
that most lowers the rotations an evaluation then costs, weighting each step by how many
instructions use it; each missing step is then reached by the fewest key rotations (breadth-first
search over the slot positions).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from medhe.errors import PlanError

KEY_HEADER_BYTES = 4096  # SEAL headers and per-component overhead, rounded up


def key_switching_key_bytes(params) -> int:
    """An upper bound on one serialized key-switching key (one Galois key, or the relinearization
    key) in SEAL's seeded form: one polynomial over all k primes for each of the k - 1 data primes
    (the other, uniformly random polynomial travels as its seed), 8 bytes a coefficient.
    N=16384 with 7 primes: a 5.25 MB bound, 5.14 MB measured (MB = 2**20 bytes)."""
    primes = len(params.coeff_modulus_bits)
    return (primes - 1) * params.poly_modulus_degree * primes * 8 + KEY_HEADER_BYTES


def galois_keys_within(params, max_key_bytes: int) -> int:
    """How many Galois keys fit a budget for all evaluation keys (the relinearization key included)."""
    per_key = key_switching_key_bytes(params)
    keys = (int(max_key_bytes) - per_key) // per_key
    if keys < 1:
        raise PlanError(f"an evaluation-key budget of {max_key_bytes / 2**20:.1f} MB holds no Galois key at "
                        f"these parameters (each key is about {per_key / 2**20:.1f} MB)")
    return keys


def _distances(key_steps: Iterable[int], slots: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fewest key rotations to reach each slot offset (-1 = unreachable), with the BFS parents."""
    generators = np.array(sorted({int(s) % slots for s in key_steps} - {0}), dtype=np.int64)
    distance = np.full(slots, -1, dtype=np.int64)
    parent = np.full(slots, -1, dtype=np.int64)
    via = np.zeros(slots, dtype=np.int64)
    distance[0] = 0
    frontier = np.array([0], dtype=np.int64)
    depth = 0
    while frontier.size and generators.size:
        depth += 1
        reached = (frontier[:, None] + generators[None, :]) % slots
        sources = np.repeat(frontier, generators.size)
        steps = np.tile(generators, frontier.size)
        reached = reached.reshape(-1)
        new = distance[reached] == -1
        reached, sources, steps = reached[new], sources[new], steps[new]
        # Keep the first way found to each offset (deterministic: sorted generators, sorted frontier).
        reached, first = np.unique(reached, return_index=True)
        distance[reached], parent[reached], via[reached] = depth, sources[first], steps[first]
        frontier = reached
    return distance, parent, via


def rotation_cost(usage: Mapping[int, int], key_steps: Iterable[int], slots: int) -> tuple[int, int]:
    """(steps that cannot be reached, key rotations per evaluation) for this key set."""
    distance, _, _ = _distances(key_steps, slots)
    unreachable = sum(1 for step in usage if distance[step % slots] < 0)
    cost = sum(count * int(distance[step % slots]) for step, count in usage.items() if distance[step % slots] >= 0)
    return unreachable, cost


def choose_key_steps(usage: Mapping[int, int], slots: int, max_keys: int) -> tuple[int, ...]:
    """At most max_keys rotation steps whose keys generate every step in `usage` (step -> how many
    rotations by it one evaluation makes), chosen greedily for the fewest rotations in total."""
    if max_keys < 1:
        raise PlanError(f"the Galois key budget must be at least 1 key, got {max_keys}")
    if len(usage) <= max_keys:
        return tuple(sorted(usage))
    powers = [1 << k for k in range(int(np.log2(slots)))]
    candidates = sorted(set(usage) | set(powers) | {-p for p in powers})
    chosen: list[int] = []
    while len(chosen) < max_keys:
        scored = [(rotation_cost(usage, chosen + [c], slots), abs(c), c) for c in candidates if c not in chosen]
        best = min(scored)
        if chosen and best[0] >= rotation_cost(usage, chosen, slots):
            break  # no candidate lowers the cost any more
        chosen.append(best[2])
    if rotation_cost(usage, chosen, slots)[0]:
        raise PlanError(f"{max_keys} Galois keys cannot generate every rotation of this plan")
    return tuple(sorted(chosen))


def rotation_chains(steps: Iterable[int], key_steps: Iterable[int], slots: int) -> dict[int, tuple[int, ...]]:
    """For each step, the key steps whose rotations, one after another, make it."""
    key_steps = list(key_steps)
    distance, parent, via = _distances(key_steps, slots)
    # Rotate by the key's own signed step (SEAL keeps a key for -1 apart from one for slots - 1).
    signed = {int(s) % slots: int(s) for s in key_steps}
    chains: dict[int, tuple[int, ...]] = {}
    for step in steps:
        offset = step % slots
        if distance[offset] < 0:
            raise PlanError(f"rotation step {step} cannot be made from the Galois keys {sorted(key_steps)}")
        chain = []
        while offset:
            chain.append(int(via[offset]))
            offset = int(parent[offset])
        chains[int(step)] = tuple(signed[c] for c in reversed(chain))
    return chains
