"""The clinic web app's local process (`medhe clinic`) on the clear backend, against an in-process
diagnosis server: studies from PNG and DICOM files diagnose exactly as the CLI's code path does,
failures get clear messages, and the page is guarded (local assets only, a header on every POST,
this machine's host name)."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydicom.data import get_testdata_file
from torch import nn

from medhe.data.images import load_image_bytes
from medhe.data.preprocess import Preprocessing
from medhe.protocol.remote import RemoteClient
from medhe.service.app import create_app
from medhe.service.auth import TokenStore
from medhe.service.clinic import CLINIC_HEADER, STATIC_DIR, ClinicApp, create_clinic_app
from medhe.service.hosting import host_plan
from tests.helpers import compile_torch

ACCESS_TOKEN = "test-access-token-of-this-run"
AUTH = {CLINIC_HEADER: ACCESS_TOKEN}
POST = {**AUTH, "content-type": "application/octet-stream"}
INPUT_PX = 8


@pytest.fixture
def setup(tmp_path):
    seq = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(2 * INPUT_PX**2, 2)).double()
    plan = compile_torch(seq, (1, INPUT_PX, INPUT_PX))
    data = tmp_path / "srv"
    tokens = TokenStore(data)
    token = tokens.add("clinic-a", "clinic")
    server = create_app([host_plan(data, "tiny", plan, backend="clear")], data_dir=data, tokens=tokens)
    transport = TestClient(server)._transport

    def clinic(token=token, key_home=tmp_path / "clinic-keys", transport=transport):
        remote = RemoteClient("http://testserver", token=token, backend="clear", key_home=key_home,
                              transport=transport)
        app = ClinicApp(remote, access_token=ACCESS_TOKEN)
        return app, TestClient(create_clinic_app(app, allowed_hosts=("testserver",)), headers=AUTH)

    return {"clinic": clinic, "token": token, "transport": transport, "tmp": tmp_path}


def _wait(client: TestClient, task_id: str, timeout_s: float = 30) -> dict:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        task = client.get(f"/api/tasks/{task_id}").json()
        if task["state"] in ("done", "failed"):
            return task
        time.sleep(0.02)
    raise AssertionError(f"task {task_id} did not finish")


def _png_bytes(width: int = 40, height: int = 30) -> bytes:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_page_is_served_locally_with_a_strict_content_policy(setup):
    _, page = setup["clinic"]()
    response = page.get("/")
    assert response.status_code == 200 and "/static/clinic.js" in response.text
    policy = response.headers["content-security-policy"]
    assert "connect-src 'self'" in policy and "default-src 'none'" in policy and "script-src 'self'" in policy
    for asset in ("clinic.js", "clinic.css"):
        assert page.get(f"/static/{asset}").status_code == 200
    # No CDN and no other address: every asset is in the package and names no other host.
    for path in STATIC_DIR.iterdir():
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", path.read_text()), path.name
    # Every form control of the page has a label.
    html = (STATIC_DIR / "index.html").read_text()
    for control in re.findall(r'<(?:select|input)[^>]*id="([^"]+)"', html):
        assert f'for="{control}"' in html, control


def test_the_api_needs_this_runs_token_and_this_machines_host_name(setup):
    app, page = setup["clinic"]()
    png = _png_bytes()
    anonymous = TestClient(create_clinic_app(app, allowed_hosts=("testserver",)))
    assert anonymous.get("/").status_code == 200  # the page itself holds nothing
    # Another web site can make a browser POST a form here, another local user can send requests:
    # neither has this run's token, so neither reads a study or uses the keys.
    for headers in ({}, {CLINIC_HEADER: "1"}, {CLINIC_HEADER: ACCESS_TOKEN + "x"}):
        response = anonymous.post("/api/studies?model=tiny&name=a.png", content=png,
                                  headers={**headers, "content-type": "text/plain"})
        assert response.status_code == 403 and "access token" in response.json()["message"]
        for path in ("/api/status", "/api/tasks", "/api/studies.csv"):
            assert anonymous.get(path, headers=headers).status_code == 403, path
    assert anonymous.post("/api/models/tiny/keys").status_code == 403
    assert anonymous.post("/", headers=AUTH).status_code == 405
    assert ClinicApp(app.remote).access_token != ClinicApp(app.remote).access_token  # new for every run
    # A DNS-rebinding page names its own host; this machine's names (IPv6 in brackets) are served.
    assert page.get("/api/status", headers={"host": "evil.example"}).status_code == 400
    local = TestClient(create_clinic_app(app), headers=AUTH)
    for host in ("127.0.0.1:8501", "localhost:8501", "[::1]:8501"):
        assert local.get("/", headers={"host": host}).status_code == 200, host
    assert app.tasks() == []


def test_png_and_dicom_studies_equal_the_cli_diagnosis(setup, tmp_path):
    app, page = setup["clinic"]()
    status = page.get("/api/status").json()
    assert status["server"]["reachable"] and [m["name"] for m in status["models"]] == ["tiny"]
    assert status["models"][0]["keys"] == "none"
    keys = _wait(page, page.post("/api/models/tiny/keys", headers=AUTH).json()["id"])
    assert keys["state"] == "done" and keys["result"]["evaluation_keys_bytes"] > 0
    assert page.get("/api/status").json()["models"][0]["keys"] == "ready"

    files = {"scan.png": _png_bytes(), "MR_small.dcm": open(get_testdata_file("MR_small.dcm"), "rb").read(),
             "MR_small_RLE.dcm": open(get_testdata_file("MR_small_RLE.dcm"), "rb").read()}
    # The CLI's code path (`medhe diagnose --server`): a RemoteClient on the file, same key home.
    cli = RemoteClient("http://testserver", token=setup["token"], backend="clear", key_home=tmp_path / "clinic-keys",
                       transport=setup["transport"])
    for name, data in files.items():
        response = page.post(f"/api/studies?model=tiny&name={name}", content=data, headers=POST)
        assert response.status_code == 200, response.text
        study = response.json()
        assert study["preview"].startswith("data:image/png;base64,")
        preview = Image.open(io.BytesIO(base64.b64decode(study["preview"].split(",", 1)[1])))
        # The preview is the cropped, resized image the model gets (normalisation undone).
        recipe = Preprocessing.from_dict(cli.spec("tiny").preprocessing)
        resized = recipe.resize(load_image_bytes(data, name))
        np.testing.assert_array_equal(np.asarray(preview), np.round(np.clip(resized, 0, 1) * 255).astype(np.uint8))
        done = _wait(page, study["id"])
        assert done["state"] == "done", done["error"]
        assert set(done["timings_s"]) == {"preprocess", "encrypt", "upload", "evaluate", "decrypt"}
        path = tmp_path / name
        path.write_bytes(data)
        expected = cli.diagnose(path, "tiny")
        assert done["result"]["label"] == expected.label
        np.testing.assert_allclose(done["result"]["logits"], expected.logits, rtol=0, atol=1e-12)
        assert done["result"]["probability"] == pytest.approx(float(expected.probabilities.max()), abs=1e-12)
        assert done["result"]["weights"] == "plain" and done["result"]["key_id"] == cli.client("tiny").key_id
    dicom = [t for t in app.tasks() if t["name"] == "MR_small.dcm"][0]["metadata"]
    assert dicom["modality"] == "MR" and dicom["size"] == "64 x 64 px" and dicom["bits stored"] == "16"
    assert dicom["patient id"].startswith("\u2022") and len(dicom["patient id"]) == 6  # masked
    rle = [t for t in app.tasks() if t["name"] == "MR_small_RLE.dcm"][0]["metadata"]
    assert "compressed" in rle["encoding"]


def test_unreadable_files_are_named_and_the_app_goes_on(setup):
    app, page = setup["clinic"]()
    dicom = open(get_testdata_file("MR_small.dcm"), "rb").read()
    for name, data, fragment in (("corrupt.dcm", dicom[: len(dicom) // 3], "corrupt.dcm"),
                                 ("notes.png", b"not an image at all", "notes.png"),
                                 ("empty.jpg", b"", "empty.jpg")):
        response = page.post(f"/api/studies?model=tiny&name={name}", content=data, headers=POST)
        assert response.status_code == 422, response.text
        body = response.json()
        assert body["error"] == "unreadable_file" and fragment in body["message"]
        assert body["task"]["state"] == "failed" and body["task"]["name"] == name  # a row of the batch
    too_big = ClinicApp(app.remote, max_file_bytes=1000, access_token=ACCESS_TOKEN)
    big = TestClient(create_clinic_app(too_big, allowed_hosts=("testserver",)), headers=AUTH)
    response = big.post("/api/studies?model=tiny&name=big.png", content=_png_bytes(400, 400), headers=POST)
    assert response.status_code == 413 and "big.png" in response.json()["message"]
    assert page.post("/api/studies?model=nope&name=a.png", content=_png_bytes(), headers=POST).status_code == 404
    ok = page.post("/api/studies?model=tiny&name=fine.png", content=_png_bytes(), headers=POST).json()
    assert _wait(page, ok["id"])["state"] == "done"
    rows = list(csv.DictReader(io.StringIO(page.get("/api/studies.csv").text)))
    assert [(r["file"], r["state"]) for r in rows] == [("corrupt.dcm", "failed"), ("notes.png", "failed"),
                                                       ("empty.jpg", "failed"), ("a.png", "failed"),
                                                       ("fine.png", "done")]
    assert "empty" in rows[2]["error"]
    # The page polls the list without previews; a study's own answer has its preview.
    assert all(t["preview"] == "" for t in page.get("/api/tasks?previews=false").json()["tasks"])
    assert page.get(f"/api/tasks/{ok['id']}").json()["preview"].startswith("data:image/png")


def test_server_unreachable_and_wrong_token_are_explained(setup):
    import httpx

    def refuse(request):
        raise httpx.ConnectError("connection refused", request=request)

    _, page = setup["clinic"](transport=httpx.MockTransport(refuse))
    status = page.get("/api/status").json()
    assert not status["server"]["reachable"]
    assert status["server"]["error"]["code"] == "server_unreachable"
    assert "cannot be reached" in status["server"]["error"]["message"]

    _, page = setup["clinic"](token="not-the-token")
    status = page.get("/api/status").json()
    assert status["server"]["error"]["code"] == "wrong_token" and "--token" in status["server"]["error"]["message"]
    keys = _wait(page, page.post("/api/models/tiny/keys", headers=AUTH).json()["id"])
    assert keys["state"] == "failed" and keys["error"]["code"] == "wrong_token"


def test_a_changed_model_is_refused_until_accepted(setup):
    app, page = setup["clinic"]()
    assert _wait(page, page.post("/api/models/tiny/keys", headers=AUTH).json()["id"])["state"] == "done"
    pins = app.remote.key_home / "pins.json"
    pins.write_text(json.dumps({"tiny": "0" * 64}))  # as if the server's model had changed since the keys
    app, page = setup["clinic"]()
    assert page.get("/api/status").json()["models"][0]["keys"] == "changed"
    response = page.post("/api/studies?model=tiny&name=a.png", content=_png_bytes(), headers=POST)
    assert response.status_code == 409 and response.json()["error"] == "model_changed"
    assert "button" in response.json()["message"]
    accepted = _wait(page, page.post("/api/models/tiny/keys?accept_new=true", headers=AUTH).json()["id"])
    assert accepted["state"] == "done"
    study = page.post("/api/studies?model=tiny&name=a.png", content=_png_bytes(), headers=POST).json()
    assert _wait(page, study["id"])["state"] == "done"


def test_studies_export_as_csv_without_formulas(setup):
    _, page = setup["clinic"]()
    names = ["b.png", "=HYPERLINK(1).png", "a.png"]
    ids = [page.post(f"/api/studies?model=tiny&name={name}", content=_png_bytes(), headers=POST).json()["id"]
           for name in names]
    for task_id in ids:
        _wait(page, task_id)
    response = page.get("/api/studies.csv")
    assert response.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert [r["file"] for r in rows] == ["b.png", "'=HYPERLINK(1).png", "a.png"]
    for row in rows:
        assert row["state"] == "done" and row["label"] in ("0", "1") and float(row["total_s"]) > 0
        assert abs(sum(float(p.split("=")[1]) for p in row["probabilities"].split("; ")) - 1) < 1e-5


def test_medhe_clinic_starts_on_this_machine_only(tmp_path, capsys):
    import subprocess

    import httpx

    from medhe.cli.main import main
    from tests.service_process import MEDHE, free_port

    assert main(["clinic", "--server", "http://127.0.0.1:9", "--host", "0.0.0.0"]) == 2
    assert "--allow-remote-host" in capsys.readouterr().err
    port, nobody = free_port(), free_port()
    process = subprocess.Popen([*MEDHE, "clinic", "--server", f"http://127.0.0.1:{nobody}", "--port", str(port),
                                "--keys", str(tmp_path / "keys"), "--backend", "clear"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        banner = process.stdout.readline()
        link = re.search(r"http://127\.0\.0\.1:\d+/\?token=(\S+)", banner)
        assert link, banner
        deadline = time.time() + 60
        while True:
            assert process.poll() is None and time.time() < deadline, "medhe clinic did not start"
            try:
                page = httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert page.status_code == 200 and "medhe clinic" in page.text
        assert httpx.get(f"http://localhost:{port}/api/status", timeout=10).status_code == 403
        status = httpx.get(f"http://localhost:{port}/api/status", timeout=10,
                           headers={CLINIC_HEADER: link.group(1)}).json()
        assert status["server"]["error"]["code"] == "server_unreachable"  # it starts and says so
    finally:
        process.terminate()
        process.communicate(timeout=30)
    assert f"http://127.0.0.1:{port}/?token=" in banner


def test_an_encrypted_model_without_this_clinics_copy_says_what_to_send(tmp_path):
    from medhe.protocol.owner import ModelOwner

    seq = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(2 * INPUT_PX**2, 2)).double()
    plan = compile_torch(seq, (1, INPUT_PX, INPUT_PX))
    server = create_app([host_plan(tmp_path / "srv", "tiny", plan, backend="clear", encrypted_model=True)],
                        data_dir=tmp_path / "srv")
    remote = RemoteClient("http://testserver", backend="clear", key_home=tmp_path / "keys",
                          transport=TestClient(server)._transport)
    clinic = ClinicApp(remote, access_token=ACCESS_TOKEN)
    page = TestClient(create_clinic_app(clinic, allowed_hosts=("testserver",)), headers=AUTH)
    assert page.get("/api/status").json()["models"][0]["weights"] == "encrypted"
    failed = _wait(page, page.post("/api/studies?model=tiny&name=a.png", content=_png_bytes(), headers=POST).json()["id"])
    assert failed["state"] == "failed" and failed["error"]["code"] == "no_encrypted_model"
    public_key = remote.key_dir("tiny", remote.spec("tiny")) / "public.key"
    assert str(public_key) in failed["error"]["message"]
    # The model owner encrypts the weights under that public key and uploads them: now it diagnoses.
    remote.register_encrypted_model(ModelOwner(backend="clear").encrypt_model(plan, public_key.read_bytes()))
    done = _wait(page, page.post("/api/studies?model=tiny&name=a.png", content=_png_bytes(), headers=POST).json()["id"])
    assert done["state"] == "done" and done["result"]["weights"] == "encrypted"
    clinic.close()


class _Switch(httpx.BaseTransport):
    """A transport whose server can be swapped: the same address, another server behind it."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self.inner = inner

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self.inner.handle_request(request)


