"""A clinic's key directory: secret.key (mode 0600, never leaves the machine), evaluation.keys
(public, for the server) and public.key (for a model owner). The directory is mode 0700."""

from __future__ import annotations

from pathlib import Path

from medhe.errors import ConfigError
from medhe.plan import ClientSpec
from medhe.protocol.client import Client

SECRET_KEY_FILE = "secret.key"
EVAL_KEYS_FILE = "evaluation.keys"
PUBLIC_KEY_FILE = "public.key"


def make_key_directory(spec: ClientSpec, out: str | Path, *, backend: str = "seal", force: bool = False) -> Client:
    """New keys for `spec` in `out`; an existing secret key is kept unless `force`."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a directory")
    if (out / SECRET_KEY_FILE).exists() and not force:
        raise ConfigError(f"{out / SECRET_KEY_FILE} already exists; refusing to replace a secret key "
                          "(pass --force to make new keys)")
    out.mkdir(parents=True, exist_ok=True)
    out.chmod(0o700)  # the key directory is the clinic's alone, whatever the umask
    client = Client(spec, backend=backend)
    eval_keys = client.evaluation_keys()
    client.save_secret_key(out / SECRET_KEY_FILE, overwrite=force)
    (out / EVAL_KEYS_FILE).write_bytes(eval_keys)
    (out / PUBLIC_KEY_FILE).write_bytes(client.public_key())
    return client


def load_key_directory(spec: ClientSpec, keys: str | Path) -> Client:
    """The client of a key directory (or of a secret key file)."""
    keys = Path(keys)
    if not keys.exists():
        raise ConfigError(f"no key directory or secret key at {keys}")
    path = keys / SECRET_KEY_FILE if keys.is_dir() else keys
    if not path.is_file():
        raise ConfigError(f"no secret key at {path}; run `medhe keygen --out {keys}` first")
    return Client.load(spec, path)
