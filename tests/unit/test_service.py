"""HTTP service on the clear backend through FastAPI's test client (evaluation on a thread):
routing between hosted models, tokens and key ownership, streamed uploads, the bounded queue and
bad input of every kind answered with a 4xx while the server keeps serving."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from fastapi.testclient import TestClient
from torch import nn

from medhe.errors import ConfigError, MissingKeyError, RemoteError
from medhe.protocol import wire
from medhe.protocol.client import Client
from medhe.protocol.remote import RemoteClient
from medhe.service.app import Limits, create_app
from medhe.service.auth import TokenStore
from medhe.service.hosting import host_plan
from tests.helpers import compile_torch, torch_out

OCTET = {"content-type": "application/octet-stream"}


def _tiny(outputs: int):
    seq = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(2 * 36, outputs)).double()
    return seq, compile_torch(seq, (1, 6, 6))


@pytest.fixture
def service(tmp_path):
    """Two hosted models, tokens for two clinics and a model owner."""
    seq, plan = _tiny(2)
    other_seq, other_plan = _tiny(3)
    data = tmp_path / "srv"
    tokens = TokenStore(data)
    issued = {name: tokens.add(name, role) for name, role in
              (("clinic-a", "clinic"), ("clinic-b", "clinic"), ("acme", "owner"))}
    models = [host_plan(data, "tiny", plan, backend="clear"), host_plan(data, "other", other_plan, backend="clear")]
    app = create_app(models, data_dir=data, tokens=tokens, limits=Limits(evaluation_keys_bytes=2**20))
    return {"seq": seq, "plan": plan, "other_plan": other_plan, "other_seq": other_seq, "app": app, "data": data,
            "tokens": issued, "tmp": tmp_path}


def _remote(service, name: str, **kwargs) -> RemoteClient:
    return RemoteClient("http://testserver", token=service["tokens"].get(name, name), backend="clear",
                        key_home=service["tmp"] / f"home-{name}", transport=TestClient(service["app"])._transport,
                        **kwargs)


def test_round_trip_for_each_hosted_model_matches_plaintext(service):
    remote = _remote(service, "clinic-a")
    assert {m["name"] for m in remote.models()} == {"tiny", "other"}
    image = np.random.rand(6, 6)
    for name, seq in (("tiny", service["seq"]), ("other", service["other_seq"])):
        result = remote.diagnose(image, name)
        client = remote.client(name)
        np.testing.assert_allclose(result.logits, torch_out(seq, client.preprocess(image)), atol=1e-9)
        assert result.evaluate_s >= 0 and result.upload_bytes > 0
    # Keys were made once and are reused by a new session; nothing is uploaded twice.
    again = _remote(service, "clinic-a")
    assert again.client("tiny").key_id == remote.client("tiny").key_id
    key_dir = again.key_dir("tiny", again.spec("tiny"))
    assert (key_dir / "secret.key").stat().st_mode & 0o777 == 0o600 and key_dir.stat().st_mode & 0o777 == 0o700


def test_a_changed_model_is_refused_until_accepted(service):
    remote = _remote(service, "clinic-a")
    remote.diagnose(np.random.rand(6, 6), "tiny")
    pins = remote.key_home / "pins.json"
    pins.write_text(json.dumps({"tiny": "0" * 64}))  # as if the server's model had changed since
    fresh = _remote(service, "clinic-a")
    with pytest.raises(ConfigError, match="changed since first use"):
        fresh.diagnose(np.random.rand(6, 6), "tiny")
    assert fresh.diagnose(np.random.rand(6, 6), "tiny", accept_new=True).label in ("0", "1")


def test_clinics_see_and_use_only_their_own_key_ids(service):
    a, b = _remote(service, "clinic-a"), _remote(service, "clinic-b")
    image = np.random.rand(6, 6)
    a_client = a.client("tiny")
    assert a.key_status(a_client.key_id)["model"] == "tiny"
    assert b.key_status(a_client.key_id) is None, "another clinic's key id is not disclosed"
    with pytest.raises(MissingKeyError, match="by this clinic"):
        b.evaluate(a_client.encrypt_image(image))
    for bad_token in ("wrong", None):
        with pytest.raises(RemoteError, match="401 unauthorized") as info:
            RemoteClient("http://testserver", token=bad_token, transport=TestClient(service["app"])._transport,
                         key_home=service["tmp"] / "x").models()
        assert info.value.status == 401
    # Only a model owner uploads encrypted models (and this server runs the model in clear).
    with TestClient(service["app"]) as tc:
        auth = {"authorization": f"Bearer {service['tokens']['clinic-a']}", **OCTET}
        assert tc.post("/v1/encrypted-model", content=b"x", headers=auth).status_code == 403
    # A revoked token stops working at once.
    TokenStore(service["data"]).revoke("clinic-b")
    with pytest.raises(RemoteError, match="401"):
        b.models()


def _header(message: bytes) -> tuple[dict, int]:
    header_len = struct.unpack_from(">I", message, 7)[0]
    return json.loads(message[11: 11 + header_len]), header_len


def _with_header(message: bytes, header: bytes) -> bytes:
    _, header_len = _header(message)
    return message[:11 - 4] + struct.pack(">I", len(header)) + header + message[11 + header_len:]


def _changed(message: bytes, **changes) -> bytes:
    header, _ = _header(message)
    return _with_header(message, json.dumps({**header, **changes}).encode())


def test_bad_input_of_every_kind_is_a_4xx_and_the_server_keeps_serving(service):
    remote = _remote(service, "clinic-a")
    client = remote.client("tiny")
    image = np.random.rand(6, 6)
    good = client.encrypt_image(image)
    stranger = Client(service["plan"].client_spec(), backend="clear")
    b_client = _remote(service, "clinic-b").client("tiny")
    foreign_plan = _tiny(2)[1]  # same architecture, other weights: a spec this server does not host
    foreign = Client(foreign_plan.client_spec(), backend="clear")
    keys = stranger.evaluation_keys()
    auth = {"authorization": f"Bearer {service['tokens']['clinic-a']}"}
    diagnose, register = "/v1/diagnose", "/v1/keys"
    cases = {
        "garbage": (diagnose, b"\x00garbage" * 10, {}, 400),
        "empty": (diagnose, b"", {}, 400),
        "truncated": (diagnose, good[:-100], {}, 400),
        "wrong kind": (diagnose, keys, {}, 400),
        "wrong plan": (diagnose, foreign.encrypt_image(image), {}, 400),
        "unknown key id": (diagnose, stranger.encrypt_image(image), {}, 404),
        "another clinic's key id": (diagnose, b_client.encrypt_image(image), {}, 404),
        "forged payload digest": (diagnose, _changed(good, payload_sha256="0" * 64), {}, 400),
        "forged spec digest": (diagnose, _changed(good, spec_digest="f" * 64), {}, 400),
        "oversized (declared)": (diagnose, b"x", {"content-length": str(10**12)}, 413),
        "oversized (claimed in header)": (diagnose, _changed(good, payload_bytes=10**9), {}, 413),
        "oversized (streamed)": (register, iter([keys[:2**16]] + [b"\0" * 2**16] * 40), {}, 413),
        "header field of the wrong type": (diagnose, _changed(good, key_id={"a": 1}), {}, 400),
        "huge number": (diagnose, _with_header(good, b'{"payload_bytes": ' + b"9" * 20000 + b"}"), {}, 400),
        "deep nesting": (diagnose, _with_header(good, b"[" * 5000 + b"]" * 5000), {}, 400),
        "secret key offered": (register, client.export_secret_key(), {}, 400),
        "path-like key id": (register, _changed(keys, key_id="../../etc/passwd"), {}, 400),
        "key id not the hash of the keys": (register, _changed(keys, key_id=client.key_id), {}, 400),
        "40 ciphertexts in one message": (diagnose, good * 40, {}, 413),
        "wrong content type": (diagnose, good, {"content-type": "application/json"}, 415),
        "wrong token": (diagnose, good, {"authorization": "Bearer nope"}, 401),
    }
    with TestClient(service["app"]) as tc:
        for name, (path, body, headers, status) in cases.items():
            response = tc.post(path, content=body, headers={**auth, **OCTET, **headers})
            assert response.status_code == status, f"{name}: {response.status_code} {response.text[:200]}"
            assert response.json()["error"] and response.json()["message"], name
            assert tc.get("/health").json()["status"] == "ok", name
            result = tc.post(diagnose, content=good, headers={**auth, **OCTET})
            assert result.status_code == 200, f"after {name}"
            np.testing.assert_allclose(client.decrypt_logits(result.content),
                                       torch_out(service["seq"], client.preprocess(image)), atol=1e-9)
    assert list((service["data"] / "uploads").iterdir()) == [], "refused uploads leave nothing behind"
    assert stranger.key_id not in {p.stem for p in (service["data"] / "models" / "tiny" / "keys").iterdir()}


def test_a_full_queue_answers_503_with_retry_after(service):
    pool = service["app"].state.pool
    remote = _remote(service, "clinic-a")
    message = remote.client("tiny").encrypt_image(np.random.rand(6, 6))
    pool.pending = pool.max_pending  # as if that many requests were in progress or waiting
    try:
        with TestClient(service["app"]) as tc:
            auth = {"authorization": f"Bearer {service['tokens']['clinic-a']}", **OCTET}
            response = tc.post("/v1/diagnose", content=message, headers=auth)
            assert response.status_code == 503 and response.json()["error"] == "busy"
            assert int(response.headers["retry-after"]) >= 1
            assert tc.get("/health").status_code == 200
    finally:
        pool.pending = 0
    assert remote.evaluate(message)


def test_openapi_schema_documents_every_endpoint(service):
    with TestClient(service["app"]) as tc:
        paths = tc.get("/openapi.json").json()["paths"]
    for path in ("/health", "/v1/models", "/v1/models/{name}", "/v1/keys", "/v1/keys/{key_id}",
                 "/v1/diagnose", "/v1/encrypted-model"):
        assert path in paths, path


def test_hosting_refuses_bad_names_and_duplicate_models(tmp_path):
    _, plan = _tiny(2)
    with pytest.raises(ConfigError, match="model name"):
        host_plan(tmp_path, "../escape", plan, backend="clear")
    same = [host_plan(tmp_path, "a", plan, backend="clear"), host_plan(tmp_path, "b", plan, backend="clear")]
    with pytest.raises(ConfigError, match="distinct"):
        create_app(same, data_dir=tmp_path)
    with pytest.raises(ConfigError, match="clinic name"):
        TokenStore(tmp_path).add("Bad Name")
    assert wire.KEY_ID_HEX_DIGITS == 32


def _batch_plan(seq, size: int):
    from medhe.compiler.batch import batch_steps
    from medhe.compiler.passes import optimize
    from medhe.params import choose_params
    from medhe.plan import BatchPlan, rescale_factors
    from tests.helpers import trace_torch

    steps = batch_steps(optimize(trace_torch(seq, (1, size, size))))
    return BatchPlan(choose_params(rescale_factors([s.kind for s in steps]), 1), (1, size, size), steps, ["a", "b"],
                     {"image_size": size, "mean": 0.0, "std": 1.0}, "test")


def test_throughput_mode_over_http_matches_plaintext(tmp_path):
    from medhe.nn.layers import PolyAct
    from medhe.plan import BatchPlan, load_plan_dir

    seq = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.AvgPool2d(2), PolyAct(), nn.Flatten(),
                        nn.Linear(2 * 9, 2)).double()
    batch_plan = _batch_plan(seq, 6)
    # The batch plan round-trips through its directory (digest checked on load).
    assert load_plan_dir(batch_plan.save(tmp_path / "bp")).digest() == batch_plan.digest()
    _, latency_plan = _tiny(2)
    data = tmp_path / "srv"
    app = create_app([host_plan(data, "tiny-batch", batch_plan, backend="clear"),
                      host_plan(data, "tiny", latency_plan, backend="clear")], data_dir=data)
    assert isinstance(load_plan_dir(data / "models" / "tiny-batch" / "plan"), BatchPlan)
    remote = RemoteClient("http://testserver", key_home=tmp_path / "clinic", backend="clear",
                          transport=TestClient(app)._transport)
    assert remote.model_card("tiny-batch")["endpoint"] == "/v1/diagnose-batch"
    images = [np.random.rand(6, 6) for _ in range(37)]
    results = remote.diagnose_batch(images, "tiny-batch")
    client = remote.client("tiny-batch")
    expected = np.stack([torch_out(seq, client.preprocess(image)) for image in images])
    np.testing.assert_allclose(np.stack([r.logits for r in results]), expected, atol=1e-9)
    assert [r.label for r in results] == [["a", "b"][i] for i in expected.argmax(1)]
    # A folder larger than a batch: several batch messages, three in flight at once, results in order.
    split = remote.diagnose_batch(images, "tiny-batch", slots_per_batch=10, max_in_flight=3)
    assert [r.image for r in split] == [str(image) for image in images]
    np.testing.assert_allclose(np.stack([r.logits for r in split]), expected, atol=1e-9)
    assert remote.diagnose_batch([], "tiny-batch") == []
    # Each model only on its own endpoint.
    with TestClient(app) as tc:
        batch_message = client.encrypt_batch(np.stack([client.preprocess(i) for i in images[:3]]))
        wrong = tc.post("/v1/diagnose", content=batch_message, headers=OCTET)
        assert wrong.status_code == 400 and "batch_ciphertext" in wrong.json()["message"]
        single = remote.client("tiny").encrypt_image(images[0])
        wrong = tc.post("/v1/diagnose-batch", content=single, headers=OCTET)
        assert wrong.status_code == 400 and "ciphertext" in wrong.json()["message"]
        latency = remote.client("tiny")
        spec = latency.spec
        for_latency_model = wire.encode_parts("batch_ciphertext", [b""], key_id=latency.key_id,
                                              spec_digest=spec.digest(), params_digest=spec.params.digest())
        wrong = tc.post("/v1/diagnose-batch", content=for_latency_model, headers=OCTET)
        assert wrong.status_code == 409 and wrong.json()["error"] == "wrong_mode"
    with pytest.raises(ConfigError, match="latency mode"):
        remote.diagnose_batch(images[:2], "tiny")