def test_a_running_app_recovers_lost_keys_and_reports_a_replaced_model(setup, tmp_path):
    switch = _Switch(setup["transport"])
    app, page = setup["clinic"](transport=switch)
    first = _wait(page, page.post("/api/studies?model=tiny&name=a.png", content=_png_bytes(), headers=POST).json()["id"])
    assert first["state"] == "done"
    # The server lost this clinic's keys (a new disk, say): uploaded again, and the study goes through.
    for stored in (setup["tmp"] / "srv" / "models" / "tiny" / "keys").glob("*.keys"):
        stored.unlink()
    again = _wait(page, page.post("/api/studies?model=tiny&name=b.png", content=_png_bytes(), headers=POST).json()["id"])
    assert again["state"] == "done", again["error"]
    # The operator replaces the model while the app runs: told as a changed model, then accepted.
    seq = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(2 * INPUT_PX**2, 2)).double()
    data = tmp_path / "srv2"
    switch.inner = TestClient(create_app([host_plan(data, "tiny", compile_torch(seq, (1, INPUT_PX, INPUT_PX)),
                                                     backend="clear")], data_dir=data, tokens=None))._transport
    changed = _wait(page, page.post("/api/studies?model=tiny&name=c.png", content=_png_bytes(), headers=POST).json()["id"])
    assert changed["state"] == "failed" and changed["error"]["code"] == "model_changed", changed["error"]
    assert page.get("/api/status").json()["models"][0]["keys"] == "changed"
    accepted = _wait(page, page.post("/api/models/tiny/keys?accept_new=true", headers=AUTH).json()["id"])
    assert accepted["state"] == "done", accepted["error"]
    done = _wait(page, page.post("/api/studies?model=tiny&name=d.png", content=_png_bytes(), headers=POST).json()["id"])
    assert done["state"] == "done" and done["result"]["spec_digest"] != first["result"]["spec_digest"]


