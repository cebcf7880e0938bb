"""What a diagnosis server hosts: named models, each a plan directory on disk (workers load it
from there, without the compiler) and a key store of its own under the server's data directory.

    DATA_DIR/
      tokens.json                     clinic and model-owner tokens, hashed (`medhe token add`)
      uploads/                        bodies being streamed in (moved into a key store when valid)
      models/NAME/plan/               the plan the server runs (weights in clear, or none in
                                      encrypted-model mode)
      models/NAME/keys/ID.keys        registered evaluation keys, named by their hash
      models/NAME/keys/ID.model       encrypted models (encrypted-model mode), first upload wins
      models/NAME/owners/ID           the clinics that registered key id ID (one name a line)
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from medhe.errors import ConfigError
from medhe.plan import BatchPlan, ClientSpec, Plan, load_plan_dir
from medhe.protocol.server import KEYS_SUFFIX, MODEL_SUFFIX, TEMPORARY_GLOB, _atomic_write, is_key_id

_MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}\Z")


@dataclass(frozen=True)
class HostedModel:
    name: str
    plan_dir: Path
    encrypted_model: bool
    backend: str
    key_dir: Path
    owners_dir: Path
    spec: ClientSpec

    @property
    def spec_digest(self) -> str:
        return self.spec.digest()

    @property
    def mode(self) -> str:
        """latency (one image per ciphertext, POST /v1/diagnose) or throughput (slots across
        images, POST /v1/diagnose-batch)."""
        return self.spec.mode

    def card(self) -> dict:
        from medhe.protocol import wire

        return {**self.spec.card(), "name": self.name, "wire_format_version": wire.FORMAT_VERSION,
                "weights": "encrypted" if self.encrypted_model else "plain",
                "endpoint": "/v1/diagnose" if self.mode == "latency" else "/v1/diagnose-batch"}

    def evaluation_keys_bound_bytes(self) -> int:
        """The most a keys message for this model can hold: the relinearization key and one Galois
        key per rotation step, seeded or not, and room for the message's framing."""
        from medhe.plan.keychains import key_switching_bytes_bound

        return key_switching_bytes_bound(self.spec.params, 1 + len(self.spec.rotation_steps)) + 2**16

    def has_keys(self, key_id: str) -> bool:
        return is_key_id(key_id) and (self.key_dir / f"{key_id}{KEYS_SUFFIX}").is_file()

    def has_encrypted_model(self, key_id: str) -> bool:
        return self.encrypted_model and is_key_id(key_id) and (self.key_dir / f"{key_id}{MODEL_SUFFIX}").is_file()

    # --- which clinic registered which key id -------------------------------------------------
    def add_owner(self, key_id: str, clinic: str) -> None:
        path = self.owners_dir / key_id
        owners = set(path.read_text().split()) if path.is_file() else set()
        if clinic not in owners:
            _atomic_write(path, "".join(f"{name}\n" for name in sorted(owners | {clinic})).encode())

    def owned_by(self, key_id: str, clinic: str) -> bool:
        path = self.owners_dir / key_id
        return is_key_id(key_id) and path.is_file() and clinic in path.read_text().split()


def check_name(name: str, what: str = "model name") -> str:
    """Model and clinic names become file names and log fields: a short, plain alphabet."""
    if not isinstance(name, str) or not _MODEL_NAME.match(name):
        raise ConfigError(f"{what} {name!r} must be 1-64 characters of a-z, 0-9, '_', '.', '-' (starting with a "
                          "letter or digit)")
    return name


def check_distinct_names(names: list[str], hint: str = "") -> None:
    """ConfigError naming every model name given more than once (`hint`: how to avoid it)."""
    twice = sorted(name for name, count in Counter(names).items() if count > 1)
    if twice:
        raise ConfigError(f"hosted models need distinct names: {', '.join(twice)} named more than once{hint}")


