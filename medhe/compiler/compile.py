"""compile_model: trace -> passes -> parameters -> lowering -> Plan."""

from __future__ import annotations

import hashlib
from pathlib import Path

from medhe.compiler.ir import NAIVE_LEVELS, Op
from medhe.compiler.keyset import key_switching_key_bytes
from medhe.compiler.layout import NeedMoreSlots, image_layout, next_power_of_two
from medhe.compiler.lower import lower_ops
from medhe.compiler.passes import WEIGHTED, naive_levels, optimize, optimized_levels
from medhe.compiler.trace import trace_model_dir
from medhe.errors import PlanError
from medhe.params import MAX_LOG_Q_128, MAX_PRIME_BITS, CKKSParams, choose_params
from medhe.plan import Plan, rescale_factors

# A key budget may at most quadruple the rotations per image (beyond that, latency and
# key-switching noise grow more than the keys are worth).
MAX_ROTATION_GROWTH = 4
# Without an explicit budget, evaluation keys are kept within 150 MB (what a clinic uploads and a
# server holds per clinic) where that costs at most 25% more key switching per image; a plan that
# would pay more (a wide model at N=32768) keeps one key per step, and the compile report says so.
DEFAULT_MAX_KEY_MB = 150.0
DEFAULT_MAX_KEY_SWITCHING_GROWTH = 0.25
DEFAULT_KEY_BUDGET = "default"


def model_digest(model_dir: Path) -> str:
    h = hashlib.sha256()
    for name in ("model.json", "weights.safetensors"):
        h.update((model_dir / name).read_bytes())
    return h.hexdigest()


def slots_needed(ops: list[Op], input_shape: tuple[int, ...]) -> int:
    """Slots the widest layer needs with channels in power-of-two blocks of the input image."""
    block = next_power_of_two(input_shape[1] * input_shape[2])
    widest = max([input_shape[0]] + [op.out_shape[0] for op in ops if len(op.out_shape) == 3])
    return widest * block


def layer_table(traced: list[Op], optimized: list[Op], plan: Plan, owners: dict) -> list[dict]:
    """One row per traced layer: naive levels, levels after optimisation, rotations."""
    after = {}
    chains = plan.rotation_chains()  # with a key budget, a step may take several key rotations
    for op in optimized:
        names = op.name.split("+")
        cost = 1 if op.kind in WEIGHTED + ("square",) else 0
        rotations = sum(plan.key_rotations(plan.instructions[i], chains) for i in owners.get(op.name, []))
        after[names[0]] = (op.describe(), cost, rotations)
        for other in names[1:]:
            after[other] = (f"merged into {names[0]}", 0, 0)
    rows = []
    for op in traced:
        lowered, cost, rotations = after.get(op.name, ("folded into a neighbour", 0, 0))
        rows.append({"layer": op.name, "op": op.describe(), "levels_before": NAIVE_LEVELS[op.kind],
                     "levels_after": cost, "rotations": rotations, "lowered_as": lowered})
    return rows


# Fresh inputs are encrypted 15 bits above the base scale: the first conv's rotations then add
# key-switching noise 2^15 times smaller relative to the image (all later rotations already act
# on ciphertexts at twice the base scale, before a rescale).
INPUT_EXTRA_BITS = 15
# The first rescale's prime is this much larger again (60 bits at most): the first layer's weights
# are then encoded at 2^(30+15) instead of 2^30. Free in time (a prime is one machine word either
# way) and 15 bits of the 128-bit budget; it matters in encrypted-model mode, where the first
# layer's weights carry fresh public-key encryption noise (about 2^16 in the slots) that no
# rescale can shrink, since no level lies above theirs.
FIRST_WEIGHT_EXTRA_BITS = 15


def check_params_fit(params: CKKSParams, factors: list[int], depth: int) -> None:
    """The primes must match the plan's rescales: prime i about factors[i] times the scale."""
    n = params.poly_modulus_degree
    if params.levels < len(factors):
        raise PlanError(
            f"model needs {len(factors)} rescales ({depth} multiplications) but the parameters give "
            f"{params.levels}; at 128-bit security N={n} allows {MAX_LOG_Q_128[n]} bits; use "
            f"poly_modulus_degree={2 * n} or a model with fewer layers"
        )
    data_primes = list(reversed(params.coeff_modulus_bits[1:-1]))[: len(factors)]
    expected = [f * params.log_scale_bits for f in factors]
    expected[0] += params.input_scale_bits - params.log_scale_bits
    # The first prime may be larger (its weights are then encoded above the base scale).
    first_ok = expected[0] - 2 <= data_primes[0] <= MAX_PRIME_BITS if factors[0] == 1 else True
    if not first_ok or any(abs(got - want) > 2 for got, want in list(zip(data_primes, expected))[1:]):
        raise PlanError(f"the primes {data_primes} do not fit the plan's rescales (expected about {expected} bits "
                        f"for a {params.log_scale_bits}-bit scale); let medhe choose the parameters")


