"""Throughput mode: slots across images. Each ciphertext holds one input feature (one pixel) of up
to N/2 images, so every layer is a weighted sum of whole ciphertexts: no rotations at all, hence
no Galois keys, and the cost is shared by all the images in the batch.

Since there are no rotations to save here, every run of linear ops (conv + pool, flatten +
dense) is merged into one matrix: fewer output features, fewer multiplications and squares.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medhe.compiler.compile import check_params_fit, model_digest
from medhe.compiler.ir import Op, linear_sparse
from medhe.compiler.passes import POOLS, WEIGHTED, naive_levels, optimize
from medhe.compiler.trace import trace_model_dir
from medhe.errors import ConfigError, PlanError
from medhe.nn.modeldir import ensemble_members
from medhe.params import CKKSParams, choose_params
from medhe.plan.batch_plan import BatchPlan, BatchStep
from medhe.plan.instructions import rescale_factors


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
    if ensemble_members(model_dir) is not None:
        raise ConfigError(f"{model_dir} is an ensemble: throughput mode compiles one model (ensembles run in "
                          "latency mode)")
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
