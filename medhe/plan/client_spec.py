"""The public client spec: everything the clinic needs and nothing of the model's weights.

CKKS parameters, preprocessing, the input and output slot layouts, the rotation steps its
evaluation keys must cover, class names, and a commitment to the weights (the server plan's
digest, a sha256 over every weight as the server evaluates it) so the clinic can tell which model
it talks to without seeing it. Every wire message carries this spec's digest.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from medhe.errors import PlanError
from medhe.params import CKKSParams
from medhe.plan.layout import Layout

SPEC_FORMAT = "medhe-client-spec"
SPEC_FORMAT_VERSION = 1
SPEC_FILE = "client_spec.json"
MODES = ("latency", "throughput")


@dataclass(frozen=True)
class ClientSpec:
    mode: str
    params: CKKSParams
    input_shape: tuple[int, ...]
    class_names: tuple[str, ...]
    preprocessing: dict
    model_commitment: str
    rotation_steps: tuple[int, ...] = ()
    input_layout: Layout | None = None  # latency mode only
    output_layout: Layout | None = None
    # Public facts about the evaluation (levels, rotations, parameters), shown to a clinic.
    summary: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise PlanError(f"client spec mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "latency" and (self.input_layout is None or self.output_layout is None):
            raise PlanError("a latency-mode client spec needs input and output layouts")

    @property
    def slot_count(self) -> int:
        return self.params.slot_count

    def to_dict(self) -> dict:
        return {
            "format": SPEC_FORMAT, "format_version": SPEC_FORMAT_VERSION, "mode": self.mode,
            "params": self.params.to_dict(), "input_shape": list(self.input_shape),
            "class_names": list(self.class_names), "preprocessing": self.preprocessing,
            "model_commitment": self.model_commitment, "rotation_steps": list(self.rotation_steps),
            "input_layout": self.input_layout.to_dict() if self.input_layout else None,
            "output_layout": self.output_layout.to_dict() if self.output_layout else None,
            "summary": self.summary,
        }

    def digest(self) -> str:
        """sha256 over what changes the client's work or names the model (the summary is
        informational and excluded)."""
        doc = self.to_dict()
        doc.pop("summary")
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    def card(self) -> dict:
        """The model card a server publishes: the spec plus its digest."""
        return {**self.to_dict(), "spec_digest": self.digest(), "params_digest": self.params.digest()}

    @classmethod
    def from_dict(cls, doc: dict) -> "ClientSpec":
        if not isinstance(doc, dict):
            raise PlanError(f"a client spec must be a JSON object, got {type(doc).__name__}")
        if doc.get("format") != SPEC_FORMAT or doc.get("format_version") != SPEC_FORMAT_VERSION:
            raise PlanError(f"expected {SPEC_FORMAT} version {SPEC_FORMAT_VERSION}, "
                            f"got {doc.get('format')!r} version {doc.get('format_version')!r}")
        try:
            spec = cls(
                mode=str(doc["mode"]), params=CKKSParams.from_dict(doc["params"]),
                input_shape=tuple(int(v) for v in doc["input_shape"]),
                class_names=tuple(str(c) for c in doc["class_names"]),
                preprocessing=dict(doc["preprocessing"]), model_commitment=str(doc["model_commitment"]),
                rotation_steps=tuple(int(s) for s in doc.get("rotation_steps", [])),
                input_layout=Layout.from_dict(doc["input_layout"]) if doc.get("input_layout") else None,
                output_layout=Layout.from_dict(doc["output_layout"]) if doc.get("output_layout") else None,
                summary=dict(doc.get("summary") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"malformed client spec: {exc!r}") from exc
        if "spec_digest" in doc and doc["spec_digest"] != spec.digest():
            raise PlanError("client spec digest mismatch: the spec was changed or corrupted")
        # The recipe (and its input profile) is validated now, before a clinic pins the spec or makes keys.
        from medhe.data.preprocess import Preprocessing
        from medhe.errors import DataError

        try:
            Preprocessing.from_dict(spec.preprocessing)
        except DataError as exc:
            raise PlanError(f"malformed client spec preprocessing: {exc}") from exc
        return spec

    def save(self, path: str | Path) -> Path:
        """Write `client_spec.json` (into `path` if it is a directory)."""
        path = Path(path)
        if path.is_dir():
            path = path / SPEC_FILE
        tmp = path.with_name(path.name + ".part")
        tmp.write_text(json.dumps(self.card(), indent=1, sort_keys=True))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ClientSpec":
        path = Path(path)
        if path.is_dir():
            path = path / SPEC_FILE
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise PlanError(f"{path} is not a readable client spec: {exc}") from exc
        return cls.from_dict(doc)
