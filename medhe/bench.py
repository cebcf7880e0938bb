"""Our side of benchmarks/compare_tenseal.py: the shipped model, encrypted, on the same images.

`OursRun` is set up once (compile, keys, server) and then evaluates image i on request, so the
benchmark can take turns with the baseline image by image: this machine's speed drifts within
minutes, and a ratio of two runs made minutes apart measures the drift too."""

from __future__ import annotations

import time

import numpy as np


class OursRun:
    def __init__(self, dataset: str, eval_gray01_images: np.ndarray, eval_labels: np.ndarray, limit: int, *,
                 two_processes: bool = False) -> None:
        import torch

        from medhe.compiler import compile_model
        from medhe.nn.io import load_model, resolve_model_dir
        from medhe.protocol.local import LocalSession

        model_dir = resolve_model_dir(dataset)
        model, self.card = load_model(model_dir)
        self.inputs = self.card.preprocessing.apply_batch(eval_gray01_images)
        with torch.no_grad():
            self.reference = model(torch.tensor(self.inputs)).double().numpy()
        self.labels = np.asarray(eval_labels).reshape(-1)
        self.limit, self.two_processes = int(limit), two_processes
        self.plan = compile_model(model_dir)
        self.session = LocalSession(self.plan, two_processes=two_processes)
        self.results: list = []
        self.seconds = 0.0  # wall time of the steps: encrypt, evaluate, decrypt

    def step(self, index: int) -> None:
        """Encrypt, evaluate and decrypt held-out image `index` (images go in order)."""
        if index != len(self.results):
            raise ValueError(f"image {index} out of order: {len(self.results)} evaluated so far")
        start = time.perf_counter()
        self.results.append(self.session.diagnose_input(self.inputs[index]))
        self.seconds += time.perf_counter() - start

    def summary(self) -> dict:
        from medhe.protocol.local import summarize

        n = len(self.results)
        summary = summarize(self.results, self.reference[:n], self.labels[:n])
        plan, card = self.plan, self.card
        summary.update({
            "system": f"medhe ({len(card.arch.conv_channels)} conv blocks, {plan.multiplicative_depth} mult in "
                      f"{plan.depth} rescales" + (", 2 processes)" if self.two_processes else ")"),
            "processes": 2 if self.two_processes else 1,
            "plaintext_accuracy": float((self.reference.argmax(1) == self.labels).mean()),
            "n_plaintext": int(len(self.labels)),
            "eval_key_bytes": self.session.eval_key_bytes,
            "keygen_s": self.session.keygen_s,
            "rotations_per_image": plan.rotation_count(),
            "parameters": {**plan.params.to_dict(), "security_bits": plan.params.security_bits},
        })
        return summary

