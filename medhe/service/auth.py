"""Bearer tokens for the diagnosis service, issued by the operator (`medhe token add`).

A token is 256 random bits shown once; the server keeps only its sha256 (a fast hash is enough for
a random secret of that size) in DATA_DIR/tokens.json, mode 0600. Roles: a `clinic` registers
its own evaluation keys and diagnoses with them; a `owner` (the model owner) uploads encrypted
models for any clinic's key id.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from medhe.errors import ConfigError
from medhe.protocol.server import temporary_sibling
from medhe.service.hosting import check_name

TOKENS_FILE = "tokens.json"
ROLES = ("clinic", "owner")


@dataclass(frozen=True)
class Principal:
    name: str
    role: str


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenStore:
    def __init__(self, data_dir: str | Path) -> None:
        self.path = Path(data_dir) / TOKENS_FILE

    def _entries(self) -> list[dict]:
        try:
            if not self.path.is_file():
                return []
            doc = json.loads(self.path.read_text())
            entries = doc["tokens"]
            if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
                raise ValueError("tokens must be a list of objects")
        except (OSError, ValueError, KeyError, TypeError):
            raise ConfigError(f"{self.path} is not a readable medhe token file; fix or remove it") from None
        return entries

    def _write(self, entries: list[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_sibling(self.path)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"format": "medhe-tokens", "tokens": entries}, f, indent=1)
        os.replace(tmp, self.path)

    def add(self, name: str, role: str = "clinic") -> str:
        """A new token for `name` (shown once; only its hash is kept)."""
        check_name(name, "clinic name")
        if role not in ROLES:
            raise ConfigError(f"role must be one of {ROLES}, got {role!r}")
        entries = self._entries()
        if any(e.get("name") == name for e in entries):
            raise ConfigError(f"{name!r} has a token already; revoke it first (`medhe token revoke {name}`)")
        token = "medhe_" + secrets.token_urlsafe(32)
        entries.append({"name": name, "role": role, "sha256": _hash(token), "created": int(time.time())})
        self._write(entries)
        return token

    def revoke(self, name: str) -> None:
        entries = self._entries()
        kept = [e for e in entries if e.get("name") != name]
        if len(kept) == len(entries):
            raise ConfigError(f"no token for {name!r}")
        self._write(kept)

    def names(self) -> list[tuple[str, str]]:
        return [(e.get("name"), e.get("role")) for e in self._entries()]

    def enabled(self) -> bool:
        return bool(self._entries())

    def identify(self, authorization: str | None) -> Principal | None:
        """The principal of an `Authorization: Bearer ...` header, or None."""
        if not authorization or not authorization.startswith("Bearer "):
            return None
        digest = _hash(authorization[len("Bearer "):].strip())
        found = None
        for entry in self._entries():  # re-read: a revoked token stops working without a restart
            if hmac.compare_digest(str(entry.get("sha256", "")), digest):
                found = Principal(str(entry.get("name")), str(entry.get("role")))
        return found
