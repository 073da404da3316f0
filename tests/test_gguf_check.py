"""The GGUF checker (xybrid.gguf_check): real files pass, malformed ones are
refused with ModelLoadError naming what is wrong, before llama.cpp sees them.

Every malformed case is loaded and used by the real extension in a child
process (gguf_mutation.Worker), so a case the checker missed shows up as the
abort or segfault it causes in llama.cpp. Cases marked "crashed" are files
that ended the process before the checker existed (found by the mutation
fuzzer, tests/test_gguf_fuzz.py, or by hand): they stay as regressions.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import pytest

from gguf_mutation import Worker, encode_value, patch, rebuild, tensor_field_offsets
from xybrid import ModelLoadError
from xybrid.gguf_check import GGUFFile, ValueType, check_model_file, check_projector_file, read_gguf
from xybrid.testing.tiny_models import (
    write_tiny_lfm2,
    write_tiny_llama,
    write_tiny_mamba,
    write_tiny_mmproj_audio,
    write_tiny_vlm,
)

VT = ValueType
Edit = Callable[[bytes, GGUFFile], bytes]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("gguf-check")
    model, vision = write_tiny_vlm(d / "vlm")
    _, omni = write_tiny_vlm(d / "omni", audio=True)
    return {
        "llama": model,
        "llama-tied-gqa": write_tiny_llama(d / "tied.gguf", tie_embeddings=True, n_head_kv=2, dtype="f32"),
        "mamba": write_tiny_mamba(d / "mamba.gguf"),
        "lfm2": write_tiny_lfm2(d / "lfm2.gguf"),
        "vision": vision,
        "audio": write_tiny_mmproj_audio(d / "mmproj-audio.gguf"),
        "omni": omni,
    }


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    w = Worker(tmp_path_factory.mktemp("gguf-worker"))
    yield w
    w.close()


# --- real files pass -------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "llama-tied-gqa", "mamba", "lfm2"])
def test_tiny_models_pass(files: dict[str, Path], name: str) -> None:
    f = check_model_file(files[name])
    assert f.architecture == name.split("-")[0]
    assert "token_embd.weight" in f.tensors


@pytest.mark.parametrize("name", ["vision", "audio", "omni"])
def test_tiny_projectors_pass(files: dict[str, Path], name: str) -> None:
    f = check_projector_file(files[name], text_n_embd=64)
    assert f.architecture == "clip"


def test_gemma_passes_quickly(gemma_path: Path) -> None:
    check_model_file(gemma_path)  # warm the page cache
    t0 = time.perf_counter()
    f = check_model_file(gemma_path)
    elapsed = time.perf_counter() - t0
    assert f.architecture == "gemma3" and len(f.tensors) == 236
    assert f.kv["tokenizer.ggml.tokens"].array_len == 262144
    # About 50 ms on the test machine: the header only, never the weights.
    assert elapsed < 1.0, elapsed


def test_vocab_files_pass_vocab_only(llama_cpp_dir: Path) -> None:
    paths = sorted((llama_cpp_dir / "models").glob("ggml-vocab-*.gguf"))
    assert len(paths) > 5
    for p in paths:
        assert check_model_file(p, vocab_only=True).kv["tokenizer.ggml.tokens"].array_len > 0


def test_layout_matches_the_file(files: dict[str, Path]) -> None:
    f = read_gguf(files["llama"])
    assert f.version == 3 and f.alignment == 32
    assert f.data_offset % 32 == 0 and f.header_size <= f.data_offset
    last = max(f.tensors.values(), key=lambda t: t.offset)
    # the writer pads the last tensor to the alignment too
    assert f.data_offset + last.offset + last.n_bytes <= f.file_size < f.data_offset + last.offset + last.n_bytes + 32
    emb = f.tensors["token_embd.weight"]
    assert emb.dims == (64, 32000) and emb.n_bytes == 64 * 32000 * 2


def test_first_file_of_a_split_model_is_not_asked_for_every_tensor(files: dict[str, Path],
                                                                       tmp_path: Path) -> None:
    src = files["llama"]
    f = read_gguf(src)
    data = src.read_bytes()
    # drop a block's tensor from the table (as if it lived in the next file)
    missing = _mutated(files, tmp_path, "llama", lambda d, g: patch(
        d, g.tensors["blk.1.ffn_up.weight"].info_offset + 8, "<B", ord("x")))
    with pytest.raises(ModelLoadError, match="blk.1.ffn_up.weight' is missing"):
        check_model_file(missing)
    split = tmp_path / "split-00001-of-00002.gguf"
    split.write_bytes(rebuild(missing.read_bytes(), {"split.count": encode_value(VT.UINT16, 2)}))
    assert check_model_file(split).get("split.count") == 2
    assert len(data) == f.file_size


def test_a_projector_is_not_a_text_model(files: dict[str, Path]) -> None:
    with pytest.raises(ModelLoadError, match="projector"):
        check_model_file(files["vision"])
    with pytest.raises(ModelLoadError, match="architecture 'clip'"):
        check_projector_file(files["llama"])


# --- malformed files are refused ---------------------------------------------------


def kv(key: str, vtype: int, value: Any, array_type: int | None = None) -> Edit:
    return lambda data, f: rebuild(data, {key: encode_value(vtype, value, array_type)}, f=f)


def drop(key: str) -> Edit:
    return lambda data, f: rebuild(data, {key: None}, f=f)


def tensor_field(name: str, fld: str, value: int) -> Edit:
    fmt = {"n_dims": "<I", "type": "<I", "offset": "<Q"}.get(fld, "<q")
    return lambda data, f: patch(data, tensor_field_offsets(f, name)[fld], fmt, value)


def header(offset: int, fmt: str, value: int) -> Edit:
    return lambda data, f: patch(data, offset, fmt, value)


def duplicate_key(data: bytes, f: GGUFFile) -> bytes:
    """A second entry named general.name: add "zz" (same key length as
    nothing else), then rename it."""
    added = rebuild(data, {"zz": encode_value(VT.STRING, "x")}, f=f)
    return _rename_key(added, read_gguf_bytes(added), "zz", "general.name")


def _rename_key(data: bytes, f: GGUFFile, old: str, new: str) -> bytes:
    e = f.kv[old]
    rest = data[e.offset + 8 + len(old.encode()):]
    # the header grows: re-pad so the data section stays aligned
    grown = len(new.encode()) - len(old.encode())
    head = data[:e.offset] + len(new.encode()).to_bytes(8, "little") + new.encode()
    body_end = f.header_size + grown
    out = head + rest
    pad_old = f.data_offset - f.header_size
    header_part = out[:body_end]
    pad = (-len(header_part)) % f.alignment
    return header_part + b"\0" * pad + out[body_end + pad_old:]


def read_gguf_bytes(data: bytes) -> GGUFFile:
    import os
    import tempfile

    fd, name = tempfile.mkstemp(suffix=".gguf")
    try:
        os.write(fd, data)
        os.close(fd)
        return read_gguf(name)
    finally:
        os.unlink(name)


# (case id, edit, words the error must contain, crashed before the checker)
MODEL_CASES: list[tuple[str, Edit, tuple[str, ...], bool]] = [
    ("int16-matrix", tensor_field("blk.1.ffn_gate.weight", "type", 25), ("blk.1.ffn_gate.weight", "I16"), True),
    ("q8_1-matrix", tensor_field("blk.1.ffn_down.weight", "type", 9), ("blk.1.ffn_down.weight", "Q8_1"), True),
    ("duplicate-token", lambda d, f: patch(d, d.index(b"<0x04>") + 3, "<B", ord("1")),
     ("tokenizer.ggml.tokens", "'<0x14>' twice"), True),
    ("int8-embeddings", tensor_field("token_embd.weight", "type", 24), ("token_embd.weight", "I8"), False),
    ("int32-embeddings", tensor_field("token_embd.weight", "type", 26), ("token_embd.weight", "overlaps"), False),
    ("f16-norm", tensor_field("output_norm.weight", "type", 1), ("output_norm.weight", "F16"), False),
    ("retired-type", tensor_field("blk.0.attn_q.weight", "type", 4), ("attn_q.weight", "unknown ggml type 4"), False),
    ("zero-dim", tensor_field("blk.0.attn_k.weight", "dim1", 0), ("attn_k.weight", "not positive"), False),
    ("negative-dim", tensor_field("blk.0.attn_k.weight", "dim0", -64), ("attn_k.weight", "not positive"), False),
    ("embd-shape", tensor_field("token_embd.weight", "dim1", 31999), ("token_embd.weight", "shape"), False),
    ("ffn-shape", tensor_field("blk.1.ffn_down.weight", "dim0", 64), ("blk.1.ffn_down.weight", "shape"), False),
    ("five-dims", tensor_field("blk.0.attn_v.weight", "n_dims", 5), ("attn_v.weight", "5 dimensions"), False),
    ("offset-past-end", tensor_field("output.weight", "offset", 1 << 40), ("output.weight", "past the end"), False),
    ("offset-misaligned", tensor_field("output.weight", "offset", 48), ("output.weight", "alignment"), False),
    ("overlap", tensor_field("output.weight", "offset", 0), ("overlaps",), False),
    ("tensor-count", header(8, "<Q", 1 << 40), ("tensors",), False),
    ("kv-count", header(16, "<Q", 1 << 40), ("metadata entries",), False),
    ("version-1", header(4, "<I", 1), ("version 1",), False),
    ("duplicate-key", duplicate_key, ("general.name", "twice"), False),
    ("alignment-3", kv("general.alignment", VT.UINT32, 3), ("general.alignment", "power of two"), False),
    ("arch-missing", drop("general.architecture"), ("general.architecture", "missing"), False),
    ("arch-number", kv("general.architecture", VT.UINT32, 7), ("general.architecture", "string"), False),
    ("embd-string", kv("llama.embedding_length", VT.STRING, "64"), ("llama.embedding_length", "integer"), False),
    ("embd-zero", kv("llama.embedding_length", VT.UINT32, 0), ("llama.embedding_length", "outside"), False),
    ("ctx-missing", drop("llama.context_length"), ("llama.context_length", "missing"), False),
    ("blocks-1000", kv("llama.block_count", VT.UINT32, 1000), ("llama.block_count", "outside"), True),
    ("blocks-3", kv("llama.block_count", VT.UINT32, 3), ("blk.2.", "missing"), False),
    ("heads-zero", kv("llama.attention.head_count", VT.UINT32, 0), ("layer 0 has 0 attention heads",), False),
    ("heads-and-kv-zero", lambda d, f: rebuild(d, {"llama.attention.head_count": encode_value(VT.UINT32, 0),
                                                   "llama.attention.head_count_kv": encode_value(VT.UINT32, 0)},
                                               f=f), ("no attention heads",), False),
    ("kv-heads-3", kv("llama.attention.head_count_kv", VT.UINT32, 3), ("head_count_kv",), False),
    ("heads-array-short", kv("llama.attention.head_count", VT.ARRAY, [4], VT.UINT32),
     ("llama.attention.head_count", "1 entries for 2 layers"), False),
    ("ffn-zero", kv("llama.feed_forward_length", VT.UINT32, 0), ("feed-forward length of 0",), False),
    ("rope-dims", kv("llama.rope.dimension_count", VT.UINT32, 64), ("rope.dimension_count", "head size"), False),
    ("rope-base-negative", kv("llama.rope.freq_base", VT.FLOAT32, -1.0), ("llama.rope.freq_base",), False),
    ("eps-nan", kv("llama.attention.layer_norm_rms_epsilon", VT.FLOAT32, float("nan")),
     ("layer_norm_rms_epsilon",), True),
    ("eps-string", kv("llama.attention.layer_norm_rms_epsilon", VT.STRING, "1e-5"),
     ("layer_norm_rms_epsilon", "float"), False),
    ("vocab-size", kv("llama.vocab_size", VT.UINT32, 32001), ("llama.vocab_size", "32000"), False),
    ("tokens-ints", kv("tokenizer.ggml.tokens", VT.ARRAY, [1, 2, 3], VT.INT32),
     ("tokenizer.ggml.tokens", "string"), False),
    ("tokens-missing", drop("tokenizer.ggml.tokens"), ("tokenizer.ggml.tokens", "missing"), False),
    ("scores-short", kv("tokenizer.ggml.scores", VT.ARRAY, [0.0] * 10, VT.FLOAT32),
     ("tokenizer.ggml.scores", "10 entries"), False),
    ("scores-strings", kv("tokenizer.ggml.scores", VT.ARRAY, ["a"], VT.STRING), ("tokenizer.ggml.scores",), False),
    ("types-short", kv("tokenizer.ggml.token_type", VT.ARRAY, [1, 1], VT.INT32),
     ("tokenizer.ggml.token_type", "2 entries"), False),
    ("bos-out-of-vocab", kv("tokenizer.ggml.bos_token_id", VT.UINT32, 32000), ("bos_token_id", "32000"), False),
    ("eos-float", kv("tokenizer.ggml.eos_token_id", VT.FLOAT32, 2.0), ("eos_token_id", "integer"), False),
    ("model-number", kv("tokenizer.ggml.model", VT.INT32, 1), ("tokenizer.ggml.model", "string"), False),
    ("template-number", kv("tokenizer.chat_template", VT.UINT64, 1), ("tokenizer.chat_template",), False),
    ("nested-array", lambda d, f: rebuild(d, {"x.nested": (9).to_bytes(4, "little") + (9).to_bytes(4, "little")
                                              + (0).to_bytes(8, "little")}, f=f), ("x.nested", "nested"), False),
    ("unknown-value-type", lambda d, f: rebuild(d, {"x.odd": (13).to_bytes(4, "little") + b"\0" * 8}, f=f),
     ("x.odd", "unknown value type 13"), False),
    ("string-too-long", lambda d, f: rebuild(d, {"x.long": (8).to_bytes(4, "little") + (1 << 50).to_bytes(8, "little")},
                                             f=f), ("x.long", "past the end"), False),
    ("truncated-header", lambda d, f: d[:f.tensor_table_offset + 10], ("past the end",), False),
    ("truncated-data", lambda d, f: d[:len(d) - 1000], ("blk.1.ffn_down.weight", "past the end"), False),
]

PROJECTOR_CASES: list[tuple[str, Edit, tuple[str, ...], bool]] = [
    ("name-number", kv("general.name", VT.UINT32, 1), ("general.name", "string"), True),
    ("heads-3", kv("clip.vision.attention.head_count", VT.UINT32, 3), ("clip.vision.attention.head_count",), True),
    ("heads-zero", kv("clip.vision.attention.head_count", VT.UINT32, 0), ("clip.vision.attention.head_count",), True),
    ("eps-number", kv("clip.vision.attention.layer_norm_epsilon", VT.UINT32, 0),
     ("layer_norm_epsilon", "float32"), True),
    ("eps-nan", kv("clip.vision.attention.layer_norm_epsilon", VT.FLOAT32, float("nan")),
     ("layer_norm_epsilon",), True),
    ("patch-string", kv("clip.vision.patch_size", VT.STRING, "8"), ("clip.vision.patch_size", "uint32"), True),
    ("patch-int32", kv("clip.vision.patch_size", VT.INT32, 8), ("clip.vision.patch_size", "uint32"), True),
    ("patch-zero", kv("clip.vision.patch_size", VT.UINT32, 0), ("clip.vision.patch_size",), False),
    ("patch-16", kv("clip.vision.patch_size", VT.UINT32, 16), ("v.patch_embd.weight", "shape"), False),
    ("image-size-float", kv("clip.vision.image_size", VT.FLOAT32, 32.0), ("clip.vision.image_size",), True),
    ("image-size-64", kv("clip.vision.image_size", VT.UINT32, 64), ("v.position_embd.weight",), True),
    ("k-bias-dim", tensor_field("v.blk.0.attn_k.bias", "dim0", 31), ("v.blk.0.attn_k.bias", "shape"), True),
    ("down-bias-dim", tensor_field("v.blk.0.ffn_down.bias", "dim0", 31), ("v.blk.0.ffn_down.bias", "shape"), True),
    ("down-bias-int", tensor_field("v.blk.0.ffn_down.bias", "type", 26), ("v.blk.0.ffn_down.bias", "I32"), True),
    ("v-renamed", lambda d, f: patch(d, f.tensors["v.blk.0.attn_v.weight"].info_offset + 8, "<B", ord("w")),
     ("v.blk.0.attn_v.weight", "missing"), True),
    ("ffn-down-missing", lambda d, f: patch(d, f.tensors["v.blk.1.ffn_down.weight"].info_offset + 8, "<B", ord("x")),
     ("v.blk.1.ffn_down.weight", "missing"), False),
    ("q-shape", tensor_field("v.blk.1.attn_q.weight", "dim1", 16), ("v.blk.1.attn_q.weight", "shape"), False),
    ("ffn-shape", tensor_field("v.blk.0.ffn_up.weight", "dim1", 32), ("v.blk.0.ffn_up.weight",), False),
    ("mm2-width", tensor_field("mm.2.weight", "dim1", 32), ("mm.2.",), False),
    ("blocks-5", kv("clip.vision.block_count", VT.UINT32, 5), ("v.blk.2.", "missing"), False),
    ("std-zero", kv("clip.vision.image_std", VT.ARRAY, [0.0, 0.0, 0.0], VT.FLOAT32), ("image_std",), False),
    ("mean-ints", kv("clip.vision.image_mean", VT.ARRAY, [1, 2, 3], VT.INT32), ("image_mean",), False),
    ("no-encoder", kv("clip.has_vision_encoder", VT.BOOL, False), ("neither",), False),
    ("has-vision-number", kv("clip.has_vision_encoder", VT.UINT8, 1), ("clip.has_vision_encoder", "bool"), True),
    ("projector-type-number", kv("clip.projector_type", VT.UINT32, 1), ("clip.projector_type", "string"), True),
    ("arch-llama", kv("general.architecture", VT.STRING, "llama"), ("'clip'",), False),
    ("patch-embd-quantized", tensor_field("v.patch_embd.weight", "type", 8), ("v.patch_embd.weight",), False),
]


def _mutated(files: dict[str, Path], tmp_path: Path, base: str, edit: Edit) -> Path:
    src = files[base]
    data = src.read_bytes()
    out = tmp_path / f"mutated-{base}.gguf"
    out.write_bytes(edit(data, read_gguf(src)))
    return out


def _assert_refused(reply: dict[str, Any], path: Path, words: tuple[str, ...]) -> None:
    assert "crash" not in reply, f"the process died (exit {reply.get('crash')}): {reply.get('stderr', '')[-1500:]}"
    assert reply.get("error") == "ModelLoadError", reply
    message = reply["message"]
    assert str(path) in message, message
    for w in words:
        assert w in message, (w, message)


@pytest.mark.parametrize("case", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_malformed_model_is_refused(files: dict[str, Path], worker: Worker, tmp_path: Path,
                                    case: tuple[str, Edit, tuple[str, ...], bool]) -> None:
    _, edit, words, _ = case
    path = _mutated(files, tmp_path, "llama", edit)
    _assert_refused(worker.run({"kind": "model", "path": str(path)}), path, words)


@pytest.mark.parametrize("case", PROJECTOR_CASES, ids=[c[0] for c in PROJECTOR_CASES])
def test_malformed_projector_is_refused(files: dict[str, Path], worker: Worker, tmp_path: Path,
                                        case: tuple[str, Edit, tuple[str, ...], bool]) -> None:
    _, edit, words, _ = case
    path = _mutated(files, tmp_path, "vision", edit)
    reply = worker.run({"kind": "projector", "path": str(path), "base_model": str(files["llama"])})
    _assert_refused(reply, path, words)


def test_mismatched_projector_width(files: dict[str, Path]) -> None:
    with pytest.raises(ModelLoadError, match="width mismatch"):
        check_projector_file(files["vision"], text_n_embd=96)


def test_unmutated_files_load_and_run_in_the_worker(files: dict[str, Path], worker: Worker) -> None:
    # the harness itself: the same requests on the original files succeed
    assert worker.run({"kind": "model", "path": str(files["llama"])}) == {"ok": True}
    reply = worker.run({"kind": "projector", "path": str(files["vision"]), "base_model": str(files["llama"])})
    assert reply == {"ok": True}
