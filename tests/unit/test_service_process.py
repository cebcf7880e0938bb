"""A real `medhe serve` process on 127.0.0.1 (clear backend, 2 worker processes), started and
stopped by the tests: concurrent clinics, SIGKILL and restart, a killed worker, stalled and
oversized uploads with the server's memory bounded, TLS with a self-signed certificate."""

from __future__ import annotations

import base64
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
from tests.bad_input import bad_input_cases
from tests.helpers import compile_torch, shipped_model_logits, torch_out
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
    server = setting["serve"]("--key-cache", "2").start()
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
    # 8 clinics over 2 workers, each keeping at most 2 clinics' key sets in memory (--key-cache 2).
    gauge = [line for line in httpx.get(f"{server.url}/metrics").text.splitlines()
             if line.startswith("medhe_worker_key_sets ")]
    assert len(gauge) == 1 and 1 <= float(gauge[0].split()[1]) <= 2, gauge
    for pid in server.workers():  # at a lower priority than the event loop that answers /health
        assert int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16]) > 0

    server.kill()
    restarted = setting["serve"]().start()
    for i in (0, 7):
        remote = _remote(setting, restarted, f"clinic-{i}")
        assert remote.key_status(key_ids[i]) is not None, "keys registered before SIGKILL are still there"
        _check(setting, remote, images[i])
    assert list((setting["data"] / "uploads").rglob("*.part")) == []


