"""The HTTP service with real SEAL ciphertexts (small, insecure-for-tests parameters): a clinic's
round trip equals local encrypted inference, and SEAL-specific bad keys are refused."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient
from torch import nn

from medhe.errors import RemoteError
from medhe.nn.layers import PolyAct
from medhe.protocol import wire
from medhe.protocol.remote import RemoteClient
from medhe.protocol.server import Server
from medhe.service.app import create_app
from medhe.service.hosting import host_plan
from tests.helpers import SMALL_N, ckks_tolerance, compile_torch, torch_out

pytestmark = pytest.mark.he


def test_remote_round_trip_on_seal_and_keys_without_galois_keys_are_refused(tmp_path):
    seq = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), PolyAct(), nn.Flatten(), nn.Linear(2 * 64, 2)).double()
    plan = compile_torch(seq, (1, 8, 8), poly_modulus_degree=SMALL_N, insecure_for_tests=True)
    assert plan.rotation_steps(), "the test needs a plan that rotates"
    app = create_app([host_plan(tmp_path / "srv", "small", plan)], data_dir=tmp_path / "srv")
    remote = RemoteClient("http://testserver", key_home=tmp_path / "clinic", transport=TestClient(app)._transport)
    image = np.random.rand(8, 8)
    result = remote.diagnose(image, "small")
    client = remote.client("small")
    expected = torch_out(seq, client.preprocess(image))
    np.testing.assert_allclose(result.logits, expected, atol=ckks_tolerance(plan, np.abs(expected).max()))
    # The same ciphertext evaluated locally decrypts to the same label.
    message = client.encrypt_image(image)
    local = Server(plan, backend="seal")
    local.register_keys((remote.key_dir("small", client.spec) / "evaluation.keys").read_bytes())
    assert np.argmax(client.decrypt_logits(local.evaluate(message))) == np.argmax(result.logits)

    # Keys that list rotation steps but carry no Galois keys (their id is their hash, so it is a
    # consistent message): refused at registration, nothing stored.
    spec = plan.client_spec()
    ids = {"spec_digest": spec.digest(), "params_digest": spec.params.digest()}
    keys = wire.decode((remote.key_dir("small", client.spec) / "evaluation.keys").read_bytes(),
                       expect_kind="evaluation_keys", **ids)
    relin, _ = keys.parts(["relin_keys", "galois_keys"])
    no_galois = wire.encode_parts("evaluation_keys", [relin, b""], key_id=wire.derive_key_id(ids["params_digest"], relin, b""),
                                  extra={"rotation_steps": list(spec.rotation_steps), "backend": "seal"}, **ids)
    with pytest.raises(RemoteError, match="no Galois keys"):
        remote.register_keys(no_galois)
    stored = {p.name for p in (tmp_path / "srv" / "models" / "small" / "keys").iterdir()}
    assert stored == {f"{client.key_id}.keys"}


def test_throughput_mode_over_http_on_seal(tmp_path):
    from medhe.compiler.batch import batch_steps
    from medhe.compiler.passes import optimize
    from medhe.params import choose_params
    from medhe.plan import BatchPlan, rescale_factors
    from tests.helpers import randomize_bn, trace_torch

    seq = randomize_bn(nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.AvgPool2d(2), nn.BatchNorm2d(2), PolyAct(),
                                     nn.Flatten(), nn.Linear(2 * 9, 2)).double())
    steps = batch_steps(optimize(trace_torch(seq, (1, 6, 6))))
    plan = BatchPlan(choose_params(rescale_factors([s.kind for s in steps]), 1, poly_modulus_degree=SMALL_N,
                                   insecure_for_tests=True),
                     (1, 6, 6), steps, ["a", "b"], {"image_size": 6, "mean": 0.0, "std": 1.0}, "test")
    app = create_app([host_plan(tmp_path / "srv", "small-batch", plan)], data_dir=tmp_path / "srv")
    remote = RemoteClient("http://testserver", key_home=tmp_path / "clinic", transport=TestClient(app)._transport)
    images = [np.random.rand(6, 6) for _ in range(40)]
    results = remote.diagnose_batch(images, "small-batch")
    client = remote.client("small-batch")
    expected = np.stack([torch_out(seq, client.preprocess(image)) for image in images])
    logits = np.stack([r.logits for r in results])
    tolerance = max(1, plan.multiplicative_depth) * np.sqrt(SMALL_N) * 2.0 ** (-plan.params.log_scale_bits + 10) \
        * max(1, np.abs(expected).max())
    np.testing.assert_allclose(logits, expected, atol=tolerance)
    assert (logits.argmax(1) == expected.argmax(1)).all()
