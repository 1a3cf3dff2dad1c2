"""``broker serve`` as a real subprocess on 127.0.0.1, started the way an operator does.

``served_broker(directory, config_text)`` writes ``config.yaml`` into an empty directory,
runs ``python -m broker serve`` there (umask 022, so a file created without an explicit
mode would be 0644), waits for ``/healthz`` and yields a ``Served``. Its stderr (the log)
is kept in ``directory/serve.log`` and read back by ``Served.log()``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

__all__ = ["Served", "free_port", "served_broker"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Served:
    directory: Path
    host: str
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def token(self) -> str:
        """The service token the first start wrote beside the database."""
        return (self.directory / "broker.token").read_text().strip()

    def connect(self, timeout: float = 5.0) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout=timeout)

    def log(self) -> str:
        return (self.directory / "serve.log").read_text(errors="replace")


@contextmanager
def served_broker(directory: Path, config_text: str) -> Iterator[Served]:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.yaml").write_text(config_text)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    with (directory / "serve.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "broker", "serve", "--config", "config.yaml",
             "--host", "127.0.0.1", "--port", str(port), "--no-refresh"],
            cwd=directory, env=env, stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=lambda: os.umask(0o022),
        )
    served = Served(directory, "127.0.0.1", port, process)
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"broker serve exited {process.returncode}:\n{served.log()}")
            try:
                with httpx.Client(timeout=1) as client:
                    if client.get(f"{served.url}/healthz").status_code == 200:
                        break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"broker serve did not answer in 30 s:\n{served.log()}")
            time.sleep(0.05)
        yield served
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
