"""Ctrl-C, sent for real: start a child that prints "ready" once it is about
to work, wait for that line, let it run, send SIGINT and collect what it
printed. The child is killed at the end whatever happened."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path


def interrupt_when_ready(cmd: Sequence[str], *, cwd: Path | None = None, delay: float = 0.5,
                         timeout: float = 60.0) -> tuple[int, str, str]:
    """(exit code, stdout after "ready", stderr) of ``cmd`` interrupted
    ``delay`` seconds after it printed "ready"."""
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=cwd)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    return proc.returncode, out, err
