"""Shared fixtures: the real extension and real models, built once per session."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

if importlib.util.find_spec("xybrid._native._engine") is None:  # pragma: no cover
    pytest.exit(
        "xybrid is imported from the source tree, which has no compiled engine. "
        "Run the tests with `make test` (or `.venv/bin/pytest` after scripts/setup.sh).",
        returncode=4,
    )


@pytest.fixture(scope="session")
def llama_cpp_dir() -> Path:
    path = REPO_ROOT / "llama.cpp"
    assert path.is_dir(), "llama.cpp/ is missing: run scripts/fetch_llama_cpp.py"
    return path


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    from xybrid.default_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def gemma_model(gemma_path: Path):  # type: ignore[no-untyped-def]
    from xybrid._native._engine import Model

    model = Model(str(gemma_path))
    yield model


@pytest.fixture(scope="session")
def gemma_ctx(gemma_model):  # type: ignore[no-untyped-def]
    from xybrid._native._engine import Context

    ctx = Context(gemma_model, n_ctx=2048, n_batch=256)
    yield ctx


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory: pytest.TempPathFactory, llama_cpp_dir: Path) -> Path:
    from xybrid.testing.tiny_models import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama.gguf",
                            llama_cpp_dir=llama_cpp_dir)
