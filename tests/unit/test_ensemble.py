"""Ensemble plans on the clear backend: several models of one architecture joined into one plan
(`branch` instructions between the members) whose logits are the members' mean, in plain-weight
and encrypted-model mode, with one key set; members that disagree are refused by name."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from medhe.compiler import join_plans
from medhe.errors import ConfigError, PlanError
from medhe.nn.layers import PolyAct
from medhe.plan import Branch, Plan
from medhe.protocol.owner import ModelOwner
from medhe.runtime.clear import ClearBackend
from medhe.runtime.executor import Executor
from tests.helpers import (client_and_both_servers, compile_torch, pack, randomize_bn, run_plan, torch_out,
                           two_block_model)

SHAPE = (1, 16, 16)
EXACT = 1e-9


@pytest.fixture
def members():
    torch.manual_seed(0)
    return [two_block_model() for _ in range(3)]


def _plans(members):
    return [compile_torch(seq, SHAPE) for seq in members]


def _run(plan, x, backend=None, trace=None):
    backend = backend or ClearBackend(plan.params)
    return run_plan(plan, backend, backend, x, trace=trace)  # the clear backend is both sides


@pytest.mark.parametrize("count", [2, 3])
def test_ensemble_logits_are_the_members_mean(members, count):
    members = members[:count]
    plans = _plans(members)
    ensemble = join_plans(plans)
    assert ensemble.members == count and ensemble.depth == plans[0].depth
    assert ensemble.multiplicative_depth == plans[0].multiplicative_depth
    assert ensemble.galois_steps() == plans[0].galois_steps()  # one key set serves every member
    for _ in range(3):
        x = np.random.randn(*SHAPE)
        each = [torch_out(seq, x) for seq in members]
        logits = _run(ensemble, x)
        np.testing.assert_allclose(logits, np.mean(each, axis=0), atol=EXACT)
        assert not np.allclose(each[0], each[1], atol=1e-3)  # the members really differ


def test_first_member_checkpoints_still_match_its_layers(members):
    from medhe.compiler.ir import run_ops
    from medhe.compiler.passes import optimize
    from medhe.plan import Layout
    from tests.helpers import trace_torch

    ensemble = join_plans(_plans(members[:2]))
    x = np.random.randn(*SHAPE)
    trace = []
    _run(ensemble, x, trace=trace)
    _, intermediates = run_ops(optimize(trace_torch(members[0], SHAPE)), x[None], collect=True)
    n = ensemble.params.slot_count
    for point in ensemble.report["checkpoints"]:
        got = trace[point["instruction"]].values[Layout.from_dict(point["layout"]).slots(n)]
        np.testing.assert_allclose(got, intermediates[point["op"]][0].reshape(-1), atol=EXACT)


def test_the_input_rotations_are_made_once_and_counted_so(members):
    plans = _plans(members[:2])
    ensemble = join_plans(plans)
    reused = ensemble.reused_input_rotations()
    assert reused and all(ensemble.instructions[index - 1].kind == Branch.kind for index, _ in reused)
    assert ensemble.rotation_count() == 2 * plans[0].rotation_count() - len(reused)
    backend = ClearBackend(ensemble.params)  # counts its rotations
    _run(ensemble, np.random.randn(*SHAPE), backend=backend)
    assert backend.rotations == ensemble.rotation_count()
    assert ensemble.report["rotations"] == ensemble.rotation_count()
    assert ensemble.key_switching_cost() < 2 * plans[0].key_switching_cost()


def test_ensemble_round_trip_and_member_tampering(members, tmp_path):
    ensemble = join_plans(_plans(members[:2]))
    ensemble.save(tmp_path / "plan")
    loaded = Plan.load(tmp_path / "plan")
    assert loaded.digest() == ensemble.digest() and loaded.members == 2
    x = np.random.randn(*SHAPE)
    np.testing.assert_allclose(_run(loaded, x), _run(ensemble, x), atol=EXACT)
    # A plan whose members would rescale differently cannot be built or loaded.
    broken = list(ensemble.instructions)
    first_square = next(i for i, ins in enumerate(broken) if i > broken.index(next(
        ins for ins in broken if ins.kind == Branch.kind)) and ins.kind == "square")
    del broken[first_square]
    with pytest.raises(PlanError, match="member 2 rescales differently"):
        Plan(ensemble.params, ensemble.input_shape, ensemble.input_layout, ensemble.output_layout, broken,
             ensemble.class_names, ensemble.preprocessing, "x").depth
    doc = json.loads((tmp_path / "plan" / "plan.json").read_text())
    del doc["instructions"][first_square]
    (tmp_path / "plan" / "plan.json").write_text(json.dumps(doc))
    with pytest.raises(PlanError, match="member 2 rescales differently"):
        Plan.load(tmp_path / "plan", weights=False)


def test_a_key_budget_is_chosen_for_the_joined_plan(members):
    """With fewer Galois keys than steps, some rotations are made of several key rotations: the
    plan counts them (shared input rotations once) as the backend makes them, and the result holds."""
    plans = _plans(members[:2])
    ensemble = join_plans(plans, max_galois_keys=10)
    assert len(ensemble.galois_steps()) == 10 < len(ensemble.rotation_steps())
    assert ensemble.report["rotation_keys"] == 10 and ensemble.report["rotations"] == ensemble.rotation_count()
    assert ensemble.rotation_count() > join_plans(plans, max_key_mb=None).rotation_count()
    backend = ClearBackend(ensemble.params)
    x = np.random.randn(*SHAPE)
    logits = _run(ensemble, x, backend=backend)
    assert backend.rotations == ensemble.rotation_count()
    np.testing.assert_allclose(logits, np.mean([torch_out(m, x) for m in members[:2]], axis=0), atol=EXACT)


def test_per_layer_timings_keep_the_members_apart(members):
    ensemble = join_plans(_plans(members[:2]))
    backend, timings = ClearBackend(ensemble.params), {}
    Executor(ensemble, backend).run(backend.encrypt(pack(ensemble, np.random.randn(*SHAPE))), timings=timings)
    layers = [ins.layer for ins in ensemble.instructions if ins.kind != Branch.kind]
    assert len(set(layers)) * 2 >= len(layers) and any(name.startswith("member 2 ") for name in timings)


def _one_block_shallower() -> nn.Sequential:
    """The two-block model without its hidden activation: one rescale less."""
    seq = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.AvgPool2d(2), nn.BatchNorm2d(4), PolyAct(),
                        nn.Conv2d(4, 4, 3, padding=1), nn.AvgPool2d(2), nn.BatchNorm2d(4), PolyAct(),
                        nn.Flatten(), nn.Linear(4 * 16, 2)).double()
    return randomize_bn(seq)


def test_members_that_disagree_are_refused_by_name(members):
    first = compile_torch(members[0], SHAPE)
    with pytest.raises(PlanError, match="b cannot join an ensemble with a: their .*rescales"):
        join_plans([first, compile_torch(_one_block_shallower(), SHAPE, params=first.params)], ["a", "b"])
    shifted = compile_torch(members[1], SHAPE, preprocessing={"image_size": 16, "mean": 0.5, "std": 1.0})
    with pytest.raises(PlanError, match="b cannot join an ensemble with a: their preprocessing differ"):
        join_plans([first, shifted], ["a", "b"])
    with pytest.raises(ConfigError, match="at least two"):
        join_plans([first])
    with pytest.raises(ConfigError, match="single models"):
        join_plans([join_plans([first, first]), first])


def test_members_whose_fitted_numbers_differ_in_the_last_bits_join(tmp_path):
    """A member retrained on another CPU has the same preprocessing but for the last bits of its
    fitted numbers (training mean, input-check profile): it joins, in `medhe ensemble` and in the
    compiler; a real difference is refused, naming the field."""
    import json

    from medhe.compiler import compile_model
    from medhe.errors import ModelFormatError
    from medhe.nn.io import save_ensemble

    def with_preprocessing(directory, **changes):
        doc = json.loads((directory / "model.json").read_text())
        doc["preprocessing"].update(changes)
        (directory / "model.json").write_text(json.dumps(doc))
        return directory

    # mean[2]: zero but for round-off, as the mean of standardised pixels is
    profile = {"mean": [0.25, 1.5, -1.19e-9], "precision": [[2.0, 0.1], [0.1, 3.0]], "threshold": 70.8}
    first = with_preprocessing(_model_dir(tmp_path / "a", 0), input_profile=profile)
    nudged = {"mean": [0.25 * (1 + 1e-12), 1.5, -1.3e-9], "precision": [[2.0, 0.1 + 1e-10], [0.1, 3.0]],
              "threshold": 70.8}
    other_cpu = with_preprocessing(_model_dir(tmp_path / "b", 1), mean=0.4 * (1 + 1e-9), input_profile=nudged)
    plan = compile_model(save_ensemble(tmp_path / "joined", [first, other_cpu]))
    assert plan.members == 2 and plan.preprocessing["mean"] == 0.4  # the first member's
    moved = with_preprocessing(_model_dir(tmp_path / "c", 1), mean=0.5, input_profile=profile)
    with pytest.raises(ModelFormatError, match=r"their preprocessing\.mean \(0\.4 vs 0\.5\) differ"):
        save_ensemble(tmp_path / "refused", [first, moved])
    cropped = with_preprocessing(_model_dir(tmp_path / "d", 1), crop="foreground_square", input_profile=profile)
    with pytest.raises(ModelFormatError, match=r"preprocessing\.crop"):
        save_ensemble(tmp_path / "refused2", [first, cropped])


def test_members_may_differ_inside(members):
    """A wider hidden layer keeps the input, output slots and levels: such members join, and the
    key set covers both members' rotations."""
    wide = nn.Sequential(*list(members[1])[:9], nn.Linear(4 * 16, 16), nn.BatchNorm1d(16), PolyAct(),
                         nn.Linear(16, 2)).double()
    wide = randomize_bn(wide)
    plans = [compile_torch(members[0], SHAPE), compile_torch(wide, SHAPE)]
    ensemble = join_plans(plans, max_key_mb=None)
    assert ensemble.galois_steps() == sorted(set(plans[0].rotation_steps()) | set(plans[1].rotation_steps()))
    x = np.random.randn(*SHAPE)
    np.testing.assert_allclose(_run(ensemble, x), (torch_out(members[0], x) + torch_out(wide, x)) / 2, atol=EXACT)


