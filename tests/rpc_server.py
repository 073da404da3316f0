"""A real ``xybrid rpc-server`` process for the tests (tests/test_rpc.py and
the wheel's smoke test): on 127.0.0.1 and a free port, its output in a log
file, ready once it answers the protocol handshake, killed by ``kill()``."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

from xybrid.errors import RemoteServerError
from xybrid.rpc import probe

START_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RpcServer:
    """One ``xybrid rpc-server`` process; ``start()`` returns once it answers."""

    def __init__(self, workdir: Path, port: int | None = None, *extra: str) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / f"rpc-{self.port}.log"

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> RpcServer:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "xybrid", "rpc-server", "--port", str(self.port),
                 "--threads", "1", *self.extra],
                cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"rpc-server exited {self.proc.returncode}: "
                                     f"{self.log.read_text(errors='replace')}")
            try:
                probe(self.endpoint, timeout=2.0)
                return self
            except RemoteServerError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
