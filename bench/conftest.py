"""pytest set-up for the micro-benchmarks in bench/ (not part of `make test`).

`bench` is a package, so pytest puts the repository root on sys.path, where
the source tree's `xybrid` (without its compiled engine) would shadow the
installed one. Import the installed package first, with the root hidden.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def _import_installed_xybrid() -> None:
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO_ROOT]
    try:
        import xybrid._native._engine  # noqa: F401
    except ImportError as exc:  # pragma: no cover
        pytest.exit(f"the installed xybrid is needed (run scripts/setup.sh): {exc}", returncode=4)
    finally:
        sys.path[:] = saved


_import_installed_xybrid()
