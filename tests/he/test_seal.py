"""Lowerings on real SEAL CKKS with small parameters, explicitly insecure-for-tests."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest
from torch import nn

from medhe.errors import InvalidMessage
from medhe.nn.layers import PolyAct
from medhe.protocol.client import Client
from medhe.protocol.server import Server
from medhe.runtime.seal_backend import SEALClientBackend, SEALServerBackend, seal
from tests.helpers import (SMALL_N, ckks_tolerance, compile_torch, randomize_bn, reachable, run_plan, torch_out,
                           two_block_model)

pytestmark = pytest.mark.he


def seal_run(plan, x):
    client = SEALClientBackend(plan.params)
    relin, galois = client.evaluation_keys(plan.rotation_steps())
    server = SEALServerBackend(plan.params, relin, galois or None)
    return run_plan(plan, server, client, x)


def small_plan(seq, shape):
    return compile_torch(seq, shape, poly_modulus_degree=SMALL_N, insecure_for_tests=True)


@pytest.mark.parametrize("size,kernel,stride,padding", [(8, 3, 1, 1), (8, 3, 2, 1), (9, 5, 1, 2), (8, 1, 1, 0), (10, 3, 2, 0)])
def test_conv_on_seal_matches_torch(size, kernel, stride, padding):
    seq = nn.Sequential(nn.Conv2d(2, 3, kernel, stride=stride, padding=padding)).double()
    x = np.random.randn(2, size, size)
    plan = small_plan(seq, (2, size, size))
    assert plan.params.insecure_for_tests
    expected = torch_out(seq, x)
    np.testing.assert_allclose(seal_run(plan, x), expected, atol=ckks_tolerance(plan, np.abs(expected).max()))


def test_pool_dense_activation_on_seal_match_torch():
    seq = two_block_model()
    x = np.random.randn(1, 16, 16)
    plan = small_plan(seq, (1, 16, 16))
    expected = torch_out(seq, x)
    got = seal_run(plan, x)
    np.testing.assert_allclose(got, expected, atol=ckks_tolerance(plan, np.abs(expected).max()))
    assert np.argmax(got) == np.argmax(expected)


def test_server_holds_no_secret_key_and_writes_none(tmp_path):
    seq = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), PolyAct(), nn.Flatten(), nn.Linear(2 * 64, 2)).double()
    plan = small_plan(seq, (1, 8, 8))
    client = Client(plan.client_spec(), backend="seal")
    keys = client.evaluation_keys()
    server = Server(plan, backend="seal", key_dir=tmp_path / "server")
    server.register_keys(keys)
    result = server.evaluate(client.encrypt_image(np.random.rand(8, 8)))
    client.decrypt_logits(result)

    # Nothing reachable from the server object is a secret key or a decryptor.
    for obj in reachable(server):
        assert not isinstance(obj, (seal.SecretKey, seal.Decryptor, SEALClientBackend)), type(obj)

    # No file the server wrote, nor the key message, contains the secret key's bytes.
    secret = client.export_secret_key()
    secret_payload = secret[-4096:]  # a chunk of the serialized key polynomial
    written = [p.read_bytes() for p in (tmp_path / "server").rglob("*") if p.is_file()]
    assert written, "the server should have stored the registered keys"
    for blob in written + [keys, result]:
        for start in range(0, len(secret_payload) - 64, 512):
            assert secret_payload[start: start + 64] not in blob


def test_ciphertext_from_another_parameter_set_is_refused():
    seq = nn.Sequential(nn.Flatten(), nn.Linear(64, 2)).double()
    plan = small_plan(seq, (1, 8, 8))
    server_backend = SEALServerBackend(plan.params)
    other = compile_torch(seq, (1, 8, 8), poly_modulus_degree=8192, insecure_for_tests=True)
    other_client = SEALClientBackend(other.params)
    foreign = other_client.serialize(other_client.encrypt(np.zeros(other.params.slot_count)))
    with pytest.raises(InvalidMessage):
        server_backend.deserialize(foreign)
    with pytest.raises(InvalidMessage):
        server_backend.deserialize(b"\x00" * 100)
    gc.collect()


def test_throughput_mode_on_seal_matches_torch():
    from medhe.compiler.batch import batch_steps
    from medhe.plan import BatchPlan
    from medhe.compiler.passes import optimize
    from medhe.plan import rescale_factors
    from medhe.params import choose_params
    from tests.helpers import trace_torch

    seq = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.AvgPool2d(2), nn.BatchNorm2d(2), PolyAct(),
                        nn.Flatten(), nn.Linear(2 * 9, 2)).double()
    randomize_bn(seq)
    steps = batch_steps(optimize(trace_torch(seq, (1, 6, 6))))
    plan = BatchPlan(choose_params(rescale_factors([s.kind for s in steps]), 1, poly_modulus_degree=SMALL_N,
                                   insecure_for_tests=True),
                     (1, 6, 6), steps, ["a", "b"], {"image_size": 6, "mean": 0.0, "std": 1.0}, "test")
    client, server = Client(plan.client_spec(), backend="seal"), Server(plan, backend="seal")
    server.register_keys(client.evaluation_keys())
    x = np.random.randn(40, 1, 6, 6)
    # Encrypted by two worker processes of the client (under its public key), then streamed through.
    logits = client.decrypt_batch(server.evaluate_batch(client.encrypt_batch(x, workers=2)))
    expected = np.stack([torch_out(seq, xi) for xi in x])
    tolerance = max(1, plan.multiplicative_depth) * np.sqrt(SMALL_N) * 2.0 ** (-plan.params.log_scale_bits + 10) * max(1, np.abs(expected).max())
    np.testing.assert_allclose(logits, expected, atol=tolerance)
    assert (logits.argmax(1) == expected.argmax(1)).all()


def test_every_layer_on_seal_matches_the_plaintext_oracle():
    """Per layer: decrypt the ciphertext after each op and compare it, slot by slot through the
    op's layout, with the optimised IR evaluated in plaintext."""
    from medhe.runtime.executor import Executor
    from tests.helpers import assert_layers_match_oracle, pack

    seq = two_block_model()
    x = np.random.randn(1, 16, 16)
    plan = small_plan(seq, (1, 16, 16))
    client = SEALClientBackend(plan.params)
    relin, galois = client.evaluation_keys(plan.rotation_steps())
    trace = []
    Executor(plan, SEALServerBackend(plan.params, relin, galois or None)).run(client.encrypt(pack(plan, x)), trace=trace)
    assert_layers_match_oracle(seq, plan, x, trace, client.decrypt)


