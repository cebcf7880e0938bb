"""The service as a Ray Serve application on a local Ray cluster started by the test (clear
backend): two replicas share one key store, so keys registered through one are used by both."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from torch import nn

from medhe.protocol.remote import OCTET, RemoteClient
from medhe.service.auth import TokenStore
from tests.helpers import compile_torch, torch_out
from tests.service_process import ServerProcess

pytest.importorskip("ray.serve", reason="Ray is the optional extra medhe[cluster]")


@pytest.mark.xdist_group("ray")  # the ray_cluster fixture stops every Ray process
def test_two_ray_replicas_share_the_key_store(ray_cluster, tmp_path):
    seq = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(2 * 36, 2)).double()
    plan = compile_torch(seq, (1, 6, 6))
    plan.save(tmp_path / "plan")
    data = tmp_path / "srv"
    token = TokenStore(data).add("clinic-a")
    server = ServerProcess(data, "--plan", f"tiny={tmp_path / 'plan'}", "--backend", "clear", "--ray", ray_cluster,
                           "--replicas", "2")
    try:
        server.start(timeout_s=300)
        remote = RemoteClient(server.url, token=token, backend="clear", key_home=tmp_path / "clinic")
        client = remote.client("tiny")  # keys registered once, through one replica
        image = np.random.rand(6, 6)
        message = client.encrypt_image(image)
        expected = torch_out(seq, client.preprocess(image))

        def diagnose(_):
            response = httpx.post(f"{server.url}/v1/diagnose", content=message, timeout=120,
                                  headers={"content-type": OCTET, "authorization": f"Bearer {token}"})
            assert response.status_code == 200, response.text
            np.testing.assert_allclose(client.decrypt_logits(response.content), expected, atol=1e-9)
            return response.headers["x-medhe-instance"]

        # Ray Serve routes to the less busy replica, so one replica may take a whole round of
        # quick requests; up to 5 rounds, until both have answered.
        instances = set()
        with ThreadPoolExecutor(4) as pool:
            for _ in range(5):
                instances |= set(pool.map(diagnose, range(24)))
                if len(instances) == 2:
                    break
        assert len(instances) == 2, "both replicas answered, with keys one of them registered"
        assert httpx.get(f"{server.url}/v1/models").status_code == 401, "tokens hold on Ray too"
    finally:
        server.kill()
