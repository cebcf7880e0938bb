"""Encrypted-model mode on real SEAL (small parameters, explicitly insecure-for-tests): results
against the plaintext model end to end and per layer, and what the server side holds."""

from __future__ import annotations

import numpy as np
import pytest

from medhe.errors import InvalidMessage
from medhe.protocol import wire
from medhe.protocol.client import Client
from medhe.protocol.owner import ModelOwner, save_encrypted_model
from medhe.protocol.server import Server
from medhe.runtime.seal_backend import SEALClientBackend, SEALServerBackend, seal
from tests.helpers import (SMALL_N, ckks_tolerance_encrypted_model, compile_torch, pack, reachable, torch_out,
                           two_block_model)
from tests.leakage import LeakSearch, torch_secrets

pytestmark = pytest.mark.he
SHAPE = (1, 16, 16)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    seq = two_block_model()
    plan = compile_torch(seq, SHAPE, poly_modulus_degree=SMALL_N, insecure_for_tests=True)
    store = tmp_path_factory.mktemp("store")
    client = Client(plan.client_spec(), backend="seal")
    keys = client.evaluation_keys()
    server = Server(plan, backend="seal", key_dir=store, encrypted_model=True)
    server.register_keys(keys)
    encrypted = ModelOwner().encrypt_model(plan, client.public_key())
    server.register_encrypted_model(encrypted)
    return seq, plan, client, server, keys, encrypted, store


def test_encrypted_model_matches_plaintext_and_plain_weight_mode(deployment):
    seq, plan, client, server, keys, _, _ = deployment
    plain_server = Server(plan, backend="seal")
    plain_server.register_keys(keys)
    for _ in range(3):
        x = np.random.randn(*SHAPE)
        expected = torch_out(seq, x)
        message = client.encrypt_input(x)
        encrypted = client.decrypt_logits(server.evaluate(message))
        plain = client.decrypt_logits(plain_server.evaluate(message))
        tolerance = ckks_tolerance_encrypted_model(plan, np.abs(expected).max())
        np.testing.assert_allclose(encrypted, expected, atol=tolerance)
        np.testing.assert_allclose(encrypted, plain, atol=tolerance)
        assert np.argmax(encrypted) == np.argmax(expected)


def test_every_layer_with_encrypted_weights_matches_the_oracle(deployment):
    from medhe.runtime.executor import EncryptedWeights, Executor, operand_schedule
    from tests.helpers import assert_layers_match_oracle

    seq, plan, _, _, _, _, _ = deployment
    client = SEALClientBackend(plan.params)
    relin, galois = client.evaluation_keys(plan.rotation_steps())
    backend = SEALServerBackend(plan.params, relin, galois or None)
    owner = SEALServerBackend(plan.params, public_key=client.public_key())
    operands = {key: owner.encrypt_public(plan.instructions[key[0]].operand(key[1]), like, scale)
                for key, like, scale in operand_schedule(plan, owner)}
    x = np.random.randn(*SHAPE)
    trace = []
    executor = Executor(plan.without_weights(), backend, weights=EncryptedWeights(operands, backend))
    executor.run(client.encrypt(pack(plan, x)), trace=trace)
    assert_layers_match_oracle(seq, plan, x, trace, client.decrypt, ckks_tolerance_encrypted_model)


def test_server_side_holds_no_weight_and_no_secret_key(deployment, tmp_path):
    seq, plan, client, server, keys, encrypted, store = deployment
    search = LeakSearch(torch_secrets(seq, SHAPE, plan))
    directory = save_encrypted_model(tmp_path / "enc", plan, encrypted)
    # Positive control: the model owner's clear plan does hold them.
    assert search.find(np.concatenate([ins.operand(n) for ins in plan.instructions
                                       for n in ins.operand_names()]).tobytes())
    for root in (directory, store):
        assert search.find_in_files(root) == {}, f"weights in clear under {root}"
    assert not server.plan.has_weights

    # Nothing reachable from the server object is a secret key, a decryptor, or an array of weights.
    objects = reachable(server)
    for obj in objects:
        assert not isinstance(obj, (seal.SecretKey, seal.Decryptor, SEALClientBackend)), type(obj)
    arrays = [obj for obj in objects if isinstance(obj, np.ndarray)]
    for array in arrays:
        if array.dtype.kind == "f":
            assert search.find(np.ascontiguousarray(array, dtype=np.float64).tobytes()) == []


