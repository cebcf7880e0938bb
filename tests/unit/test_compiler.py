"""Compiler and lowering against torch on the clear backend (slot-exact, no HE library)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from torch import nn

from medhe.compiler import Plan
from medhe.compiler.ir import run_ops
from medhe.plan import Layout
from medhe.compiler.passes import (absorb_activation, absorb_pooling, fold_batchnorm, merge_linear,
                                   naive_levels, optimize, optimized_levels)
from medhe.errors import InsecureParametersError, PlanError, UnsupportedLayerError
from medhe.nn.layers import PolyAct
from medhe.nn.model import HECNN, ArchConfig
from medhe.params import CKKSParams, choose_params
from medhe.runtime.clear import ClearBackend
from tests.helpers import compile_torch, randomize_bn, run_plan, torch_out, trace_torch

EXACT = 1e-9


def clear_run(plan, x, trace=None):
    backend = ClearBackend(plan.params)
    return run_plan(plan, backend, backend, x, trace)


CONV_GRID = list(itertools.product((6, 8, 11), (1, 3, 5), (1, 2), (0, 1, 2), ((1, 3), (2, 4))))


@pytest.mark.parametrize("size,kernel,stride,padding,channels", CONV_GRID)
def test_conv_lowering_matches_torch(size, kernel, stride, padding, channels):
    if kernel > size + 2 * padding:
        pytest.skip("kernel larger than the padded input")
    c_in, c_out = channels
    seq = nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding)).double()
    x = np.random.randn(c_in, size, size)
    plan = compile_torch(seq, (c_in, size, size))
    np.testing.assert_allclose(clear_run(plan, x), torch_out(seq, x), atol=EXACT)


@pytest.mark.parametrize("size,kernel", [(8, 2), (12, 2), (9, 3), (12, 3)])
def test_avgpool_after_conv_is_absorbed_and_exact(size, kernel):
    seq = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.AvgPool2d(kernel)).double()
    x = np.random.randn(2, size, size)
    plan = compile_torch(seq, (2, size, size))
    assert plan.depth == 1, "the pool must cost no level"
    np.testing.assert_allclose(clear_run(plan, x), torch_out(seq, x), atol=EXACT)


@pytest.mark.parametrize("features,outputs", [(8, 2), (16, 5), (32, 16)])
def test_dense_lowering_matches_torch(features, outputs):
    side = int(np.sqrt(features)) if int(np.sqrt(features)) ** 2 == features else None
    shape = (1, side, side) if side else (2, 4, features // 8)
    seq = nn.Sequential(nn.Flatten(), nn.Linear(features, outputs)).double()
    x = np.random.randn(*shape)
    plan = compile_torch(seq, shape)
    np.testing.assert_allclose(clear_run(plan, x), torch_out(seq, x), atol=EXACT)


def test_activation_costs_one_level_and_matches():
    seq = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), PolyAct(), nn.Flatten(),
                        nn.Linear(4 * 36, 3)).double()
    randomize_bn(seq)
    with torch.no_grad():
        seq[2].coef.copy_(torch.tensor([0.3, -0.4, 0.1]))
    x = np.random.randn(1, 6, 6)
    plan = compile_torch(seq, (1, 6, 6))
    # conv, square, dense: BN and the polynomial's a, b, c cost nothing; the square shares the
    # dense layer's prime, so 3 multiplications take 2 rescales.
    assert plan.multiplicative_depth == 3 and plan.depth == 2
    # Inputs sit 15 bits above the base scale (against rotation noise) and the first prime 15 bits
    # above that (the first layer's weights are encoded at 2^(scale+15)), at most 60 bits.
    first = min(60, plan.params.input_scale_bits + 15)
    assert plan.params.coeff_modulus_bits[1:-1] == (2 * plan.params.log_scale_bits, first)
    assert plan.params.input_scale_bits == plan.params.log_scale_bits + 15
    np.testing.assert_allclose(clear_run(plan, x), torch_out(seq, x), atol=EXACT)


@pytest.mark.parametrize("a", [-1e-4, 0.02])
def test_a_near_linear_polynomial_is_refused_not_miscompiled(a):
    # a=-1e-4 came out of one training run: completing the square shifted by ~3500 and the
    # encrypted logits were unrelated to the plaintext ones, though the clear backend agreed.
    seq = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), PolyAct(), nn.Flatten(), nn.Linear(2 * 36, 2)).double()
    with torch.no_grad():
        seq[1].coef.copy_(torch.tensor([a, 0.7, 0.1]))
    with pytest.raises(PlanError, match=r"shifts its input by b/2a=.*retrain with a curvature floor"):
        compile_torch(seq, (1, 6, 6))
    with torch.no_grad():
        seq[1].coef[0] = PolyAct.MIN_CURVATURE  # the floor training keeps: 0.7 / 0.1 = 7, accepted
    x = np.random.randn(1, 6, 6)
    np.testing.assert_allclose(clear_run(compile_torch(seq, (1, 6, 6)), x), torch_out(seq, x), atol=EXACT)


def test_training_keeps_the_curvature_at_its_floor():
    from medhe.nn.layers import project_curvature

    model = HECNN(ArchConfig(conv_channels=(8, 8, 8)))  # four activations
    polys = [m for m in model.modules() if isinstance(m, PolyAct)]
    with torch.no_grad():
        for module, (a, b) in zip(polys, [(-0.3, 0.6), (0.0, 0.6), (0.01, 3.2), (0.4, 0.6)]):
            module.coef[0], module.coef[1] = a, b
    project_curvature(model)
    # a >= 0.05, and for b = 3.2 a >= 3.2 / 32 = 0.1 so that b / 2a stays within the compiler's 16.
    coefs = [m.coef.detach() for m in polys]
    assert [float(c[0]) for c in coefs] == pytest.approx([PolyAct.MIN_CURVATURE] * 2 + [0.1, 0.4])
    assert all(abs(float(c[1]) / (2 * float(c[0]))) <= PolyAct.MAX_SQUARE_SHIFT for c in coefs)
    from medhe.compiler import passes

    # The compiler's bound and the floor its message names are training's.
    assert (passes.MIN_CURVATURE, passes.MAX_SQUARE_SHIFT) == (PolyAct.MIN_CURVATURE, PolyAct.MAX_SQUARE_SHIFT)


def _default_model(image_size: int, **arch) -> nn.Module:
    model = HECNN(ArchConfig(image_size=image_size, **arch)).double()
    randomize_bn(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, PolyAct):
                m.coef.add_(torch.randn(3) * 0.05)
    return model


@pytest.mark.parametrize("image_size", [28, 32])
def test_each_pass_preserves_the_function(image_size):
    model = _default_model(image_size)
    ops = trace_torch(model.layers, (1, image_size, image_size))
    x = np.random.randn(3, 1, image_size, image_size)
    with torch.no_grad():
        reference = model(torch.tensor(x)).numpy()
    np.testing.assert_allclose(run_ops(ops, x), reference, atol=1e-9)
    for step in (fold_batchnorm, absorb_pooling, absorb_activation, merge_linear):
        ops = step(ops)
        np.testing.assert_allclose(run_ops(ops, x), reference, atol=1e-9, err_msg=step.__name__)
    assert [o.kind for o in ops].count("batchnorm") == 0
    assert [o.kind for o in ops].count("poly") == 0


@pytest.mark.parametrize("image_size", [28, 32])
def test_default_model_end_to_end_and_per_layer_on_clear_backend(image_size):
    model = _default_model(image_size)
    plan = compile_torch(model.layers, (1, image_size, image_size))
    assert plan.report["levels_before"] == 15 and plan.report["levels_after"] == 7
    assert plan.report["rescales"] == 4 and plan.params.coeff_modulus_bits == (46, 60, 60, 60, 60, 60)
    assert plan.params.poly_modulus_degree == 16384 and plan.params.security_bits == 128
    _check_end_to_end_and_per_layer(model, plan, image_size)


def _check_end_to_end_and_per_layer(model, plan, image_size: int) -> None:
    x = np.random.randn(1, image_size, image_size)
    trace = []
    logits = clear_run(plan, x, trace)
    np.testing.assert_allclose(logits, torch_out(model.layers, x), atol=EXACT)
    # Per layer: every op's output, read from the slots of its layout, equals the optimised IR.
    ops = optimize(trace_torch(model.layers, (1, image_size, image_size)))
    _, intermediates = run_ops(ops, x[None], collect=True)
    n = plan.params.slot_count
    checkpoints = plan.report["checkpoints"]
    assert len(checkpoints) == len(ops) - 1  # every op but flatten
    for point in checkpoints:
        slots = Layout.from_dict(point["layout"]).slots(n)
        np.testing.assert_allclose(trace[point["instruction"]].values[slots],
                                   intermediates[point["op"]][0].reshape(-1), atol=EXACT,
                                   err_msg=ops[point["op"]].name)


@pytest.mark.parametrize("image_size,arch,rescales,max_dense_rotations", [
    (28, {}, 4, 20),  # 7x7 maps: the dense layer's outputs go in 4 groups of 4 copies
    (32, {}, 4, 20),
    (28, {"pool_sizes": (4, 2)}, 4, 12),
    (28, {"conv_channels": (8, 8, 8)}, 5, 16),
    (32, {"conv_channels": (8, 8, 8)}, 5, 16),
    (28, {"hidden_units": 10}, 4, 20),  # groups of 4: the last one partial
    (28, {"conv_channels": (8, 8, 8), "hidden_units": 0}, 4, 30),  # the only dense layer is the last: diagonals
    (64, {"conv_channels": (4, 4)}, 4, 20),  # 4 maps of 64x64 fill N=32768's 16384 slots
])
def test_other_architectures_end_to_end_on_clear_backend(image_size, arch, rescales, max_dense_rotations):
    model = _default_model(image_size, **arch)
    plan = compile_torch(model.layers, (1, image_size, image_size))
    assert plan.depth == rescales and plan.params.coeff_modulus_bits == (46,) + (60,) * (rescales + 1)
    first_dense = next(row for row in plan.report["layers"] if row["op"].startswith("dense"))
    # Replicate-multiply-reduce, not the diagonal method's ~100+ rotations.
    assert first_dense["rotations"] <= max_dense_rotations, first_dense
    _check_end_to_end_and_per_layer(model, plan, image_size)


def test_chained_dense_layers_after_grouped_outputs_on_clear_backend():
    """The first dense layer's 10 outputs go in groups of 4, so its output layout has padding (12
    positions for 10 values); the next dense layer's reduce sums over that window and must not take
    in another output's products there (it once did, silently)."""
    from types import SimpleNamespace

    seq = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.AvgPool2d(2), nn.BatchNorm2d(8), PolyAct(),
                        nn.Conv2d(8, 8, 3, padding=1), nn.AvgPool2d(2), nn.BatchNorm2d(8), PolyAct(),
                        nn.Flatten(), nn.Linear(392, 10), PolyAct(), nn.Linear(10, 10), PolyAct(),
                        nn.Linear(10, 2)).double()
    randomize_bn(seq)
    plan = compile_torch(seq, (1, 28, 28))
    _check_end_to_end_and_per_layer(SimpleNamespace(layers=seq), plan, 28)


