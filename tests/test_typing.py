"""The package's typed surface stays clean under mypy --strict (pyproject settings)."""

from __future__ import annotations

import shutil
import subprocess

from conftest import REPO_ROOT


def test_mypy_strict_is_clean() -> None:
    mypy = shutil.which("mypy", path=str(REPO_ROOT / ".venv" / "bin")) or shutil.which("mypy")
    assert mypy, "mypy is part of the [test] extra"
    done = subprocess.run(
        [mypy, "--no-incremental", "--config-file", str(REPO_ROOT / "pyproject.toml")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Success" in done.stdout, done.stdout
