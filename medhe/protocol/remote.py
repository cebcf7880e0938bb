"""The clinic's side of the HTTP service: `RemoteClient`.

It fetches a model card, checks it against the digest pinned at first use (a model that changed is
refused), makes or reuses the clinic's keys in a local key directory, uploads the evaluation keys
once, and then per image: preprocess and encrypt here, send ciphertexts only, decrypt here.

    KEY_HOME/pins.json                        model name -> pinned spec digest, for this server
    KEY_HOME/NAME-DIGEST12/secret.key ...     a key directory per model version (medhe.protocol.keydir)
"""

from __future__ import annotations

import json
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from medhe.errors import ConfigError, ImageLoadError, MissingKeyError, ModelChangedError, RemoteError
from medhe.plan import ClientSpec
from medhe.protocol.client import Client
from medhe.protocol.keydir import EVAL_KEYS_FILE, SECRET_KEY_FILE, load_key_directory, make_key_directory

OCTET = "application/octet-stream"
PINS_FILE = "pins.json"
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def default_key_home(server_url: str) -> Path:
    """~/.medhe/servers/HOST_PORT (or under $MEDHE_HOME): keys and pins for one server."""
    parts = urlsplit(server_url)
    root = Path(os.environ.get("MEDHE_HOME") or Path.home() / ".medhe")
    return root / "servers" / f"{parts.hostname or 'local'}_{parts.port or (443 if parts.scheme == 'https' else 80)}"


@dataclass
class RemoteResult:
    image: str
    label: str
    probabilities: np.ndarray
    logits: np.ndarray
    encrypt_s: float
    server_s: float  # request round trip: upload, queue, evaluation, download
    evaluate_s: float  # evaluation alone, as the server measured it
    decrypt_s: float
    upload_bytes: int
    preprocess_s: float = 0.0  # reading the file, crop and resize (in batches: the whole folder's, per image)
    input_check: dict | None = None  # Client.check_input: is the input like the training images?


