"""Throughput-mode server plan: slots across images. Each ciphertext holds one input feature (one
pixel) of up to N/2 images; every step is a weighted sum of whole ciphertexts or a square."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from medhe.errors import PlanError
from medhe.params import CKKSParams
from medhe.plan.client_spec import ClientSpec
from medhe.plan.files import write_plan_files
from medhe.plan.instructions import rescale_factors

BATCH_FORMAT = "medhe-batch-plan"
BATCH_FORMAT_VERSION = 1
BATCH_PLAN_JSON = "batch_plan.json"
BATCH_PLAN_ARRAYS = "batch_arrays.npz"


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

    def galois_steps(self) -> list[int]:
        """Throughput mode never rotates: no Galois keys."""
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

    # --- serialisation ----------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """batch_plan.json + batch_arrays.npz (each linear step's sparse matrix and bias)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        arrays = {}
        for index, step in enumerate(self.steps):
            if step.kind == "linear":
                matrix = step.matrix.tocsr()
                arrays.update({f"s{index}_data": matrix.data, f"s{index}_indices": matrix.indices,
                               f"s{index}_indptr": matrix.indptr, f"s{index}_shape": np.array(matrix.shape),
                               f"s{index}_bias": np.asarray(step.bias, dtype=np.float64)})
        doc = {"format": BATCH_FORMAT, "format_version": BATCH_FORMAT_VERSION, "params": self.params.to_dict(),
               "input_shape": list(self.input_shape), "class_names": list(self.class_names),
               "preprocessing": self.preprocessing, "model_digest": self.model_digest,
               "steps": [{"kind": step.kind, "layer": step.layer} for step in self.steps],
               "digest": self.digest(), "report": self.report}
        write_plan_files(directory, BATCH_PLAN_JSON, doc, BATCH_PLAN_ARRAYS, arrays)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "BatchPlan":
        directory = Path(directory)
        try:
            doc = json.loads((directory / BATCH_PLAN_JSON).read_text())
            with np.load(directory / BATCH_PLAN_ARRAYS, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (OSError, ValueError) as exc:
            raise PlanError(f"{directory} is not a readable medhe batch plan: {exc}") from exc
        if not isinstance(doc, dict) or doc.get("format") != BATCH_FORMAT \
                or doc.get("format_version") != BATCH_FORMAT_VERSION:
            raise PlanError(f"{directory}: expected {BATCH_FORMAT} version {BATCH_FORMAT_VERSION}; recompile")
        try:
            steps = []
            for index, entry in enumerate(doc["steps"]):
                if entry["kind"] == "linear":
                    matrix = sp.csr_matrix((arrays[f"s{index}_data"], arrays[f"s{index}_indices"],
                                            arrays[f"s{index}_indptr"]), shape=tuple(arrays[f"s{index}_shape"]))
                    steps.append(BatchStep("linear", matrix, arrays[f"s{index}_bias"], entry.get("layer", "")))
                elif entry["kind"] == "square":
                    steps.append(BatchStep("square", layer=entry.get("layer", "")))
                else:
                    raise PlanError(f"unknown batch step kind {entry['kind']!r}")
            plan = cls(CKKSParams.from_dict(doc["params"]), tuple(doc["input_shape"]), steps,
                       list(doc["class_names"]), doc["preprocessing"], doc["model_digest"], doc.get("report", {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"{directory}: the batch plan is inconsistent ({exc})") from exc
        if plan.digest() != doc.get("digest"):
            raise PlanError(f"{directory}: the batch plan does not match its recorded digest")
        return plan


def load_plan_dir(directory: str | Path, *, weights: bool = True):
    """A latency plan (plan.json) or a throughput plan (batch_plan.json) from a directory."""
    from medhe.plan.server_plan import Plan

    if (Path(directory) / BATCH_PLAN_JSON).is_file():
        return BatchPlan.load(directory)
    return Plan.load(directory, weights=weights)
