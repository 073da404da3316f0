"""Prepare a benchmark run, in xybrid's interpreter (installed package).

Writes the tiny random model when missing, finds the default model, tokenizes
every prompt once with xybrid (so that every contestant gets the same token
ids), checks the llama.cpp headers against the commit xybrid was built
from, and reports the build facts. Prints one JSON object.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import xybrid
from xybrid import _build_info
from xybrid._native import _engine
from xybrid.testing.tiny_models import write_tiny_llama


def main() -> None:
    req = json.loads(Path(sys.argv[1]).read_text())
    out: dict[str, object] = {}
    tiny = Path(req["tiny_model"])
    if not tiny.is_file():
        tiny.parent.mkdir(parents=True, exist_ok=True)
        tmp = tiny.with_suffix(".partial")
        write_tiny_llama(tmp, llama_cpp_dir=req["llama_cpp_dir"])
        os.replace(tmp, tiny)
    models = {"tiny": str(tiny)}
    if req.get("gemma"):
        if req.get("gemma_path"):
            models["gemma"] = req["gemma_path"]
        else:
            from xybrid.default_model import default_model_path

            models["gemma"] = str(default_model_path())
    out["models"] = models

    tokens: dict[str, dict[str, list[int]]] = {}
    descriptions: dict[str, str] = {}
    for key, path in models.items():
        m = _engine.Model(path, vocab_only=True)
        descriptions[key] = " ".join(x for x in (m.meta("general.name"), m.architecture,
                                                 f"{os.path.getsize(path) / 2**20:.1f} MiB") if x)
        tokens[key] = {}
        for name, item in req["prompts"].items():
            ids = m.tokenize(item["text"], add_special=item.get("add_special", True))
            if item.get("length"):
                if len(ids) < item["length"]:
                    raise SystemExit(f"prompt {name!r} gives only {len(ids)} tokens on {key}; "
                                     f"{item['length']} wanted")
                ids = ids[: item["length"]]
            tokens[key][name] = ids
        m.close()
    out["tokens"] = tokens
    out["model_descriptions"] = descriptions

    lib_dir = Path(_engine.__file__).resolve().parent
    out["lib_dir"] = str(lib_dir)
    out["libs"] = sorted(p.name for p in lib_dir.glob("lib*.so*"))
    out["xybrid_version"] = xybrid.__version__
    out["llama_cpp_commit"] = xybrid.__llama_cpp_commit__
    out["build_info"] = {k: getattr(_build_info, k) for k in dir(_build_info) if k.isupper()}
    out["system_info"] = _engine.system_info() if hasattr(_engine, "system_info") else ""
    out["python"] = sys.version.split()[0]
    out["python_executable"] = sys.executable
    out["platform"] = platform.platform()
    pin = Path(req["llama_cpp_dir"]) / ".xybrid-pin"
    out["headers_commit"] = pin.read_text().split()[0] if pin.is_file() else None
    print(json.dumps(out))


if __name__ == "__main__":
    main()