def test_a_key_the_server_makes_itself_does_not_decrypt_the_weights(deployment):
    _, plan, client, _, _, encrypted, _ = deployment
    spec = plan.client_spec()
    msg = wire.decode(encrypted, expect_kind="encrypted_model", spec_digest=spec.digest(),
                      params_digest=spec.params.digest())
    parts = msg.parts(msg.extra["operands"])
    index, name = 0, "d0"
    weight = plan.instructions[index].operand(name)
    attacker = SEALClientBackend(plan.params)
    ct = attacker.deserialize(parts[msg.extra["operands"].index(f"i{index}.{name}")])
    scale = ct.scale
    guessed = attacker.decrypt(ct)
    assert np.abs(guessed - weight).max() > 1e3 * np.abs(weight).max(), "a foreign key must not decrypt"
    # The clinic's own key does (why the server never hands the encrypted model out: see the
    # threat model, collusion of server and clinic reveals the weights in this deployment).
    clinic = client._backend.decrypt(ct)
    assert np.abs(clinic - weight).max() < 1e-3 * max(1.0, np.abs(weight).max()) and scale > 1


def test_owner_key_deployment_same_mechanics():
    """A hospital that outsources inference encrypts images and model under its own key."""
    seq = two_block_model()
    plan = compile_torch(seq, SHAPE, poly_modulus_degree=SMALL_N, insecure_for_tests=True)
    hospital = Client(plan.client_spec(), backend="seal")
    cloud = Server(plan.without_weights(), backend="seal", encrypted_model=True)
    cloud.register_keys(hospital.evaluation_keys())
    cloud.register_encrypted_model(ModelOwner().encrypt_model(plan, hospital.public_key()))
    x = np.random.randn(*SHAPE)
    expected = torch_out(seq, x)
    got = hospital.decrypt_logits(cloud.evaluate(hospital.encrypt_input(x)))
    np.testing.assert_allclose(got, expected, atol=ckks_tolerance_encrypted_model(plan, np.abs(expected).max()))


def test_client_side_seal_artifacts_hold_no_weight(deployment, tmp_path):
    seq, plan, client, server, keys, _, _ = deployment
    search = LeakSearch(torch_secrets(seq, SHAPE, plan))
    ciphertext = client.encrypt_input(np.random.randn(*SHAPE))
    artifacts = {"client_spec.json": plan.client_spec().save(tmp_path).read_bytes(), "evaluation keys": keys,
                 "public key": client.public_key(), "secret key": client.export_secret_key(),
                 "ciphertext": ciphertext, "result": server.evaluate(ciphertext)}
    for name, blob in artifacts.items():
        assert search.find(blob, text=name.endswith(".json")) == [], f"{name} holds model weights"


def test_a_three_component_operand_is_refused_at_upload(deployment):
    _, plan, client, _, _, encrypted, _ = deployment
    spec = plan.client_spec()
    ids = {"spec_digest": spec.digest(), "params_digest": spec.params.digest()}
    msg = wire.decode(encrypted, expect_kind="encrypted_model", **ids)
    labels = msg.extra["operands"]
    parts = msg.parts(labels)
    backend = SEALServerBackend(plan.params)
    first = backend.deserialize(parts[0])
    parts[0] = backend.serialize(backend.multiply(first, first))  # three components, not relinearised
    forged = wire.encode_parts("encrypted_model", parts, key_id=msg.key_id,
                               extra={k: v for k, v in msg.extra.items() if k != "part_sizes"}, **ids)
    fresh = Server(plan, backend="seal", encrypted_model=True)
    with pytest.raises(InvalidMessage, match="two-component"):
        fresh.register_encrypted_model(forged)
