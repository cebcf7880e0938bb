"""The clinic app sends the diagnosis server ciphertexts only (SEAL, small insecure-for-tests
parameters): every byte that reaches the server (requests and the answers it sends back) is
searched for the image file, the model input the image became, the file name, the patient id, the
secret key and the decrypted diagnosis. The same search run against the clear backend (where a
"ciphertext" is the packed input itself) finds the input: the search can fail."""

from __future__ import annotations

import io
import struct
import time

import httpx
import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydicom.data import get_testdata_file
from torch import nn

from medhe.data.images import load_image_bytes
from medhe.nn.layers import PolyAct
from medhe.protocol import wire
from medhe.protocol.client import spec_ids
from medhe.protocol.remote import RemoteClient
from medhe.service.app import create_app
from medhe.service.clinic import CLINIC_HEADER, ClinicApp, create_clinic_app
from medhe.service.hosting import host_plan
from tests.helpers import SMALL_N, compile_torch

pytestmark = pytest.mark.he

POST = {CLINIC_HEADER: "seal-test-token", "content-type": "application/octet-stream"}
PATIENT_ID = "PID-7305-ZK"


class Recording(httpx.BaseTransport):
    """Forwards to the server and keeps every byte that crossed: URL, headers, bodies both ways."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self.inner, self.sent = inner, []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        self.sent.append(str(request.url).encode() + b"\n" + b"\n".join(k + b": " + v for k, v in request.headers.raw)
                         + b"\n" + body)
        response = self.inner.handle_request(request)
        content = response.read()
        self.sent.append(content)
        return httpx.Response(response.status_code, headers=response.headers, content=content)


def _float64_hits(values: np.ndarray, blob: bytes) -> int:
    """How many of `values` (skipping short dyadic fractions, which occur anywhere) appear as float64."""
    values = np.asarray(values, dtype=np.float64).ravel()
    values = values[np.abs(values * 1024 - np.round(values * 1024)) > 1e-9]
    return sum(struct.pack("<d", v) in blob or struct.pack(">d", v) in blob for v in values)


def _windows(data: bytes, count: int = 8, width: int = 32) -> list[bytes]:
    step = max((len(data) - width) // count, 1)
    return [data[i: i + width] for i in range(0, len(data) - width, step)][:count]


def _run_clinic(tmp_path, backend: str):
    seq = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), PolyAct(), nn.Flatten(), nn.Linear(2 * 64, 2)).double()
    plan = compile_torch(seq, (1, 8, 8), poly_modulus_degree=SMALL_N, insecure_for_tests=True)
    server = create_app([host_plan(tmp_path / f"srv-{backend}", "small", plan, backend=backend)],
                        data_dir=tmp_path / f"srv-{backend}")
    recording = Recording(TestClient(server)._transport)
    remote = RemoteClient("http://testserver", backend=backend, key_home=tmp_path / f"clinic-{backend}",
                          transport=recording)
    clinic = ClinicApp(remote, access_token="seal-test-token")
    page = TestClient(create_clinic_app(clinic, allowed_hosts=("testserver",)), headers={CLINIC_HEADER: "seal-test-token"})

    dataset = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    dataset.PatientID = PATIENT_ID
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 40), dtype=np.uint8)).save(png, format="PNG")
    files = {"ward3_study_dicom.dcm": buffer.getvalue(), "ward3_study_png.png": png.getvalue()}
    studies = []
    for name, data in files.items():
        study = page.post(f"/api/studies?model=small&name={name}", content=data, headers=POST).json()
        deadline = time.time() + 120
        while (task := page.get(f"/api/tasks/{study['id']}").json())["state"] not in ("done", "failed"):
            assert time.time() < deadline
            time.sleep(0.05)
        assert task["state"] == "done", task["error"]
        studies.append(task)
    client = remote.client("small")
    inputs = {name: client.preprocess(load_image_bytes(data, name)) for name, data in files.items()}
    secret = wire.decode(client.export_secret_key(), expect_kind="secret_key", **spec_ids(client.spec)).payload
    clinic.close()
    return b"\n".join(recording.sent), files, inputs, studies, secret, dataset


def test_the_server_receives_ciphertexts_only(tmp_path):
    blob, files, inputs, studies, secret, dataset = _run_clinic(tmp_path, "seal")
    assert len(blob) > 100_000  # keys and ciphertexts did cross
    for name, data in files.items():
        assert name.encode() not in blob and name.rsplit(".", 1)[0].encode() not in blob
        assert not any(window in blob for window in _windows(data)), f"bytes of {name} reached the server"
        assert _float64_hits(inputs[name], blob) == 0, f"the model input of {name} reached the server"
        assert not any(window in blob for window in _windows(inputs[name].astype("<f4").tobytes()))
    assert not any(window in blob for window in _windows(dataset.PixelData))
    assert PATIENT_ID.encode() not in blob
    assert len(secret) > 1000 and not any(window in blob for window in _windows(secret, count=32))
    for study in studies:  # the diagnosis was decrypted here and never sent back
        assert _float64_hits(np.array(study["result"]["logits"]), blob) == 0
        assert _float64_hits(np.array(list(study["result"]["probabilities"].values())), blob) == 0


def test_the_search_finds_the_input_when_it_is_sent_in_clear(tmp_path):
    blob, files, inputs, *_ = _run_clinic(tmp_path, "clear")
    for name in files:
        # The clear backend's "ciphertext" is the packed input: most of its values are found.
        values = inputs[name][np.abs(inputs[name] * 1024 - np.round(inputs[name] * 1024)) > 1e-9]
        assert _float64_hits(inputs[name], blob) >= 0.9 * values.size > 0
