"""`import xybrid` stays light: heavy dependencies load when first used.

Every process that imports xybrid pays for what the package imports eagerly,
in start-up time and in resident memory (numpy, jinja2 and asyncio together
were ~37 MiB and ~0.3 s). They are imported by the code that needs them:
numpy is only looked up for arrays the caller passes, jinja2 when a model's
own chat template is compiled, asyncio by ``astream``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile

HEAVY = ("numpy", "jinja2", "asyncio", "ssl", "PIL")


def loaded_after(code: str) -> list[str]:
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    # Run outside the repository, so the installed package is imported (the
    # source tree has no compiled extension).
    with tempfile.TemporaryDirectory() as cwd:
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=cwd)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


def test_importing_the_package_and_engine_loads_no_heavy_dependency() -> None:
    assert loaded_after("import xybrid\nfrom xybrid._native import _engine") == []


def test_importing_the_engine_does_not_load_typing() -> None:
    # ~1.6 MiB of resident memory in every process: the engine's peak RSS
    # is measured against a C program's (bench/).
    probe = ("import xybrid\nfrom xybrid._native import _engine\nimport sys\n"
             "assert 'typing' not in sys.modules, 'typing'")
    with tempfile.TemporaryDirectory() as cwd:
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=cwd)
    assert out.returncode == 0, out.stderr


def test_the_engine_alone_does_not_load_the_python_layers() -> None:
    # The package's names are imported on first use (PEP 562).
    probe = ("from xybrid._native import _engine\nimport sys\n"
             "assert 'xybrid.llama_cpp_backend' not in sys.modules, sorted(sys.modules)\n"
             "import xybrid\nassert xybrid.LlamaCppBackend.__name__ == 'LlamaCppBackend'\n"
             "assert 'xybrid.llama_cpp_backend' in sys.modules\n"
             "assert set(xybrid.__all__) <= set(dir(xybrid))\n"
             "from xybrid import ChatMessage, GenerationConfig, default_model_path\n"
             "try:\n    xybrid.NoSuchThing\nexcept AttributeError as e:\n    assert 'NoSuchThing' in str(e)\n"
             "else:\n    raise SystemExit('no AttributeError')")
    assert loaded_after(probe) == []


def test_heavy_dependencies_load_when_used(tiny_llama_path) -> None:  # type: ignore[no-untyped-def]
    code = f"""
from xybrid import LlamaCppBackend, LlmConfig, GenerationConfig
b = LlamaCppBackend()
b.load(LlmConfig({str(tiny_llama_path)!r}, context_length=256, n_threads=1, chat_template="chatml"))
b.generate_raw("Hello", GenerationConfig.greedy(max_tokens=2))
"""
    assert loaded_after(code) == []  # a raw generation needs none of them
    assert "jinja2" in loaded_after(code + "\nfrom xybrid.chat_templates import JinjaChatTemplate\n"
                                           "JinjaChatTemplate('{{ messages[0].content }}')")
