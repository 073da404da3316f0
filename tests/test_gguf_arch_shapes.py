"""Tensor shapes checked against the architecture, by tensor role, for every
architecture in xybrid.gguf_check.SHAPE_CHECKED_ARCHITECTURES.

Tiny random models of ten architectures (xybrid.testing.write_tiny_transformer)
load and generate in a child process; each one mutated so that a tensor no
longer fits the hyper-parameters, or so that the hyper-parameters break an
assertion of the architecture's graph, is refused with ModelLoadError naming
the tensor or key, and never ends the child. The real Gemma 3 and SmolLM2
files pass and are refused once mutated; llama.cpp's vocab-only files (no
tensors at all) are refused with a typed error whoever notices; a file of an
architecture the rules do not cover is never refused for its shapes.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from gguf_mutation import Worker, encode_value, patch, rebuild, tensor_field_offsets
from xybrid import ModelLoadError
from xybrid.gguf_check import SHAPE_CHECKED_ARCHITECTURES, ValueType, check_model_file, read_gguf
from xybrid.testing.tiny_models import TINY_TRANSFORMER_ARCHITECTURES, write_tiny_llama, write_tiny_transformer

VT = ValueType


@pytest.fixture(scope="module")
def arch_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("gguf-arch")
    return {arch: write_tiny_transformer(d / f"{arch}.gguf", arch) for arch in TINY_TRANSFORMER_ARCHITECTURES}


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    w = Worker(tmp_path_factory.mktemp("gguf-arch-worker"))
    yield w
    w.close()


def _refused(reply: dict[str, Any], path: Path, *words: str) -> None:
    assert "crash" not in reply, f"the process died (exit {reply.get('crash')}): {reply.get('stderr', '')[-1500:]}"
    assert reply.get("error") == "ModelLoadError", reply
    assert str(path) in reply["message"], reply["message"]
    for w in words:
        assert w in reply["message"], (w, reply["message"])


def test_the_covered_architectures_are_llama_cpp_names(llama_cpp_dir: Path) -> None:
    names = set(re.findall(r'\{ LLM_ARCH_\w+,\s*"([^"]+)"', (llama_cpp_dir / "src" / "llama-arch.cpp").read_text()))
    assert set(SHAPE_CHECKED_ARCHITECTURES) <= names, set(SHAPE_CHECKED_ARCHITECTURES) - names
    assert set(TINY_TRANSFORMER_ARCHITECTURES) <= set(SHAPE_CHECKED_ARCHITECTURES)


@pytest.mark.parametrize("arch", TINY_TRANSFORMER_ARCHITECTURES)
def test_tiny_architecture_passes_loads_and_generates(arch_files: dict[str, Path], worker: Worker,
                                                      arch: str) -> None:
    f = check_model_file(arch_files[arch])
    assert f.architecture == arch
    assert worker.run({"kind": "model", "path": str(arch_files[arch])}) == {"ok": True}


# One tensor per architecture that plays a role only some architectures have
# (fused QKV, experts, q/k norms over all heads, biases, post-norms), its
# dimension to change, and a smaller value (a larger one would overlap the
# next tensor's data, which the container check refuses first).
SHAPE_CASES = {
    "gemma2": ("blk.1.post_ffw_norm.weight", "dim0", 32),
    "granite": ("blk.0.attn_k.weight", "dim1", 16),
    "olmo2": ("blk.1.attn_k_norm.weight", "dim0", 8),
    "phi3": ("blk.0.attn_qkv.weight", "dim1", 96),
    "qwen2": ("blk.1.attn_v.bias", "dim0", 16),
    "qwen3": ("blk.0.attn_q_norm.weight", "dim0", 8),
    "qwen3moe": ("blk.1.ffn_down_exps.weight", "dim0", 64),
    "smollm3": ("blk.1.attn_output.weight", "dim0", 32),
    "stablelm": ("blk.0.attn_norm.bias", "dim0", 32),
    "starcoder2": ("blk.1.ffn_up.bias", "dim0", 64),
}


def test_every_tiny_architecture_has_a_shape_case() -> None:
    assert set(SHAPE_CASES) == set(TINY_TRANSFORMER_ARCHITECTURES)


@pytest.mark.parametrize("arch", sorted(SHAPE_CASES))
def test_tensor_that_does_not_fit_is_refused(arch_files: dict[str, Path], worker: Worker, tmp_path: Path,
                                             arch: str) -> None:
    name, fld, value = SHAPE_CASES[arch]
    src = arch_files[arch]
    f = read_gguf(src)
    path = tmp_path / f"{arch}-shape.gguf"
    path.write_bytes(patch(src.read_bytes(), tensor_field_offsets(f, name)[fld], "<q", value))
    _refused(worker.run({"kind": "model", "path": str(path)}), path, name, "shape")


# Hyper-parameters that break an assertion in the graph (GGML_ASSERT, an
# abort while the first batch is built) while every tensor still passes
# llama.cpp's loader: a rotary width other than the head size, for the
# graphs that rotate whole heads. Each of these aborted the process before
# the checker knew the rule; phi3, stablelm and gemma2 rotate part of a head
# and load the same file.
WHOLE_HEAD_ROPE = ("granite", "olmo2", "qwen2", "qwen3", "qwen3moe", "smollm3", "starcoder2")
PARTIAL_ROPE = ("gemma2", "phi3", "stablelm")


@pytest.mark.parametrize("arch", WHOLE_HEAD_ROPE + PARTIAL_ROPE)
def test_rotary_width_against_the_graph(arch_files: dict[str, Path], worker: Worker, tmp_path: Path,
                                        arch: str) -> None:
    src = arch_files[arch]
    key = f"{arch}.rope.dimension_count"
    path = tmp_path / f"{arch}-rope.gguf"
    path.write_bytes(rebuild(src.read_bytes(), {key: encode_value(VT.UINT32, 8)}, f=read_gguf(src)))
    reply = worker.run({"kind": "model", "path": str(path)})
    if arch in WHOLE_HEAD_ROPE:
        _refused(reply, path, repr(key), "head size 16")
    else:
        assert reply == {"ok": True}


@pytest.mark.parametrize("arch", ["qwen2", "phi3"])
def test_value_heads_of_another_size_are_refused(arch_files: dict[str, Path], worker: Worker, tmp_path: Path,
                                                 arch: str) -> None:
    src = arch_files[arch]
    path = tmp_path / f"{arch}-value-length.gguf"
    path.write_bytes(rebuild(src.read_bytes(), {f"{arch}.attention.value_length": encode_value(VT.UINT32, 32)},
                             f=read_gguf(src)))
    _refused(worker.run({"kind": "model", "path": str(path)}), path, "value_length 32")


def test_mixture_of_experts_needs_its_experts(arch_files: dict[str, Path], tmp_path: Path) -> None:
    src = arch_files["qwen3moe"]
    data, f = src.read_bytes(), read_gguf(src)
    path = tmp_path / "no-experts.gguf"
    path.write_bytes(rebuild(data, {"qwen3moe.expert_count": encode_value(VT.UINT32, 0),
                                    "qwen3moe.expert_used_count": encode_value(VT.UINT32, 0)}, f=f))
    with pytest.raises(ModelLoadError, match="expert_count 0"):
        check_model_file(path)
    path.write_bytes(rebuild(data, {"qwen3moe.expert_count": encode_value(VT.UINT32, 8)}, f=f))
    with pytest.raises(ModelLoadError, match="blk.0.ffn_gate_inp.weight"):
        check_model_file(path)
    # a missing fused projection is named, not a null tensor in the graph
    f3 = read_gguf(arch_files["phi3"])
    path.write_bytes(patch(arch_files["phi3"].read_bytes(), f3.tensors["blk.1.attn_qkv.weight"].info_offset + 8,
                           "<B", ord("x")))
    with pytest.raises(ModelLoadError, match="'blk.1.attn_q.weight' is missing"):
        check_model_file(path)


def test_an_architecture_without_rules_is_never_refused_for_shapes(tmp_path: Path) -> None:
    # The tiny llama file renamed to an architecture the rules do not know,
    # one of its tensors given a shape no rule would accept: the container,
    # metadata and tokenizer checks still run; the shapes are left alone.
    src = write_tiny_llama(tmp_path / "llama.gguf")
    f = read_gguf(src)
    data = patch(src.read_bytes(), tensor_field_offsets(f, "blk.0.attn_k.weight")["dim1"], "<q", 32)
    edits: dict[str, bytes | None] = {"general.architecture": encode_value(VT.STRING, "xyarch")}
    for key, entry in f.kv.items():
        if key.startswith("llama."):
            edits[key] = None
            edits["xyarch." + key[len("llama."):]] = data[entry.value_offset - 4:_entry_end(f, key)]
    path = tmp_path / "xyarch.gguf"
    path.write_bytes(rebuild(data, edits, f=f))
    assert check_model_file(path).architecture == "xyarch"
    broken = tmp_path / "xyarch-broken.gguf"
    broken.write_bytes(rebuild(path.read_bytes(), {"xyarch.embedding_length": encode_value(VT.STRING, "64")}))
    with pytest.raises(ModelLoadError, match="xyarch.embedding_length"):
        check_model_file(broken)


def _entry_end(f: Any, key: str) -> int:
    ordered = sorted(f.kv.values(), key=lambda e: e.offset)
    ends = [e.offset for e in ordered[1:]] + [f.tensor_table_offset]
    return dict(zip([e.key for e in ordered], ends))[key]


def test_vocab_only_files_have_no_tensors_and_are_refused(llama_cpp_dir: Path, worker: Worker) -> None:
    paths = sorted((llama_cpp_dir / "models").glob("ggml-vocab-*.gguf"))
    assert len(paths) > 5
    checked = 0
    for p in paths:
        f = read_gguf(p)
        assert not f.tensors
        reply = worker.run({"kind": "model", "path": str(p)})
        _refused(reply, p)
        if f.architecture in SHAPE_CHECKED_ARCHITECTURES:
            assert "tensor 'token_embd.weight' is missing" in reply["message"]
            checked += 1
    assert checked >= 5


# --- the real files ------------------------------------------------------------------


def _copy_patched(src: Path, out: Path, name: str, fld: str, value: int) -> Path:
    shutil.copyfile(src, out)
    offset = tensor_field_offsets(read_gguf(src), name)[fld]
    with open(out, "r+b") as fh:
        fh.seek(offset)
        fh.write(value.to_bytes(8, "little", signed=True))
    return out


def test_gemma3_mutated(gemma_path: Path, tmp_path: Path) -> None:
    check_model_file(gemma_path)
    bad = _copy_patched(gemma_path, tmp_path / "gemma.gguf", "blk.3.attn_k_norm.weight", "dim0", 128)
    with pytest.raises(ModelLoadError, match=r"blk\.3\.attn_k_norm\.weight.*shape \[128\]"):
        check_model_file(bad)


def test_smollm2_mutated(tmp_path: Path) -> None:
    from xybrid.default_model import default_chat_model_path

    smol = default_chat_model_path()
    assert check_model_file(smol).architecture == "llama"
    # 9 heads of 64: a query projection for 8 heads does not fit
    bad = _copy_patched(smol, tmp_path / "smol.gguf", "blk.7.attn_q.weight", "dim1", 512)
    with pytest.raises(ModelLoadError, match=r"blk\.7\.attn_q\.weight.*expected \[576, 576\]"):
        check_model_file(bad)


# --- projectors: the ViT stem and the gemma3 / idefics3 heads ------------------------


@pytest.fixture(scope="module")
def projectors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from xybrid.testing.tiny_models import write_tiny_mmproj_vision

    d = tmp_path_factory.mktemp("gguf-projectors")
    out = {pt: write_tiny_mmproj_vision(d / f"{pt}.gguf", projector_type=pt) for pt in ("gemma3", "idefics3")}
    out["base"] = write_tiny_llama(d / "base.gguf")
    # the tokens mtmd frames idefics3's image slices with
    out["base-idefics3"] = write_tiny_llama(d / "base-idefics3.gguf",
                                            extra_tokens=["\n\n", "<fake_token_around_image>", "<global-img>"])
    return out


@pytest.mark.parametrize("kind", ["gemma3", "idefics3"])
def test_projector_passes_and_runs(projectors: dict[str, Path], worker: Worker, kind: str) -> None:
    from xybrid.gguf_check import check_projector_file

    check_projector_file(projectors[kind], text_n_embd=64)
    base = projectors["base-idefics3" if kind == "idefics3" else "base"]
    reply = worker.run({"kind": "projector", "path": str(projectors[kind]), "base_model": str(base)})
    assert reply == {"ok": True}


def test_projector_markers_missing_from_the_vocabulary(projectors: dict[str, Path], worker: Worker) -> None:
    # idefics3 frames each image slice with tokens it looks up in the text
    # model's vocabulary ("<fake_token_around_image>", "\n\n"); the tiny
    # llama has none of them and mtmd wrote -1 in their place, which aborted
    # the process (GGML_ASSERT(idx >= 0) in mtmd's helper) at the first image.
    from xybrid.gguf_check import check_projector_file

    check_projector_file(projectors["idefics3"], text_n_embd=64)
    reply = worker.run({"kind": "projector", "path": str(projectors["idefics3"]),
                        "base_model": str(projectors["base"])})
    assert "crash" not in reply, reply.get("stderr", "")[-1500:]
    assert reply.get("error") == "UnsupportedInputError", reply
    assert "vocabulary does not have" in reply["message"]


PROJECTOR_SHAPE_CASES = [
    ("gemma3", "projection-width", lambda d, f: patch(
        d, tensor_field_offsets(f, "mm.input_projection.weight")["dim1"], "<q", 16),
     ("mm.input_projection.weight", "shape")),
    ("gemma3", "soft-norm", lambda d, f: patch(d, tensor_field_offsets(f, "mm.soft_emb_norm.weight")["dim0"], "<q", 16),
     ("mm.soft_emb_norm.weight", "shape")),
    ("gemma3", "pool-zero", lambda d, f: rebuild(d, {"clip.vision.projector.scale_factor": encode_value(VT.UINT32, 0)},
                                                 f=f), ("clip.vision.projector.scale_factor",)),
    ("gemma3", "pool-past-the-grid", lambda d, f: rebuild(
        d, {"clip.vision.projector.scale_factor": encode_value(VT.UINT32, 8)}, f=f),
     ("clip.vision.projector.scale_factor", "outside [1, 4]")),
    ("gemma3", "position-count", lambda d, f: patch(d, tensor_field_offsets(f, "v.position_embd.weight")["dim1"], "<q", 8),
     ("v.position_embd.weight",)),
    ("idefics3", "shuffle-of-one", lambda d, f: rebuild(
        d, {"clip.vision.projector.scale_factor": encode_value(VT.UINT32, 1)}, f=f),
     ("clip.vision.projector.scale_factor", "outside [2, 64]")),
    ("idefics3", "shuffle-missing", lambda d, f: rebuild(d, {"clip.vision.projector.scale_factor": None}, f=f),
     ("clip.vision.projector.scale_factor", "missing")),
    ("idefics3", "fc-rows", lambda d, f: patch(d, tensor_field_offsets(f, "mm.model.fc.weight")["dim0"], "<q", 64),
     ("mm.model.fc.weight", "shape")),
]


@pytest.mark.parametrize("case", PROJECTOR_SHAPE_CASES, ids=[f"{c[0]}-{c[1]}" for c in PROJECTOR_SHAPE_CASES])
def test_projector_that_does_not_fit_is_refused(projectors: dict[str, Path], worker: Worker, tmp_path: Path,
                                                case: tuple[str, str, Any, tuple[str, ...]]) -> None:
    kind, _, edit, words = case
    src = projectors[kind]
    path = tmp_path / f"{kind}-mutated.gguf"
    path.write_bytes(edit(src.read_bytes(), read_gguf(src)))
    base = projectors["base-idefics3" if kind == "idefics3" else "base"]
    reply = worker.run({"kind": "projector", "path": str(path), "base_model": str(base)})
    _refused(reply, path, *words)
