"""compile_model: trace -> passes -> parameters -> lowering -> Plan."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from medhe.compiler.ir import NAIVE_LEVELS, Op
from medhe.compiler.keyset import key_switching_key_bytes
from medhe.compiler.layout import NeedMoreSlots, image_layout, next_power_of_two
from medhe.compiler.lower import lower_ops
from medhe.compiler.passes import WEIGHTED, naive_levels, optimize, optimized_levels
from medhe.compiler.trace import trace_model_dir
from medhe.errors import ConfigError, PlanError
from medhe.nn.modeldir import ensemble_members, first_difference
from medhe.params import MAX_LOG_Q_128, MAX_PRIME_BITS, CKKSParams, choose_params
from medhe.plan import AddPlain, Branch, Linear, Plan, rescale_factors

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


def feature_map_slots(channels: int, height: int, width: int) -> int:
    """Slots of `channels` maps in one ciphertext, each in a power-of-two block of the input image
    (pooling keeps a map's block: its values are spread out, not packed)."""
    return channels * next_power_of_two(height * width)


def slots_needed(ops: list[Op], input_shape: tuple[int, ...]) -> int:
    """Slots the widest layer needs with channels in power-of-two blocks of the input image."""
    widest = max([input_shape[0]] + [op.out_shape[0] for op in ops if len(op.out_shape) == 3])
    return feature_map_slots(widest, input_shape[1], input_shape[2])


# The most slots one ciphertext has at 128-bit security (N = 32768).
MAX_SLOTS_128 = max(MAX_LOG_Q_128) // 2


def check_conv_fits(image_size: int, in_channels: int, conv_channels: tuple[int, ...]) -> None:
    """Refuse, before training, a network whose widest conv block does not fit one ciphertext: the
    compiler packs every channel of a layer in one (it does not split activations over several)."""
    widest = max((in_channels, *conv_channels))
    needed = feature_map_slots(widest, image_size, image_size)
    if needed > MAX_SLOTS_128:
        fitting = MAX_SLOTS_128 // next_power_of_two(image_size * image_size)
        hint = (f"at most {fitting} channels per conv block at {image_size}x{image_size}" if fitting
                else "a smaller image")
        raise ConfigError(
            f"{widest} channels of {image_size}x{image_size} need {needed} slots in one ciphertext; the "
            f"largest 128-bit parameters (N={2 * MAX_SLOTS_128}) have {MAX_SLOTS_128}: use {hint}, or a "
            f"smaller --image-size")


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
    key_report = choose_key_set(plan, max_galois_keys=max_galois_keys, max_key_mb=max_key_mb)
    plan.report = {
        "layers": layer_table(traced, optimized, plan, owners),
        "levels_before": naive_levels(traced),
        "levels_after": depth,
        "rescales": plan.depth,
        "levels_available": params.levels,
        **key_report,
        "weight_operands": plan.weight_operand_count(),
        "relinearizations": relinearizations(plan),
        "params": params.to_dict(),
        "security_bits": params.security_bits,
        # For per-layer checks: after instruction i, optimised op k's output sits in this layout.
        "checkpoints": [{"op": k, "instruction": i, "layout": lay.to_dict()} for k, i, lay in checkpoints],
    }
    return plan


def choose_key_set(plan: Plan, *, max_galois_keys: int | None = None,
                   max_key_mb: float | str | None = DEFAULT_KEY_BUDGET) -> dict:
    """Set `plan.key_steps` for a key budget (see compile_ops) and return the report's key fields."""
    params = plan.params
    soft_budget = max_key_mb == DEFAULT_KEY_BUDGET and max_galois_keys is None
    if max_key_mb == DEFAULT_KEY_BUDGET:
        max_key_mb = DEFAULT_MAX_KEY_MB if soft_budget else None
    plan.key_steps = ()
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
    return {
        "rotations": plan.rotation_count(),
        "rotation_keys": len(plan.galois_steps()),
        "eval_key_bytes_bound": (len(plan.galois_steps()) + 1) * key_switching_key_bytes(params),
        "rotations_one_key_per_step": rotations_one_key_per_step,
        "key_switching_growth": growth,
        "key_budget_note": key_budget_note,
        "rotation_steps": len(plan.rotation_steps()),
    }


def relinearizations(plan: Plan) -> dict[str, int]:
    """Relinearisations per image in each mode. Plain weights: one per square. Encrypted weights:
    also one per giant step of every linear layer (a ciphertext product must be relinearised
    before it is rotated), the unrotated giant's included."""
    squares = sum(1 for ins in plan.instructions if ins.kind == "square")
    giants = sum(len({g for g, _ in ins.pairs}) for ins in plan.instructions if ins.kind == "linear")
    return {"plain_weights": squares, "encrypted_model": squares + giants}


def compile_model(model_dir: str | Path, **options) -> Plan:
    """Compile a saved model directory (see compile_ops for the options); an ensemble directory
    (`medhe ensemble`) gives one plan for all its members (compile_ensemble)."""
    model_dir = Path(model_dir)
    members = ensemble_members(model_dir)
    if members is not None:
        return compile_ensemble(members, **options)
    traced, doc = trace_model_dir(model_dir)
    return compile_ops(traced, tuple(doc["input_shape"]), class_names=doc["class_names"],
                       preprocessing=doc["preprocessing"], digest_of_model=model_digest(model_dir), **options)


def compile_ensemble(model_dirs, **options) -> Plan:
    """One plan that averages the logits of several models (e.g. one recipe trained with different
    seeds): each compiled as `compile_model` would (same options), then joined by `join_plans`."""
    model_dirs = [Path(d) for d in model_dirs]
    budget = {key: options.pop(key) for key in ("max_galois_keys", "max_key_mb") if key in options}
    # One key per step for each member: the key budget is chosen once, for the joined plan.
    plans = [compile_model(d, max_galois_keys=None, max_key_mb=None, **options) for d in model_dirs]
    return join_plans(plans, [str(d) for d in model_dirs], **budget)


def join_plans(plans: list[Plan], names: list[str] | None = None, *, max_galois_keys: int | None = None,
               max_key_mb: float | str | None = DEFAULT_KEY_BUDGET) -> Plan:
    """An ensemble plan: the members run one after the other from the same input ciphertext (a
    `branch` instruction between them; the first layer's rotations of the input are made once)
    and their outputs are summed, each member's last layer scaled by 1/members, so the plan's
    logits are the members' mean: no extra level, one key set, one client spec. The members must
    agree on the parameters, input and output layouts, levels, classes and preprocessing; inside,
    they may differ (e.g. in width). Their own key sets are dropped: the key budget (as in
    compile_ops) is applied to the joined plan, whose rotations are every member's.

    Each member keeps the decision cut folded into its own output bias, so the ensemble decides at
    the mean of its members' cuts (on the logit difference)."""
    names = names or [f"member {number + 1}" for number in range(len(plans))]
    if len(plans) < 2:
        raise ConfigError(f"an ensemble needs at least two models, got {len(plans)}")
    if any(plan.members > 1 for plan in plans):
        raise ConfigError("an ensemble's members must be single models")
    first = plans[0]

    def agreed(plan: Plan) -> dict:
        return {"CKKS parameters": plan.params.to_dict(), "input shape": list(plan.input_shape),
                "input layout": plan.input_layout.to_dict(), "output layout": plan.output_layout.to_dict(),
                "class names": plan.class_names, "preprocessing": plan.preprocessing,
                "rescales": plan.rescale_factors()}

    reference = agreed(first)
    for name, plan in zip(names[1:], plans[1:]):
        # Preprocessing holds fitted numbers, equal to the last bits only on the same CPU.
        differing = [what for what, value in agreed(plan).items()
                     if (first_difference(reference[what], value, what) if what == "preprocessing"
                         else value != reference[what])]
        if differing:
            raise PlanError(f"{name} cannot join an ensemble with {names[0]}: their {', '.join(differing)} "
                            "differ (members need the same input, classes, levels and output slots)")
    instructions = []
    for number, plan in enumerate(plans):
        member = _scaled_output(plan.instructions, 1.0 / len(plans))
        if number:  # the later members' layers are named apart (per-layer timings are by name)
            instructions.append(Branch(f"member {number + 1}"))
            member = [dataclasses.replace(ins, layer=f"member {number + 1} {ins.layer}") for ins in member]
        instructions += member
    digest = hashlib.sha256("".join(plan.model_digest for plan in plans).encode()).hexdigest()
    ensemble = Plan(first.params, first.input_shape, first.input_layout, first.output_layout, instructions,
                    list(first.class_names), first.preprocessing, digest)
    key_report = choose_key_set(ensemble, max_galois_keys=max_galois_keys, max_key_mb=max_key_mb)
    scaled_from = _last_linear(first.instructions)
    ensemble.report = {
        **first.report,  # the per-layer table is the first member's (with one key per step)
        # Per-layer checks: the first member's layers up to its (scaled) output layer.
        "checkpoints": [point for point in first.report.get("checkpoints", []) if point["instruction"] < scaled_from],
        **key_report,
        "members": len(plans),
        "member_model_digests": [plan.model_digest for plan in plans],
        "reused_input_rotations": len(ensemble.reused_input_rotations()),
        "weight_operands": ensemble.weight_operand_count(),
        "relinearizations": relinearizations(ensemble),
    }
    return ensemble


def _scaled_output(instructions, factor: float) -> list:
    """The instructions with everything from the last linear layer on multiplied by `factor` (the
    output is linear in those weights: only rotations and added vectors follow that layer)."""
    last = _last_linear(instructions)
    scaled = list(instructions[:last])
    for ins in instructions[last:]:
        if isinstance(ins, Linear):
            ins = dataclasses.replace(ins, diagonals=ins.diagonals * factor,
                                      bias=None if ins.bias is None else ins.bias * factor)
        elif isinstance(ins, AddPlain):
            ins = dataclasses.replace(ins, vector=ins.vector * factor)
        elif ins.has_weights and ins.operand_names():
            raise PlanError(f"internal: cannot scale the weights of a {ins.kind} instruction after the last linear layer")
        scaled.append(ins)
    return scaled


def _last_linear(instructions) -> int:
    return max(i for i, ins in enumerate(instructions) if isinstance(ins, Linear))
