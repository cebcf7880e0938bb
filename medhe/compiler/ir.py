"""A small closed IR of the operations an HE-friendly CNN is made of.

Every op knows its input and output shape (one example, channels first) and evaluates on a batch
in numpy, so the IR itself is an oracle: the folded and merged forms are checked against the
traced model op by op. Linear ops also give their logical sparse matrix, which is what the
lowering maps onto ciphertext slots.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from medhe.errors import PlanError

SUPPORTED_OPS = ("conv2d", "avgpool2d", "sumpool2d", "batchnorm", "poly", "square", "flatten", "dense", "linear_map")

# Multiplicative levels a direct (unoptimised) CKKS evaluation spends on each op.
NAIVE_LEVELS = {"conv2d": 1, "avgpool2d": 1, "sumpool2d": 0, "batchnorm": 1, "poly": 2, "square": 1,
                "flatten": 0, "dense": 1, "linear_map": 1}


@dataclass
class Op:
    kind: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    name: str = ""

    @property
    def is_linear(self) -> bool:
        return self.kind in ("conv2d", "avgpool2d", "sumpool2d", "batchnorm", "flatten", "dense", "linear_map")

    def evaluate(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> str:
        return self.kind


@dataclass
class Conv2d(Op):
    weight: np.ndarray = None  # (Co, Ci, kh, kw)
    bias: np.ndarray = None  # (Co, Ho, Wo): position-dependent after absorbing activation offsets
    stride: int = 1
    padding: int = 0

    def evaluate(self, x: np.ndarray) -> np.ndarray:
        batch = x.shape[0]
        co, ci, kh, kw = self.weight.shape
        _, ho, wo = self.out_shape
        padded = np.pad(x, ((0, 0), (0, 0), (self.padding, self.padding), (self.padding, self.padding)))
        out = np.zeros((batch, co, ho, wo))
        s = self.stride
        for dy in range(kh):
            for dx in range(kw):
                window = padded[:, :, dy: dy + s * (ho - 1) + 1: s, dx: dx + s * (wo - 1) + 1: s]
                out += np.einsum("bchw,oc->bohw", window, self.weight[:, :, dy, dx])
        return out + self.bias[None]

    def to_sparse(self) -> tuple[sp.csr_matrix, np.ndarray]:
        co, ci, kh, kw = self.weight.shape
        _, h, w = self.in_shape
        _, ho, wo = self.out_shape
        rows, cols, vals = [], [], []
        oy, ox = np.meshgrid(np.arange(ho), np.arange(wo), indexing="ij")
        for o in range(co):
            for c in range(ci):
                for dy in range(kh):
                    for dx in range(kw):
                        iy = oy * self.stride + dy - self.padding
                        ix = ox * self.stride + dx - self.padding
                        ok = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
                        rows.append((o * ho * wo + oy * wo + ox)[ok])
                        cols.append((c * h * w + iy * w + ix)[ok])
                        vals.append(np.full(int(ok.sum()), self.weight[o, c, dy, dx]))
        matrix = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                               shape=(co * ho * wo, ci * h * w))
        return matrix, self.bias.reshape(-1).copy()

    def describe(self) -> str:
        co, ci, kh, kw = self.weight.shape
        return f"conv {ci}->{co} {kh}x{kw} s{self.stride} p{self.padding}"


@dataclass
class Pool2d(Op):
    """Average pooling (kind avgpool2d) or its unscaled form (sumpool2d) after absorption."""

    kernel: int = 2
    stride: int = 2

    @property
    def factor(self) -> float:
        return 1.0 / (self.kernel * self.kernel) if self.kind == "avgpool2d" else 1.0

    def evaluate(self, x: np.ndarray) -> np.ndarray:
        _, ho, wo = self.out_shape
        k, s = self.kernel, self.stride
        out = np.zeros((x.shape[0], x.shape[1], ho, wo))
        for dy in range(k):
            for dx in range(k):
                out += x[:, :, dy: dy + s * (ho - 1) + 1: s, dx: dx + s * (wo - 1) + 1: s]
        return out * self.factor

    def to_sparse(self) -> tuple[sp.csr_matrix, np.ndarray]:
        c, h, w = self.in_shape
        _, ho, wo = self.out_shape
        rows, cols = [], []
        ch, oy, ox = np.meshgrid(np.arange(c), np.arange(ho), np.arange(wo), indexing="ij")
        for dy in range(self.kernel):
            for dx in range(self.kernel):
                rows.append((ch * ho * wo + oy * wo + ox).ravel())
                cols.append((ch * h * w + (oy * self.stride + dy) * w + ox * self.stride + dx).ravel())
        rows, cols = np.concatenate(rows), np.concatenate(cols)
        matrix = sp.csr_matrix((np.full(rows.size, self.factor), (rows, cols)), shape=(c * ho * wo, c * h * w))
        return matrix, np.zeros(c * ho * wo)

    def describe(self) -> str:
        return f"{'avg' if self.kind == 'avgpool2d' else 'sum'}pool {self.kernel}x{self.kernel} s{self.stride}"


@dataclass
class BatchNorm(Op):
    """Inference batch norm as a per-channel affine map y = scale * x + shift."""

    scale: np.ndarray = None
    shift: np.ndarray = None

    def evaluate(self, x: np.ndarray) -> np.ndarray:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return x * self.scale.reshape(shape) + self.shift.reshape(shape)


@dataclass
class Poly(Op):
    """a*x^2 + b*x + c, elementwise."""

    a: float = 0.0
    b: float = 0.0
    c: float = 0.0

    def evaluate(self, x: np.ndarray) -> np.ndarray:
        return self.a * x * x + self.b * x + self.c

    def describe(self) -> str:
        # No coefficients: they are trained weights, and the report travels with public artifacts.
        return "poly degree 2"


@dataclass
class Square(Op):
    def evaluate(self, x: np.ndarray) -> np.ndarray:
        return x * x


@dataclass
class Flatten(Op):
    def evaluate(self, x: np.ndarray) -> np.ndarray:
        return x.reshape(x.shape[0], -1)


@dataclass
class Dense(Op):
    weight: np.ndarray = None  # (out, in)
    bias: np.ndarray = None  # (out,)

    def evaluate(self, x: np.ndarray) -> np.ndarray:
        return x.reshape(x.shape[0], -1) @ self.weight.T + self.bias[None]

    def to_sparse(self) -> tuple[sp.csr_matrix, np.ndarray]:
        return sp.csr_matrix(self.weight), self.bias.copy()

    def describe(self) -> str:
        return f"dense {self.weight.shape[1]}->{self.weight.shape[0]}"


@dataclass
class LinearMap(Op):
    """Any linear map between logical tensors, the result of merging linear ops."""

    matrix: sp.csr_matrix = None
    bias: np.ndarray = None
    merged: tuple[str, ...] = field(default_factory=tuple)

    def evaluate(self, x: np.ndarray) -> np.ndarray:
        flat = x.reshape(x.shape[0], -1)
        return (self.matrix @ flat.T).T.reshape((x.shape[0],) + self.out_shape) + self.bias.reshape(self.out_shape)[None]

    def to_sparse(self) -> tuple[sp.csr_matrix, np.ndarray]:
        return self.matrix.tocsr(), self.bias.copy()

    def describe(self) -> str:
        return "merged(" + " + ".join(self.merged) + ")"


def run_ops(ops: list[Op], x: np.ndarray, *, collect: bool = False):
    """Evaluate an op list on a batch (n, *in_shape); with collect, also every intermediate."""
    x = np.asarray(x, dtype=np.float64)
    outputs = []
    for op in ops:
        if x.shape[1:] != tuple(op.in_shape):
            raise PlanError(f"{op.kind} expects input shape {op.in_shape}, got {x.shape[1:]}")
        x = op.evaluate(x)
        outputs.append(x)
    return (x, outputs) if collect else x


def linear_sparse(op: Op) -> tuple[sp.csr_matrix, np.ndarray]:
    """The logical matrix and bias of any linear op (flatten is the identity)."""
    if op.kind == "flatten":
        size = int(np.prod(op.in_shape))
        return sp.identity(size, format="csr"), np.zeros(size)
    if op.kind == "batchnorm":
        per = int(np.prod(op.in_shape[1:])) if len(op.in_shape) > 1 else 1
        return sp.diags(np.repeat(op.scale, per)).tocsr(), np.repeat(op.shift, per)
    return op.to_sparse()