def test_ensemble_served_with_plain_and_encrypted_weights(members):
    """The protocol needs nothing new: one client spec, one key set, the owner encrypts every
    member's operands at the level and scale the server meets them."""
    client, plain, encrypted = client_and_both_servers(join_plans(_plans(members[:2])), "clear")
    for _ in range(2):
        x = np.random.randn(*SHAPE)
        expected = np.mean([torch_out(seq, x) for seq in members[:2]], axis=0)
        message = client.encrypt_input(x)
        np.testing.assert_allclose(client.decrypt_logits(plain.evaluate(message)), expected, atol=EXACT)
        np.testing.assert_allclose(client.decrypt_logits(encrypted.evaluate(message)), expected, atol=EXACT)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="two-process evaluation forks")
def test_ensemble_on_two_processes_gives_the_one_process_result():
    from medhe.runtime.split import TwoProcessExecutor

    torch.manual_seed(1)
    # 8 -> 8 convolutions: enough baby steps for the two processes to share them.
    members = [randomize_bn(nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.AvgPool2d(2), nn.BatchNorm2d(8), PolyAct(),
        nn.Conv2d(8, 8, 3, padding=1), nn.AvgPool2d(2), nn.BatchNorm2d(8), PolyAct(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 2)).double()) for _ in range(2)]
    ensemble = join_plans(_plans(members))
    serial, parent = ClearBackend(ensemble.params), ClearBackend(ensemble.params)
    two = TwoProcessExecutor(Executor(ensemble, parent))
    try:
        assert two.shares_work
        for _ in range(2):
            x = np.random.randn(*SHAPE)
            ct = serial.encrypt(pack(ensemble, x))
            serial.rotations = parent.rotations = 0
            expected = Executor(ensemble, serial).run(ct)
            got = two.run(ct)
            slots = ensemble.output_layout.slots(ensemble.params.slot_count)
            np.testing.assert_allclose(parent.decrypt(got)[slots], serial.decrypt(expected)[slots], atol=EXACT)
            np.testing.assert_allclose(parent.decrypt(got)[slots], np.mean([torch_out(m, x) for m in members], axis=0),
                                       atol=1e-6)
            assert parent.rotations < serial.rotations
    finally:
        two.close()


