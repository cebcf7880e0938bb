"""HTTP service on the clear backend through FastAPI's test client (evaluation on a thread):
routing between hosted models, tokens and key ownership, streamed uploads, the bounded queue and
bad input of every kind answered with a 4xx while the server keeps serving."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from torch import nn

from medhe.errors import ConfigError, ImageLoadError, MissingKeyError, RemoteError
from medhe.protocol import wire
from medhe.protocol.client import Client
from medhe.protocol.remote import RemoteClient
from medhe.service.app import Limits, create_app
from medhe.service.auth import TokenStore
from medhe.service.hosting import host_plan
from tests.bad_input import bad_input_cases, changed, header_of
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
    # Revoking every token closes the server to everyone; it never opens it.
    store = TokenStore(service["data"])
    for name, _ in store.names():
        store.revoke(name)
    a_auth = {"authorization": f"Bearer {service['tokens']['clinic-a']}"}
    with TestClient(service["app"]) as tc:
        for headers in (a_auth, {}):
            answer = tc.get("/v1/models", headers=headers)
            assert answer.status_code == 401 and answer.json()["error"] == "unauthorized"
        # An unreadable token store admits nobody either: a JSON 503, not a 500, and no opening.
        for damaged in ("{not json", '{"tokens": ["x"]}', '["tokens"]'):
            store.path.write_text(damaged)
            answer = tc.get("/v1/models", headers=a_auth)
            assert answer.status_code == 503 and answer.json()["error"] == "token_store_unavailable", damaged
        assert tc.get("/v1/models").status_code == 401
        assert tc.get("/health").status_code == 200


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
    diagnose = "/v1/diagnose"
    cases = bad_input_cases(good=good, keys=keys, foreign=foreign.encrypt_image(image),
                            unknown_key=stranger.encrypt_image(image), other_clinics=b_client.encrypt_image(image),
                            secret_key=client.export_secret_key(), own_key_id=client.key_id)
    assert len(cases) >= 15
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
    assert list((service["data"] / "uploads").rglob("*.part")) == [], "refused uploads leave nothing behind"
    assert stranger.key_id not in {p.stem for p in (service["data"] / "models" / "tiny" / "keys").iterdir()}


def test_uploads_are_refused_on_their_header_before_the_payload_reaches_the_disk(service, tmp_path):
    """Each body here stops a few bytes after its header: a check made only once the whole upload
    is on disk would answer "truncated" (400 invalid_message) instead of the check's own error."""
    tiny_keys = Client(service["plan"].client_spec(), backend="clear").evaluation_keys()
    foreign_keys = Client(_tiny(2)[1].client_spec(), backend="clear").evaluation_keys()

    def cut(message: bytes) -> bytes:
        return message[:11 + header_of(message)[1] + 8]

    def bearer(name: str) -> dict:
        return {"authorization": f"Bearer {service['tokens'][name]}", **OCTET}

    b_batch = changed(tiny_keys, kind="batch_ciphertext", key_id=_remote(service, "clinic-b").client("tiny").key_id)
    cases = [
        ("/v1/keys", cut(foreign_keys), "clinic-a", 400, "unknown_model"),
        ("/v1/encrypted-model", cut(changed(tiny_keys, kind="encrypted_model")), "acme", 409, "wrong_mode"),
        ("/v1/diagnose-batch", cut(b_batch), "clinic-a", 409, "wrong_mode"),  # a latency model
    ]
    with TestClient(service["app"]) as tc:
        for path, body, who, status, code in cases:
            answer = tc.post(path, content=body, headers=bearer(who))
            assert (answer.status_code, answer.json()["error"]) == (status, code), (path, answer.text[:300])
    # Keys larger than the plan's keys can be (under the server's own size limit, 2 GiB by default).
    data = tmp_path / "plain-limits"
    model = host_plan(data, "tiny", service["plan"], backend="clear")
    bound = model.evaluation_keys_bound_bytes()
    assert bound < Limits().evaluation_keys_bytes
    with TestClient(create_app([model], data_dir=data)) as tc:
        answer = tc.post("/v1/keys", content=cut(changed(tiny_keys, payload_bytes=bound + 1)), headers=OCTET)
        assert answer.status_code == 413 and "evaluation keys for model tiny are at most" in answer.json()["message"]
        assert list((data / "uploads").rglob("*.part")) == []


