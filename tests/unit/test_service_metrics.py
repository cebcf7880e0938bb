"""The service's operator counters (GET /metrics) and per-clinic rate limits, on the clear backend."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient
from torch import nn

from medhe.errors import RemoteError
from medhe.protocol.remote import RemoteClient
from medhe.service.app import Limits, create_app
from medhe.service.auth import TokenStore
from medhe.service.hosting import host_plan
from medhe.service.metrics import RateLimiter
from tests.helpers import compile_torch


def _service(tmp_path, **limits):
    seq = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(2 * 36, 2)).double()
    data = tmp_path / "srv"
    tokens = TokenStore(data)
    issued = {name: tokens.add(name, "clinic") for name in ("clinic-a", "clinic-b")}
    app = create_app([host_plan(data, "tiny", compile_torch(seq, (1, 6, 6)), backend="clear")], data_dir=data,
                     tokens=tokens, limits=Limits(**limits))
    return app, issued


def _remote(app, token, tmp_path, name):
    return RemoteClient("http://testserver", token=token, backend="clear", key_home=tmp_path / name,
                        transport=TestClient(app)._transport)


def _samples(text: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def test_metrics_count_requests_and_evaluations_without_naming_a_clinic(tmp_path):
    app, issued = _service(tmp_path)
    remote = _remote(app, issued["clinic-a"], tmp_path, "a")
    for _ in range(3):
        remote.diagnose(np.random.rand(6, 6), "tiny")
    key_id = remote.client("tiny").key_id
    with TestClient(app) as http:
        response = http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = _samples(response.text)
    assert samples['medhe_requests_total{method="POST",route="/v1/diagnose",status="200"}'] == 3
    assert samples['medhe_evaluations_total{model="tiny"}'] == 3
    assert samples['medhe_evaluation_seconds_total{model="tiny"}'] > 0
    # The first use asked whether its key id was registered (404), then uploaded the keys.
    assert samples['medhe_requests_total{method="GET",route="/v1/keys/{key_id}",status="404"}'] == 1
    assert samples['medhe_requests_total{method="POST",route="/v1/keys",status="200"}'] == 1
    assert samples["medhe_in_flight"] == 0 and samples["medhe_models"] == 1
    # Route templates and model names only: no clinic, no key id, no token.
    for secret in ("clinic-a", key_id, issued["clinic-a"]):
        assert secret not in response.text


def test_a_clinic_over_its_rate_gets_429_and_others_are_served(tmp_path):
    app, issued = _service(tmp_path, requests_per_minute=6, burst=2)
    a = _remote(app, issued["clinic-a"], tmp_path, "a")
    a.client("tiny")  # the key upload is one request of the burst
    a.diagnose(np.random.rand(6, 6), "tiny")
    with pytest.raises(RemoteError) as refused:
        a.diagnose(np.random.rand(6, 6), "tiny")
    assert refused.value.status == 429 and refused.value.code == "rate_limited"
    assert "a minute per clinic" in str(refused.value)
    b = _remote(app, issued["clinic-b"], tmp_path, "b")
    assert b.diagnose(np.random.rand(6, 6), "tiny").label in ("0", "1")  # another clinic's bucket
    with TestClient(app) as http:
        response = http.post("/v1/diagnose", content=b"x", headers={
            "authorization": f"Bearer {issued['clinic-a']}", "content-type": "application/octet-stream"})
        assert response.status_code == 429 and int(response.headers["retry-after"]) >= 1
        assert http.get("/health").status_code == 200  # never limited
        assert _samples(http.get("/metrics").text)["medhe_rate_limited_total"] == 2


def test_rate_limiter_refills_at_its_rate():
    now = [0.0]
    limiter = RateLimiter(per_minute=60, burst=3, clock=lambda: now[0])
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a") == pytest.approx(1.0)
    assert limiter.take("b") == 0.0
    now[0] += 2.0  # two tokens back
    assert limiter.take("a") == 0.0 and limiter.take("a") == 0.0 and limiter.take("a") > 0
    with pytest.raises(ValueError):
        RateLimiter(per_minute=0)
