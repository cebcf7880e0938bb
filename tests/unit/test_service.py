"""HTTP service on the clear backend, through FastAPI's test client."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient
from torch import nn

from medhe.errors import InvalidMessage, MissingKeyError
from medhe.protocol.client import Client
from medhe.service.app import HTTPServerClient, create_app
from tests.helpers import compile_torch, torch_out


@pytest.fixture
def setup(tmp_path):
    seq = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(2 * 36, 2)).double()
    plan = compile_torch(seq, (1, 6, 6))
    app = create_app(plan, backend="clear", key_dir=tmp_path / "keys")
    http = HTTPServerClient("http://testserver", transport=TestClient(app)._transport)
    return seq, plan, app, http


def test_http_round_trip_and_errors(setup):
    seq, plan, app, http = setup
    assert http.client_spec() == plan.client_spec()
    assert http.model_card()["model_commitment"] == plan.digest()
    client = Client(plan.client_spec(), backend="clear")
    assert http.register_keys(client.evaluation_keys()) == client.key_id
    image = np.random.rand(6, 6)
    logits = client.decrypt_logits(http.evaluate(client.encrypt_image(image)))
    np.testing.assert_allclose(logits, torch_out(seq, client.preprocess(image)), atol=1e-9)

    with pytest.raises(InvalidMessage, match="400"):
        http.evaluate(b"garbage")
    with pytest.raises(MissingKeyError):
        http.evaluate(Client(plan.client_spec(), backend="clear").encrypt_image(image))
    # Still serving, keys intact.
    assert client.decrypt_logits(http.evaluate(client.encrypt_image(image))).shape == (2,)


def test_oversized_body_is_refused_without_reading_it(setup):
    _, _, app, _ = setup
    with TestClient(app) as tc:
        response = tc.post("/v1/diagnose", content=b"x", headers={"content-length": str(10**12)})
    assert response.status_code == 413


def test_other_content_types_are_refused(setup):
    _, _, app, _ = setup
    with TestClient(app) as tc:
        response = tc.post("/v1/diagnose", content=b"MEDHE...", headers={"content-type": "application/json"})
        assert response.status_code == 415 and "octet-stream" in response.json()["detail"]
        assert tc.get("/health").status_code == 200
