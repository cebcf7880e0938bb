"""Client, server (and, in encrypted-model mode, the model owner) in one process, talking through
the same bytes they would send over a network: for `medhe diagnose`, `medhe demo`, encrypted
evaluation and benchmarks. The client gets the public client spec only."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from medhe.plan import Plan
from medhe.protocol.client import Client
from medhe.protocol.owner import ModelOwner
from medhe.protocol.server import Server


@dataclass
class EncryptedResult:
    logits: np.ndarray
    label: str
    probabilities: np.ndarray
    encrypt_s: float
    server_s: float
    decrypt_s: float
    upload_bytes: int
    download_bytes: int
    input_check: dict | None = None  # Client.check_input: is the input like the training images?


@dataclass
class LocalSession:
    plan: Plan
    backend: str = "seal"
    encrypted_model: bool = False
    two_processes: bool = False  # share each evaluation with a helper process (medhe.runtime.split)
    client: Client = field(init=False)
    server: Server = field(init=False)
    keygen_s: float = field(init=False)
    eval_key_bytes: int = field(init=False)
    model_encrypt_s: float = field(init=False, default=0.0)
    encrypted_model_bytes: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        start = time.perf_counter()
        self.client = Client(self.plan.client_spec(), backend=self.backend)
        keys = self.client.evaluation_keys()
        self.keygen_s = time.perf_counter() - start
        self.eval_key_bytes = len(keys)
        self.server = Server(self.plan, backend=self.backend, encrypted_model=self.encrypted_model,
                             two_processes=self.two_processes)
        self.server.register_keys(keys)
        if self.encrypted_model:
            start = time.perf_counter()
            model = ModelOwner(backend=self.backend).encrypt_model(self.plan, self.client.public_key())
            self.model_encrypt_s = time.perf_counter() - start
            self.encrypted_model_bytes = len(model)
            self.server.register_encrypted_model(model)

    def diagnose_input(self, model_input: np.ndarray) -> EncryptedResult:
        input_check = self.client.check_input(model_input)  # on the plaintext, before encrypting
        t0 = time.perf_counter()
        message = self.client.encrypt_input(model_input)
        t1 = time.perf_counter()
        result = self.server.evaluate(message)
        t2 = time.perf_counter()
        logits = self.client.decrypt_logits(result)
        label, probs = self.client.diagnosis(logits)
        t3 = time.perf_counter()
        return EncryptedResult(logits, label, probs, t1 - t0, t2 - t1, t3 - t2, len(message), len(result),
                               input_check)

    def diagnose_image(self, image) -> EncryptedResult:
        return self.diagnose_input(self.client.preprocess(image))

    def diagnose_many(self, model_inputs: np.ndarray, *, progress: bool = True) -> list[EncryptedResult]:
        """Diagnose each input (the server encoded the weights at key registration, so the first
        image costs the same as the rest)."""
        return [self.diagnose_input(x) for x in tqdm(model_inputs, desc="encrypted inference",
                                                     disable=not progress, leave=False)]


def summarize(results: list[EncryptedResult], reference_logits: np.ndarray, labels: np.ndarray) -> dict:
    """Agreement with the plaintext model, accuracy, error and timing statistics."""
    enc_logits = np.stack([r.logits for r in results])
    enc_pred = enc_logits.argmax(1)
    ref_pred = reference_logits.argmax(1)
    server = np.array([r.server_s for r in results])
    return {
        "n_encrypted": len(results),
        "encrypted_accuracy": float((enc_pred == labels).mean()),
        "plaintext_accuracy_same_images": float((ref_pred == labels).mean()),
        "agreement": float((enc_pred == ref_pred).mean()),
        "max_abs_logit_error": float(np.abs(enc_logits - reference_logits).max()),
        "server_latency_median_s": float(np.median(server)),
        "server_latency_p90_s": float(np.percentile(server, 90)),
        "client_encrypt_median_s": float(np.median([r.encrypt_s for r in results])),
        "client_decrypt_median_s": float(np.median([r.decrypt_s for r in results])),
        "upload_bytes": int(np.median([r.upload_bytes for r in results])),
        "download_bytes": int(np.median([r.download_bytes for r in results])),
    }
