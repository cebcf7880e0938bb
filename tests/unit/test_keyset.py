"""A Galois key budget: fewer rotation keys, each missing step made of several key rotations."""

from __future__ import annotations

import numpy as np
import pytest

from medhe.compiler.keyset import choose_key_steps, rotation_chains, rotation_cost
from medhe.errors import PlanError


def test_chains_compose_to_each_step_from_key_steps_only() -> None:
    slots = 64
    keys = (1, 4, -16)
    chains = rotation_chains([3, 5, -1, 20, 47], keys, slots)
    for step, chain in chains.items():
        assert set(chain) <= set(keys)
        assert sum(chain) % slots == step % slots
    assert chains[5] in ((1, 4), (4, 1)) and len(chains[-1]) > 1
    with pytest.raises(PlanError, match="cannot be made"):
        rotation_chains([3], (2, 4), slots)  # even keys never reach an odd step


def test_budget_is_kept_and_every_step_stays_reachable() -> None:
    usage = {1: 3, 2: 2, 3: 1, 32: 4, -32: 1, 96: 1, 1024: 1, -1024: 2, 3072: 1}
    for budget in (len(usage), 6, 4, 3):
        keys = choose_key_steps(usage, 8192, budget)
        assert len(keys) <= budget
        unreachable, cost = rotation_cost(usage, keys, 8192)
        assert unreachable == 0 and cost >= sum(usage.values())
    # No budget pressure: one key per step, one rotation each.
    assert choose_key_steps(usage, 8192, 20) == tuple(sorted(usage))
    # A tighter budget never costs fewer rotations.
    costs = [rotation_cost(usage, choose_key_steps(usage, 8192, b), 8192)[1] for b in (8, 5, 3)]
    assert costs == sorted(costs)


def test_plan_with_a_key_budget_gives_the_same_logits_with_fewer_keys() -> None:
    """Clear backend: the budgeted plan rotates only by its key steps and computes the same logits."""
    from medhe.compiler import compile_model
    from medhe.nn.io import load_model, resolve_model_dir
    from medhe.protocol.client import Client
    from medhe.protocol.server import Server
    from medhe.runtime.clear import ClearBackend

    model_dir = resolve_model_dir("pneumoniamnist")
    full = compile_model(model_dir, max_key_mb=None)
    budget = compile_model(model_dir, max_galois_keys=12)
    assert len(full.galois_steps()) > 12 and len(budget.galois_steps()) == 12
    assert budget.client_spec().rotation_steps == tuple(budget.galois_steps())
    assert budget.report["rotations"] > full.report["rotations"] == budget.report["rotations_one_key_per_step"]
    assert budget.digest() != full.digest()

    used: list[int] = []
    original = ClearBackend.rotate

    def spy(self, a, steps):
        used.append(int(steps))
        return original(self, a, steps)

    _, card = load_model(model_dir)
    image = np.random.default_rng(0).random((28, 28)).astype(np.float32)
    logits = {}
    for name, plan in (("full", full), ("budget", budget)):
        client, server = Client(plan.client_spec(), backend="clear"), Server(plan, backend="clear")
        server.register_keys(client.evaluation_keys())
        used.clear()
        ClearBackend.rotate = spy
        try:
            logits[name] = client.decrypt_logits(server.evaluate(client.encrypt_image(image)))
        finally:
            ClearBackend.rotate = original
        assert set(used) <= set(plan.galois_steps()) and len(used) == plan.report["rotations"]
    np.testing.assert_allclose(logits["budget"], logits["full"], atol=1e-9)


def test_budgeted_plan_survives_save_and_load(tmp_path) -> None:
    from medhe.compiler import Plan, compile_model
    from medhe.nn.io import resolve_model_dir

    plan = compile_model(resolve_model_dir("br35h"), max_galois_keys=14)
    loaded = Plan.load(plan.save(tmp_path / "plan"))
    assert loaded.key_steps == plan.key_steps and loaded.digest() == plan.digest()
    assert Plan.load(tmp_path / "plan", weights=False).without_weights().galois_steps() == plan.galois_steps()


def test_a_server_refuses_keys_made_for_the_unbudgeted_plan() -> None:
    from medhe.compiler import compile_model
    from medhe.errors import MedHEError
    from medhe.nn.io import resolve_model_dir
    from medhe.protocol.client import Client
    from medhe.protocol.server import Server

    full = compile_model(resolve_model_dir("br35h"), max_key_mb=None)
    budget = compile_model(resolve_model_dir("br35h"), max_galois_keys=12)
    with pytest.raises(MedHEError):
        Server(budget, backend="clear").register_keys(Client(full.client_spec(), backend="clear").evaluation_keys())


