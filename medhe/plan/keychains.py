"""Galois key chains: how a plan with a key budget makes each rotation step from the steps that
have keys (rotations compose: by a, then by b, is by a + b, cyclically over the slots), and the
size of one key. Here, not in the compiler, because servers and clients need them at run time
without importing the compiler."""

from __future__ import annotations

from collections.abc import Iterable

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


def key_switching_bytes_bound(params, keys: int) -> int:
    """The most `keys` serialized key-switching keys can take, seeded or not (SEAL's unseeded form
    is twice the seeded one): what a server accepts before loading any of them."""
    return 2 * key_switching_key_bytes(params) * keys


def _distances(key_steps: Iterable[int], slots: int,
               max_depth: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fewest key rotations to reach each slot offset (-1 = unreachable, or further than
    max_depth), with the BFS parents."""
    generators = np.array(sorted({int(s) % slots for s in key_steps} - {0}), dtype=np.int64)
    distance = np.full(slots, -1, dtype=np.int64)
    parent = np.full(slots, -1, dtype=np.int64)
    via = np.zeros(slots, dtype=np.int64)
    distance[0] = 0
    frontier = np.array([0], dtype=np.int64)
    depth = 0
    while frontier.size and generators.size and (max_depth is None or depth < max_depth):
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