# --------------------------------------------------------------------- ensemble directories


def _model_dir(path, seed: int, *, image_size: int = 16, class_names=("normal", "disease"), dataset="toy"):
    from medhe.data.preprocess import Preprocessing
    from medhe.nn.io import ModelCard, save_model
    from medhe.nn.model import HECNN, ArchConfig

    torch.manual_seed(seed)
    arch = ArchConfig(image_size=image_size)
    model = randomize_bn(HECNN(arch))
    card = ModelCard(arch=arch, preprocessing=Preprocessing(image_size=image_size, mean=0.4, std=0.2),
                     class_names=list(class_names), dataset={"name": dataset})
    return save_model(path, model, card)


def test_an_ensemble_directory_is_a_model_everywhere(tmp_path):
    from medhe.compiler import compile_model
    from medhe.nn.io import load_model, save_ensemble
    from medhe.nn.modeldir import ensemble_members, resolve_model_dir

    members = [_model_dir(tmp_path / f"seed{seed}", seed) for seed in (0, 1)]
    out = save_ensemble(tmp_path / "ensemble", members)
    assert resolve_model_dir(out) == out and ensemble_members(out) == [out / "member-1", out / "member-2"]
    model, card = load_model(out)
    singles = [load_model(m)[0] for m in members]
    x = torch.rand(4, 1, 16, 16)
    with torch.no_grad():
        expected = (singles[0](x) + singles[1](x)) / 2
        torch.testing.assert_close(model(x), expected)
        assert not torch.allclose(singles[0](x), singles[1](x))
    assert card.class_names == ["normal", "disease"] and card.metrics["members"] == [str(out / "member-1"),
                                                                                     str(out / "member-2")]
    plan = compile_model(out)
    assert plan.members == 2
    inputs = np.random.rand(3, 1, 16, 16)
    with torch.no_grad():
        oracle = model(torch.from_numpy(inputs).float()).double().numpy()
    for x, want in zip(inputs, oracle):
        np.testing.assert_allclose(_run(plan, x), want, atol=1e-5)  # float32 torch against float64 slots


