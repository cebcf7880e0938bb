"""The clinic never holds a weight: byte searches over every client-side artifact of the shipped
models (clear backend here; tests/he repeats it with SEAL keys and ciphertexts, and searches the
server side of encrypted-model mode)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import numpy as np
import pytest
from fastapi.testclient import TestClient

from medhe.compiler import compile_model
from medhe.errors import ConfigError
from medhe.nn.modeldir import resolve_model_dir
from medhe.plan import ClientSpec
from medhe.protocol.client import Client
from medhe.protocol.server import Server
from medhe.service.app import create_app
from medhe.service.hosting import host_plan
from tests.leakage import LeakSearch, model_dir_secrets


@pytest.fixture(scope="module", params=["br35h", "pneumoniamnist", "pneumoniamnist-ensemble", "br35h-64"])
def shipped(request):
    model_dir = resolve_model_dir(request.param)
    plan = compile_model(model_dir)
    secrets = model_dir_secrets(model_dir, plan)
    return model_dir, plan, LeakSearch(secrets)


def client_artifacts(plan, tmp_path) -> dict[str, tuple[bytes, bool]]:
    """name -> (bytes, is_text) for everything a clinic receives, makes or sends."""
    spec_file = plan.client_spec().save(tmp_path)
    card = TestClient(create_app([host_plan(tmp_path / "srv", "m", plan, backend="clear")],
                                 data_dir=tmp_path / "srv")).get("/v1/models/m")
    assert card.status_code == 200
    client = Client(ClientSpec.load(spec_file), backend="clear")
    server = Server(plan, backend="clear")
    evaluation_keys = client.evaluation_keys()
    server.register_keys(evaluation_keys)
    ciphertext = client.encrypt_image(np.random.default_rng(0).random((64, 48)))
    return {
        "client_spec.json": (spec_file.read_bytes(), True),
        "model card": (card.content, True),
        "evaluation keys": (evaluation_keys, False),
        "public key": (client.public_key(), False),
        "secret key": (client.export_secret_key(), False),
        "ciphertext": (ciphertext, False),
        "result": (server.evaluate(ciphertext), False),
    }


def test_no_client_side_artifact_holds_a_weight(shipped, tmp_path):
    model_dir, plan, search = shipped
    assert len(search.secrets) > 1000, "the search must cover the model's weights and folded coefficients"
    # Positive control: the same search finds the weights in the model's own weight files (an
    # ensemble's: each member's).
    weight_files = sorted(model_dir.rglob("weights.safetensors"))
    assert weight_files and all(search.find(path.read_bytes()) for path in weight_files)
    for name, (blob, is_text) in client_artifacts(plan, tmp_path).items():
        assert search.find(blob, text=is_text) == [], f"{name} holds model weights"


def test_the_search_would_catch_a_planted_weight(shipped, tmp_path):
    _, plan, search = shipped
    artifacts = client_artifacts(plan, tmp_path)
    weight = float(search.secrets.float64[len(search.secrets) // 2])
    # In the spec, as JSON would write it.
    doc = json.loads(artifacts["client_spec.json"][0])
    doc["summary"]["planted"] = weight
    assert search.find(json.dumps(doc).encode(), text=True)
    # In a message's bytes, as float64 and as two consecutive float32 values of a tensor.
    ciphertext = artifacts["ciphertext"][0]
    assert search.find(ciphertext[:100] + struct.pack("<d", weight) + ciphertext[100:])
    pair = search.secrets.float32_tensors[0][:2]
    assert search.find(ciphertext + pair.astype("<f4").tobytes())
    # One of the plan's encoded diagonals.
    diagonal = next(ins.operand("d0") for ins in plan.instructions if ins.kind == "linear")
    assert search.find(diagonal[diagonal != 0][:1].astype(">f8").tobytes())


def test_client_refuses_the_server_plan(shipped):
    _, plan, _ = shipped
    with pytest.raises(ConfigError, match="client spec"):
        Client(plan, backend="clear")


def test_spec_commits_to_the_weights_without_holding_them(shipped):
    model_dir, plan, _ = shipped
    spec = plan.client_spec()
    assert spec.model_commitment == plan.digest()
    changed = compile_model(model_dir)
    first = next(ins for ins in changed.instructions if ins.kind == "linear")
    first.diagonals = first.diagonals * (1 + 1e-6)
    changed._digest = None
    assert changed.client_spec().model_commitment != plan.digest()
    assert changed.structure_digest() == plan.structure_digest()


def test_compile_report_names_layers_without_numbers(shipped):
    """The report travels with public artifacts (the plan without weights, the spec's summary):
    its strings hold shapes and kinds, never a trained value (no decimal point anywhere)."""
    _, plan, _ = shipped
    for row in plan.report["layers"]:
        for text in (row["op"], row["lowered_as"]):
            assert "." not in text, text
    assert "." not in json.dumps(plan.client_spec().summary)


def test_spec_file_round_trips_and_detects_tampering(shipped, tmp_path):
    _, plan, _ = shipped
    path = plan.client_spec().save(tmp_path)
    assert ClientSpec.load(path) == plan.client_spec()
    doc = json.loads(path.read_text())
    doc["class_names"] = list(reversed(doc["class_names"]))
    path.write_text(json.dumps(doc))
    from medhe.errors import PlanError

    with pytest.raises(PlanError, match="digest"):
        ClientSpec.load(path)


def test_runtime_and_roles_load_without_torch_or_compiler_passes(tmp_path):
    """The runtime reads a saved plan without importing the compiler or torch, and a model
    directory is found and read without torch."""
    plan = compile_model(resolve_model_dir("pneumoniamnist"))
    plan.save(tmp_path / "plan")
    code = f"""
import sys
from medhe.plan import Plan, ClientSpec
from medhe.runtime.executor import Executor
from medhe.runtime.clear import ClearBackend
from medhe.protocol.client import Client
from medhe.protocol.server import Server
from medhe.protocol.owner import ModelOwner
from medhe.nn.modeldir import read_model_json, resolve_model_dir
plan = Plan.load({str(tmp_path / 'plan')!r})
read_model_json(resolve_model_dir("pneumoniamnist"))
client = Client(plan.client_spec(), backend="clear")
server = Server(plan, backend="clear")
server.register_keys(client.evaluation_keys())
import numpy as np
client.decrypt_logits(server.evaluate(client.encrypt_input(np.zeros(plan.input_shape))))
bad = sorted(m for m in sys.modules if m == "torch" or m.startswith("medhe.compiler") or m.startswith("medhe.nn.io"))
print(bad)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