def test_the_preview_of_a_per_image_input_spans_black_to_white() -> None:
    """A per_image input has no pixel scale to undo: the preview shows it stretched from its darkest
    pixel to its brightest, the same picture whatever the scan's intensity scale."""
    from medhe.service.clinic import preview_png

    recipe = Preprocessing(image_size=16, mean=0.3, std=0.2, normalization="per_image")
    scan = np.linspace(0.1, 0.6, 40 * 40, dtype=np.float32).reshape(40, 40)

    def shown(image):
        data_url = preview_png(recipe.apply(image), recipe)
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))))

    preview = shown(scan)
    assert preview.shape == (16, 16) and preview.min() == 0 and preview.max() == 255
    np.testing.assert_array_equal(shown(1.5 * scan), preview)


def test_an_image_unlike_the_training_ones_is_marked_on_the_result_and_in_the_csv(tmp_path):
    """The clinic checks each study against the spec's input profile before encrypting: the
    result says whether it is typical and the CSV has an input_typical column."""
    from medhe.data.input_check import fit_input_profile

    recipe = Preprocessing(image_size=INPUT_PX, mean=0.0, std=1.0)
    rng = np.random.default_rng(1)
    noise = [rng.integers(0, 256, (30, 40)).astype(np.float32) / 255 for _ in range(300)]
    profile = fit_input_profile(recipe.apply_batch(noise[:200]), recipe.apply_batch(noise[200:]))
    seq = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(2 * INPUT_PX**2, 2)).double()
    plan = compile_torch(seq, (1, INPUT_PX, INPUT_PX), preprocessing=recipe.with_input_profile(profile).to_dict())
    data = tmp_path / "srv"
    tokens = TokenStore(data)
    server = create_app([host_plan(data, "tiny", plan, backend="clear")], data_dir=data, tokens=tokens)
    remote = RemoteClient("http://testserver", token=tokens.add("clinic-a", "clinic"), backend="clear",
                          key_home=tmp_path / "keys", transport=TestClient(server)._transport)
    page = TestClient(create_clinic_app(ClinicApp(remote, access_token=ACCESS_TOKEN), allowed_hosts=("testserver",)),
                      headers=AUTH)
    gradient = io.BytesIO()
    Image.fromarray(np.tile(np.linspace(0, 255, 40), (30, 1)).astype(np.uint8)).save(gradient, format="PNG")
    tasks = [_wait(page, page.post(f"/api/studies?model=tiny&name={name}", content=body, headers=POST).json()["id"])
             for name, body in (("noise.png", _png_bytes()), ("gradient.png", gradient.getvalue()))]
    assert [t["state"] for t in tasks] == ["done", "done"]
    assert [t["result"]["input_check"]["typical"] for t in tasks] == [True, False]
    rows = list(csv.DictReader(io.StringIO(page.get("/api/studies.csv").text)))
    assert [(r["file"], r["input_typical"]) for r in rows] == [("noise.png", "yes"), ("gradient.png", "no")]
