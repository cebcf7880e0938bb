"""Throughput mode streams features through the network (clear backend): the result equals
layer-by-layer evaluation, only a band of each feature map is open at once, and a batch message
is read one ciphertext at a time from bytes or a file with every check still made."""

from __future__ import annotations

import numpy as np
import pytest
from torch import nn

from medhe.compiler.batch import batch_steps
from medhe.compiler.passes import optimize
from medhe.errors import InvalidMessage, PlanError
from medhe.nn.layers import PolyAct
from medhe.params import choose_params
from medhe.plan import BatchPlan, rescale_factors
from medhe.protocol import wire
from medhe.protocol.client import Client
from medhe.protocol.server import Server
from medhe.runtime.batch_executor import BatchExecutor
from medhe.runtime.clear import ClearBackend
from tests.helpers import randomize_bn, torch_out, trace_torch

SIZE_PX = 16


@pytest.fixture(scope="module")
def model_and_plan():
    seq = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.AvgPool2d(2), nn.BatchNorm2d(4), PolyAct(),
                        nn.Conv2d(4, 4, 3, padding=1), nn.AvgPool2d(2), nn.BatchNorm2d(4), PolyAct(),
                        nn.Flatten(), nn.Linear(4 * 16, 6), nn.BatchNorm1d(6), PolyAct(), nn.Linear(6, 2)).double()
    randomize_bn(seq)
    seq.eval()
    steps = batch_steps(optimize(trace_torch(seq, (1, SIZE_PX, SIZE_PX))))
    plan = BatchPlan(choose_params(rescale_factors([s.kind for s in steps]), 1), (1, SIZE_PX, SIZE_PX), steps,
                     ["a", "b"], {"image_size": SIZE_PX, "mean": 0.0, "std": 1.0}, "test")
    return seq, plan


def _layer_by_layer(plan: BatchPlan, features: np.ndarray) -> np.ndarray:
    """The plan evaluated a whole layer at a time in float64: (features, batch) -> (classes, batch)."""
    x = features
    for step in plan.steps:
        x = x * x if step.kind == "square" else step.matrix @ x + step.bias[:, None]
    return x


def test_streaming_equals_layer_by_layer_with_a_band_of_features_open(model_and_plan):
    seq, plan = model_and_plan
    backend = ClearBackend(plan.params)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((50, 1, SIZE_PX, SIZE_PX))
    features = np.zeros((SIZE_PX * SIZE_PX, plan.batch_size))
    features[:, :50] = images.reshape(50, -1).T
    executor = BatchExecutor(plan, backend)
    outputs = executor.run(backend.encrypt(row) for row in features)  # a generator: consumed one at a time
    logits = np.stack([backend.decrypt(ct)[:50] for ct in outputs], axis=1)
    np.testing.assert_allclose(logits, _layer_by_layer(plan, features)[:, :50].T, rtol=0, atol=1e-9)
    np.testing.assert_allclose(logits, np.stack([torch_out(seq, image) for image in images]), atol=1e-8)
    # The first sum has 4 x 8 x 8 outputs: a layer-by-layer run holds all of them (and then their
    # squares); streaming holds only those whose receptive field the sweep is crossing.
    first_layer_outputs = plan.steps[0].matrix.shape[0]
    assert executor.peak_open_ciphertexts <= first_layer_outputs // 2, executor.peak_open_ciphertexts


def test_the_wrong_number_of_inputs_is_refused(model_and_plan):
    _, plan = model_and_plan
    backend = ClearBackend(plan.params)
    zero = backend.encrypt(np.zeros(plan.batch_size))
    with pytest.raises(PlanError, match=f"expected {plan.input_features} input ciphertexts, got 3"):
        BatchExecutor(plan, backend).run([zero] * 3)
    with pytest.raises(PlanError, match="input feature"):
        BatchExecutor(plan, backend).run([zero] * (plan.input_features + 1))


def test_a_batch_message_streams_from_bytes_or_a_file_with_every_check(model_and_plan, tmp_path):
    seq, plan = model_and_plan
    client, server = Client(plan.client_spec(), backend="clear"), Server(plan, backend="clear")
    server.register_keys(client.evaluation_keys())
    images = np.random.default_rng(1).standard_normal((9, 1, SIZE_PX, SIZE_PX))
    message = client.encrypt_batch(images)
    path = tmp_path / "batch.msg"
    path.write_bytes(message)
    expected = np.stack([torch_out(seq, image) for image in images])
    for source in (message, path, str(path)):
        np.testing.assert_allclose(client.decrypt_batch(server.evaluate_batch(source)), expected, atol=1e-8)

    header_len = int.from_bytes(message[7:11], "big")
    flipped = bytearray(message)
    flipped[-5] ^= 0xFF  # the last ciphertext: found by the checksum, after every part was read
    for bad, match in ((bytes(flipped), "checksum"), (message[:-1000], "truncated"),
                       (message + b"\x00", "longer than its header"),
                       (message[:11 + header_len - 1], "not a medhe message|not valid JSON|truncated")):
        with pytest.raises(InvalidMessage, match=match):
            server.evaluate_batch(bad)
    other = Client(plan.client_spec(), backend="clear")
    other_message = other.encrypt_batch(images)
    with pytest.raises(Exception, match="key"):
        server.evaluate_batch(other_message)  # keys never registered
    wrong_parts = wire.encode_parts("batch_ciphertext", [b"x"] * 3, key_id=client.key_id,
                                    **{"spec_digest": plan.client_spec().digest(),
                                       "params_digest": plan.params.digest()})
    with pytest.raises(InvalidMessage, match=f"expected {plan.input_features} parts"):
        server.evaluate_batch(wrong_parts)
    # Part sizes that add up but put the whole payload in one part are refused before it is read.
    one_huge = wire.encode_parts("batch_ciphertext", [b"\0" * (wire.MAX_PAYLOAD_BYTES["ciphertext"] + 1)]
                                 + [b""] * (plan.input_features - 1), key_id=client.key_id,
                                 spec_digest=plan.client_spec().digest(), params_digest=plan.params.digest())
    with pytest.raises(InvalidMessage, match="a part is larger than"):
        server.evaluate_batch(one_huge)
