"""Runs a plan's instructions on any backend. Plaintexts are encoded once per plan and level and
cached, since the scales at every step are the same for every image."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from medhe.compiler.plan import Plan
from medhe.errors import PlanError


class Executor:
    def __init__(self, plan: Plan, backend, *, cache: dict | None = None) -> None:
        if backend.slot_count != plan.params.slot_count:
            raise PlanError(f"backend has {backend.slot_count} slots, the plan needs {plan.params.slot_count}")
        self.plan = plan
        self.backend = backend
        self._cache: dict[tuple, Any] = {} if cache is None else cache
        self._target_scale = 2.0 ** plan.params.log_scale_bits

    def _plain(self, key: tuple, values: np.ndarray, like, scale: float):
        full_key = key + (self.backend.levels_left(like), round(scale))
        pt = self._cache.get(full_key)
        if pt is None:
            pt = self.backend.encode(values, like, scale)
            self._cache[full_key] = pt
        return pt

    def _linear(self, index: int, ins, x):
        be = self.backend
        # Encode weights at q * target / scale(x): after the rescale by q the result is back at the
        # base scale exactly, whether x was fresh (scale ~ base) or squared (scale ~ base^2).
        weight_scale = be.rescale_divisor(x) * self._target_scale / be.scale(x)
        rotated = {b: (x if b == 0 else be.rotate(x, b)) for b in ins.babies}
        per_giant: dict[int, Any] = {}
        for p, (g, b) in enumerate(ins.pairs):
            pt = self._plain(("d", index, p), ins.diagonals[p], x, weight_scale)
            term = be.multiply_plain(rotated[b], pt)  # a fresh ciphertext: safe to add into in place
            if g in per_giant:
                be.add_inplace(per_giant[g], term)
            else:
                per_giant[g] = term
        acc = None
        for g, partial in per_giant.items():
            moved = partial if g == 0 else be.rotate(partial, g)
            acc = moved if acc is None else be.add_inplace(acc, moved)
        if ins.bias is not None:
            acc = be.add_plain(acc, self._plain(("b", index), ins.bias, acc, be.scale(acc)))
        return acc  # rescaled later, by run(): rotations until then see less relative noise

    def _rotsum(self, ins, x):
        be = self.backend
        for stage in ins.stages:
            terms = [be.rotate(x, offset) for offset in stage if offset != 0]
            if not terms:
                continue
            total = terms[0]
            for term in terms[1:]:
                be.add_inplace(total, term)
            if 0 in stage:
                be.add_inplace(total, x)
            x = total
        return x

    def prepare(self) -> int:
        """Encode every plaintext of the plan ahead of the first request, walking the plan's
        levels and scales without a ciphertext (they are the same for every image). Returns the
        number of plaintexts encoded."""
        be = self.backend
        before = len(self._cache)
        level, scale = self.plan.depth, 2.0 ** self.plan.params.input_scale_bits
        pending_divisor = None
        for index, ins in enumerate(self.plan.instructions):
            if pending_divisor is not None and ins.kind in ("linear", "square"):
                level, scale, pending_divisor = level - 1, scale / pending_divisor, None
            like = be.level_stub(level, scale)
            if ins.kind == "linear":
                divisor = be.rescale_divisor(like)
                weight_scale = divisor * self._target_scale / scale
                for p in range(len(ins.pairs)):
                    self._plain(("d", index, p), ins.diagonals[p], like, weight_scale)
                scale *= weight_scale
                if ins.bias is not None:
                    self._plain(("b", index), ins.bias, like, scale)
                pending_divisor = divisor
            elif ins.kind == "square":
                scale = scale * scale
            elif ins.kind == "add_plain":
                self._plain(("a", index), ins.vector, like, scale)
        return len(self._cache) - before

    def run(self, ct, *, trace: list | None = None, timings: dict | None = None):
        """Evaluate the plan on an input ciphertext. With `trace`, each instruction's output is
        appended (for per-layer checks against the plaintext model)."""
        be = self.backend
        x = ct
        pending_rescale = False
        for index, ins in enumerate(self.plan.instructions):
            start = time.perf_counter()
            # A linear layer's rescale waits until the next multiplication: pooling and reduce
            # rotations in between then act at the larger scale, where key-switching noise is
            # relatively 2^30 smaller.
            if pending_rescale and ins.kind in ("linear", "square"):
                x, pending_rescale = be.rescale(x), False
            if ins.kind == "linear":
                x = self._linear(index, ins, x)
                pending_rescale = True
            elif ins.kind == "rotsum":
                x = self._rotsum(ins, x)
            elif ins.kind == "square":
                x = be.square(x)  # no rescale: the next linear layer rescales for both
            elif ins.kind == "add_plain":
                x = be.add_plain(x, self._plain(("a", index), ins.vector, x, be.scale(x)))
            else:
                raise PlanError(f"unknown instruction {ins.kind}")
            if timings is not None:
                timings[ins.layer] = timings.get(ins.layer, 0.0) + time.perf_counter() - start
            if trace is not None:
                trace.append(x)
        return be.rescale(x) if pending_rescale else x