def _raw_post(server, path: str, headers: dict, body: bytes) -> tuple[int, dict]:
    """POST over a bare socket, headers as given (Content-Length included): (status, JSON answer)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close",
                 *(f"{name}: {value}" for name, value in headers.items())]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, content = received.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(content)


def test_bad_input_of_every_kind_to_a_real_server_is_a_4xx_and_no_worker_dies(setting):
    """The bad-input list of tests/bad_input.py sent over a socket to the server process: each a
    4xx with a JSON error, the same worker processes still running, and /health and a correct
    request answered after each."""
    server = setting["serve"]().start()
    remote = _remote(setting, server, "clinic-0")
    client = remote.client("tiny")
    image = np.random.rand(6, 6)
    good = client.encrypt_image(image)
    expected = torch_out(setting["seq"], client.preprocess(image))
    stranger = Client(setting["plan"].client_spec(), backend="clear")
    foreign_seq = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(2 * 36, 2)).double()
    foreign = Client(compile_torch(foreign_seq, (1, 6, 6)).client_spec(), backend="clear")
    cases = bad_input_cases(good=good, keys=stranger.evaluation_keys(), foreign=foreign.encrypt_image(image),
                            unknown_key=stranger.encrypt_image(image),
                            other_clinics=_remote(setting, server, "clinic-1").client("tiny").encrypt_image(image),
                            secret_key=client.export_secret_key(), own_key_id=client.key_id)
    workers = server.workers()
    auth = {"authorization": f"Bearer {setting['tokens']['clinic-0']}", "content-type": "application/octet-stream"}
    for name, (path, body, headers, status) in cases.items():
        if "content-length" in headers:  # a length the body does not have: httpx will not send that
            got, answer = _raw_post(server, path, {**auth, **headers}, body)
        else:
            with httpx.Client(timeout=60) as http:
                response = http.post(f"{server.url}{path}", content=body, headers={**auth, **headers})
            got, answer = response.status_code, response.json()
        assert got == status, f"{name}: {got} {answer}"
        assert answer["error"] and answer["message"], name
        assert httpx.get(f"{server.url}/health", timeout=10).json()["status"] == "ok", name
        answer = httpx.post(f"{server.url}/v1/diagnose", content=good, headers=auth, timeout=60)
        assert answer.status_code == 200, f"after {name}"
        np.testing.assert_allclose(client.decrypt_logits(answer.content), expected, atol=1e-9)
    assert server.workers() == workers, "no bad input took a worker process down"
    assert list((setting["data"] / "uploads").rglob("*.part")) == []
    # The log: one JSON line per request, with its id, status and time; no token, no message bytes.
    text = server.log.read_text()
    logged = [json.loads(line) for line in text.splitlines() if line.startswith('{"request_id"')]
    assert len(logged) >= 2 * len(cases) and all({"status", "latency_s", "path"} <= set(entry) for entry in logged)
    assert {entry["status"] for entry in logged} >= {200, 400, 401, 404, 413, 415}
    payload = good[-48:]  # ciphertext bytes, as they would appear if logged
    for secret in (setting["tokens"]["clinic-0"], payload.hex(), base64.b64encode(payload).decode(), repr(payload)[2:40]):
        assert secret not in text


def test_a_killed_worker_is_replaced_and_a_stalled_upload_does_not_block(setting):
    server = setting["serve"]("--upload-timeout", "2", "--header-timeout", "2").start()
    remote = _remote(setting, server, "clinic-0")
    image = np.random.rand(6, 6)
    _check(setting, remote, image)
    # The header deadline (2 s) counts only while headers arrive: not a body that takes longer, not
    # idle time between requests on a kept-alive connection.
    message = remote.client("tiny").encrypt_image(image)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as slow:
        slow.sendall(f"POST /v1/diagnose HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                     f"Authorization: Bearer {setting['tokens']['clinic-0']}\r\nContent-Length: {len(message)}\r\n"
                     f"Connection: close\r\n\r\n".encode())
        for piece in np.array_split(np.frombuffer(message, dtype=np.uint8), 4):
            time.sleep(0.8)
            slow.sendall(piece.tobytes())
        answer = b""
        while chunk := slow.recv(65536):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    kept = socket.create_connection(("127.0.0.1", server.port))
    kept.settimeout(10)
    for pause_s in (2.5, 0):  # past the deadline counted from the connection; under the 5 s keep-alive
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while not answer.endswith(b"}"):  # the whole JSON answer, so nothing of it is read below
            answer += kept.recv(4096)
        assert answer.startswith(b"HTTP/1.1 200")
        time.sleep(pause_s)
    # Headers that stop half-way are not waited for: on a new connection, and on a kept-alive one
    # after a request was answered.
    fresh = socket.create_connection(("127.0.0.1", server.port))
    start = time.perf_counter()
    for sock in (fresh, kept):
        sock.sendall(b"POST /v1/keys HTTP/1.1\r\nHost: x\r\nContent-Ty")
    for sock in (fresh, kept):
        sock.settimeout(20)
        assert sock.recv(4096) == b"", "the server closes a connection whose headers stall"
        sock.close()
    assert 1.5 < time.perf_counter() - start < 10
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
    setting["plan"].without_weights().save(setting["tmp"] / "architecture")
    server = setting["serve"](models=("--encrypted-model", f"tiny={setting['tmp'] / 'architecture'}")).start()
    before = server.peak_rss_bytes()
    spec = setting["plan"].client_spec()
    size = 600 * 2**20
    # An encrypted model whose header claims 600 MiB (under the 2 GiB limit) with a wrong checksum:
    # streamed to disk, refused at the end, never held in memory. (Evaluation keys that large are
    # refused on their header: more than this plan's keys can be.)
    header = wire.encode("encrypted_model", b"", key_id="0" * 32, spec_digest=spec.digest(),
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

    owner_token = TokenStore(setting["data"]).add("acme", "owner")
    response = httpx.post(f"{server.url}/v1/encrypted-model", content=chunks(), timeout=120,
                          headers={"content-type": "application/octet-stream", "authorization": f"Bearer {owner_token}"})
    assert response.status_code == 400 and "checksum" in response.json()["message"], response.text
    assert server.peak_rss_bytes() - before < 100 * 2**20, "the upload went to disk, not to memory"
    assert list((setting["data"] / "uploads").rglob("*.part")) == []
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
    # The command line trusts the certificate with --ca-file; without it, the error says so.
    from PIL import Image

    image = setting["tmp"] / "scan.png"
    Image.fromarray((np.random.rand(6, 6) * 255).astype(np.uint8)).save(image)
    command = [*MEDHE, "diagnose", str(image), "--server", server.url, "--model", "tiny", "--backend", "clear",
               "--token", setting["tokens"]["clinic-2"], "--keys", str(setting["tmp"] / "home-cli")]
    trusted = subprocess.run([*command, "--ca-file", str(cert)], capture_output=True, text=True, timeout=300)
    assert trusted.returncode == 0 and "scan.png" in trusted.stdout, trusted.stderr
    refused = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--ca-file CERT.pem" in refused.stderr, refused.stderr


def test_serve_and_clinic_refuse_a_port_in_use_before_starting(setting):
    """A port another program listens on is refused at once, before models compile or a banner
    names that address, and nothing is written to the data directory."""
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        models_before = sorted((setting["data"]).rglob("*"))
        served = subprocess.run([*MEDHE, "serve", "--plan", str(setting["tmp"] / "plan"), "--backend", "clear",
                                 "--data-dir", str(setting["data"]), "--port", str(port)],
                                capture_output=True, text=True, timeout=120)
        assert served.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in served.stderr, served.stderr
        assert "another program is using the port" in served.stderr
        assert "serving on" not in served.stdout and sorted((setting["data"]).rglob("*")) == models_before
        clinic = subprocess.run([*MEDHE, "clinic", "--server", "http://127.0.0.1:9", "--port", str(port),
                                 "--keys", str(setting["tmp"] / "clinic-keys")],
                                capture_output=True, text=True, timeout=120)
        assert clinic.returncode == 2 and "choose another with --port" in clinic.stderr, clinic.stderr
        assert "open http" not in clinic.stdout


def test_serve_refuses_a_name_given_twice_before_writing_anything(tmp_path, setting):
    """Two models under one name are refused by name, and --data-dir gets no model folder for it
    (before, the second plan had replaced the first on disk by the time the server refused). A
    repeated flag adds to the first (`--model a --model b` serves both)."""
    data = tmp_path / "srv"
    plan = str(setting["tmp"] / "plan")
    done = subprocess.run([*MEDHE, "serve", "--plan", f"twin={plan}", "--plan", f"twin={plan}", "--backend", "clear",
                           "--data-dir", str(data), "--no-auth", "--port", str(free_port())],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "distinct names: twin named more than once" in done.stderr, done.stderr
    assert not (data / "models" / "twin").exists()
    # So is a mistyped model or encrypted-model directory after a good one: the good one is not written.
    for bad in (["--model", "no-such-model"], ["--encrypted-model", f"enc={tmp_path / 'nowhere'}"]):
        done = subprocess.run([*MEDHE, "serve", "--plan", f"good={plan}", *bad, "--backend", "clear",
                               "--data-dir", str(data), "--no-auth", "--port", str(free_port())],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and bad[1].split("=")[-1] in done.stderr, done.stderr
        assert not (data / "models" / "good").exists()


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
    assert f"send the model owner this clinic's public key ({public_key})" in first.stderr, first.stderr
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
    # Per-step timings: preprocessing, encryption, the request, the server's evaluation, decryption.
    columns = second.stdout.splitlines()[-2].split()
    assert columns == ["image", "label", "P(label)", "prep", "s", "encrypt", "s", "server", "s", "eval", "s", "decrypt", "s"]
    prep_s, encrypt_s, server_s, eval_s, decrypt_s = map(float, second.stdout.splitlines()[-1].split()[-5:])
    assert 0 < eval_s <= server_s and min(prep_s, encrypt_s, decrypt_s) >= 0
    assert not (setting["data"] / "models" / "tiny" / "plan" / "arrays.npz").exists()
    # The encrypted model uploaded before a SIGKILL serves the clinic after the restart.
    server.kill()
    restarted = setting["serve"](models=("--encrypted-model", f"tiny={tmp / 'architecture'}", "--workers", "1"))
    clinic[clinic.index(server.url)] = restarted.start().url
    third = subprocess.run(clinic, capture_output=True, text=True, env=env, timeout=120)
    assert third.returncode == 0, third.stderr
    assert f" {label} " in third.stdout.splitlines()[-1] + " ", third.stdout


def test_a_folder_in_throughput_mode_from_the_command_line(setting):
    """`medhe diagnose --server URL --batch FOLDER` against `medhe serve --batch-model`: one line per
    image, labels as the plaintext model gives them, and per-image timings amortized over the batch."""
    from PIL import Image

    from medhe.protocol.keydir import load_key_directory

    server = setting["serve"](models=("--batch-model", "pneumoniamnist", "--workers", "1")).start()
    studies = setting["tmp"] / "studies"
    studies.mkdir()
    rng = np.random.default_rng(3)
    for i in range(5):
        Image.fromarray((rng.random((28, 28) if i % 2 else (36, 30)) * 255).astype(np.uint8)).save(studies / f"s{i}.png")
    (studies / "s2b.png").write_bytes(b"\x89PNG\r\n\x1a\n cut off in transfer")  # skipped, the batch goes on
    done = subprocess.run([*MEDHE, "diagnose", "--server", server.url, "--model", "pneumoniamnist-batch", "--batch",
                           str(studies), "--backend", "clear", "--keys", str(setting["tmp"] / "clinic")],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "MEDHE_TOKEN": setting["tokens"]["clinic-0"]})
    assert done.returncode == 3, done.stderr
    assert "1 of 6 images could not be read and were not diagnosed: " in done.stderr and "s2b.png" in done.stderr
    lines = done.stdout.splitlines()
    assert "amortized over the batch" in lines[-6] and len(lines[-5:]) == 5
    remote = _remote(setting, server, "clinic-0")
    client = load_key_directory(remote.spec("pneumoniamnist-batch"), next((setting["tmp"] / "clinic").glob("pneumo*")))
    images = sorted(p for p in studies.iterdir() if p.name != "s2b.png")
    expected = shipped_model_logits("pneumoniamnist", np.stack([client.preprocess(p) for p in images]))
    names = [client.spec.class_names[i] for i in expected.argmax(1)]
    assert [line.split()[:2] for line in lines[-5:]] == [[str(p)[-39:], name] for p, name in zip(images, names)]


def test_two_process_evaluation_from_the_command_line(setting):
    """`medhe serve --workers 1 --two-processes`: the worker forks a helper that shares the 8 -> 8
    convolution of each evaluation; clinics get the plaintext model's logits; a killed worker's
    helper goes with it (it ends when its pipe closes)."""
    from medhe.nn.layers import PolyAct
    from medhe.runtime.split import last_shared_instruction
    from tests.helpers import randomize_bn

    seq = randomize_bn(nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.AvgPool2d(2), nn.BatchNorm2d(8), PolyAct(),
        nn.Conv2d(8, 8, 3, padding=1), nn.AvgPool2d(2), nn.BatchNorm2d(8), PolyAct(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 2)).double())
    plan = compile_torch(seq, (1, 16, 16))
    assert last_shared_instruction(plan) is not None
    plan.save(setting["tmp"] / "plan8")
    server = setting["serve"]("--two-processes", models=("--plan", f"tiny={setting['tmp'] / 'plan8'}",
                                                         "--workers", "1")).start()
    remote = _remote(setting, server, "clinic-0")
    for _ in range(2):
        image = np.random.rand(16, 16)
        result = remote.diagnose(image, "tiny")
        np.testing.assert_allclose(result.logits, torch_out(seq, remote.client("tiny").preprocess(image)),
                                   rtol=1e-6, atol=1e-6)
    (worker,) = server.workers()
    helpers = subprocess.run(["pgrep", "-P", str(worker)], capture_output=True, text=True).stdout.split()
    assert len(helpers) == 1, "the worker forked one helper for the clinic's key set"
    os.kill(worker, signal.SIGKILL)
    deadline = time.time() + 30
    while Path(f"/proc/{helpers[0]}").exists() and time.time() < deadline:
        time.sleep(0.2)
    assert not Path(f"/proc/{helpers[0]}").exists() or "Z" in Path(f"/proc/{helpers[0]}/stat").read_text().split()[2]


def test_two_processes_need_local_worker_processes(setting):
    for extra in (("--workers", "0"), ("--ray", "auto")):
        run = subprocess.run([*MEDHE, "serve", "--data-dir", str(setting["data"]), "--plan",
                              f"tiny={setting['tmp'] / 'plan'}", "--backend", "clear", "--two-processes", *extra],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 2 and "two-process" in run.stderr.lower(), run.stderr
