"""Start a real ``xybrid serve`` process for the server tests.

The server runs as its own process on 127.0.0.1 and a free port, from a
temporary folder (so the installed package is imported, not the source
tree), with one compute thread so it shares the machine with the clients.
Start-up is bounded; the process is killed at teardown whatever happened.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

API_KEY = "test-key-0123456789"
STARTUP_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    api_key: str | None
    workdir: Any = field(repr=False)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return self.base_url + "/v1"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def health(self) -> dict[str, Any]:
        r = httpx.get(self.base_url + "/health", timeout=10)
        return dict(r.json())

    def wait_idle(self, timeout: float = 10.0) -> dict[str, Any]:
        """Wait until no sequence is in flight (engine and admission); return /health."""
        deadline = time.monotonic() + timeout
        while True:
            h = self.health()
            slots = h["slots"]
            if slots["in_flight"] == 0 and not slots.get("running") and not slots.get("queued"):
                return h
            if time.monotonic() > deadline:
                raise AssertionError(f"the server is still busy after {timeout}s: {h}")
            time.sleep(0.05)

    def rss_bytes(self) -> int:
        import psutil

        return int(psutil.Process(self.proc.pid).memory_info().rss)

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.workdir.cleanup()
        return int(self.proc.returncode)


def start_server(*args: str, api_key: str | None = API_KEY, wait: bool = True) -> ServerProcess:
    """``xybrid serve`` with ``args`` on a free port, ready to serve."""
    from xybrid.default_model import default_chat_model_path

    default_chat_model_path()  # fetched once per machine; not part of the start-up bound
    workdir = tempfile.TemporaryDirectory(prefix="xybrid-serve-")
    port = free_port()
    cmd = [sys.executable, "-m", "xybrid", "serve", "--port", str(port), "--threads", "1",
           "--ctx-size", "2048", *args]
    if api_key:
        cmd += ["--api-key", api_key]
    log_path = Path(workdir.name) / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("XYBRID_") or
           k == "XYBRID_CACHE_DIR"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=workdir.name, stdout=log, stderr=subprocess.STDOUT,
                                env=env)
    server = ServerProcess(proc, port, log_path, api_key, workdir)
    if wait:
        wait_ready(server)
    return server


def wait_ready(server: ServerProcess, timeout: float = STARTUP_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise AssertionError(f"xybrid serve exited with {server.proc.returncode}:\n"
                                 f"{server.log()}")
        try:
            if httpx.get(server.base_url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    server.stop()
    raise AssertionError(f"xybrid serve was not ready within {timeout}s:\n{server.log()}")


def assert_openai_error(response: httpx.Response, status: int, *, param: str | None = None,
                        code: str | None = None) -> dict[str, Any]:
    """The response is ``status`` with an OpenAI error body; returns the error."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return dict(err)
