"""Client/server roles and wire format on the clear backend (no HE library)."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from torch import nn

from medhe.errors import ConfigError, InvalidMessage, MissingKeyError
from medhe.nn.layers import PolyAct
from medhe.protocol import wire
from medhe.protocol.client import Client
from medhe.protocol.server import Server
from tests.helpers import compile_torch, randomize_bn, torch_out

SIZE = 8


@pytest.fixture
def model():
    seq = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.AvgPool2d(2), nn.BatchNorm2d(2), PolyAct(),
                        nn.Flatten(), nn.Linear(2 * 16, 2)).double()
    return randomize_bn(seq)


@pytest.fixture
def plan(model):
    return compile_torch(model, (1, SIZE, SIZE))


@pytest.fixture
def parties(plan, tmp_path):
    client = Client(plan.client_spec(), backend="clear")
    server = Server(plan, backend="clear", key_dir=tmp_path / "keys")
    server.register_keys(client.evaluation_keys())
    return client, server


def test_round_trip_matches_plaintext(model, parties):
    client, server = parties
    image = np.random.rand(SIZE, SIZE)
    x = client.preprocess(image)
    logits = client.decrypt_logits(server.evaluate(client.encrypt_image(image)))
    np.testing.assert_allclose(logits, torch_out(model, x), atol=1e-9)
    label, probs = client.diagnosis(logits)
    assert label == client.spec.class_names[int(np.argmax(logits))] and abs(probs.sum() - 1) < 1e-12


def test_secret_key_export_is_explicit_and_round_trips(plan, parties):
    client, server = parties
    result = server.evaluate(client.encrypt_image(np.random.rand(SIZE, SIZE)))
    restored = Client.from_secret_key(plan.client_spec(), client.export_secret_key())
    assert restored.key_id == client.key_id
    np.testing.assert_array_equal(restored.decrypt_logits(result), client.decrypt_logits(result))
    assert "secret" not in repr(client).lower() or "held" in repr(client).lower()


def _tamper_header(message: bytes, **changes) -> bytes:
    magic, version, header_len = struct.unpack_from(">5sHI", message)
    import json

    header = json.loads(message[11: 11 + header_len])
    header.update(changes)
    new = json.dumps(header).encode()
    return struct.pack(">5sHI", magic, version, len(new)) + new + message[11 + header_len:]


def test_wire_negatives_each_raise_a_clear_error(plan, parties):
    client, server = parties
    good = client.encrypt_image(np.random.rand(SIZE, SIZE))
    cases = {
        "truncated": (good[:-10], "truncated"),
        "not a message": (b"hello world, not medhe", "not a medhe message"),
        "wrong version": (good[:5] + struct.pack(">H", 99) + good[7:], "version 99"),
        "wrong spec hash": (_tamper_header(good, spec_digest="0" * 64), "spec"),
        "wrong params": (_tamper_header(good, params_digest="0" * 64), "parameters"),
        "wrong kind": (_tamper_header(good, kind="result"), "expected a ciphertext"),
        "corrupted payload": (good[:-1] + bytes([good[-1] ^ 1]), "checksum"),
    }
    for name, (bad, pattern) in cases.items():
        with pytest.raises(InvalidMessage, match=pattern):
            server.evaluate(bad)
    with pytest.raises(MissingKeyError, match="key id"):
        server.evaluate(_tamper_header(good, key_id="0123456789abcdef"))
    # The server keeps working and keeps its keys after all of that.
    assert client.key_id in server.key_ids
    client.decrypt_logits(server.evaluate(good))


def test_ciphertext_from_another_key_set_is_refused(plan, parties):
    _, server = parties
    stranger = Client(plan.client_spec(), backend="clear")
    with pytest.raises(MissingKeyError, match=stranger.key_id):
        server.evaluate(stranger.encrypt_image(np.random.rand(SIZE, SIZE)))


def test_result_for_another_client_is_refused(plan, parties):
    client, server = parties
    other = Client(plan.client_spec(), backend="clear")
    server.register_keys(other.evaluation_keys())
    result = server.evaluate(other.encrypt_image(np.random.rand(SIZE, SIZE)))
    with pytest.raises(InvalidMessage, match="key id"):
        client.decrypt_logits(result)


def test_oversized_payload_is_refused(plan):
    limit = wire.MAX_PAYLOAD_BYTES["ciphertext"]
    ids = {"spec_digest": plan.client_spec().digest(), "params_digest": plan.params.digest()}
    big = wire.encode("ciphertext", b"\0" * (limit + 1), key_id="0123456789abcdef", **ids)
    with pytest.raises(InvalidMessage, match="exceeds"):
        wire.decode(big, expect_kind="ciphertext", **ids)


def test_registered_keys_survive_a_server_restart(plan, parties, tmp_path):
    client, _ = parties
    restarted = Server(plan, backend="clear", key_dir=tmp_path / "keys")
    assert client.key_id in restarted.key_ids
    client.decrypt_logits(restarted.evaluate(client.encrypt_image(np.random.rand(SIZE, SIZE))))


def test_bad_inputs_name_what_was_expected(plan, parties):
    client, _ = parties
    with pytest.raises(ConfigError, match=r"shape \(1, 8, 8\)"):
        client.encrypt_input(np.zeros((1, 7, 7)))
    bad = np.zeros((1, SIZE, SIZE))
    bad[0, 0, 0] = np.nan
    with pytest.raises(ConfigError, match="NaN"):
        client.encrypt_input(bad)


def test_a_ciphertext_that_is_not_a_fresh_input_is_refused_by_name(plan, parties):
    """A ciphertext at the wrong scale or level would not fail on its own, only give wrong logits:
    the server refuses it and says what a fresh input is."""
    import struct

    from medhe.runtime.clear import ClearCiphertext

    client, server = parties
    backend = client._backend
    values = client.pack(np.random.rand(1, SIZE, SIZE))
    fresh = backend.encrypt(values)
    for stale in (ClearCiphertext(values, fresh.level, fresh.scale * 2), ClearCiphertext(values, fresh.level - 1,
                                                                                             fresh.scale)):
        message = wire.encode("ciphertext", backend.serialize(stale), key_id=client.key_id, **client._ids)
        with pytest.raises(InvalidMessage, match=rf"the ciphertext must be fresh: {plan.depth} levels, 2 components"):
            server.evaluate(message)
    assert struct.unpack("<id", backend.encrypt_to_bytes(values)[4:16]) == (fresh.level, fresh.scale)
    client.decrypt_logits(server.evaluate(client.encrypt_input(np.random.rand(1, SIZE, SIZE))))  # still serving


def test_evaluation_keys_for_another_plan_are_refused(model, plan):
    other_plan = compile_torch(nn.Sequential(nn.Flatten(), nn.Linear(64, 2)).double(), (1, SIZE, SIZE))
    with pytest.raises(InvalidMessage, match="spec"):
        Server(other_plan, backend="clear").register_keys(Client(plan.client_spec(), backend="clear").evaluation_keys())


def test_key_ids_are_the_hash_of_the_keys_so_nobody_can_take_over_one(plan, parties, tmp_path):
    client, server = parties
    keys_file = tmp_path / "keys" / f"{client.key_id}.keys"
    stored = keys_file.read_bytes()
    # Another clinic's keys sent under this clinic's key id are refused; nothing stored changes.
    intruder = Client(plan.client_spec(), backend="clear")
    forged = _tamper_header(intruder.evaluation_keys(), key_id=client.key_id)
    with pytest.raises(InvalidMessage, match="hash of the keys"):
        server.register_keys(forged)
    assert keys_file.read_bytes() == stored
    # Re-registering the same keys is idempotent; a new client gets a new id.
    assert server.register_keys(stored) == client.key_id and keys_file.read_bytes() == stored
    assert intruder.key_id != client.key_id and len(client.key_id) == 32
    # A restored client cannot mint a second key set under its id.
    with pytest.raises(ConfigError, match="were made"):
        Client.from_secret_key(plan.client_spec(), client.export_secret_key()).evaluation_keys()
    # Key ids are checked as whole strings (no trailing newline, no path).
    for bad_id in (client.key_id + "\n", "../" + client.key_id[3:], client.key_id.upper()):
        with pytest.raises(InvalidMessage, match="key id"):
            server.register_keys(_tamper_header(stored, key_id=bad_id))


def test_key_sets_in_memory_are_bounded_and_reloaded_from_the_store(model, plan, tmp_path):
    server = Server(plan, backend="clear", key_dir=tmp_path / "store", max_key_sets=2)
    clients = [Client(plan.client_spec(), backend="clear") for _ in range(5)]
    for client in clients:
        server.register_keys(client.evaluation_keys())
    assert server.key_sets_in_memory == 2 and len(server.key_ids) == 5
    image = np.random.rand(SIZE, SIZE)
    for client in clients + clients[::-1]:  # every clinic, evicted or not, still gets its answer
        logits = client.decrypt_logits(server.evaluate(client.encrypt_image(image)))
        np.testing.assert_allclose(logits, torch_out(model, client.preprocess(image)), atol=1e-9)
        assert server.key_sets_in_memory <= 2
    with pytest.raises(ConfigError, match="key store"):
        Server(plan, backend="clear", max_key_sets=2)


def test_throughput_mode_batch_round_trip_matches_plaintext(model, tmp_path):
    from medhe.compiler.batch import batch_steps
    from medhe.plan import BatchPlan
    from medhe.compiler.passes import optimize
    from medhe.plan import rescale_factors
    from medhe.params import choose_params
    from tests.helpers import trace_torch

    steps = batch_steps(optimize(trace_torch(model, (1, SIZE, SIZE))))
    assert [s.kind for s in steps] == ["linear", "square", "linear"]
    plan = BatchPlan(choose_params(rescale_factors([s.kind for s in steps]), 1), (1, SIZE, SIZE), steps, ["a", "b"],
                     {"image_size": SIZE, "mean": 0.0, "std": 1.0}, "test")
    client, server = Client(plan.client_spec(), backend="clear"), Server(plan, backend="clear")
    assert plan.rotation_steps() == []  # no Galois keys needed at all
    server.register_keys(client.evaluation_keys())
    x = np.random.randn(37, 1, SIZE, SIZE)
    logits = client.decrypt_batch(server.evaluate_batch(client.encrypt_batch(x)))
    expected = np.stack([torch_out(model, xi) for xi in x])
    np.testing.assert_allclose(logits, expected, atol=1e-9)
    with pytest.raises(ConfigError, match="batch must have shape"):
        client.encrypt_batch(np.zeros((3, 1, SIZE + 1, SIZE)))
    # A batch whose ciphertexts (one per input value) would exceed the message limit is refused
    # after the first one is encrypted, not after all of them.
    from medhe.protocol import wire

    one_bytes = len(client._backend.encrypt_to_bytes(np.zeros(plan.batch_size)))
    calls = []
    backend = client._backend
    real_one, real_rows = backend.encrypt_to_bytes, backend.encrypt_serialized
    backend.encrypt_to_bytes = lambda values: calls.append(1) or real_one(values)
    backend.encrypt_serialized = lambda rows, **kw: calls.append(len(rows)) or real_rows(rows, **kw)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(wire.MAX_PAYLOAD_BYTES, "batch_ciphertext", one_bytes * SIZE * SIZE - 1)
        with pytest.raises(ConfigError, match=f"{SIZE * SIZE} of .* over the .* batch message limit; use latency mode"):
            client.encrypt_batch(x)
        assert calls == [1]
        with pytest.raises(ConfigError, match="seeded, half the bytes"):  # helpers: public-key sizes
            client.encrypt_batch(x, workers=2)
        patch.setitem(wire.MAX_PAYLOAD_BYTES, "batch_ciphertext", one_bytes * SIZE * SIZE + 10**6)
        calls.clear()
        client.encrypt_batch(x[:2])  # at the limit's side that fits, the whole batch is encrypted
        assert calls[:2] == [1, SIZE * SIZE - 1]


def test_secret_key_file_is_private_atomic_and_never_follows_links(plan, tmp_path):
    import os

    client = Client(plan.client_spec(), backend="clear")
    target = tmp_path / "elsewhere"
    target.write_bytes(b"not a key")
    link = tmp_path / "secret.key"
    link.symlink_to(target)
    with pytest.raises(ConfigError, match="already exists"):
        client.save_secret_key(link)
    old_umask = os.umask(0)
    try:
        client.save_secret_key(link, overwrite=True)
    finally:
        os.umask(old_umask)
    assert not link.is_symlink() and target.read_bytes() == b"not a key", "the link is replaced, not followed"
    assert link.stat().st_mode & 0o777 == 0o600
    assert Client.load(plan.client_spec(), link).key_id == client.key_id
    assert not list(tmp_path.glob(".*part")), "no temporary file is left behind"
    with pytest.raises(ConfigError, match="does not exist"):
        client.save_secret_key(tmp_path / "missing" / "secret.key")


def _with_raw_header(message: bytes, header: bytes) -> bytes:
    magic, version, header_len = struct.unpack_from(">5sHI", message)
    return struct.pack(">5sHI", magic, version, len(header)) + header + message[11 + header_len:]


def test_hostile_headers_are_invalid_messages_not_crashes(plan, parties):
    client, server = parties
    good = client.encrypt_image(np.random.rand(SIZE, SIZE))
    hostile = {
        "deep nesting": b"[" * 20000 + b"]" * 20000,
        "absurdly long number": b'{"key_id": ' + b"9" * 20000 + b"}",
        "key id of the wrong type": b'{"key_id": {"a": 1}, "kind": "ciphertext"}',
        "header is a list": b'["key_id"]',
    }
    for name, header in hostile.items():
        with pytest.raises(InvalidMessage):
            server.evaluate(_with_raw_header(good, header))
    assert client.decrypt_logits(server.evaluate(good)).shape == (2,)


def test_a_key_store_that_is_a_file_is_a_clear_error(plan, tmp_path):
    (tmp_path / "store").write_text("not a directory")
    with pytest.raises(ConfigError, match="not a directory"):
        Server(plan, backend="clear", key_dir=tmp_path / "store")
