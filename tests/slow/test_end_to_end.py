"""Slow tier: real 128-bit parameters, client -> bytes -> server -> bytes -> client, on held-out
real images of each dataset, checked against the plaintext model (the oracle)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medhe.compiler import compile_model
from medhe.nn.io import load_model, resolve_model_dir
from medhe.protocol.local import LocalSession, summarize
from tests.helpers import ckks_tolerance, ckks_tolerance_encrypted_model

pytestmark = pytest.mark.slow
IMAGES_PER_DATASET = 100


def held_out(dataset: str, card, pneumoniamnist_path):
    if dataset == "br35h":
        from medhe.data.br35h import load_br35h

        return load_br35h("test", **card.preprocessing.geometry())
    from medhe.data.medmnist import load_medmnist_npz

    images, labels = load_medmnist_npz(pneumoniamnist_path, "val")
    return images.astype(np.float32) / 255.0, labels


@pytest.mark.parametrize("dataset", ["br35h", "pneumoniamnist", "br35h-ensemble", "pneumoniamnist-ensemble",
                                     "br35h-64"])
def test_encrypted_agrees_with_plaintext_at_128_bits(dataset, request, report_line, tmp_path):
    """Both deployments on the same held-out images: weights in clear on the server, and weights
    encrypted by the model owner under the clinic's public key (encrypted-model mode). Every
    shipped model, the ensembles (one plan for both members) and the 64x64 Br35H model included."""
    model_dir = resolve_model_dir(dataset)
    model, card = load_model(model_dir)
    data_name = card.dataset["name"]
    npz = request.getfixturevalue("pneumoniamnist_npz") if data_name == "pneumoniamnist" else None
    images, labels = held_out(data_name, card, npz)
    # A deterministic spread over the whole held-out split, both classes included.
    pick = np.linspace(0, len(images) - 1, IMAGES_PER_DATASET).round().astype(int)
    inputs = card.preprocessing.apply_batch(images[pick])
    with torch.no_grad():
        reference = model(torch.tensor(inputs)).double().numpy()

    plan = compile_model(model_dir)
    assert plan.params.security_bits == 128 and not plan.params.insecure_for_tests
    for encrypted_model, tolerance_of in ((False, ckks_tolerance), (True, ckks_tolerance_encrypted_model)):
        session = LocalSession(plan, encrypted_model=encrypted_model)
        results = session.diagnose_many(inputs, progress=False)
        summary = summarize(results, reference, labels[pick])
        tolerance = tolerance_of(plan, np.abs(reference).max())
        mode = "encrypted model" if encrypted_model else "plain weights"
        report_line(f"{dataset} ({mode}): {IMAGES_PER_DATASET} held-out images at 128-bit security: agreement "
                    f"{summary['agreement']:.3f}, max |logit error| {summary['max_abs_logit_error']:.2e} "
                    f"(tolerance {tolerance:.2e}), encrypted accuracy {summary['encrypted_accuracy']:.3f} "
                    f"(plaintext {summary['plaintext_accuracy_same_images']:.3f}), server "
                    f"{summary['server_latency_median_s']:.3f} s median")
        assert summary["agreement"] == 1.0, mode
        assert summary["max_abs_logit_error"] <= tolerance, mode
        if encrypted_model:
            # The real encrypted model (about 180 MB of ciphertexts) holds no weight in clear.
            from medhe.protocol.owner import ModelOwner, save_encrypted_model
            from tests.leakage import LeakSearch, model_dir_secrets

            message = ModelOwner().encrypt_model(plan, session.client.public_key())
            directory = save_encrypted_model(tmp_path / "enc", plan, message)
            assert LeakSearch(model_dir_secrets(model_dir, plan)).find_in_files(directory) == {}
        del session


@pytest.mark.parametrize("encrypted_model", [False, True], ids=["plain-weights", "encrypted-model"])
def test_cli_roles_with_real_keys(tmp_path, encrypted_model):
    from tests.unit.test_cli_roles import run_roles

    answer, expected = run_roles(tmp_path, "seal", encrypted_model=encrypted_model)
    plan = compile_model(resolve_model_dir("pneumoniamnist"))
    tolerance = (ckks_tolerance_encrypted_model if encrypted_model else ckks_tolerance)(plan, np.abs(expected).max())
    np.testing.assert_allclose(answer["logits"], expected, atol=tolerance)
    assert int(np.argmax(answer["logits"])) == int(np.argmax(expected))


def test_both_default_models_over_http_match_the_plaintext_model(tmp_path, pneumoniamnist_npz, report_line):
    """A real `medhe serve` process hosting both shipped models (2 worker processes, tokens); a
    clinic diagnoses held-out images of each through RemoteClient at 128-bit security."""
    from medhe.protocol.remote import RemoteClient
    from medhe.service.auth import TokenStore
    from tests.service_process import ServerProcess

    token = TokenStore(tmp_path / "srv").add("clinic-a")
    server = ServerProcess(tmp_path / "srv", "--model", "br35h", "pneumoniamnist", "--workers", "2")
    try:
        server.start(timeout_s=600)
        remote = RemoteClient(server.url, token=token, key_home=tmp_path / "clinic")
        for dataset in ("br35h", "pneumoniamnist"):
            model, card = load_model(resolve_model_dir(dataset))
            images, labels = held_out(dataset, card, pneumoniamnist_npz)
            pick = np.linspace(0, len(images) - 1, 6).round().astype(int)
            inputs = card.preprocessing.apply_batch(images[pick])
            with torch.no_grad():
                reference = model(torch.tensor(inputs)).double().numpy()
            plan = compile_model(resolve_model_dir(dataset))
            tolerance = ckks_tolerance(plan, np.abs(reference).max())
            results = [remote.diagnose(images[i], dataset) for i in pick]
            logits = np.stack([r.logits for r in results])
            assert (logits.argmax(1) == reference.argmax(1)).all(), dataset
            assert np.abs(logits - reference).max() <= tolerance, dataset
            report_line(f"{dataset} over HTTP (2 workers, tokens): 6 images, labels equal to plaintext, max |logit "
                        f"error| {np.abs(logits - reference).max():.2e}, request round trip "
                        f"{np.median([r.server_s for r in results]):.3f} s median")
    finally:
        server.kill()
