"""HTTP service for the diagnosis server (FastAPI). Bytes in, bytes out: the bodies are the same
versioned wire messages the CLI writes to files, so nothing is unpickled and every message is
validated (version, plan hash, key id, checksum, size) before use.

    GET  /v1/model            the model card: the public client spec (no weight) and its digest
    POST /v1/keys             evaluation keys message   -> {"key_id": ...}
    POST /v1/encrypted-model  encrypted model message   -> {"key_id": ...} (encrypted-model mode)
    POST /v1/diagnose         ciphertext message        -> result message (application/octet-stream)
    GET  /health
"""

from __future__ import annotations

from fastapi import FastAPI, HTTPException, Request, Response

from medhe.errors import ConfigError, ConflictError, InvalidMessage, MedHEError, MissingKeyError
from medhe.plan import ClientSpec, Plan
from medhe.protocol import wire
from medhe.protocol.server import Server

OCTET = "application/octet-stream"


async def _read_body(request: Request, kind: str) -> bytes:
    limit = wire.MAX_PAYLOAD_BYTES[kind] + wire.MAX_HEADER_BYTES + 64
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise HTTPException(413, f"a {kind} message is at most {limit} bytes")
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != OCTET:
        raise HTTPException(415, f"a {kind} message is sent as {OCTET}, not {content_type or 'no content type'}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"a {kind} message is at most {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(plan: Plan, *, backend: str = "seal", key_dir=None, encrypted_model: bool = False,
               encrypted_models: tuple[bytes, ...] = ()) -> FastAPI:
    """The app for one model: `plan` is the server plan (plain-weight mode) or the plan without
    weights (encrypted-model mode, with `encrypted_models` registered at start)."""
    server = Server(plan, backend=backend, key_dir=key_dir, encrypted_model=encrypted_model)
    for message in encrypted_models:
        server.register_encrypted_model(message)
    card = server.spec.card()
    app = FastAPI(title="medhe diagnosis server", version="2")
    app.state.server = server

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "spec_digest": card["spec_digest"]}

    @app.get("/v1/model")
    def model_card() -> dict:
        return {**card, "wire_format_version": wire.FORMAT_VERSION,
                "weights": "encrypted" if encrypted_model else "plain"}

    @app.post("/v1/keys")
    async def register_keys(request: Request) -> dict:
        body = await _read_body(request, "evaluation_keys")
        try:
            return {"key_id": server.register_keys(body)}
        except InvalidMessage as exc:
            raise HTTPException(400, str(exc)) from None

    @app.post("/v1/encrypted-model")
    async def register_encrypted_model(request: Request) -> dict:
        body = await _read_body(request, "encrypted_model")
        try:
            return {"key_id": server.register_encrypted_model(body)}
        except (ConfigError, ConflictError) as exc:
            raise HTTPException(409, str(exc)) from None
        except InvalidMessage as exc:
            raise HTTPException(400, str(exc)) from None

    @app.post("/v1/diagnose")
    async def diagnose(request: Request) -> Response:
        body = await _read_body(request, "ciphertext")
        try:
            result = server.evaluate(body)
        except MissingKeyError as exc:
            raise HTTPException(404, str(exc)) from None
        except InvalidMessage as exc:
            raise HTTPException(400, str(exc)) from None
        except MedHEError:
            # Toward a peer: no internals beyond the category.
            raise HTTPException(400, "the ciphertext could not be evaluated with this plan") from None
        return Response(result, media_type=OCTET)

    return app


class HTTPServerClient:
    """The clinic's side of the HTTP service (httpx)."""

    def __init__(self, base_url: str, *, timeout_s: float = 300.0, transport=None) -> None:
        import httpx

        self._http = httpx.Client(base_url=base_url, timeout=timeout_s, transport=transport)

    def model_card(self) -> dict:
        return self._checked(self._http.get("/v1/model")).json()

    def client_spec(self) -> ClientSpec:
        """The server's public client spec, checked against its own digest."""
        return ClientSpec.from_dict(self.model_card())

    def register_encrypted_model(self, message: bytes) -> str:
        return self._checked(self._http.post("/v1/encrypted-model", content=message,
                                             headers={"content-type": OCTET})).json()["key_id"]

    def register_keys(self, message: bytes) -> str:
        return self._checked(self._http.post("/v1/keys", content=message,
                                             headers={"content-type": OCTET})).json()["key_id"]

    def evaluate(self, message: bytes) -> bytes:
        return self._checked(self._http.post("/v1/diagnose", content=message,
                                             headers={"content-type": OCTET})).content

    @staticmethod
    def _checked(response):
        if response.status_code == 404:
            raise MissingKeyError(response.json().get("detail", "unknown key id"))
        if response.status_code >= 400:
            raise InvalidMessage(f"server refused the request ({response.status_code}): "
                                 f"{response.json().get('detail', '')}")
        return response
