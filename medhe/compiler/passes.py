"""Depth-optimisation passes over the IR. Each pass returns a new op list computing the same
function (checked by tests against the traced model).

1. fold_batchnorm     batch norm into the linear layer before it (through pooling): 0 levels.
2. absorb_pooling     average pooling's 1/k^2 into the linear layer before it; what is left is a
                      sum of rotations, which costs no level.
3. absorb_activation  a*x^2 + b*x + c = a*(x + b/2a)^2 + c - b^2/4a: the shift goes into the previous
                      layer's bias, a and the constant into the next layer: one square, one level.
4. merge_linear       runs of linear layers with no activation between them become one linear map
                      (one level instead of one per layer).
"""

from __future__ import annotations

import copy

import numpy as np
import scipy.sparse as sp

from medhe.compiler.ir import NAIVE_LEVELS, LinearMap, Op, Pool2d, Square, linear_sparse
from medhe.errors import PlanError

WEIGHTED = ("conv2d", "dense", "linear_map")
POOLS = ("avgpool2d", "sumpool2d")


def _pool_sum_factor(op: Op) -> float:
    """How much a constant grows through this pool (k^2 for a sum pool, 1 for an average)."""
    return op.kernel * op.kernel if op.kind == "sumpool2d" else 1.0


def _scale_rows(op: Op, row_scale: np.ndarray) -> None:
    """Multiply each output element's weights and bias of a weighted op (row_scale over outputs)."""
    if op.kind == "conv2d":
        op.weight = op.weight * row_scale.reshape(-1, 1, 1, 1)
        op.bias = op.bias * row_scale.reshape(-1, 1, 1)
    elif op.kind == "dense":
        op.weight = op.weight * row_scale.reshape(-1, 1)
        op.bias = op.bias * row_scale
    else:
        per = int(np.prod(op.out_shape)) // row_scale.size
        full = np.repeat(row_scale, per)
        op.matrix = sp.diags(full) @ op.matrix
        op.bias = op.bias * full


def _add_bias(op: Op, shift: np.ndarray) -> None:
    """Add a per-channel shift (or scalar) to a weighted op's bias."""
    shift = np.asarray(shift, dtype=np.float64)
    if op.kind == "conv2d":
        op.bias = op.bias + (shift.reshape(-1, 1, 1) if shift.ndim else shift)
    elif op.kind == "dense":
        op.bias = op.bias + shift
    else:
        per = int(np.prod(op.out_shape)) // max(1, shift.size)
        op.bias = op.bias + (np.repeat(shift, per) if shift.ndim else shift)


def _previous_weighted(ops: list[Op], index: int, what: str) -> tuple[int, float]:
    """Index of the weighted op feeding ops[index] through pools only, and how much a constant
    added there grows by the time it reaches ops[index]."""
    growth = 1.0
    j = index - 1
    while j >= 0 and ops[j].kind in POOLS:
        growth *= _pool_sum_factor(ops[j])
        j -= 1
    if j < 0 or ops[j].kind not in WEIGHTED:
        found = ops[j].kind if j >= 0 else "the input"
        raise PlanError(f"{what} ({ops[index].name}) must follow a conv or dense layer to be folded, found {found}")
    return j, growth


def fold_batchnorm(ops: list[Op]) -> list[Op]:
    ops = copy.deepcopy(ops)
    out: list[Op] = []
    for i, op in enumerate(ops):
        if op.kind != "batchnorm":
            out.append(op)
            continue
        j, growth = _previous_weighted(out + [op], len(out), "batch norm")
        target = out[j]
        # A per-channel scale commutes with pooling; a shift grows by k^2 through a sum pool.
        _scale_rows(target, op.scale)
        _add_bias(target, op.shift / growth)
    return out


def absorb_pooling(ops: list[Op]) -> list[Op]:
    ops = copy.deepcopy(ops)
    for i, op in enumerate(ops):
        if op.kind != "avgpool2d":
            continue
        factor = op.factor
        if i > 0 and ops[i - 1].kind in WEIGHTED:
            _scale_rows(ops[i - 1], np.full(ops[i - 1].out_shape[0], factor))
        else:
            j = i + 1
            while j < len(ops) and ops[j].kind in ("flatten",) + POOLS:
                j += 1
            if j >= len(ops) or ops[j].kind not in WEIGHTED:
                raise PlanError(f"average pool {op.name} has no neighbouring linear layer to absorb its 1/{op.kernel ** 2}")
            nxt = ops[j]
            if nxt.kind == "conv2d":
                nxt.weight = nxt.weight * factor
            elif nxt.kind == "dense":
                nxt.weight = nxt.weight * factor
            else:
                nxt.matrix = nxt.matrix * factor
        ops[i] = Pool2d("sumpool2d", op.in_shape, op.out_shape, op.name, kernel=op.kernel, stride=op.stride)
    return ops