def test_compile_cli_takes_a_key_budget_and_says_what_it_costs(tmp_path) -> None:
    import subprocess
    import sys

    from medhe.compiler import Plan, compile_model
    from medhe.nn.io import resolve_model_dir

    done = subprocess.run([sys.executable, "-m", "medhe.cli.main", "compile", "--model", "br35h", "--out",
                           str(tmp_path / "plan"), "--max-galois-keys", "12"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    full = compile_model(resolve_model_dir("br35h"), max_key_mb=None)
    assert (f"Galois key budget: 12 keys for {len(full.rotation_steps())} rotation steps; rotations per image "
            f"{full.rotation_count()} ->") in done.stdout
    assert len(Plan.load(tmp_path / "plan").galois_steps()) == 12
    refused = subprocess.run([sys.executable, "-m", "medhe.cli.main", "compile", "--model", "br35h", "--out",
                              str(tmp_path / "p0"), "--max-galois-keys", "0"], capture_output=True, text=True,
                             timeout=300)
    assert refused.returncode != 0 and "at least 1 key" in refused.stderr


def test_a_budget_that_would_multiply_the_rotations_is_refused() -> None:
    from medhe.compiler import compile_model
    from medhe.nn.io import resolve_model_dir

    with pytest.raises(PlanError, match="allow more keys"):
        compile_model(resolve_model_dir("br35h"), max_galois_keys=2)


@pytest.mark.parametrize("tampered", [[1.5], ["1"], [True], [0, 1], [1, 1], [9000], [2, 4]])
def test_a_stored_key_set_is_checked_before_use(tmp_path, tampered) -> None:
    import json

    from medhe.compiler import Plan, compile_model
    from medhe.nn.io import resolve_model_dir

    directory = compile_model(resolve_model_dir("br35h"), max_galois_keys=14).save(tmp_path / "plan")
    doc = json.loads((directory / "plan.json").read_text())
    doc["key_steps"] = tampered
    (directory / "plan.json").write_text(json.dumps(doc))
    with pytest.raises(PlanError, match="key_steps must|cannot be made"):  # not just the digest check
        Plan.load(directory)


def test_the_compile_table_rows_add_up_to_the_budgeted_total() -> None:
    from medhe.compiler import compile_model
    from medhe.nn.io import resolve_model_dir

    plan = compile_model(resolve_model_dir("br35h"), max_galois_keys=12)
    unbudgeted = compile_model(resolve_model_dir("br35h"), max_key_mb=None).rotation_count()
    assert sum(row["rotations"] for row in plan.report["layers"]) == plan.report["rotations"] > unbudgeted


def test_a_key_size_budget_picks_as_many_keys_as_fit():
    from medhe.compiler import compile_model
    from medhe.compiler.keyset import galois_keys_within, key_switching_key_bytes
    from medhe.errors import PlanError
    from medhe.nn.io import resolve_model_dir

    model_dir = resolve_model_dir("pneumoniamnist")
    full = compile_model(model_dir, max_key_mb=None)
    per_key = key_switching_key_bytes(full.params)
    assert full.report["eval_key_bytes_bound"] == (len(full.galois_steps()) + 1) * per_key
    # Room for the relinearization key and all but 5 rotation keys, plus half a key.
    budget_mb = (len(full.galois_steps()) - 4 + 0.5) * per_key / 2**20
    plan = compile_model(model_dir, max_key_mb=budget_mb)
    keys = len(plan.galois_steps())
    assert keys == galois_keys_within(full.params, budget_mb * 2**20) < len(full.galois_steps())
    assert plan.report["eval_key_bytes_bound"] <= budget_mb * 2**20 < (keys + 2) * per_key  # one more would not fit
    # A budget above the full set changes nothing; with both limits the tighter one wins.
    assert compile_model(model_dir, max_key_mb=10_000).digest() == full.digest()
    assert len(compile_model(model_dir, max_key_mb=budget_mb, max_galois_keys=12).galois_steps()) == 12
    with pytest.raises(PlanError, match="holds no Galois key"):
        compile_model(model_dir, max_key_mb=per_key / 2**20)


def test_instruction_levels_are_the_levels_the_executor_rotates_at() -> None:
    """Plan.instruction_levels (used to weight rotations by cost) follows the executor's deferred
    rescales: every rotation the clear backend sees happens at the level the plan predicts."""
    from medhe.compiler import compile_model
    from medhe.nn.io import resolve_model_dir
    from medhe.runtime.clear import ClearBackend
    from medhe.runtime.executor import Executor

    plan = compile_model(resolve_model_dir("pneumoniamnist"), max_key_mb=None)
    seen: list[int] = []
    original = ClearBackend.rotate

    def spy(self, a, steps):
        seen.append(a.level)
        return original(self, a, steps)

    backend = ClearBackend(plan.params)
    ClearBackend.rotate = spy
    try:
        Executor(plan, backend).run(backend.encrypt(np.zeros(plan.params.slot_count)))
    finally:
        ClearBackend.rotate = original
    levels = plan.instruction_levels()
    expected = [level for ins, level in zip(plan.instructions, levels) for _ in range(ins.rotations)]
    assert seen == expected
    assert levels[0] == plan.depth and min(levels) >= 0 and len(set(levels)) > 3


def test_a_cost_weighted_key_budget_spends_its_extra_rotations_at_cheap_levels() -> None:
    from medhe.nn.model import HECNN, ArchConfig
    from tests.helpers import compile_torch

    # A three-block network at 28x28 (the shipped PneumoniaMNIST architecture until 2026-11-30):
    # five levels, so the cost weights span 1..5.
    layers = HECNN(ArchConfig(image_size=28, conv_channels=(8, 8, 8))).eval().layers
    plan = compile_torch(layers, (1, 28, 28), max_galois_keys=27)
    full = compile_torch(layers, (1, 28, 28), max_key_mb=None)
    chains = plan.rotation_chains()

    def extra_cost(p, weighted_chains):
        return sum((level + 1) * (level + 2) * (p.key_rotations(ins, weighted_chains) - ins.rotations)
                   for ins, level in zip(p.instructions, p.instruction_levels()))

    weighted = full.rotation_usage(cost_weighted=True)
    plain = full.rotation_usage()
    assert set(weighted) == set(plain)
    # Step 1 is used by the first convolution and pooling (level 5), step 84 only by the last dense
    # layer (level 1): their weights are the key-switching cost of those levels.
    assert plain[1] == 2 and weighted[1] == 2 * full.key_switching_weight(5) == 86
    assert plain[84] == 1 and weighted[84] == full.key_switching_weight(1) == 7
    # Against the unweighted choice of the same size, the extra rotations cost less key switching.
    from medhe.compiler.keyset import choose_key_steps, rotation_chains

    unweighted_keys = choose_key_steps(plain, plan.params.slot_count, 27)
    unweighted_chains = rotation_chains(full.rotation_steps(), unweighted_keys, plan.params.slot_count)
    assert extra_cost(plan, chains) < extra_cost(full, unweighted_chains)


def test_by_default_the_keys_fit_150_mb_where_that_costs_little(monkeypatch, tmp_path) -> None:
    """Default: evaluation keys within 150 MB for both shipped models (one key per step fits now), a
    budget applied where it costs at most 25% more level-weighted key switching; where it would
    cost more, one key per step and a note."""
    import subprocess
    import sys

    from medhe.compiler import compile as compile_module
    from medhe.compiler import compile_model
    from medhe.nn.io import resolve_model_dir

    for name in ("pneumoniamnist", "br35h"):
        plan = compile_model(resolve_model_dir(name))
        full = compile_model(resolve_model_dir(name), max_key_mb=None)
        # The two-block models' keys fit with one key per step: nothing to trade.
        assert full.report["eval_key_bytes_bound"] <= 150 * 2**20
        assert plan.digest() == full.digest() and plan.report["key_switching_growth"] == 0
    # A default budget that costs little is applied ...
    monkeypatch.setattr(compile_module, "DEFAULT_MAX_KEY_MB", 90.0)
    for name in ("pneumoniamnist", "br35h"):
        plan = compile_model(resolve_model_dir(name))
        full = compile_model(resolve_model_dir(name), max_key_mb=None)
        assert plan.report["eval_key_bytes_bound"] <= 90 * 2**20 < full.report["eval_key_bytes_bound"]
        growth = plan.key_switching_cost() / full.key_switching_cost() - 1
        assert 0 < growth <= 0.25 and plan.report["key_switching_growth"] == pytest.approx(growth)
        assert plan.report["key_budget_note"] is None
    # A default that would cost too much is not applied (the compile report says why) ...
    monkeypatch.setattr(compile_module, "DEFAULT_MAX_KEY_MB", 40.0)
    fallback = compile_model(resolve_model_dir("br35h"))
    assert fallback.galois_steps() == fallback.rotation_steps() and fallback.key_steps == ()
    assert "more key switching" in fallback.report["key_budget_note"]
    # ... while the same budget asked for explicitly is kept.
    assert len(compile_model(resolve_model_dir("br35h"), max_key_mb=40.0).galois_steps()) < 10
    done = subprocess.run([sys.executable, "-m", "medhe.cli.main", "compile", "--model", "br35h", "--out",
                           str(tmp_path / "plan"), "--max-key-mb", "none"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"{len(full.rotation_steps())} rotation keys" in done.stdout and "Galois key budget" not in done.stdout
    bad = subprocess.run([sys.executable, "-m", "medhe.cli.main", "compile", "--model", "br35h", "--out",
                          str(tmp_path / "p2"), "--max-key-mb", "-3"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "positive size in MB" in bad.stderr