def compile_ops(
    traced: list[Op],
    input_shape: tuple[int, ...],
    *,
    class_names: list[str],
    preprocessing: dict,
    digest_of_model: str,
    params: CKKSParams | None = None,
    poly_modulus_degree: int | None = None,
    log_scale_bits: int | None = None,
    insecure_for_tests: bool = False,
    max_galois_keys: int | None = None,
    max_key_mb: float | str | None = DEFAULT_KEY_BUDGET,
) -> Plan:
    """Passes, parameter choice and lowering for a traced op list. With max_galois_keys, at most that
    many Galois keys (steps missing a key are made of several rotations; see medhe.compiler.keyset);
    with max_key_mb, as many as fit that size of evaluation keys (MB = 2**20 bytes); None: one key
    per rotation step. The default is DEFAULT_MAX_KEY_MB where it costs little (see above)."""
    soft_budget = max_key_mb == DEFAULT_KEY_BUDGET and max_galois_keys is None
    if max_key_mb == DEFAULT_KEY_BUDGET:
        max_key_mb = DEFAULT_MAX_KEY_MB if soft_budget else None
    optimized = optimize(traced)
    depth = optimized_levels(optimized)
    n = params.slot_count if params else next_power_of_two(slots_needed(optimized, input_shape))
    while True:  # a larger N may be needed by a layout or by the modulus budget
        try:
            in_layout, _ = image_layout(input_shape, n)
            instructions, out_layout, owners, checkpoints = lower_ops(optimized, in_layout, n)
        except NeedMoreSlots:
            if params is not None or n >= max(MAX_LOG_Q_128) // 2:
                raise
            n *= 2
            continue
        factors = rescale_factors(instructions)
        if params is None:
            params = choose_params(factors, n, log_scale_bits=log_scale_bits, input_extra_bits=INPUT_EXTRA_BITS,
                                   first_weight_extra_bits=FIRST_WEIGHT_EXTRA_BITS,
                                   poly_modulus_degree=poly_modulus_degree, insecure_for_tests=insecure_for_tests)
        if params.slot_count == n:
            break
        n, params = params.slot_count, None
    check_params_fit(params, factors, depth)
    plan = Plan(params, input_shape, in_layout, out_layout, instructions, list(class_names),
                preprocessing, digest_of_model)
    if plan.multiplicative_depth != depth:
        raise PlanError(f"internal: lowering used {plan.multiplicative_depth} multiplications, the IR counts {depth}")
    rotations_one_key_per_step = plan.rotation_count()
    cost_one_key_per_step = plan.key_switching_cost()
    growth, key_budget_note = 0.0, None
    try:
        if max_key_mb is not None and plan.rotation_steps():
            from medhe.compiler.keyset import galois_keys_within

            fit = galois_keys_within(params, int(float(max_key_mb) * 2**20))
            max_galois_keys = fit if max_galois_keys is None else min(max_galois_keys, fit)
        if max_galois_keys is not None and max_galois_keys < len(plan.rotation_steps()):
            from medhe.compiler.keyset import choose_key_steps

            # Weighted by level: a rotation the key budget adds costs 13x more at the top level (of
            # the shipped plans) than at the bottom, so the keys go to the steps used early in the network.
            plan.key_steps = choose_key_steps(plan.rotation_usage(cost_weighted=True), params.slot_count,
                                              int(max_galois_keys))
            if plan.rotation_count() > MAX_ROTATION_GROWTH * rotations_one_key_per_step:
                raise PlanError(f"{max_galois_keys} Galois keys would take {plan.rotation_count()} rotations per "
                                f"image ({rotations_one_key_per_step} with one key per step; each adds time and "
                                f"noise); allow more keys")
            growth = plan.key_switching_cost() / cost_one_key_per_step - 1
            if soft_budget and growth > DEFAULT_MAX_KEY_SWITCHING_GROWTH:
                raise PlanError(f"keys within {DEFAULT_MAX_KEY_MB:.0f} MB would cost {growth:.0%} more key switching")
    except PlanError as exc:
        if not soft_budget:
            raise
        plan.key_steps, growth = (), 0.0
        key_budget_note = f"one key per rotation step: {exc}"
    plan.report = {
        "layers": layer_table(traced, optimized, plan, owners),
        "levels_before": naive_levels(traced),
        "levels_after": depth,
        "rescales": plan.depth,
        "levels_available": params.levels,
        "rotations": plan.rotation_count(),
        "rotation_keys": len(plan.galois_steps()),
        "eval_key_bytes_bound": (len(plan.galois_steps()) + 1) * key_switching_key_bytes(params),
        "rotations_one_key_per_step": rotations_one_key_per_step,
        "key_switching_growth": growth,
        "key_budget_note": key_budget_note,
        "rotation_steps": len(plan.rotation_steps()),
        "weight_operands": plan.weight_operand_count(),
        "relinearizations": relinearizations(plan),
        "params": params.to_dict(),
        "security_bits": params.security_bits,
        # For per-layer checks: after instruction i, optimised op k's output sits in this layout.
        "checkpoints": [{"op": k, "instruction": i, "layout": lay.to_dict()} for k, i, lay in checkpoints],
    }
    return plan


def relinearizations(plan: Plan) -> dict[str, int]:
    """Relinearisations per image in each mode. Plain weights: one per square. Encrypted weights:
    also one per giant step of every linear layer (a ciphertext product must be relinearised
    before it is rotated), the unrotated giant's included."""
    squares = sum(1 for ins in plan.instructions if ins.kind == "square")
    giants = sum(len({g for g, _ in ins.pairs}) for ins in plan.instructions if ins.kind == "linear")
    return {"plain_weights": squares, "encrypted_model": squares + giants}


def compile_model(model_dir: str | Path, **options) -> Plan:
    """Compile a saved model directory (see compile_ops for the options)."""
    model_dir = Path(model_dir)
    traced, doc = trace_model_dir(model_dir)
    return compile_ops(traced, tuple(doc["input_shape"]), class_names=doc["class_names"],
                       preprocessing=doc["preprocessing"], digest_of_model=model_digest(model_dir), **options)