def test_ensemble_directories_refuse_what_does_not_fit(tmp_path):
    from medhe.compiler.batch import compile_batch
    from medhe.errors import ModelFormatError
    from medhe.nn.io import save_ensemble
    from medhe.nn.modeldir import ensemble_members, read_model_json

    first = _model_dir(tmp_path / "a", 0)
    with pytest.raises(ModelFormatError, match=r"their class_names\[0\] \(.normal. vs .x.\) differ"):
        save_ensemble(tmp_path / "e1", [first, _model_dir(tmp_path / "b", 1, class_names=("x", "y"))])
    with pytest.raises(ModelFormatError, match=r"their dataset\.name \(.toy. vs .other.\) differ"):
        save_ensemble(tmp_path / "e2", [first, _model_dir(tmp_path / "c", 1, dataset="other")])
    with pytest.raises(ModelFormatError, match="at least two"):
        save_ensemble(tmp_path / "e3", [first])
    out = save_ensemble(tmp_path / "e4", [first, _model_dir(tmp_path / "d", 1)])
    with pytest.raises(ModelFormatError, match="not an empty directory"):
        save_ensemble(out, [first, first])
    with pytest.raises(ModelFormatError, match="is an ensemble .* change each member directory"):
        read_model_json(out)
    with pytest.raises(ModelFormatError, match="is an ensemble"):
        save_ensemble(tmp_path / "e5", [out, first])  # no ensembles of ensembles
    with pytest.raises(ConfigError, match="throughput mode compiles one model"):
        compile_batch(out)
    # A hand-written ensemble is checked like one `medhe ensemble` writes.
    shutil.copytree(tmp_path / "b", out / "member-3")
    (out / "ensemble.json").write_text(
        '{"format": "medhe-ensemble", "format_version": 1, "members": ["member-1", "member-3"]}')
    with pytest.raises(ModelFormatError, match=r"their class_names\[0\] \(.normal. vs .x.\) differ"):
        ensemble_members(out)
    (out / "linked").symlink_to(tmp_path / "d")
    (out / "ensemble.json").write_text(
        '{"format": "medhe-ensemble", "format_version": 1, "members": ["member-1", "linked"]}')
    with pytest.raises(ModelFormatError, match="symbolic link"):
        ensemble_members(out)
    # A hand-edited ensemble.json cannot point outside its directory.
    (out / "ensemble.json").write_text('{"format": "medhe-ensemble", "format_version": 1, "members": ["../a", "member-2"]}')
    with pytest.raises(ModelFormatError, match="subdirectory names"):
        ensemble_members(out)


