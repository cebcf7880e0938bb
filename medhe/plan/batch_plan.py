"""Throughput-mode server plan: slots across images. Each ciphertext holds one input feature (one
pixel) of up to N/2 images; every step is a weighted sum of whole ciphertexts or a square."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from medhe.params import CKKSParams
from medhe.plan.client_spec import ClientSpec
from medhe.plan.instructions import rescale_factors

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

    def client_spec(self) -> ClientSpec:
        """The public half: parameters, input shape, classes, preprocessing, a commitment."""
        summary = {"levels_after": self.multiplicative_depth, "rescales": self.depth, "batch_size": self.batch_size}
        return ClientSpec("throughput", self.params, tuple(self.input_shape), tuple(self.class_names),
                          self.preprocessing, self.digest(), summary=summary)

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