def test_merge_linear_merges_consecutive_linear_layers():
    seq = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1), PolyAct(),
                        nn.Flatten(), nn.Linear(2 * 64, 8), nn.Linear(8, 3)).double()
    x = np.random.randn(1, 8, 8)
    ops = trace_torch(seq, (1, 8, 8))
    merged = optimize(ops)
    assert [o.kind for o in merged] == ["linear_map", "square", "linear_map"]
    assert naive_levels(ops) == 6 and optimized_levels(merged) == 3
    plan = compile_torch(seq, (1, 8, 8))
    np.testing.assert_allclose(clear_run(plan, x), torch_out(seq, x), atol=EXACT)


def test_unsupported_layer_lists_supported_ones():
    with pytest.raises(UnsupportedLayerError, match="Conv2d.*Linear"):
        trace_torch(nn.Sequential(nn.MaxPool2d(2)), (1, 4, 4))
    relu_model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    with pytest.raises(UnsupportedLayerError, match="supported layer types"):
        trace_torch(relu_model, (1, 6, 6))


def test_parameters_refuse_weak_security_without_opt_in():
    with pytest.raises(InsecureParametersError, match="128-bit"):
        CKKSParams(8192, (60, 40, 40, 40, 60), 40)
    assert CKKSParams(8192, (60, 40, 40, 40, 60), 40, insecure_for_tests=True).security_bits == 0
    with pytest.raises(InsecureParametersError, match="levels"):
        choose_params(40, 8192)
    with pytest.raises(PlanError, match=r"needs 4 rescales \(7 multiplications\)"):
        model = _default_model(28)
        compile_torch(model.layers, (1, 28, 28), params=CKKSParams(16384, (60, 40, 40, 40, 60), 40))