def host_plan(data_dir: str | Path, name: str, plan: Plan | BatchPlan, *, backend: str = "seal",
              encrypted_model: bool = False) -> HostedModel:
    """Write `plan` (without its weights in encrypted-model mode) under DATA_DIR/models/NAME and
    return the hosted model."""
    check_name(name)
    root = _data_dir(data_dir) / "models" / name
    if encrypted_model:
        if not isinstance(plan, Plan):
            raise ConfigError("encrypted-model mode evaluates latency plans; throughput mode needs the weights")
        plan = plan.without_weights()
    plan_dir = root / "plan"
    if plan_dir.exists():
        # A re-hosted model replaces its plan (never leaves weights beside a weightless plan).
        for stale in plan_dir.iterdir():
            stale.unlink()
    plan.save(plan_dir)
    for sub in ("keys", "owners"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    return HostedModel(name, plan_dir, encrypted_model, backend, root / "keys", root / "owners", plan.client_spec())


def open_hosted(data_dir: str | Path, name: str, *, backend: str = "seal", encrypted_model: bool = False) -> HostedModel:
    """A model `host_plan` put under DATA_DIR/models/NAME (e.g. by another process sharing the
    data directory), without loading its weights."""
    root = Path(data_dir) / "models" / check_name(name)
    plan = load_plan_dir(root / "plan", weights=False)
    return HostedModel(name, root / "plan", encrypted_model, backend, root / "keys", root / "owners", plan.client_spec())


def uploads_dir(data_dir: str | Path) -> Path:
    path = _data_dir(data_dir) / "uploads"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


# Temporary files of the key store, owners lists and token file are written in seconds: one this
# old is a killed server's.
STALE_TMP_AGE_S = 3600.0


def sweep_stale_files(data_dir: str | Path, models: list["HostedModel"], *,
                      older_than_s: float = STALE_TMP_AGE_S) -> int:
    """Remove what killed servers left: their upload areas (`UploadArea`: any whose lock no live
    server holds, at once), and temporary files of the key store, the key owners' lists and the
    token file last written more than `older_than_s` ago (replicas sharing the data directory, as
    under Ray, may be writing theirs right now). Returns how many were removed."""
    root = _data_dir(data_dir)
    removed = UploadArea.sweep(uploads_dir(root), older_than_s=older_than_s)
    folders = [root] + [folder for model in models for folder in (model.key_dir, model.owners_dir)]
    cutoff = time.time() - older_than_s
    for folder in folders:
        for path in folder.glob(TEMPORARY_GLOB):
            try:
                if path.lstat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:  # another replica swept it first
                pass
    return removed


class UploadArea:
    """One server's (or Ray replica's) folder for request bodies being received,
    DATA_DIR/uploads/INSTANCE/, locked (flock) for as long as that server's process lives. The
    kernel drops the lock however the process ends, so a starting server removes every area whose
    lock it can take (a stopped server's, with whatever it was receiving), and never one that a
    live server holds."""

    LOCK = ".lock"

    def __init__(self, data_dir: str | Path, instance: str) -> None:
        check_name(instance, "server instance")
        root = uploads_dir(data_dir)
        staging = Path(tempfile.mkdtemp(prefix=".new-", dir=root))
        self._fd = os.open(staging / self.LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.path = root / instance
        os.rename(staging, self.path)  # named once locked: a sweeping server never sees it unlocked

    def new_file(self) -> Path:
        return self.path / f"{secrets.token_hex(12)}.part"

    @classmethod
    def sweep(cls, root: Path, *, older_than_s: float) -> int:
        removed = 0
        for entry in root.iterdir():
            try:
                if entry.is_symlink() or not entry.is_dir():
                    # An older medhe's bodies (uploads/*.part) or a stray file: by age.
                    if time.time() - entry.lstat().st_mtime > older_than_s:
                        entry.unlink()
                        removed += 1
                    continue
                if entry.name.startswith(".new-"):  # a server that died while making its area
                    if time.time() - entry.stat().st_mtime > 60:
                        shutil.rmtree(entry, ignore_errors=True)
                        removed += 1
                    continue
                fd = os.open(entry / cls.LOCK, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
            except FileNotFoundError:  # an area is named only once locked: this one is half removed
                shutil.rmtree(entry, ignore_errors=True)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live server's
            finally:
                os.close(fd)
            # Free: its server is gone (instance names are random, so none will take this one again).
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
        return removed


def _data_dir(data_dir: str | Path) -> Path:
    path = Path(data_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"the data directory {path} exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    return path
