"""Throughput-mode executor: one ciphertext per feature through weighted sums and squares.

Features are streamed through the network instead of being held layer by layer: each input
ciphertext, as it arrives, is multiplied into the accumulators of the outputs that use it and then
dropped; an output whose last input has arrived is finished (bias, rescale, square) and pushed on
into the next layer the same way. With inputs in pixel order, only the outputs whose receptive
field the sweep is crossing are open at any time (a few rows of each feature map), so memory grows
with the width of the receptive fields, not with the number of features. (That holds for
one-channel inputs, as the shipped grayscale models have: features arrive channel by channel, so
with C input channels every first-layer output stays open until the last channel.) The result is
that of computing layer by layer: each output adds its terms (in the order its inputs are
finished; CKKS addition is exact modular addition, so the order does not matter), then its bias.
Each weight is encoded as a scalar plaintext where it is used: an encoding costs about 1/30 of the
multiplication it serves (measured at N=16384), while a cache of every distinct weight's plaintext
held 2 GB for the PneumoniaMNIST model."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from medhe.errors import PlanError
from medhe.plan import BatchPlan


@dataclass
class _Layer:
    """A weighted sum and the squares that follow it, with its open accumulators."""
    name: str
    columns: Any  # the matrix in CSC form: the outputs each input feature feeds
    bias: np.ndarray
    squares: int
    remaining: np.ndarray  # inputs each output still waits for
    open: dict = field(default_factory=dict)  # output row -> its partial sum
    weight_scale: float | None = None


class BatchExecutor:
    def __init__(self, plan: BatchPlan, backend, *, progress: bool = False) -> None:
        if backend.slot_count != plan.params.slot_count:
            raise PlanError(f"backend has {backend.slot_count} slots, the plan needs {plan.params.slot_count}")
        self.plan = plan
        self.backend = backend
        self.progress = progress
        self._target_scale = 2.0 ** plan.params.log_scale_bits
        self.peak_open_ciphertexts = 0  # the most partial sums open at once in the last run

    def _layers(self) -> list[_Layer]:
        layers: list[_Layer] = []
        for step in self.plan.steps:
            if step.kind == "square":
                if not layers:
                    raise PlanError("a throughput plan starts with a weighted sum")
                layers[-1].squares += 1
                continue
            remaining = np.diff(step.matrix.indptr).astype(np.int64)
            if (remaining == 0).any():
                raise PlanError(f"{step.layer}: output {int(np.argmin(remaining))} has no inputs")
            layers.append(_Layer(step.layer, step.matrix.tocsc(), np.asarray(step.bias), 0, remaining))
        return layers

    def run(self, inputs: Iterable) -> list:
        """`inputs`: the input ciphertexts in feature order (a list, or an iterator that is consumed
        one ciphertext at a time) -> one ciphertext per output of the last layer."""
        be = self.backend
        layers = self._layers()
        outputs: list = [None] * layers[-1].remaining.size
        self.peak_open_ciphertexts = 0

        def push(depth: int, feature: int, ct) -> None:
            if depth == len(layers):
                outputs[feature] = ct
                return
            layer = layers[depth]
            if feature >= layer.columns.shape[1]:
                raise PlanError(f"{layer.name}: got input feature {feature}, it has {layer.columns.shape[1]}")
            if layer.weight_scale is None:  # every input of a layer has the same level and scale
                layer.weight_scale = be.rescale_divisor(ct) * self._target_scale / be.scale(ct)
            start, end = layer.columns.indptr[feature], layer.columns.indptr[feature + 1]
            for row, weight in zip(layer.columns.indices[start:end], layer.columns.data[start:end]):
                term = be.multiply_plain(ct, be.encode_scalar(float(weight), ct, layer.weight_scale))
                partial = layer.open.get(row)
                layer.open[row] = term if partial is None else be.add_inplace(partial, term)
                layer.remaining[row] -= 1
                if layer.remaining[row] == 0:
                    done = layer.open.pop(row)
                    done = be.rescale(be.add_plain(done, be.encode_scalar(float(layer.bias[row]), done, be.scale(done))))
                    for _ in range(layer.squares):  # the next weighted sum rescales for the square
                        done = be.square(done)
                    push(depth + 1, int(row), done)
            self.peak_open_ciphertexts = max(self.peak_open_ciphertexts, sum(len(x.open) for x in layers))

        count = 0
        for feature, ct in enumerate(tqdm(inputs, desc="batch features", total=self.plan.input_features,
                                          disable=not self.progress, leave=False)):
            push(0, feature, ct)
            count += 1
        if count != self.plan.input_features:
            raise PlanError(f"expected {self.plan.input_features} input ciphertexts, got {count}")
        if any(ct is None for ct in outputs):
            raise PlanError("internal: an output of the last layer was never finished")
        return outputs