def test_chosen_parameters_fit_the_128_bit_bound():
    for depth in range(1, 11):
        p = choose_params(depth, 4096)
        assert p.levels == depth and p.total_bits <= {8192: 218, 16384: 438, 32768: 881}[p.poly_modulus_degree]


def test_plan_round_trip_and_tamper_detection(tmp_path):
    model = _default_model(28)
    plan = compile_torch(model.layers, (1, 28, 28))
    plan.save(tmp_path / "plan")
    loaded = Plan.load(tmp_path / "plan")
    assert loaded.digest() == plan.digest()
    x = np.random.randn(1, 28, 28)
    np.testing.assert_allclose(clear_run(loaded, x), clear_run(plan, x), atol=0)
    doc = json.loads((tmp_path / "plan" / "plan.json").read_text())
    doc["instructions"][1]["stages"][0][1] += 1
    (tmp_path / "plan" / "plan.json").write_text(json.dumps(doc))
    with pytest.raises(PlanError, match="digest"):
        Plan.load(tmp_path / "plan")


def test_rotation_keys_limited_to_plan_steps():
    model = _default_model(28)
    plan = compile_torch(model.layers, (1, 28, 28))
    used = set()
    for ins in plan.instructions:
        used |= ins.steps
    assert set(plan.rotation_steps()) == used
    assert len(used) < 64, "one Galois key per used step, not a full power-of-two set"


@pytest.mark.parametrize("image_size", [28, 32])
def test_client_sees_only_the_logits(image_size):
    """The last layer's diagonals vanish outside the output slots: the decrypted vector holds the
    logits and zeros, not partial sums of the weights."""
    from medhe.runtime.executor import Executor
    from tests.helpers import pack

    model = _default_model(image_size)
    plan = compile_torch(model.layers, (1, image_size, image_size))
    backend = ClearBackend(plan.params)
    x = np.random.randn(1, image_size, image_size)
    values = backend.decrypt(Executor(plan, backend).run(backend.encrypt(pack(plan, x))))
    outputs = plan.output_layout.slots(plan.params.slot_count)
    others = np.delete(values, outputs)
    assert np.abs(others).max() == 0.0
    np.testing.assert_allclose(values[outputs], torch_out(model.layers, x), atol=EXACT)