def _apply_without_bias(op: Op, x: np.ndarray) -> np.ndarray:
    matrix, _ = linear_sparse(op)
    return matrix @ x.reshape(-1)


# |b / 2a| beyond this costs more than ~3 bits of precision in the completed square (see PolyAct).
# Both equal PolyAct's constants (a test checks): the compiler does not import torch.
MAX_SQUARE_SHIFT = 16.0
MIN_CURVATURE = 0.05


def absorb_activation(ops: list[Op]) -> list[Op]:
    ops = copy.deepcopy(ops)
    for i, op in enumerate(ops):
        if op.kind != "poly":
            continue
        a, b, c = op.a, op.b, op.c
        if abs(a) < 1e-9:
            raise PlanError(f"activation {op.name} has a~0 (a={a}); it is linear and should be removed")
        shift = b / (2 * a)
        if abs(shift) > MAX_SQUARE_SHIFT:
            lost_bits = np.log2(abs(shift) / 2)
            raise PlanError(
                f"activation {op.name}: a={a:.3g}, b={b:.3g}; completing the square shifts its input by "
                f"b/2a={shift:.3g} (at most {MAX_SQUARE_SHIFT} here), so the square's constant part would swamp "
                f"its signal (about {lost_bits:.0f} bits of CKKS precision lost); retrain with a curvature floor "
                f"(`medhe train` keeps a >= {MIN_CURVATURE})")
        offset = c - b * b / (4 * a)
        j, growth = _previous_weighted(ops, i, "activation")
        _add_bias(ops[j], np.float64(shift / growth))
        # Forward: a*z + offset flows through pools/flatten into the next weighted op.
        constant = np.full(op.out_shape, offset)
        k = i + 1
        while k < len(ops) and ops[k].kind in ("flatten",) + POOLS:
            constant = ops[k].evaluate(constant[None])[0]
            k += 1
        if k >= len(ops) or ops[k].kind not in WEIGHTED:
            raise PlanError(f"activation {op.name} must be followed by a conv or dense layer to absorb a and c")
        nxt = ops[k]
        extra = _apply_without_bias(nxt, constant).reshape(nxt.out_shape)
        if nxt.kind == "conv2d":
            nxt.weight = nxt.weight * a
            nxt.bias = nxt.bias + extra
        elif nxt.kind == "dense":
            nxt.weight = nxt.weight * a
            nxt.bias = nxt.bias + extra
        else:
            nxt.matrix = nxt.matrix * a
            nxt.bias = nxt.bias + extra.reshape(-1)
        ops[i] = Square("square", op.in_shape, op.out_shape, op.name)
    return ops


def merge_linear(ops: list[Op]) -> list[Op]:
    """Merge each run of linear ops holding two or more weighted ops into one LinearMap.

    A run with a single weighted op is left alone: its pools are sums of rotations (no level),
    so merging them would add rotations and save nothing.
    """
    out: list[Op] = []
    run: list[Op] = []

    def flush() -> None:
        if sum(o.kind in WEIGHTED for o in run) >= 2:
            matrix, bias = linear_sparse(run[0])
            for o in run[1:]:
                m, b = linear_sparse(o)
                matrix = (m @ matrix).tocsr()
                bias = m @ bias + b
            out.append(LinearMap("linear_map", run[0].in_shape, run[-1].out_shape,
                                 "+".join(o.name for o in run), matrix=matrix, bias=bias,
                                 merged=tuple(o.describe() for o in run)))
        else:
            out.extend(run)
        run.clear()

    for op in ops:
        if op.kind in WEIGHTED + POOLS + ("flatten",):
            run.append(op)
        else:
            flush()
            out.append(op)
    flush()
    return out


def optimize(ops: list[Op]) -> list[Op]:
    for step in (fold_batchnorm, absorb_pooling, absorb_activation, merge_linear):
        ops = step(ops)
    return ops


def naive_levels(ops: list[Op]) -> int:
    return sum(NAIVE_LEVELS[o.kind] for o in ops)


def optimized_levels(ops: list[Op]) -> int:
    """Levels of the optimised op list as lowered: weighted ops and squares cost one each."""
    unsupported = [o.kind for o in ops if o.kind not in WEIGHTED + POOLS + ("flatten", "square")]
    if unsupported:
        raise PlanError(f"ops left that have no one-level lowering: {unsupported}")
    return sum(1 for o in ops if o.kind in WEIGHTED + ("square",))