def test_a_starting_server_sweeps_stopped_servers_files_but_not_live_ones(tmp_path):
    """Upload areas whose server is gone (their lock is free) go at once, whatever their age; a
    live server's area stays (under Ray, replicas share the data directory). Temporary files of
    the key store, owners lists and tokens go when older than an hour, fresh ones stay."""
    import fcntl
    import os
    import time

    data = tmp_path / "srv"
    model = host_plan(data, "tiny", _tiny(2)[1], backend="clear")
    model.owners_dir.mkdir(parents=True, exist_ok=True)
    areas = {name: data / "uploads" / name for name in ("0dead000", "11fe0000")}
    for area in areas.values():
        area.mkdir(parents=True)
        (area / ".lock").touch()
        (area / "body.part").write_bytes(b"half a body")
    live = open(areas["11fe0000"] / ".lock", "a")  # a live server holds its area's lock
    fcntl.flock(live, fcntl.LOCK_EX)
    places = {"key": model.key_dir, "owners": model.owners_dir, "tokens": data}
    old = time.time() - 2 * 3600
    for folder in places.values():
        (folder / ".x.0123.tmp").write_bytes(b"half")
        os.utime(folder / ".x.0123.tmp", (old, old))
        (folder / ".x.4567.tmp").write_bytes(b"being written")
    create_app([model], data_dir=data)
    assert not areas["0dead000"].exists(), "a stopped server's upload area is removed at once"
    assert (areas["11fe0000"] / "body.part").exists(), "a live server's upload is left alone"
    for name, folder in places.items():
        assert not (folder / ".x.0123.tmp").exists() and (folder / ".x.4567.tmp").exists(), name
    # The new server's own area is locked: a second server starting now keeps it.
    mine = [area for area in (data / "uploads").iterdir() if area.name not in areas]
    assert len(mine) == 1 and (mine[0] / ".lock").exists()
    create_app([model], data_dir=data)
    assert mine[0].exists() and areas["11fe0000"].exists()
    live.close()


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
    with pytest.raises(ConfigError, match="distinct client specs: a and b have the same one"):
        create_app(same, data_dir=tmp_path)
    _, other = _tiny(3)
    twice = [host_plan(tmp_path, "a", plan, backend="clear"), host_plan(tmp_path, "a", other, backend="clear")]
    with pytest.raises(ConfigError, match="distinct names: a named more than once"):
        create_app(twice, data_dir=tmp_path)
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
    progress = []
    split = remote.diagnose_batch(images, "tiny-batch", slots_per_batch=10, max_in_flight=3,
                                  on_batch=lambda done, total: progress.append((done, total)))
    assert progress == [(1, 4), (2, 4), (3, 4), (4, 4)]  # 37 images in batches of 10
    assert [r.image for r in split] == [str(image) for image in images]
    np.testing.assert_allclose(np.stack([r.logits for r in split]), expected, atol=1e-9)
    assert remote.diagnose_batch([], "tiny-batch") == []
    # An unreadable file raises, or, given a list, is set aside while the others are diagnosed.
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ImageLoadError, match="broken.png"):
        remote.diagnose_batch([images[0], broken], "tiny-batch")
    unreadable = []
    kept = remote.diagnose_batch([images[0], broken, images[1]], "tiny-batch", unreadable=unreadable)
    assert [u[0] for u in unreadable] == [str(broken)] and isinstance(unreadable[0][1], ImageLoadError)
    assert [r.image for r in kept] == [str(images[0]), str(images[1])]
    np.testing.assert_allclose(np.stack([r.logits for r in kept]), expected[:2], atol=1e-9)
    assert remote.diagnose_batch([broken], "tiny-batch", unreadable=[]) == []
    assert all(r.preprocess_s > 0 for r in split)
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
        # A batch under keys the server does not have is refused on its header (the body here stops
        # short: a check after the whole upload would answer "truncated").
        stranger = changed(batch_message, key_id="0" * 32)
        wrong = tc.post("/v1/diagnose-batch", content=stranger[:11 + header_of(stranger)[1] + 8], headers=OCTET)
        assert wrong.status_code == 404 and wrong.json()["error"] == "unknown_key", wrong.text
    with pytest.raises(ConfigError, match="latency mode"):
        remote.diagnose_batch(images[:2], "tiny")