def test_cli_ensemble_evaluate_and_compile(tmp_path, capsys):
    from medhe.cli.main import main
    from medhe.nn.io import load_model
    from medhe.train.evaluate import evaluate_plaintext

    members = [str(_model_dir(tmp_path / f"seed{seed}", seed)) for seed in (0, 1)]
    assert main(["ensemble", "--model", *members, "--out", str(tmp_path / "e")]) == 0
    assert "ensemble of 2 models" in capsys.readouterr().out
    assert main(["compile", "--model", str(tmp_path / "e"), "--out", str(tmp_path / "plan")]) == 0
    assert "ensemble of 2 models" in capsys.readouterr().out
    assert main(["compile", "--model", *members, "--out", str(tmp_path / "plan2")]) == 0
    assert Plan.load(tmp_path / "plan").digest() == Plan.load(tmp_path / "plan2").digest()
    assert main(["compile", "--model", *members, "--throughput", "--out", str(tmp_path / "plan3")]) == 2
    assert "compiles one model" in capsys.readouterr().err
    images, labels = np.random.rand(6, 16, 16).astype(np.float32), np.array([0, 1] * 3)
    report = evaluate_plaintext(tmp_path / "e", images, labels)
    model, card = load_model(tmp_path / "e")
    with torch.no_grad():
        logits = model(torch.from_numpy(card.preprocessing.apply_batch(images))).double().numpy()
    want = np.exp(logits[:, 1]) / np.exp(logits).sum(axis=1)
    np.testing.assert_allclose(report["per_image"]["prob_positive"], want, atol=1e-6)


def test_a_shipped_ensemble_over_http_with_an_encrypted_model(tmp_path):
    """`medhe serve --model br35h-ensemble` hosts it like any model: the clinic gets the spec,
    the owner uploads the encrypted members, the diagnosis is the members' mean."""
    from fastapi.testclient import TestClient

    from medhe.compiler import compile_model
    from medhe.nn.io import load_model, resolve_model_dir
    from medhe.protocol.remote import RemoteClient
    from medhe.service.app import create_app
    from medhe.service.hosting import host_plan

    model_dir = resolve_model_dir("br35h-ensemble")
    plan = compile_model(model_dir)
    hosted = host_plan(tmp_path / "srv", "br35h-ensemble", plan, backend="clear", encrypted_model=True)
    http = RemoteClient("http://testserver", key_home=tmp_path / "clinic", backend="clear",
                        transport=TestClient(create_app([hosted], data_dir=tmp_path / "srv"))._transport)
    client = http.client("br35h-ensemble")
    http.register_encrypted_model(ModelOwner(backend="clear").encrypt_model(plan, client.public_key()))
    model, _ = load_model(model_dir)
    image = np.random.rand(40, 48)
    with torch.no_grad():
        expected = model(torch.from_numpy(client.preprocess(image)[None])).double().numpy()[0]
    np.testing.assert_allclose(http.diagnose(image, "br35h-ensemble").logits, expected, atol=1e-5)
