"""Throughput-mode executor: a list of ciphertexts (one per feature) through weighted sums and
squares. Scalar plaintexts are encoded once per (value, level) and reused."""

from __future__ import annotations

from typing import Any

from tqdm import tqdm

from medhe.plan import BatchPlan
from medhe.errors import PlanError


class BatchExecutor:
    def __init__(self, plan: BatchPlan, backend, *, progress: bool = False) -> None:
        if backend.slot_count != plan.params.slot_count:
            raise PlanError(f"backend has {backend.slot_count} slots, the plan needs {plan.params.slot_count}")
        self.plan = plan
        self.backend = backend
        self.progress = progress
        self._scalars: dict[tuple, Any] = {}
        self._target_scale = 2.0 ** plan.params.log_scale_bits

    def _scalar(self, value: float, like, scale: float):
        key = (float(value), self.backend.levels_left(like), round(scale))
        pt = self._scalars.get(key)
        if pt is None:
            pt = self.backend.encode_scalar(float(value), like, scale)
            self._scalars[key] = pt
        return pt

    def run(self, cts: list) -> list:
        if len(cts) != self.plan.input_features:
            raise PlanError(f"expected {self.plan.input_features} input ciphertexts, got {len(cts)}")
        be = self.backend
        x = cts
        steps = tqdm(self.plan.steps, desc="batch layers", disable=not self.progress, leave=False)
        for step in steps:
            if step.kind == "square":
                x = [be.square(c) for c in x]  # the next weighted sum rescales for both
                continue
            matrix, out = step.matrix, []
            weight_scale = be.rescale_divisor(x[0]) * self._target_scale / be.scale(x[0])
            for row in range(matrix.shape[0]):
                start, end = matrix.indptr[row], matrix.indptr[row + 1]
                acc = None
                for col, weight in zip(matrix.indices[start:end], matrix.data[start:end]):
                    term = be.multiply_plain(x[col], self._scalar(weight, x[col], weight_scale))
                    acc = term if acc is None else be.add_inplace(acc, term)
                if acc is None:
                    raise PlanError(f"{step.layer}: output {row} has no inputs")
                acc = be.add_plain(acc, self._scalar(step.bias[row], acc, be.scale(acc)))
                out.append(be.rescale(acc))
            x = out
        return x
