"""Slow tier: the Python API example in README.md runs as written (real 128-bit keys), and its
answers, plain-weight and encrypted-model, equal the plaintext model's."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from medhe.data.br35h import br35h_test_files
from medhe.nn.io import load_model, resolve_model_dir

pytestmark = pytest.mark.slow
README = Path(__file__).parents[2] / "README.md"


def _api_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    example = next((block for block in blocks if "medhe.compile_model" in block), None)
    assert example is not None, "README has no Python block with medhe.compile_model"
    return example


def test_readme_python_example_runs_and_matches_plaintext(tmp_path, monkeypatch):
    model, card = load_model(resolve_model_dir("br35h"))
    scan, _ = br35h_test_files()[0]  # a held-out scan, full size as the clinic would have it
    shutil.copy(scan, tmp_path / "scan.jpg")
    monkeypatch.chdir(tmp_path)
    names: dict = {}
    exec(compile(_api_example(), str(README), "exec"), names)  # noqa: S102 - our own README

    client, server = names["client"], names["server"]
    with torch.no_grad():
        expected = model(torch.from_numpy(names["model_input"][None])).numpy()[0]
    assert names["label"] == card.class_names[int(np.argmax(expected))]
    # The example's encrypted-model server answers the same scan with the same label.
    logits = client.decrypt_logits(server.evaluate(client.encrypt_input(names["model_input"])))
    assert np.argmax(logits) == np.argmax(expected)
    assert set(client.check_input(names["model_input"])) == {"distance", "threshold", "typical", "uniform"}
