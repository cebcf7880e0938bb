"""`medhe serve` as a real process on 127.0.0.1, started and stopped by tests."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx

MEDHE = [sys.executable, "-m", "medhe.cli.main"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, data_dir: Path, *args: str, scheme: str = "http") -> None:
        self.port = free_port()
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.log = data_dir.parent / f"serve-{self.port}.log"
        self.args = [*MEDHE, "serve", "--data-dir", str(data_dir), "--port", str(self.port), *args]
        self.process = None

    def start(self, verify=True, timeout_s: float = 120) -> "ServerProcess":
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited: {self.log.read_text()[-2000:]}")
            try:
                context = ssl.create_default_context(cafile=verify) if isinstance(verify, str) else verify
                if httpx.get(f"{self.url}/health", timeout=1, verify=context).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.2)
        raise AssertionError("server did not start")

    def workers(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True).stdout
        # Spawned workers, not multiprocessing's resource tracker.
        return [int(pid) for pid in out.split()
                if b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes()]

    def peak_rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM")

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)  # the server and its workers, no clean-up
            self.process.wait(timeout=30)
