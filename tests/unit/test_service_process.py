"""A real `medhe serve` process on 127.0.0.1 (clear backend, 2 worker processes), started and
stopped by the tests: concurrent clinics, SIGKILL and restart, a killed worker, stalled and
oversized uploads with the server's memory bounded, TLS with a self-signed certificate."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from torch import nn

from medhe.protocol import wire
from medhe.protocol.client import Client
from medhe.protocol.remote import RemoteClient
from medhe.service.auth import TokenStore
from tests.helpers import compile_torch, torch_out
from tests.service_process import MEDHE, ServerProcess, free_port

@pytest.fixture
def setting(tmp_path):
    seq = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(2 * 36, 2)).double()
    plan = compile_torch(seq, (1, 6, 6))
    plan.save(tmp_path / "plan")
    data = tmp_path / "srv"
    store = TokenStore(data)
    tokens = {f"clinic-{i}": store.add(f"clinic-{i}") for i in range(8)}
    servers = []

    def serve(*extra, models: tuple = ("--plan", f"tiny={tmp_path / 'plan'}", "--workers", "2"), **kwargs):
        servers.append(ServerProcess(data, *models, "--backend", "clear", *extra, **kwargs))
        return servers[-1]

    yield {"seq": seq, "plan": plan, "data": data, "tokens": tokens, "serve": serve, "tmp": tmp_path}
    for server in servers:
        server.kill()


def _remote(setting, server, clinic: str, **kwargs) -> RemoteClient:
    return RemoteClient(server.url, token=setting["tokens"][clinic], backend="clear",
                        key_home=setting["tmp"] / f"home-{clinic}", **kwargs)


def _check(setting, remote: RemoteClient, image) -> None:
    result = remote.diagnose(image, "tiny")
    expected = torch_out(setting["seq"], remote.client("tiny").preprocess(image))
    np.testing.assert_allclose(result.logits, expected, atol=1e-9)


def test_eight_clinics_at_once_sigkill_and_restart(setting):
    server = setting["serve"]().start()
    images = [np.random.rand(6, 6) for _ in range(8)]

    def clinic(i: int) -> str:
        remote = _remote(setting, server, f"clinic-{i}")
        for _ in range(3):
            _check(setting, remote, images[i])
        return remote.client("tiny").key_id

    with ThreadPoolExecutor(8) as pool:
        key_ids = list(pool.map(clinic, range(8)))
    assert len(set(key_ids)) == 8
    assert len(server.workers()) == 2, "evaluation runs in 2 worker processes"
    for pid in server.workers():  # at a lower priority than the event loop that answers /health
        assert int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16]) > 0

    server.kill()
    restarted = setting["serve"]().start()
    for i in (0, 7):
        remote = _remote(setting, restarted, f"clinic-{i}")
        assert remote.key_status(key_ids[i]) is not None, "keys registered before SIGKILL are still there"
        _check(setting, remote, images[i])
    assert list((setting["data"] / "uploads").iterdir()) == []


def test_a_killed_worker_is_replaced_and_a_stalled_upload_does_not_block(setting):
    server = setting["serve"]("--upload-timeout", "2").start()
    remote = _remote(setting, server, "clinic-0")
    image = np.random.rand(6, 6)
    _check(setting, remote, image)
    # A client that announces a body and stalls: /health still answers, and the server drops it.
    stalled = socket.create_connection(("127.0.0.1", server.port))
    stalled.sendall(b"POST /v1/keys HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                    b"Authorization: Bearer " + setting["tokens"]["clinic-0"].encode() +
                    b"\r\nContent-Length: 100000\r\n\r\nMEDHE")
    start = time.perf_counter()
    assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
    assert time.perf_counter() - start < 1.0
    stalled.settimeout(20)
    assert b" 408 " in stalled.recv(4096).split(b"\r\n")[0] + b" "
    stalled.close()
    # Kill one worker: requests keep being answered (at worst one 503 to retry), state intact.
    os.kill(server.workers()[0], signal.SIGKILL)
    answered = 0
    for _ in range(6):
        try:
            _check(setting, remote, image)
            answered += 1
        except Exception as exc:  # the request the dead worker held
            assert "503" in str(exc), exc
    assert answered >= 5
    assert len(server.workers()) == 2


def test_an_oversized_streamed_upload_is_refused_with_memory_bounded(setting):
    server = setting["serve"]().start()
    before = server.peak_rss_bytes()
    spec = setting["plan"].client_spec()
    size = 600 * 2**20
    # A keys message whose header claims 600 MiB (under the 2 GiB limit) with a wrong checksum:
    # streamed to disk, refused at the end, never held in memory.
    header = wire.encode("evaluation_keys", b"", key_id="0" * 32, spec_digest=spec.digest(),
                         params_digest=spec.params.digest())
    prefix, header_len = header[:11], int.from_bytes(header[7:11], "big")
    doc = json.loads(header[11: 11 + header_len])
    doc["payload_bytes"] = size
    body = json.dumps(doc).encode()
    head = prefix[:7] + len(body).to_bytes(4, "big") + body

    def chunks():
        yield head
        block = b"\0" * 2**20
        for _ in range(size // 2**20):
            yield block

    response = httpx.post(f"{server.url}/v1/keys", content=chunks(), timeout=120,
                          headers={"content-type": "application/octet-stream",
                                   "authorization": f"Bearer {setting['tokens']['clinic-0']}"})
    assert response.status_code == 400 and "checksum" in response.json()["message"]
    assert server.peak_rss_bytes() - before < 100 * 2**20, "the upload went to disk, not to memory"
    assert list((setting["data"] / "uploads").iterdir()) == []
    assert httpx.get(f"{server.url}/health").status_code == 200


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make a test certificate")
def test_tls_with_a_self_signed_certificate(setting):
    cert, key = setting["tmp"] / "cert.pem", setting["tmp"] / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    server = setting["serve"]("--ssl-certfile", str(cert), "--ssl-keyfile", str(key), scheme="https").start(
        verify=str(cert))
    _check(setting, _remote(setting, server, "clinic-0", verify=str(cert)), np.random.rand(6, 6))
    with pytest.raises(Exception, match="(?i)certificate|unreachable"):
        _remote(setting, server, "clinic-1").models()  # an unknown certificate is refused by default
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{server.port}/health", timeout=5)  # no plain http on a TLS port


def test_serve_refuses_to_start_without_tokens_unless_told(tmp_path, setting):
    empty = tmp_path / "open"
    result = subprocess.run([*MEDHE, "serve", "--plan", str(setting["tmp"] / "plan"), "--backend", "clear",
                             "--data-dir", str(empty), "--port", str(free_port())],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "medhe token add" in result.stderr



def test_encrypted_model_mode_over_http_from_the_command_line(setting):
    """The server hosts only the architecture; the model owner encrypts the weights under the
    clinic's public key and uploads them with `medhe encrypt-model --server`; the clinic diagnoses
    with `medhe diagnose --server`."""
    tmp = setting["tmp"]
    owner_token = TokenStore(setting["data"]).add("acme", "owner")
    setting["plan"].without_weights().save(tmp / "architecture")
    server = setting["serve"](models=("--encrypted-model", f"tiny={tmp / 'architecture'}", "--workers", "1")).start()
    image = tmp / "scan.png"
    from PIL import Image

    Image.fromarray((np.random.rand(6, 6) * 255).astype(np.uint8)).save(image)
    clinic = [*MEDHE, "diagnose", "--server", server.url, "--backend", "clear", "--keys", str(tmp / "clinic"),
              str(image)]
    env = {**os.environ, "MEDHE_TOKEN": setting["tokens"]["clinic-0"]}
    first = subprocess.run(clinic, capture_output=True, text=True, env=env, timeout=120)
    assert first.returncode == 2 and "no encrypted model" in first.stderr, first.stderr
    public_key = next((tmp / "clinic").glob("tiny-*/public.key"))
    owner = subprocess.run([*MEDHE, "encrypt-model", "--plan", str(tmp / "plan"), "--public-key", str(public_key),
                            "--out", str(tmp / "enc"), "--backend", "clear", "--server", server.url,
                            "--token", owner_token], capture_output=True, text=True, timeout=120)
    assert owner.returncode == 0 and "uploaded" in owner.stdout, owner.stderr
    second = subprocess.run(clinic, capture_output=True, text=True, env=env, timeout=120)
    assert second.returncode == 0, second.stderr
    remote = _remote(setting, server, "clinic-0")
    client = Client.load(remote.spec("tiny"), public_key.with_name("secret.key"))
    expected = torch_out(setting["seq"], client.preprocess(str(image)))
    label = ["0", "1"][int(np.argmax(expected))]
    assert f" {label} " in second.stdout.splitlines()[-1] + " ", second.stdout
    assert not (setting["data"] / "models" / "tiny" / "plan" / "arrays.npz").exists()
