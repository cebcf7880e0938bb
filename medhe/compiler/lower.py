"""Lower optimised IR ops to slot instructions (latency mode: one image per ciphertext).

- conv / merged linear maps: the diagonal method over the slot vector with baby-step giant-step
  (rotations = babies + giants, one plaintext multiply per diagonal), on layouts where a
  convolution's diagonals are few: channels in power-of-two blocks, so a diagonal is one
  (kernel offset, channel shift) pair.
- sum pooling: a sum of rotations, no level; the layout's grid steps double.
- dense: replicate -> multiply -> reduce. The input is copied to one offset per output neuron
  with a few doubling rotations, multiplied once by the weights, and each neuron's dot product
  summed with rotations along the input layout's axes. The compiler checks that no copy lands
  on a slot holding something else, using the support (which slots can be non-zero) it tracks.
"""

from __future__ import annotations

import numpy as np

from medhe.compiler.ir import Op, linear_sparse
from medhe.compiler.layout import NeedMoreSlots, next_power_of_two
from medhe.errors import PlanError
from medhe.plan.instructions import AddPlain, Linear, RotSum, SquareOp
from medhe.plan.layout import Layout, signed_step


# --- diagonal method -------------------------------------------------------------------------
def bsgs_split(ks: list[int], n: int) -> dict[int, tuple[int, int]]:
    """Split each diagonal index k into giant + baby (mod n) minimising the rotation count.

    Candidates: baby = (k / d) mod m times d, for m a power of two and d either 1 or the gcd of
    the (signed) indices, so that arithmetic progressions with any step split evenly."""
    signed = [signed_step(k, n) for k in ks]
    units = {1, int(np.gcd.reduce([abs(k) for k in signed if k] or [1]))}
    best, best_cost = None, None
    for unit in sorted(units):
        m = 1
        while m <= n:
            for centered in (False, True):
                pairs = {}
                for k, sk in zip(ks, signed):
                    b = (sk // unit) % m
                    if centered and b >= m // 2 and m > 1:
                        b -= m
                    b *= unit
                    pairs[k] = ((k - b) % n, b % n)
                cost = len({b for _, b in pairs.values()} - {0}) + len({g for g, _ in pairs.values()} - {0})
                if best_cost is None or cost < best_cost:
                    best, best_cost = pairs, cost
            m *= 2
    return best


def lower_matrix(matrix, bias: np.ndarray, in_layout: Layout, out_layout: Layout, n: int, layer: str) -> Linear:
    coo = matrix.tocoo()
    out_slots_all = out_layout.slots(n)
    if np.unique(out_slots_all).size != out_slots_all.size:
        raise PlanError(f"{layer}: output layout maps two values to one slot")
    out_slots = out_slots_all[coo.row]
    candidates = in_layout.replica_slots(n)[:, coo.col]
    offsets = (candidates - out_slots[None, :]) % n
    distance = np.minimum(offsets, n - offsets)
    # Of the copies of an input, read the nearest: for a conv it is the one in the same block.
    chosen = offsets[np.argmin(distance, axis=0), np.arange(offsets.shape[1])]
    ks = np.unique(chosen)
    split = bsgs_split([int(k) for k in ks], n)
    pairs, diagonals = [], []
    for k in ks:
        mask = chosen == k
        diag = np.zeros(n)
        np.add.at(diag, out_slots[mask], coo.data[mask])
        g, b = split[int(k)]
        pairs.append((signed_step(g, n), signed_step(b, n)))
        diagonals.append(np.roll(diag, g))
    bias_vector = np.zeros(n)
    bias_vector[out_slots_all] = bias
    babies = sorted({b for _, b in pairs}, key=abs)
    giants = sorted({g for g, _ in pairs}, key=abs)
    return Linear(layer, babies, giants, pairs, np.array(diagonals), bias_vector if np.any(bias) else None)


# --- replicate, multiply, reduce ---------------------------------------------------------------
def _sum_stages(length: int, step: int) -> list[list[int]]:
    """Rotation stages whose composition sums offsets 0, step, ..., (length-1)*step."""
    if length <= 1:
        return []
    if length & (length - 1) == 0:
        stages, span = [], 1
        while span < length:
            stages.append([0, span * step])
            span *= 2
        return stages
    return [[d * step for d in range(length)]]


def _forbidden_differences(input_slots: np.ndarray, support: np.ndarray) -> np.ndarray:
    """r - r' values that would pull a non-zero slot onto a product slot: {t - s}."""
    n = support.size
    forbidden = np.zeros(n, dtype=bool)
    for s in np.unique(input_slots):
        forbidden |= np.roll(support, -int(s))
    forbidden[0] = False
    return forbidden


def _differences(lengths: tuple[int, int], steps: tuple[int, int], n: int) -> np.ndarray:
    a = np.arange(-(lengths[0] - 1), lengths[0])[:, None] * steps[0]
    b = np.arange(-(lengths[1] - 1), lengths[1])[None, :] * steps[1]
    d = ((a + b) % n).ravel()
    return d[d != 0]


def find_replication(outputs: int, input_slots: np.ndarray, support: np.ndarray, n: int):
    """Offsets R = AP(L1, s1) + AP(L2, s2) with L1*L2 >= outputs (powers of two) such that the
    copies never collide with anything non-zero. Returns (L1, s1, L2, s2) or None."""
    forbidden = _forbidden_differences(input_slots, support)
    total = next_power_of_two(outputs)
    max_step = min(n // 2, 4096)
    shapes = [(total // (1 << e), 1 << e) for e in range(int(np.log2(total)) + 1)]
    for l1, l2 in shapes:
        s1_options = range(1, max_step) if l1 > 1 else [1]
        for s1 in s1_options:
            first = (np.arange(-(l1 - 1), l1) * s1) % n
            if forbidden[first[first != 0]].any():
                continue
            if l2 == 1:
                return l1, s1, 1, 0
            span1 = (l1 - 1) * s1 + 1
            s2 = np.arange(span1, max_step)
            a = np.arange(-(l1 - 1), l1) * s1
            b = np.arange(1, l2)
            # Differences r - r' whose second digit is non-zero, both signs (forbidden is not
            # symmetric); those with a zero second digit were checked with s1 above.
            diffs = (a[None, :, None] + b[None, None, :] * s2[:, None, None])
            bad = forbidden[diffs % n].any(axis=(1, 2)) | forbidden[(-diffs) % n].any(axis=(1, 2))
            good = np.flatnonzero(~bad)
            if good.size:
                return l1, s1, l2, int(s2[good[0]])
    return None


def _reduce_stages(in_layout: Layout, owner: np.ndarray, out_slots: np.ndarray, n: int) -> list[list[int]] | None:
    """Rotation stages summing each output's products (at out_slot + the input layout's offsets)
    into its output slot, or None when the sum over the layout's window (every digit of `dims`,
    padding included) would take in another output's products. An axis whose length is not a
    power of two is summed as if padded to one (log2 rotations instead of length - 1) when the
    padding only reaches empty slots: `owner` maps each slot to the output whose product it
    holds, -1 where nothing is."""
    dims, steps = in_layout.dims, in_layout.steps

    def paddable(dim: int, step: int) -> bool:
        return _sum_rotations(next_power_of_two(dim)) < _sum_rotations(dim) and dim * step != n

    def safe(lengths: list[int]) -> bool:
        offsets = np.zeros(1, dtype=np.int64)
        for length, step in zip(lengths, steps):
            offsets = (offsets[:, None] + np.arange(length)[None, :] * step).ravel()
        reached = owner[(out_slots[:, None] + offsets[None, :]) % n]
        own = reached == np.arange(out_slots.size)[:, None]
        # Each output may meet only empty slots and its own products, each of those exactly once.
        return bool(((reached == -1) | own).all() and (own.sum(axis=1) == in_layout.size).all())

    if not safe(list(dims)):
        return None
    candidates = [a for a, (d, st) in enumerate(zip(dims, steps)) if paddable(d, st)]
    best = list(dims)
    for mask in range(1, 1 << len(candidates)):  # a few axes at most: try every subset
        lengths = list(dims)
        for bit, axis in enumerate(candidates):
            if mask >> bit & 1:
                lengths[axis] = next_power_of_two(dims[axis])
        if sum(map(_sum_rotations, lengths)) < sum(map(_sum_rotations, best)) and safe(lengths):
            best = lengths
    return [stage for length, step in zip(best, steps) for stage in _sum_stages(length, step)]


def _sum_rotations(length: int) -> int:
    return sum(len(stage) - 1 for stage in _sum_stages(length, 1))


def lower_dense_rmr(op: Op, in_layout: Layout, support: np.ndarray, n: int):
    """Instructions and output layout for a dense op, or None when no safe replication exists.

    When fewer copies fit than there are outputs, the outputs go in groups: each group's
    products (one plaintext multiply each, clean outside their slots) are shifted next to the
    first group's by one rotation, then all groups share the reduce."""
    matrix, bias = linear_sparse(op)
    weight = matrix.toarray()
    outputs, features = weight.shape
    s_slots = in_layout.slots(n)
    base = int(s_slots[0])
    instructions = []
    s_set = (s_slots[:, None] - s_slots[None, :]) % n
    reps = np.asarray(in_layout.replicas[:outputs]) if len(in_layout.replicas) >= outputs else None
    if reps is not None and len(set(np.diff(reps))) > 1:
        reps = None  # the output layout below needs evenly spaced copies
    groups, per_group, shifts = 1, outputs, np.zeros(1, dtype=np.int64)
    if reps is not None and not np.isin(((reps[:, None] - reps[None, :]) % n)[~np.eye(len(reps), dtype=bool)], s_set).any():
        offsets = reps
        out_dims, out_steps = (len(reps),), (int(reps[1]) if len(reps) > 1 else 1,)
    else:
        while True:
            found = find_replication(-(-outputs // groups), s_slots, support, n)
            if found is not None or groups >= outputs:
                break
            groups *= 2
        if found is None:
            return None
        l1, s1, l2, s2 = found
        copies = (np.arange(l2)[:, None] * s2 + np.arange(l1)[None, :] * s1).ravel()
        per_group = copies.size
        groups = -(-outputs // per_group)
        out_dims, out_steps = (l2, l1), (s2, s1)
        if groups > 1:
            # Where each group's products go: the same search, now for copies of the products
            # (clean: zero outside their slots) that must not land on one another.
            # Every slot of the input's window counts: the reduce sums over it, padding included.
            window = Layout(int(np.prod(in_layout.dims)), base, in_layout.dims, in_layout.steps).slots(n)
            copy_slots = np.unique((window[None, :] + copies[:, None]) % n)
            occupied = np.zeros(n, dtype=bool)
            occupied[copy_slots] = True
            placed = find_replication(groups, copy_slots, occupied, n)
            if placed is None:
                return None
            g1, t1, g2, t2 = placed
            shifts = (np.arange(g2)[:, None] * t2 + np.arange(g1)[None, :] * t1).ravel()
            out_dims, out_steps = (g2, g1) + out_dims, (t2, t1) + out_steps
        offsets = (shifts[:, None] + copies[None, :]).ravel()[:outputs]
        stages = [[signed_step(-o, n) for o in stage] for stage in _sum_stages(l1, s1) + _sum_stages(l2, s2)]
        instructions.append(RotSum(op.name + ":replicate", stages))
    product_slots = (s_slots[None, :] + offsets[:, None]) % n
    if np.unique(product_slots).size != product_slots.size:
        return None  # copies that wrap onto one another: the diagonal method instead
    groups = -(-outputs // per_group)  # the last shifts may hold no output
    products = np.zeros((groups, n))
    giants = []
    for g in range(groups):
        rows = slice(g * per_group, min(outputs, (g + 1) * per_group))
        shift = int(shifts[g])
        # Group g's weights sit where its products are made, before the shift that moves them.
        products[g, ((product_slots[rows] - shift) % n).ravel()] = weight[rows].ravel()
        giants.append(signed_step(-shift, n))
    instructions.append(Linear(op.name + ":multiply", [0], sorted(set(giants), key=abs),
                               [(g, 0) for g in giants], products))
    owner = np.full(n, -1)
    owner[product_slots] = np.arange(outputs)[:, None]
    out_slots = (base + offsets) % n
    replicas = [0]
    for dim, step in zip(in_layout.dims, in_layout.steps):
        if dim * step == n:
            # Summing a whole cyclic axis leaves the total in every position along it.
            replicas = [r + d * step for r in replicas for d in range(dim)]
    stages = _reduce_stages(in_layout, owner, out_slots, n)
    if stages is None:
        return None
    reduce_stages = [[signed_step(o, n) for o in stage] for stage in stages]
    instructions.append(RotSum(op.name + ":reduce", reduce_stages))
    out_layout = Layout(outputs, base, out_dims, out_steps, tuple(sorted(int(r) % n for r in replicas)))
    bias_vector = np.zeros(n)
    bias_vector[out_layout.replica_slots(n)] = bias[None, :]  # every copy needs its bias
    if np.any(bias):
        instructions.append(AddPlain(op.name + ":bias", bias_vector))
    return instructions, out_layout


def conv_out_layout(op: Op, in_layout: Layout, n: int) -> Layout:
    """Outputs on the input's grid (every stride-th position) when they fit in its frame, so a
    diagonal is one (kernel offset, channel shift) pair; otherwise a fresh compact layout."""
    c_in, h, w = op.in_shape
    c_out, ho, wo = op.out_shape
    block, row_step, col_step = in_layout.steps
    stride = op.stride if op.kind == "conv2d" else max(1, h // ho)
    fits = ((wo - 1) * stride + 1) * col_step <= row_step and \
        (ho - 1) * stride * row_step + (wo - 1) * stride * col_step < block
    if not fits:
        block = next_power_of_two(ho * wo)
        row_step, col_step, stride = wo, 1, 1
    if c_out * block > n:
        raise NeedMoreSlots(f"{op.name}: {c_out} channels in blocks of {block} need {c_out * block} slots, "
                        f"the ciphertext has {n}; use at most {n // block} channels")
    base = in_layout.base if fits else 0
    return Layout(c_out * ho * wo, base, (c_out, ho, wo), (block, row_step * stride, col_step * stride))


def lower_ops(ops: list[Op], in_layout: Layout, n: int):
    """All instructions, the output layout, per-op (name -> instruction indices), and checkpoints:
    (op index, last instruction index, output layout) to compare each layer with the oracle."""
    layout = in_layout
    support = np.zeros(n, dtype=bool)
    support[in_layout.replica_slots(n).ravel()] = True
    instructions, owners, checkpoints = [], {}, []

    def emit(items, name):
        nonlocal support
        for item in items:
            owners.setdefault(name, []).append(len(instructions))
            instructions.append(item)
            support = item.support_after(support)

    for op_index, op in enumerate(ops):
        if op.kind in ("conv2d",) or (op.kind == "linear_map" and len(op.out_shape) == 3):
            out_layout = conv_out_layout(op, layout, n)
            matrix, bias = linear_sparse(op)
            emit([lower_matrix(matrix, bias, layout, out_layout, n, op.name)], op.name)
            layout = out_layout
        elif op.kind == "sumpool2d":
            block, row_step, col_step = layout.steps
            k = op.kernel
            stages = [[dx * col_step for dx in range(k)], [dy * row_step for dy in range(k)]]
            emit([RotSum(op.name, [[signed_step(o, n) for o in s] for s in stages])], op.name)
            layout = Layout(int(np.prod(op.out_shape)), layout.base, op.out_shape,
                            (block, row_step * op.stride, col_step * op.stride), layout.replicas)
        elif op.kind == "square":
            emit([SquareOp(op.name)], op.name)
        elif op.kind == "flatten":
            layout = Layout(layout.size, layout.base, layout.dims, layout.steps, layout.replicas)
        elif op.kind in ("dense", "linear_map"):
            last = op_index == len(ops) - 1
            # The last layer goes through the diagonal method: its diagonals are zero outside the
            # output slots, so the client decrypts the logits and zeros, not the partial sums
            # that replicate-multiply-reduce would leave around them (weights stay private).
            lowered = None if last else lower_dense_rmr(op, layout, support, n)
            if lowered is None:
                outputs, reps = op.out_shape[0], layout.replicas
                if len(reps) >= outputs > 1 and len(set(np.diff(reps))) == 1:
                    # Output j where the input's j-th copy starts: every output reads the same
                    # diagonals, so the output count does not multiply the rotations.
                    out_layout = Layout(outputs, layout.base, (outputs,), (int(reps[1] - reps[0]),))
                else:
                    out_layout = Layout(outputs, 0, (outputs,), (1,))
                matrix, bias = linear_sparse(op)
                lowered = ([lower_matrix(matrix, bias, layout, out_layout, n, op.name)], out_layout)
            emit(lowered[0], op.name)
            layout = lowered[1]
        else:
            raise PlanError(f"no lowering for {op.kind} ({op.name})")
        if op.kind != "flatten":
            checkpoints.append((op_index, len(instructions) - 1, layout))
    return instructions, layout, owners, checkpoints
