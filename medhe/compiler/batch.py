"""Throughput mode: slots across images. Each ciphertext holds one input feature (one pixel) of up
to N/2 images, so every layer is a weighted sum of whole ciphertexts: no rotations at all, hence
no Galois keys, and the cost is shared by all the images in the batch.

Since there are no rotations to save here, every run of linear ops (conv + pool, flatten +
dense) is merged into one matrix: fewer output features, fewer multiplications and squares.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from medhe.compiler.compile import check_params_fit, model_digest
from medhe.compiler.plan import rescale_factors
from medhe.compiler.ir import Op, linear_sparse
from medhe.compiler.passes import POOLS, WEIGHTED, naive_levels, optimize
from medhe.compiler.trace import trace_model_dir
from medhe.errors import PlanError
from medhe.params import CKKSParams, choose_params

BATCH_FORMAT = "medhe-batch-plan"
BATCH_FORMAT_VERSION = 1


@dataclass
class BatchStep:
    kind: str  # "linear" or "square"
    matrix: sp.csr_matrix | None = None
    bias: np.ndarray | None = None
    layer: str = ""


@dataclass
class BatchPlan:
    params: CKKSParams
    input_shape: tuple[int, ...]
    steps: list[BatchStep]
    class_names: list[str]
    preprocessing: dict
    model_digest: str
    report: dict = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.params.slot_count

    @property
    def depth(self) -> int:
        """Rescales: one per weighted sum (a square shares the next sum's prime)."""
        return sum(1 for s in self.steps if s.kind == "linear")

    @property
    def multiplicative_depth(self) -> int:
        return len(self.steps)

    def rescale_factors(self) -> list[int]:
        return rescale_factors([s.kind for s in self.steps])

    @property
    def input_features(self) -> int:
        return int(np.prod(self.input_shape))

    def rotation_steps(self) -> list[int]:
        return []

    def digest(self) -> str:
        if getattr(self, "_digest", None) is None:
            h = hashlib.sha256(json.dumps({"format": BATCH_FORMAT, "version": BATCH_FORMAT_VERSION,
                                           "params": self.params.to_dict(), "input_shape": list(self.input_shape),
                                           "classes": self.class_names, "model": self.model_digest},
                                          sort_keys=True).encode())
            for step in self.steps:
                h.update(step.kind.encode())
                if step.kind == "linear":
                    for arr in (step.matrix.indptr, step.matrix.indices):
                        h.update(np.ascontiguousarray(arr, dtype=np.int64).tobytes())
                    h.update(np.ascontiguousarray(step.matrix.data, dtype=np.float64).tobytes())
                    h.update(np.ascontiguousarray(step.bias, dtype=np.float64).tobytes())
            self._digest = h.hexdigest()
        return self._digest

    def multiplications(self) -> int:
        return int(sum(s.matrix.nnz for s in self.steps if s.kind == "linear"))

    def squares(self) -> int:
        sizes = [s.matrix.shape[0] for s in self.steps if s.kind == "linear"]
        return int(sum(sizes[i] for i, s in enumerate(s for s in self.steps if s.kind == "linear")
                       if i < len(sizes) - 1))


def batch_steps(optimized: list[Op]) -> list[BatchStep]:
    steps: list[BatchStep] = []
    run: list[Op] = []

    def flush() -> None:
        if not run:
            return
        matrix, bias = linear_sparse(run[0])
        for op in run[1:]:
            m, b = linear_sparse(op)
            matrix = (m @ matrix).tocsr()
            bias = m @ bias + b
        matrix.eliminate_zeros()
        steps.append(BatchStep("linear", matrix.tocsr(), np.asarray(bias, dtype=np.float64),
                               "+".join(o.name for o in run)))
        run.clear()

    for op in optimized:
        if op.kind in WEIGHTED + POOLS + ("flatten",):
            run.append(op)
        elif op.kind == "square":
            flush()
            steps.append(BatchStep("square", layer=op.name))
        else:
            raise PlanError(f"throughput mode cannot lower {op.kind} ({op.name})")
    flush()
    if steps and steps[0].kind != "linear" or any(a.kind == b.kind == "linear" for a, b in zip(steps, steps[1:])):
        raise PlanError("internal: throughput steps must alternate linear and square")
    return steps


def compile_batch(model_dir: str | Path, *, poly_modulus_degree: int | None = None,
                  insecure_for_tests: bool = False, params: CKKSParams | None = None) -> BatchPlan:
    model_dir = Path(model_dir)
    traced, doc = trace_model_dir(model_dir)
    steps = batch_steps(optimize(traced))
    factors = rescale_factors([s.kind for s in steps])
    if params is None:
        params = choose_params(factors, 1, poly_modulus_degree=poly_modulus_degree,
                               insecure_for_tests=insecure_for_tests)
    check_params_fit(params, factors, len(steps))
    plan = BatchPlan(params, tuple(doc["input_shape"]), steps, list(doc["class_names"]), doc["preprocessing"],
                     model_digest(model_dir))
    plan.report = {"levels_before": naive_levels(traced), "levels_after": len(steps), "rescales": len(factors),
                   "multiplications": plan.multiplications(),
                   "squares": int(sum(s.matrix.shape[0] for s in steps[:-1] if s.kind == "linear")),
                   "batch_size": plan.batch_size, "params": params.to_dict()}
    return plan
