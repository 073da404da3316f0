"""Shared fixtures: the real extension and real models, built once per session."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# The tests import the installed package, whose tiny-model generators would
# look for llama.cpp/ beside site-packages; point them at this checkout.
os.environ.setdefault("XYBRID_LLAMA_CPP_DIR", str(REPO_ROOT / "llama.cpp"))

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


@pytest.fixture(scope="session")
def gemma_gen_ctx(gemma_model):  # type: ignore[no-untyped-def]
    """A Gemma context for the generation tests, with one compute thread.

    The test machines have two cores shared with other jobs; ggml's threads
    meet at a barrier after every graph node, so a two-thread context slows
    to a crawl whenever a neighbour holds one core. One thread keeps the
    suite's runtime steady (and leaves a core to the Python threads that the
    GIL tests run beside generation).
    """
    from xybrid._native._engine import Context

    ctx = Context(gemma_model, n_ctx=1024, n_batch=256, n_threads=1)
    yield ctx
    ctx.close()


@pytest.fixture(scope="session")
def gemma_greedy(gemma_model):  # type: ignore[no-untyped-def]
    """A greedy (temperature 0) sampler over Gemma."""
    from xybrid._native._engine import Sampler

    return Sampler(gemma_model, temperature=0.0)


# --- fixtures of the backend / adapter / chat CLI tests -------------------------


@pytest.fixture(scope="session")
def tiny_recurrent_path(tmp_path_factory: pytest.TempPathFactory, llama_cpp_dir: Path) -> Path:
    """A tiny random-weight Mamba model: llama.cpp treats it as recurrent."""
    from xybrid.testing.tiny_models import write_tiny_recurrent

    return write_tiny_recurrent(tmp_path_factory.mktemp("tiny-rec") / "tiny-mamba.gguf",
                                llama_cpp_dir=llama_cpp_dir)


@pytest.fixture(scope="session")
def tiny_hybrid_path(tmp_path_factory: pytest.TempPathFactory, llama_cpp_dir: Path) -> Path:
    """A tiny random-weight LFM2 model: llama.cpp treats it as hybrid."""
    from xybrid.testing.tiny_models import write_tiny_hybrid

    return write_tiny_hybrid(tmp_path_factory.mktemp("tiny-hyb") / "tiny-lfm2.gguf",
                             llama_cpp_dir=llama_cpp_dir)


@pytest.fixture(scope="session")
def gemma_backend_session(gemma_path: Path):  # type: ignore[no-untyped-def]
    """One LlamaCppBackend over Gemma 3 270M shared by the backend tests
    (1024-token context, one compute thread: see ``gemma_gen_ctx``)."""
    from xybrid.llama_cpp_backend import LlamaCppBackend
    from xybrid.types import LlmConfig

    # prefix_reuse="exact": the backend tests assert the aligned reuse.
    backend = LlamaCppBackend(LlmConfig(gemma_path, context_length=1024, n_threads=1,
                                        prefix_reuse="exact"))
    yield backend
    backend.unload()


@pytest.fixture
def gemma_backend(gemma_backend_session):  # type: ignore[no-untyped-def]
    """The shared Gemma backend with an empty KV cache (a test never sees
    the previous test's conversation)."""
    gemma_backend_session.reset_cache()
    return gemma_backend_session
