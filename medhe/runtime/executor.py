"""Runs a latency-mode plan's instructions on any backend, with the weights either in clear
(encoded as plaintexts once per level and scale, and cached) or encrypted (ciphertexts from the
model owner, prepared at the level and scale where each is consumed).

The levels and scales at every step are the same for every image, so `operand_schedule` can walk
the plan ahead of time: the server encodes its plaintexts with it and the model owner encrypts
the weights at exactly the level and scale the server will meet them.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Iterator

from medhe.errors import InvalidMessage, PlanError
from medhe.plan import Branch, Plan


def operand_schedule(plan: Plan, backend) -> Iterator[tuple[tuple[int, str], Any, float]]:
    """(operand key (instruction index, name), a level stub to encode at, scale) for every weight
    operand of the plan, in evaluation order, without a ciphertext."""
    level, scale = plan.depth, 2.0 ** plan.params.input_scale_bits
    target = 2.0 ** plan.params.log_scale_bits
    pending_divisor = None
    for index, ins in enumerate(plan.instructions):
        if ins.kind == Branch.kind:  # the next ensemble member starts from the input
            level, scale, pending_divisor = plan.depth, 2.0 ** plan.params.input_scale_bits, None
            continue
        if pending_divisor is not None and ins.multiplies:
            level, scale, pending_divisor = level - 1, scale / pending_divisor, None
        like = backend.level_stub(level, scale)
        divisor = backend.rescale_divisor(like)
        operands, scale, rescales = ins.operand_scales(scale, divisor, target)
        for name, operand_scale in operands:
            yield (index, name), like, operand_scale
        if rescales:
            pending_divisor = divisor


class PlainWeights:
    """Weights in clear, encoded on first use (or by `prepare`) and cached per level and scale;
    the cache depends on the parameters only, so a server shares it between key sets."""

    encrypted = False

    def __init__(self, plan: Plan, backend, cache: dict | None = None) -> None:
        if not plan.has_weights:
            raise PlanError("this plan holds no weights; evaluate it with an encrypted model")
        self.plan, self.backend = plan, backend
        self._cache: dict[tuple, Any] = {} if cache is None else cache

    def get(self, key: tuple[int, str], like, scale: float):
        full_key = key + (self.backend.levels_left(like), round(scale))
        pt = self._cache.get(full_key)
        if pt is None:
            index, name = key
            pt = self.backend.encode(self.plan.instructions[index].operand(name), like, scale)
            self._cache[full_key] = pt
        return pt

    def multiply(self, ct, weight):
        return self.backend.multiply_plain(ct, weight)

    def add(self, ct, weight):
        return self.backend.add_plain(ct, weight)

    def relinearize(self, ct):
        return ct  # a plaintext product has two components already

    def prepare(self) -> int:
        before = len(self._cache)
        for key, like, scale in operand_schedule(self.plan, self.backend):
            self.get(key, like, scale)
        return len(self._cache) - before


class EncryptedWeights:
    """Weights as ciphertexts under the clinic's key: products are ciphertext x ciphertext, summed
    while they have three components and relinearised once per giant step."""

    encrypted = True

    def __init__(self, operands: dict[tuple[int, str], Any], backend) -> None:
        self._operands, self.backend = operands, backend

    def with_backend(self, backend) -> "EncryptedWeights":
        """The same ciphertexts, evaluated with another backend (one holding a clinic's keys)."""
        return EncryptedWeights(self._operands, backend)

    @property
    def count(self) -> int:
        return len(self._operands)

    def get(self, key: tuple[int, str], like, scale: float):
        ct = self._operands.get(key)
        if ct is None:
            raise InvalidMessage(f"the encrypted model lacks operand {key[1]} of instruction {key[0]}")
        be = self.backend
        if be.levels_left(ct) != be.levels_left(like) or not abs(be.scale(ct) / scale - 1) <= 1e-9:
            raise InvalidMessage(f"encrypted operand {key[1]} of instruction {key[0]} is at level "
                                 f"{be.levels_left(ct)} and scale 2^{be.scale(ct):.3e}; the plan needs level "
                                 f"{be.levels_left(like)} and scale {scale:.6e}")
        return ct

    def multiply(self, ct, weight):
        return self.backend.multiply(ct, weight)

    def add(self, ct, weight):
        return self.backend.add(ct, weight)

    def relinearize(self, ct):
        return self.backend.relinearize(ct)

    def prepare(self) -> int:
        return 0


class Executor:
    def __init__(self, plan: Plan, backend, *, cache: dict | None = None, weights=None) -> None:
        if backend.slot_count != plan.params.slot_count:
            raise PlanError(f"backend has {backend.slot_count} slots, the plan needs {plan.params.slot_count}")
        self.plan = plan
        self.backend = backend
        self.weights = weights if weights is not None else PlainWeights(plan, backend, cache)
        self._target_scale = 2.0 ** plan.params.log_scale_bits
        self._chains = plan.rotation_chains()
        # Set while a two-process evaluation runs (medhe.runtime.split): shares linear layers.
        self.partner = None
        # Ensemble plans: the input's rotations made by the first member, reused by the others
        # (their first layers rotate the same input by the same baby steps). Set during run(), per
        # thread, so that two evaluations at once on one executor keep their own.
        self._run_state = threading.local()
        self._ensemble = plan.members > 1

    def _rotate(self, x, step: int):
        """Rotate by `step`: one key rotation, or several when the key budget left it without a key."""
        for key_step in self._chains[step]:
            x = self.backend.rotate(x, key_step)
        return x

    def _rotate_input_once(self, x, step: int):
        """`_rotate`, made once per evaluation for the input of an ensemble plan. Rotations make new
        ciphertexts and nothing adds into a rotated baby, so the members can share them."""
        state = self._run_state
        if x is not getattr(state, "input", None):
            return self._rotate(x, step)
        rotated = state.rotations.get(step)
        if rotated is None:
            rotated = state.rotations[step] = self._rotate(x, step)
        return rotated

    def prepare(self) -> int:
        """Encode every plaintext of the plan ahead of the first request. Returns how many."""
        return self.weights.prepare()

    # --- one method per instruction kind ----------------------------------------------------------
    def _run_linear(self, index: int, ins, x):
        be, weights = self.backend, self.weights
        operand_scales, _, _ = ins.operand_scales(be.scale(x), be.rescale_divisor(x), self._target_scale)
        scales = dict(operand_scales)
        babies = self.partner.share(ins) if self.partner is not None else None
        if babies is None:
            acc = self._linear_terms(index, ins, x, scales)
        else:  # this process's babies; the partner process adds the terms of the others
            acc = self.partner.combine(self._linear_terms(index, ins, x, scales, babies))
        if ins.has_bias:
            acc = weights.add(acc, weights.get((index, "bias"), x, scales["bias"]))
        return acc  # rescaled later, by run(): rotations until then see less relative noise

    def _linear_terms(self, index: int, ins, x, scales: dict, babies: list[int] | None = None):
        """The sum over the pairs whose baby step is in `babies` (None: all of them, the layer's
        output without its bias), relinearised."""
        be, weights = self.backend, self.weights
        rotated = {b: (x if b == 0 else self._rotate_input_once(x, b))
                   for b in (ins.babies if babies is None else babies)}
        per_giant: dict[int, Any] = {}
        for p, (g, b) in enumerate(ins.pairs):
            if b not in rotated:
                if babies is None:
                    raise PlanError(f"{ins.layer}: pair {p} uses baby step {b}, which the layer does not list")
                continue  # the partner process's term
            term = weights.multiply(rotated[b], weights.get((index, f"d{p}"), x, scales[f"d{p}"]))
            if g in per_giant:
                be.add_inplace(per_giant[g], term)  # terms are fresh: safe to add into in place
            else:
                per_giant[g] = term
        # Encrypted weights leave three-component products: each giant's sum is relinearised once
        # before its rotation; the unrotated sum (giant 0) takes the rest and is relinearised last.
        unrotated = 0 in per_giant
        acc = per_giant.pop(0, None)
        for g, partial in per_giant.items():
            moved = self._rotate(weights.relinearize(partial), g)
            acc = moved if acc is None else be.add_inplace(acc, moved)
        return weights.relinearize(acc) if unrotated else acc

    def _run_rotsum(self, index: int, ins, x):
        be = self.backend
        for stage in ins.stages:
            terms = [self._rotate(x, offset) for offset in stage if offset != 0]
            if not terms:
                continue
            total = terms[0]
            for term in terms[1:]:
                be.add_inplace(total, term)
            if 0 in stage:
                be.add_inplace(total, x)
            x = total
        return x

    def _run_square(self, index: int, ins, x):
        return self.backend.square(x)  # no rescale: the next linear layer rescales for both

    def _run_add_plain(self, index: int, ins, x):
        return self.weights.add(x, self.weights.get((index, "vector"), x, self.backend.scale(x)))

    def run(self, ct, *, trace: list | None = None, timings: dict | None = None, stop_after: int | None = None):
        """Evaluate the plan on an input ciphertext. With `trace`, each instruction's output is
        appended (for per-layer checks against the plaintext model). With `stop_after`, only the
        instructions up to that index run (the helper of a two-process evaluation)."""
        be = self.backend
        x = ct
        pending_rescale = False
        members_done = []  # ensemble plans: the outputs of the members before the current one
        state = self._run_state
        if self._ensemble:
            state.input, state.rotations = ct, {}
        try:
            for index, ins in enumerate(self.plan.instructions):
                start = time.perf_counter()
                if ins.kind == Branch.kind:
                    members_done.append(be.rescale(x) if pending_rescale else x)
                    x, pending_rescale = ct, False
                else:
                    x, pending_rescale = self._step(index, ins, x, pending_rescale)
                if timings is not None:
                    timings[ins.layer] = timings.get(ins.layer, 0.0) + time.perf_counter() - start
                if trace is not None:
                    trace.append(x)
                if index == stop_after:
                    return x
        finally:
            state.input, state.rotations = None, {}
        x = be.rescale(x) if pending_rescale else x
        for output in members_done:  # same level and scale: the members ran the same schedule
            x = be.add_inplace(x, output)
        return x

    def _step(self, index: int, ins, x, pending_rescale: bool):
        """One instruction; returns its output and whether a rescale is pending."""
        be = self.backend
        # A linear layer's rescale waits until the next multiplication: pooling and reduce
        # rotations in between then act at the larger scale, where key-switching noise is
        # relatively 2^30 smaller.
        if pending_rescale and ins.multiplies:
            x, pending_rescale = be.rescale(x), False
        step = getattr(self, f"_run_{ins.kind}", None)
        if step is None:
            raise PlanError(f"this executor cannot run instruction kind {ins.kind!r}")
        return step(index, ins, x), pending_rescale or bool(ins.level_cost)