def test_concatenated_or_padded_seal_objects_are_refused():
    """SEAL reads the first object of a buffer and ignores the rest; medhe refuses such messages."""
    seq = nn.Sequential(nn.Flatten(), nn.Linear(64, 2)).double()
    plan = small_plan(seq, (1, 8, 8))
    client = Client(plan.client_spec(), backend="seal")
    server = Server(plan, backend="seal")
    server.register_keys(client.evaluation_keys())
    good = client.encrypt_input(np.random.rand(1, 8, 8))
    from medhe.protocol import wire

    spec = plan.client_spec()
    ids = {"spec_digest": spec.digest(), "params_digest": spec.params.digest()}
    payload = wire.decode(good, expect_kind="ciphertext", **ids).payload
    for name, forged in {"40 ciphertexts in one": payload * 40, "trailing bytes": payload + b"\0" * 16,
                         "not SEAL at all": b"\0" * 64}.items():
        message = wire.encode("ciphertext", forged, key_id=client.key_id, **ids)
        with pytest.raises(InvalidMessage):
            server.evaluate(message)
    assert client.decrypt_logits(server.evaluate(good)).shape == (2,)


def test_seal_objects_never_pass_through_a_named_file(monkeypatch):
    """Secret keys, keys and ciphertexts go through anonymous in-memory files (memfd): no temp file
    in /dev/shm or the temp directory that a crash could leave behind or another user could read."""
    import os
    import tempfile

    if not hasattr(os, "memfd_create"):
        pytest.skip("memfd is Linux only; elsewhere a private temporary directory is used")

    def refuse(*args, **kwargs):
        raise AssertionError("a SEAL object went through a temporary directory")

    monkeypatch.setattr(tempfile, "TemporaryDirectory", refuse)
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse)
    places = [Path(p) for p in ("/dev/shm", tempfile.gettempdir()) if Path(p).is_dir()]
    before = {p: set(os.listdir(p)) for p in places}
    seq = nn.Sequential(nn.Flatten(), nn.Linear(64, 2)).double()
    plan = small_plan(seq, (1, 8, 8))
    client = Client(plan.client_spec(), backend="seal")
    server = Server(plan, backend="seal")
    server.register_keys(client.evaluation_keys())
    restored = Client.from_secret_key(plan.client_spec(), client.export_secret_key())
    result = server.evaluate(client.encrypt_input(np.random.rand(1, 8, 8)))
    np.testing.assert_array_equal(restored.decrypt_logits(result), client.decrypt_logits(result))
    assert {p: set(os.listdir(p)) for p in places} == before


