"""Trace a saved model directory into the IR, with numpy only (no torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from medhe.compiler.ir import BatchNorm, Conv2d, Dense, Flatten, Op, Poly, Pool2d
from medhe.errors import ModelFormatError, UnsupportedLayerError
from medhe.nn.modeldir import WEIGHTS_FILE, read_model_json

TRACEABLE_LAYERS = ("conv2d", "avgpool2d", "batchnorm", "poly", "flatten", "linear")


def _pair(value) -> int:
    values = value if isinstance(value, (list, tuple)) else [value, value]
    if values[0] != values[1]:
        raise UnsupportedLayerError(f"only square kernels/strides/paddings are supported, got {values}")
    return int(values[0])


def trace_layers(layers: list[dict], weights: dict[str, np.ndarray], input_shape: tuple[int, ...]) -> list[Op]:
    """Turn a model.json layer list into IR ops, tracking shapes."""
    ops: list[Op] = []
    shape = tuple(int(s) for s in input_shape)

    def tensor(key: str | None, default_shape=None) -> np.ndarray:
        if key is None:
            return np.zeros(default_shape)
        if key not in weights:
            raise ModelFormatError(f"weights lack the tensor {key!r}")
        return weights[key].astype(np.float64)

    for index, layer in enumerate(layers):
        kind = layer.get("type")
        name = f"{index}:{kind}"
        if kind == "conv2d":
            c, h, w = shape
            weight = tensor(layer["weight"])
            k = _pair(layer["kernel_size"])
            stride, padding = _pair(layer["stride"]), _pair(layer["padding"])
            if weight.shape[1] != c:
                raise ModelFormatError(f"{name}: weight expects {weight.shape[1]} input channels, input has {c}")
            ho, wo = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
            bias = tensor(layer.get("bias"), (weight.shape[0],))
            out = (weight.shape[0], ho, wo)
            ops.append(Conv2d("conv2d", shape, out, name, weight=weight,
                              bias=np.broadcast_to(bias[:, None, None], out).copy(), stride=stride, padding=padding))
        elif kind == "avgpool2d":
            c, h, w = shape
            k, s = int(layer["kernel_size"]), int(layer["stride"])
            out = (c, (h - k) // s + 1, (w - k) // s + 1)
            ops.append(Pool2d("avgpool2d", shape, out, name, kernel=k, stride=s))
        elif kind == "batchnorm":
            gamma, beta = tensor(layer["weight"]), tensor(layer["bias"])
            mean, var = tensor(layer["running_mean"]), tensor(layer["running_var"])
            scale = gamma / np.sqrt(var + float(layer["eps"]))
            ops.append(BatchNorm("batchnorm", shape, shape, name, scale=scale, shift=beta - mean * scale))
            if scale.shape[0] != shape[0]:
                raise ModelFormatError(f"{name}: {scale.shape[0]} channels, input has {shape[0]}")
        elif kind == "poly":
            a, b, c = (float(v) for v in tensor(layer["coef"]))
            ops.append(Poly("poly", shape, shape, name, a=a, b=b, c=c))
        elif kind == "flatten":
            out = (int(np.prod(shape)),)
            ops.append(Flatten("flatten", shape, out, name))
        elif kind == "linear":
            weight = tensor(layer["weight"])
            if len(shape) != 1 or weight.shape[1] != shape[0]:
                raise ModelFormatError(f"{name}: expects {weight.shape[1]} features, input shape is {shape}")
            bias = tensor(layer.get("bias"), (weight.shape[0],))
            out = (weight.shape[0],)
            ops.append(Dense("dense", shape, out, name, weight=weight, bias=bias))
        else:
            raise UnsupportedLayerError(
                f"layer {index} has type {kind!r}, which has no encrypted lowering; supported layer "
                f"types: {', '.join(TRACEABLE_LAYERS)} (train with activation 'poly', not 'relu')"
            )
        shape = ops[-1].out_shape
    return ops


def trace_model_dir(directory: str | Path) -> tuple[list[Op], dict]:
    """IR ops and the model.json document of a saved model directory."""
    directory = Path(directory)
    doc = read_model_json(directory)
    weights = load_file(str(directory / WEIGHTS_FILE))
    return trace_layers(doc["layers"], weights, tuple(doc["input_shape"])), doc
