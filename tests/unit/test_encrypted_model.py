"""Encrypted-model mode on the clear backend: the model owner encrypts every weight operand under
the client's public key, the server computes ciphertext x ciphertext without the plan's weights.
The clear backend checks levels, scales and ciphertext sizes (a three-component product must be
relinearised before it is rotated) as SEAL would; tests/he repeats the arithmetic in SEAL."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient
from torch import nn

from medhe.errors import ConfigError, ConflictError, InvalidMessage, MissingKeyError, RemoteError
from medhe.nn.layers import PolyAct
from medhe.plan import Plan
from medhe.protocol import wire
from medhe.protocol.client import Client
from medhe.protocol.owner import ModelOwner, load_encrypted_model, save_encrypted_model
from medhe.protocol.remote import RemoteClient
from medhe.protocol.server import Server
from medhe.service.app import create_app
from medhe.service.hosting import host_plan
from tests.helpers import compile_torch, randomize_bn, torch_out

SIZE = 8


@pytest.fixture
def model():
    seq = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.AvgPool2d(2), nn.BatchNorm2d(2), PolyAct(),
                        nn.Flatten(), nn.Linear(2 * 16, 4), nn.BatchNorm1d(4), PolyAct(), nn.Linear(4, 2)).double()
    return randomize_bn(seq)


@pytest.fixture
def plan(model):
    return compile_torch(model, (1, SIZE, SIZE))


@pytest.fixture
def deployed(plan, tmp_path):
    client = Client(plan.client_spec(), backend="clear")
    server = Server(plan, backend="clear", key_dir=tmp_path / "store", encrypted_model=True)
    server.register_keys(client.evaluation_keys())
    encrypted = ModelOwner(backend="clear").encrypt_model(plan, client.public_key())
    assert server.register_encrypted_model(encrypted) == client.key_id
    return client, server, encrypted


def test_encrypted_model_round_trip_matches_plaintext(model, plan, deployed):
    client, server, _ = deployed
    assert not server.plan.has_weights, "an encrypted-model server keeps no weight of the plan"
    kinds = {ins.kind for ins in plan.instructions}
    assert {"linear", "rotsum", "square", "add_plain"} <= kinds, "every instruction kind is exercised"
    for _ in range(3):
        image = np.random.rand(SIZE, SIZE)
        logits = client.decrypt_logits(server.evaluate(client.encrypt_image(image)))
        np.testing.assert_allclose(logits, torch_out(model, client.preprocess(image)), atol=1e-9)


def test_weights_are_one_ciphertext_per_operand_at_their_level(plan, deployed):
    _, _, encrypted = deployed
    spec = plan.client_spec()
    msg = wire.decode(encrypted, expect_kind="encrypted_model", spec_digest=spec.digest(),
                      params_digest=spec.params.digest())
    assert len(msg.extra["operands"]) == plan.weight_operand_count() == plan.report["weight_operands"]
    assert msg.extra["structure_digest"] == plan.structure_digest()


def test_encrypted_model_survives_a_restart(plan, deployed, tmp_path):
    client, _, _ = deployed
    restarted = Server(plan.without_weights(), backend="clear", key_dir=tmp_path / "store", encrypted_model=True)
    result = restarted.evaluate(client.encrypt_input(np.random.rand(1, SIZE, SIZE)))
    assert client.decrypt_logits(result).shape == (2,)


def test_evaluation_before_the_model_arrives_is_refused(plan):
    client = Client(plan.client_spec(), backend="clear")
    server = Server(plan, backend="clear", encrypted_model=True)
    server.register_keys(client.evaluation_keys())
    with pytest.raises(MissingKeyError, match="no encrypted model"):
        server.evaluate(client.encrypt_input(np.zeros((1, SIZE, SIZE))))


def test_another_clinics_model_is_not_used(plan, deployed):
    _, server, _ = deployed
    stranger = Client(plan.client_spec(), backend="clear")
    server.register_keys(stranger.evaluation_keys())
    with pytest.raises(MissingKeyError, match=stranger.key_id):
        server.evaluate(stranger.encrypt_input(np.zeros((1, SIZE, SIZE))))


def _reencode(message: bytes, plan, *, parts=None, **extra_changes) -> bytes:
    spec = plan.client_spec()
    ids = {"spec_digest": spec.digest(), "params_digest": spec.params.digest()}
    msg = wire.decode(message, expect_kind="encrypted_model", **ids)
    labels = msg.extra["operands"]
    payloads = parts(msg.parts(labels)) if parts else msg.parts(labels)
    extra = {k: v for k, v in msg.extra.items() if k != "part_sizes"}
    extra.update(extra_changes)
    return wire.encode_parts("encrypted_model", payloads, key_id=msg.key_id, extra=extra, **ids)


def _with_extra(message: bytes, plan, **changes) -> bytes:
    """The same payload under a header whose `extra` fields are changed as given."""
    spec = plan.client_spec()
    ids = {"spec_digest": spec.digest(), "params_digest": spec.params.digest()}
    msg = wire.decode(message, expect_kind="encrypted_model", **ids)
    return wire.encode("encrypted_model", msg.payload, key_id=msg.key_id, extra={**msg.extra, **changes}, **ids)


def test_malformed_encrypted_models_are_refused_and_change_nothing(plan, deployed, tmp_path):
    client, server, encrypted = deployed
    spec = plan.client_spec()
    probe = client.encrypt_input(np.random.rand(1, SIZE, SIZE))
    before = client.decrypt_logits(server.evaluate(probe))
    stored = (tmp_path / "store" / f"{client.key_id}.model").read_bytes()
    bad = {
        "swapped operands (wrong level or scale)": (_reencode(encrypted, plan, parts=lambda p: [p[-1]] + p[1:-1] + [p[0]]),
                                                    "level"),
        "missing operand": (_reencode(encrypted, plan, operands=[]), "operands"),
        "part sizes not integers": (_with_extra(encrypted, plan, part_sizes=["a"] * plan.weight_operand_count()),
                                    "parts"),
        "other architecture": (_reencode(encrypted, plan, structure_digest="0" * 64), "architecture"),
        "other backend": (_reencode(encrypted, plan, backend="seal"), "backend"),
        "truncated": (encrypted[:-7], "truncated"),
        "not a model": (probe, "expected a encrypted_model"),
        "path-like key id": (wire.encode("encrypted_model", b"", key_id="../../etc", spec_digest=spec.digest(),
                                         params_digest=spec.params.digest()), "key id"),
    }
    for name, (message, pattern) in bad.items():
        with pytest.raises(InvalidMessage, match=pattern):
            server.register_encrypted_model(message)
    # A valid but different model for the same clinic does not replace it; the same one again is fine.
    other = ModelOwner(backend="clear").encrypt_model(plan, client.public_key())
    scaled = _reencode(other, plan, parts=lambda p: p[:-1] + [p[-1][:-8] + np.float64(1.5).tobytes()])
    with pytest.raises(ConflictError, match="not replaced"):
        server.register_encrypted_model(scaled)
    assert server.register_encrypted_model(encrypted) == client.key_id
    # Nothing changed: same answer, same stored model.
    np.testing.assert_array_equal(client.decrypt_logits(server.evaluate(probe)), before)
    assert (tmp_path / "store" / f"{client.key_id}.model").read_bytes() == stored


def test_owner_and_servers_refuse_the_wrong_inputs(model, plan):
    client = Client(plan.client_spec(), backend="clear")
    with pytest.raises(ConfigError, match="full server plan"):
        ModelOwner(backend="clear").encrypt_model(plan.without_weights(), client.public_key())
    other = compile_torch(nn.Sequential(nn.Flatten(), nn.Linear(SIZE * SIZE, 2)).double(), (1, SIZE, SIZE))
    with pytest.raises(InvalidMessage, match="spec"):
        ModelOwner(backend="clear").encrypt_model(other, client.public_key())
    with pytest.raises(ConfigError, match="encrypted-model mode"):
        Server(plan, backend="clear").register_encrypted_model(ModelOwner(backend="clear").encrypt_model(plan, client.public_key()))
    # The owner picks the backend, never the key message: a "clear" key cannot make it skip encryption.
    with pytest.raises(InvalidMessage, match="backend"):
        ModelOwner().encrypt_model(plan, client.public_key())
    # The server's copy of the plan never keeps a weight, whatever it was given.
    assert not Server(plan, backend="clear", encrypted_model=True).plan.has_weights


def test_encrypted_model_directory_holds_no_clear_weights(plan, deployed, tmp_path):
    _, _, encrypted = deployed
    directory = save_encrypted_model(tmp_path / "enc", plan, encrypted)
    assert not (directory / "arrays.npz").exists()
    loaded, message = load_encrypted_model(directory)
    assert not loaded.has_weights and message == encrypted
    assert loaded.structure_digest() == plan.structure_digest()
    assert loaded.client_spec() == plan.client_spec(), "the clinic's spec is the same in both modes"
    with pytest.raises(Exception, match="without weights"):
        Plan.load(directory)
    plan.save(tmp_path / "plan")
    with pytest.raises(ConfigError, match="weights in clear"):
        save_encrypted_model(tmp_path / "plan", plan, encrypted)


def test_http_encrypted_model_round_trip(model, plan, tmp_path):
    hosted = host_plan(tmp_path / "srv", "tiny", plan, backend="clear", encrypted_model=True)
    app = create_app([hosted], data_dir=tmp_path / "srv")
    http = RemoteClient("http://testserver", key_home=tmp_path / "clinic", backend="clear",
                        transport=TestClient(app)._transport)
    assert http.model_card("tiny")["weights"] == "encrypted"
    assert not (hosted.plan_dir / "arrays.npz").exists(), "an encrypted-model server keeps no weight on disk"
    client = http.client("tiny")
    assert client.spec == plan.client_spec()
    with pytest.raises(MissingKeyError, match="no encrypted model"):
        http.evaluate(client.encrypt_input(np.zeros((1, SIZE, SIZE))))
    assert http.register_encrypted_model(ModelOwner(backend="clear").encrypt_model(plan, client.public_key())) == client.key_id
    with pytest.raises(RemoteError, match="400 invalid_message"):
        http.register_encrypted_model(b"garbage")
    image = np.random.rand(SIZE, SIZE)
    logits = http.diagnose(image, "tiny").logits
    np.testing.assert_allclose(logits, torch_out(model, client.preprocess(image)), atol=1e-9)
    assert http.key_status(client.key_id)["encrypted_model"] is True


def test_plain_server_refuses_an_encrypted_model_upload_over_http(plan, tmp_path):
    app = create_app([host_plan(tmp_path, "tiny", plan, backend="clear")], data_dir=tmp_path)
    client = Client(plan.client_spec(), backend="clear")
    with TestClient(app) as tc:
        response = tc.post("/v1/encrypted-model", content=ModelOwner(backend="clear").encrypt_model(plan, client.public_key()),
                           headers={"content-type": "application/octet-stream"})
    assert response.status_code == 409 and response.json()["error"] == "wrong_mode"


def test_a_new_instruction_kind_is_one_class_and_one_executor_method(plan, tmp_path):
    """Serialisation, digests, levels, operands and scheduling come from the class; the executor
    needs one `_run_<kind>` method. (Registered only for this test.)"""
    from dataclasses import dataclass
    from typing import ClassVar

    from medhe.plan.instructions import INSTRUCTION_KINDS, Instruction, register
    from medhe.runtime.clear import ClearBackend
    from medhe.runtime.executor import Executor

    @register
    @dataclass
    class Negate(Instruction):
        kind: ClassVar[str] = "negate_for_test"

    class NegatingExecutor(Executor):
        def _run_negate_for_test(self, index, ins, x):
            return self.backend.multiply_plain(x, self.backend.encode(-np.ones(self.backend.slot_count), x, 1.0))

    try:
        plan.instructions.append(Negate("negate"))
        plan._digest = None
        plan.save(tmp_path / "plan")
        loaded = Plan.load(tmp_path / "plan")
        assert loaded.instructions[-1].kind == "negate_for_test" and loaded.digest() == plan.digest()
        backend = ClearBackend(plan.params)
        x = np.random.rand(plan.params.slot_count)
        plain = Executor(plan, backend)
        plan.instructions.pop()
        reference = backend.decrypt(plain.run(backend.encrypt(x)))
        plan.instructions.append(Negate("negate"))
        negated = backend.decrypt(NegatingExecutor(plan, backend).run(backend.encrypt(x)))
        np.testing.assert_allclose(negated, -reference, atol=1e-12)
    finally:
        INSTRUCTION_KINDS.pop("negate_for_test", None)