def server_matches_torch(seq, plan, encrypted_model: bool, **server_options) -> Server:
    """Two inputs through a SEAL server (plain or encrypted weights): the plaintext model's logits
    within the CKKS tolerance, and its labels. Returns the server."""
    from medhe.protocol.owner import ModelOwner
    from tests.helpers import ckks_tolerance_encrypted_model

    client = Client(plan.client_spec(), backend="seal")
    server = Server(plan, backend="seal", encrypted_model=encrypted_model, **server_options)
    server.register_keys(client.evaluation_keys())
    if encrypted_model:
        server.register_encrypted_model(ModelOwner().encrypt_model(plan, client.public_key()))
    tolerance = ckks_tolerance_encrypted_model if encrypted_model else ckks_tolerance
    for _ in range(2):
        x = np.random.randn(1, 16, 16)
        expected = torch_out(seq, x)
        got = client.decrypt_logits(server.evaluate(client.encrypt_input(x)))
        np.testing.assert_allclose(got, expected, atol=tolerance(plan, np.abs(expected).max()))
        assert np.argmax(got) == np.argmax(expected)
    return server


@pytest.mark.parametrize("encrypted_model", [False, True])
def test_a_galois_key_budget_keeps_the_result_on_seal(encrypted_model):
    """Fewer rotation keys, steps made of several key rotations: still the plaintext model's logits."""
    seq = two_block_model()
    full = small_plan(seq, (1, 16, 16))
    plan = compile_torch(seq, (1, 16, 16), poly_modulus_degree=SMALL_N, insecure_for_tests=True,
                         max_galois_keys=max(2, len(full.rotation_steps()) // 2))
    assert len(plan.galois_steps()) < len(full.rotation_steps()) and plan.report["rotations"] > full.report["rotations"]
    server_matches_torch(seq, plan, encrypted_model)


def test_batch_encryption_helpers_need_no_main_guard_and_report_failures(tmp_path):
    """The client's encryption helpers are fresh processes: a script without
    `if __name__ == "__main__"` works, and a helper that fails is reported, not hung on."""
    import subprocess
    import sys

    from medhe.errors import BackendError
    from medhe.runtime.encrypt_worker import encrypt_rows_in_processes

    script = tmp_path / "unguarded.py"
    script.write_text(
        "import numpy as np\n"
        "from medhe.params import choose_params\n"
        "from medhe.runtime.seal_backend import SEALClientBackend\n"
        "params = choose_params([1], 1, poly_modulus_degree=4096, insecure_for_tests=True)\n"
        "client = SEALClientBackend(params)\n"
        "rows = np.random.rand(12, client.slot_count)\n"
        "parts = client.encrypt_serialized(rows, workers=2)\n"
        "values = [client.decrypt(client.deserialize(p)) for p in parts]\n"
        "print('max error', max(float(np.abs(v - r).max()) for v, r in zip(values, rows)))\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.split()[-1]) < 1e-3
    from medhe.params import choose_params

    params = choose_params([1], 1, poly_modulus_degree=4096, insecure_for_tests=True)
    with pytest.raises(BackendError, match="helper process failed"):
        encrypt_rows_in_processes(params.to_dict(), b"not a public key", np.zeros((4, 2048)), 2)


def test_evaluation_keys_travel_seeded_at_half_the_size_and_still_rotate():
    from medhe.runtime.seal_backend import _load, _save

    seq = two_block_model()
    plan = small_plan(seq, (1, 16, 16))
    client = SEALClientBackend(plan.params)
    steps = plan.rotation_steps()
    relin, galois = client.evaluation_keys(steps)
    # Loaded, the keys are whole; saved again from memory they take their expanded size.
    expanded_galois = _save(_load(seal.GaloisKeys(), client.context, galois, "Galois keys"))
    expanded_relin = _save(_load(seal.RelinKeys(), client.context, relin, "relinearization keys"))
    assert 0.45 < len(galois) / len(expanded_galois) < 0.55
    assert 0.45 < len(relin) / len(expanded_relin) < 0.55
    # The compiler's size bound (what `--max-key-mb` budgets with) holds and is not loose.
    from medhe.compiler.keyset import key_switching_key_bytes

    bound = key_switching_key_bytes(plan.params)
    assert 0.8 * bound < len(relin) <= bound
    assert 0.8 * bound * len(steps) < len(galois) <= bound * len(steps)
    # And they evaluate the plan as exactly as the expanded keys do.
    x = np.random.randn(1, 16, 16)
    expected = torch_out(seq, x)
    got = run_plan(plan, SEALServerBackend(plan.params, relin, galois), client, x)
    np.testing.assert_allclose(got, expected, atol=ckks_tolerance(plan, np.abs(expected).max()))


def test_the_clients_own_inputs_travel_seeded_at_half_the_size_and_evaluate_alike():
    """The client encrypts its inputs with its secret key (SEAL's symmetric encryption), sent in
    seeded form: about half a public-key ciphertext, less fresh noise, and the server computes on
    it as on any ciphertext. Helpers (workers > 1) have only the public key: full size."""
    seq = two_block_model()
    plan = small_plan(seq, (1, 16, 16))
    client = SEALClientBackend(plan.params)
    values = np.random.default_rng(0).uniform(-1, 1, client.slot_count)
    seeded, public = client.encrypt_to_bytes(values), client.serialize(client.encrypt(values))
    assert 0.45 < len(seeded) / len(public) < 0.55
    seeded_error = np.abs(client.decrypt(client.deserialize(seeded)) - values).max()
    public_error = np.abs(client.decrypt(client.deserialize(public)) - values).max()
    assert seeded_error < public_error < 2.0 ** -(plan.params.input_scale_bits - 20)
    rows = np.stack([values] * 16)  # enough rows that two helpers are started
    assert all(0.45 < len(b) / len(public) < 0.55 for b in client.encrypt_serialized(rows))
    assert all(0.9 < len(b) / len(public) < 1.1 for b in client.encrypt_serialized(rows, workers=2))
    # The protocol's ciphertext message is the seeded one, and the plan evaluates it as exactly.
    protocol_client = Client(plan.client_spec(), backend="seal")
    server = Server(plan, backend="seal")
    server.register_keys(protocol_client.evaluation_keys())
    x = np.random.randn(1, 16, 16)
    message = protocol_client.encrypt_input(x)
    assert len(message) < 0.55 * len(public) + 4096
    expected = torch_out(seq, x)
    got = protocol_client.decrypt_logits(server.evaluate(message))
    np.testing.assert_allclose(got, expected, atol=ckks_tolerance(plan, np.abs(expected).max()))


def test_keys_for_more_steps_than_the_plan_needs_are_refused_before_loading():
    from medhe.protocol import wire

    plan = small_plan(two_block_model(), (1, 16, 16))
    client = Client(plan.client_spec(), backend="seal")
    needed = list(plan.client_spec().rotation_steps)
    extra_steps = needed + [s for s in range(1, 200) if s not in needed][: 3 * len(needed)]
    relin, galois = client._backend.evaluation_keys(extra_steps)  # a well-formed but oversized key set
    spec = plan.client_spec()
    ids = {"spec_digest": spec.digest(), "params_digest": spec.params.digest()}
    message = wire.encode_parts("evaluation_keys", [relin, galois],
                                key_id=wire.derive_key_id(ids["params_digest"], relin, galois),
                                extra={"rotation_steps": extra_steps, "backend": "seal"}, **ids)
    server = Server(plan, backend="seal")
    with pytest.raises(InvalidMessage, match=r"Galois keys of \d+ bytes exceed the \d+ key\(s\) this plan needs"):
        server.register_keys(message)
    server.register_keys(client.evaluation_keys())  # the plan's own keys are accepted


@pytest.mark.parametrize("encrypted_model", [False, True])
def test_two_process_evaluation_on_seal_matches_the_plaintext_model(encrypted_model):
    """Both cores for one request (medhe.runtime.split): the halves of each shared layer, computed
    in two processes and handed over in SEAL's format, add up to the plaintext model's logits."""
    from medhe.runtime.split import last_shared_instruction

    seq = two_block_model()
    plan = small_plan(seq, (1, 16, 16))
    assert last_shared_instruction(plan) is not None
    server = server_matches_torch(seq, plan, encrypted_model, two_processes=True)
    (entry,) = server._key_sets.values()
    assert entry.executor._pid is not None  # a helper shared the evaluations
    entry.executor.close()