class RemoteClient:
    """A clinic talking to a diagnosis server. The secret key stays in `key_home`."""

    def __init__(self, server_url: str, *, token: str | None = None, key_home: str | Path | None = None,
                 backend: str = "seal", timeout_s: float = 900.0, transport=None, verify: bool | str | Path = True) -> None:
        import httpx

        self.server_url = server_url.rstrip("/")
        self.key_home = Path(key_home) if key_home else default_key_home(server_url)
        self.backend = backend
        headers = {"authorization": f"Bearer {token}"} if token else {}
        if isinstance(verify, (str, Path)):  # a CA bundle or the server's own (self-signed) certificate
            import ssl

            verify = ssl.create_default_context(cafile=str(verify))
        # A server that silently drops packets is reported after 10 s, not after the evaluation timeout.
        self._http = httpx.Client(base_url=self.server_url, timeout=httpx.Timeout(timeout_s, connect=10.0),
                                  transport=transport, headers=headers, verify=verify)
        self._clients: dict[str, Client] = {}
        self._lock = threading.Lock()  # pins.json and the client cache, shared by a caller's threads

    def close(self) -> None:
        self._http.close()

    # --- transport ------------------------------------------------------------------------------
    def _request(self, method: str, path: str, **kwargs):
        import httpx

        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            hint = ("; if the server has its own (self-signed) certificate, trust it with --ca-file CERT.pem "
                    "(Python: RemoteClient(..., verify='CERT.pem'))" if "CERTIFICATE_VERIFY_FAILED" in str(exc) else "")
            raise RemoteError(0, "unreachable", f"the diagnosis server at {self.server_url} cannot be reached "
                                                f"({type(exc).__name__}: {exc}){hint}") from None
        if response.status_code >= 400:
            try:
                body = response.json()
                code, message = str(body.get("error")), str(body.get("message"))
            except ValueError:
                code, message = "http_error", response.text[:200]
            hint = {401: " (check the token: --token or MEDHE_TOKEN)",
                    503: f" (server busy; retry after {response.headers.get('retry-after', '?')} s)"}
            if code == "unknown_key":
                raise MissingKeyError(message)
            raise RemoteError(response.status_code, code,
                              f"the server refused {method} {path} ({response.status_code} {code}): {message}"
                              f"{hint.get(response.status_code, '')}")
        return response

    def health(self) -> dict:
        return self._request("GET", "/health").json()

    def models(self) -> list[dict]:
        return self._request("GET", "/v1/models").json()["models"]

    def model_card(self, name: str) -> dict:
        return self._request("GET", f"/v1/models/{name}").json()

    def register_keys(self, message: bytes | Path) -> str:
        """Upload evaluation keys (bytes, or a file that is streamed) -> key id."""
        if isinstance(message, Path):
            with open(message, "rb") as f:
                return self._post("/v1/keys", f).json()["key_id"]
        return self._post("/v1/keys", message).json()["key_id"]

    def register_encrypted_model(self, message: bytes | Path) -> str:
        if isinstance(message, Path):
            with open(message, "rb") as f:
                return self._post("/v1/encrypted-model", f).json()["key_id"]
        return self._post("/v1/encrypted-model", message).json()["key_id"]

    def key_status(self, key_id: str) -> dict | None:
        try:
            return self._request("GET", f"/v1/keys/{key_id}").json()
        except MissingKeyError:
            return None

    def evaluate(self, message: bytes) -> bytes:
        return self._post("/v1/diagnose", message).content

    def _post(self, path: str, content):
        return self._request("POST", path, content=content, headers={"content-type": OCTET})

    # --- the clinic's workflow --------------------------------------------------------------------
    def spec(self, model: str, *, accept_new: bool = False) -> ClientSpec:
        """The model's public client spec, checked against its digest and against the digest pinned
        at first use: a model that changed since is refused unless `accept_new`."""
        card = self.model_card(model)
        spec = ClientSpec.from_dict(card)
        if card.get("spec_digest") != spec.digest():
            raise RemoteError(0, "bad_card", f"the server's card for {model} does not match its own digest")
        with self._lock:
            pins = self._pins()
            pinned = pins.get(model)
            if pinned is not None and pinned != spec.digest() and not accept_new:
                raise ModelChangedError(f"model {model} at {self.server_url} changed since first use: pinned spec "
                                        f"{pinned[:16]}, the server now offers {spec.digest()[:16]}. If the operator "
                                        "announced a new model version, accept it with --accept-new-model (new keys "
                                        "are made)")
            if pinned != spec.digest():
                self.key_home.mkdir(parents=True, exist_ok=True)
                self.key_home.chmod(0o700)
                pins[model] = spec.digest()
                pins_path = self.key_home / PINS_FILE
                tmp = pins_path.with_name(f".{PINS_FILE}.{secrets.token_hex(6)}.part")
                tmp.write_text(json.dumps(pins, indent=1))
                tmp.replace(pins_path)
        return spec

    def _pins(self) -> dict[str, str]:
        pins_path = self.key_home / PINS_FILE
        return json.loads(pins_path.read_text()) if pins_path.is_file() else {}

    def pinned_digest(self, model: str) -> str | None:
        """The spec digest pinned for `model` at first use (None before it)."""
        return self._pins().get(model)

    def has_local_keys(self, model: str, spec: ClientSpec) -> bool:
        return (self.key_dir(model, spec) / SECRET_KEY_FILE).is_file()

    def key_dir(self, model: str, spec: ClientSpec) -> Path:
        if not MODEL_NAME.fullmatch(model):  # a server's model name becomes a folder name here
            raise ConfigError(f"model name {model!r} is not a plain name (letters, digits, '.', '_', '-')")
        return self.key_home / f"{model}-{spec.digest()[:12]}"

    def client(self, model: str, *, accept_new: bool = False, progress=None) -> Client:
        """The clinic's client for `model`: keys made on first use (then reused), evaluation keys
        uploaded once (again only if the server lost them)."""
        with self._lock:
            if model in self._clients:
                return self._clients[model]
        spec = self.spec(model, accept_new=accept_new)
        directory = self.key_dir(model, spec)
        if self.has_local_keys(model, spec):
            client = load_key_directory(spec, directory)
        else:
            if progress:
                progress(f"making keys for {model} (first use; a few seconds)")
            self.key_home.mkdir(parents=True, exist_ok=True)
            client = make_key_directory(spec, directory, backend=self.backend)
        if self.key_status(client.key_id) is None:
            keys_file = directory / EVAL_KEYS_FILE
            if progress:
                progress(f"uploading evaluation keys ({keys_file.stat().st_size / 2**20:.0f} MiB, once)")
            registered = self.register_keys(keys_file)
            if registered != client.key_id:
                raise RemoteError(0, "bad_key_id", f"the server registered key id {registered}, expected {client.key_id}")
        with self._lock:
            self._clients[model] = client
        return client

    def forget_client(self, model: str) -> None:
        """Drop the cached client of `model` (its keys stay on disk): the next use checks the card again."""
        with self._lock:
            self._clients.pop(model, None)

    def _exchange(self, endpoint: str, encrypt, decrypt, on_step=None) -> tuple[int, np.ndarray, tuple[float, ...]]:
        """Encrypt, send, decrypt -> (message bytes, logits, (encrypt_s, server_s, evaluate_s, decrypt_s))."""
        step = on_step or (lambda _: None)
        t0 = time.perf_counter()
        message = encrypt()
        step("server")
        t1 = time.perf_counter()
        response = self._post(endpoint, message)
        step("decrypt")
        t2 = time.perf_counter()
        logits = decrypt(response.content)
        t3 = time.perf_counter()
        return len(message), logits, (t1 - t0, t2 - t1, float(response.headers.get("x-evaluate-s", "nan")), t3 - t2)

    def diagnose(self, image, model: str, *, accept_new: bool = False, name: str | None = None,
                 on_step=None) -> RemoteResult:
        """One image (a file path or a 2-D grayscale array in [0, 1]) in latency mode. `on_step(step)`
        is called as each step starts: preprocess, encrypt, server (upload, evaluation, download),
        decrypt."""
        client = self.client(model, accept_new=accept_new)
        if on_step:
            on_step("preprocess")
        t0 = time.perf_counter()
        model_input = client.preprocess(image)
        preprocess_s = time.perf_counter() - t0
        result = self.diagnose_input(model_input, model, name=name or str(image), on_step=on_step)
        result.preprocess_s = preprocess_s
        return result

    def diagnose_input(self, model_input: np.ndarray, model: str, *, name: str = "<input>",
                       on_step=None) -> RemoteResult:
        """A preprocessed model input (C, H, W), as `Client.preprocess` made it, in latency mode."""
        client = self.client(model)
        input_check = client.check_input(model_input)  # on the plaintext, before encrypting
        step = on_step or (lambda _: None)
        step("encrypt")
        size, logits, timings = self._exchange("/v1/diagnose", lambda: client.encrypt_input(model_input),
                                               client.decrypt_logits, on_step=step)
        label, probabilities = client.diagnosis(logits)
        return RemoteResult(name, label, probabilities, logits, *timings, size, input_check=input_check)

    def diagnose_batch(self, images: list, model: str, *, accept_new: bool = False,
                       max_in_flight: int = 2, slots_per_batch: int | None = None,
                       on_batch=None, unreadable: list | None = None) -> list[RemoteResult]:
        """Throughput mode (a model the server hosts as a batch plan): up to N/2 images per message,
        slots across images. More images than that go as several batches, up to `max_in_flight` at
        once, so that a server's worker processes (or Ray replicas) evaluate them side by side while
        the next is encrypted (in this process, seeded: medhe.protocol.client.Client.encrypt_batch);
        each batch message is about 0.45 GB (28x28 inputs; 2.2 GiB for 64x64) in memory while in
        flight. (Helper processes, Client.encrypt_batch(workers=N), are not used here.)
        Results are in the order of `images`; timings per image are their batch's, divided by its size.
        `on_batch(done, total)` is called as each batch's result is decrypted (for a progress bar).
        An image that cannot be read raises ImageLoadError, unless `unreadable` is a list: then it
        is appended there as (image, error) and the others are still diagnosed."""
        from concurrent.futures import ThreadPoolExecutor

        client = self.client(model, accept_new=accept_new)
        if client.spec.mode != "throughput":
            raise ConfigError(f"model {model} runs in latency mode: diagnose its images one by one")
        if max_in_flight < 1:
            raise ConfigError("max_in_flight must be at least 1")
        if not images:
            return []
        per_batch = min(slots_per_batch or client.spec.slot_count, client.spec.slot_count)
        t0 = time.perf_counter()
        readable, model_inputs = [], []
        for image in images:
            try:
                model_inputs.append(client.preprocess(image))
            except ImageLoadError as exc:
                if unreadable is None:
                    raise
                unreadable.append((str(image), exc))
            else:
                readable.append(image)
        if not readable:
            return []
        images, inputs = readable, np.stack(model_inputs)
        preprocess_s = (time.perf_counter() - t0) / len(images)
        checks = [client.check_input(x) for x in inputs]  # on the plaintext, before encrypting
        starts = list(range(0, len(inputs), per_batch))
        in_flight = min(max_in_flight, len(starts))
        done, lock = [0], threading.Lock()

        def one_batch(start: int) -> list[RemoteResult]:
            chunk = inputs[start: start + per_batch]
            size, logits, timings = self._exchange("/v1/diagnose-batch",
                                                   lambda: client.encrypt_batch(chunk),
                                                   client.decrypt_batch)
            per_image = [t / len(chunk) for t in timings]
            if on_batch:
                with lock:
                    done[0] += 1
                    on_batch(done[0], len(starts))
            return [RemoteResult(str(images[start + offset]), *client.diagnosis(row), row, *per_image,
                                 size // len(chunk), preprocess_s, checks[start + offset])
                    for offset, row in enumerate(logits)]

        with ThreadPoolExecutor(max_workers=in_flight) as pool:
            return [result for batch in pool.map(one_batch, starts) for result in batch]
