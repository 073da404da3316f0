"""Mutation fuzzing of real GGUF files: no model or projector file, however
damaged, may end the process.

The originals are tiny random-weight files written by xybrid.testing: the
llama model, the recurrent (mamba) and hybrid (lfm2) models and the vision
projector. Hypothesis mutates them at the byte level (bit flips in the
header, metadata and tensor table; truncation) and at the value level
(metadata values replaced by other types or out-of-range values, or removed;
tensor dimensions, types, offsets and dimension counts rewritten). Each
mutated file is loaded and used by the real extension in a child process (a
short generation for a model; one image for a projector, next to the
unmutated text model): the child must succeed or raise a typed
XybridError. An abort, a segfault or another exception type fails the test.

A CI run tries ``XYBRID_FUZZ_EXAMPLES`` (default 40) files per test,
derandomized; raise it for a longer local run, e.g.
``XYBRID_FUZZ_EXAMPLES=2000 .venv/bin/pytest tests/test_gguf_fuzz.py``. A
crash found here becomes an explicit case in tests/test_gguf_check.py.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gguf_mutation import Worker, encode_value, patch, rebuild, tensor_field_offsets
from xybrid.gguf_check import GGUFFile, ValueType, read_gguf
from xybrid.testing.tiny_models import write_tiny_lfm2, write_tiny_mamba, write_tiny_vlm

EXAMPLES = int(os.environ.get("XYBRID_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
VT = ValueType


class Mutated(bytes):
    """A mutated file's bytes, shown by what was done (Hypothesis prints
    the drawn values of a failing example)."""

    what: str

    def __new__(cls, what: str, data: bytes) -> "Mutated":
        m = super().__new__(cls, data)
        m.what = what
        return m

    def __repr__(self) -> str:
        return f"<{self.what}>"


class Base:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = path.read_bytes()
        self.f: GGUFFile = read_gguf(path)
        self.keys = sorted(self.f.kv)
        self.tensors = sorted(self.f.tensors)


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Base]:
    d = tmp_path_factory.mktemp("fuzz-bases")
    model, vision = write_tiny_vlm(d / "vlm")
    return {
        "llama": Base(model),
        "mamba": Base(write_tiny_mamba(d / "mamba.gguf")),
        "lfm2": Base(write_tiny_lfm2(d / "lfm2.gguf")),
        "vision": Base(vision),
    }


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    w = Worker(tmp_path_factory.mktemp("fuzz-worker"))
    yield w
    w.close()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-files")


# --- strategies ----------------------------------------------------------------

INTS = st.one_of(
    st.sampled_from([0, 1, 2, 3, 4, 7, 8, 16, 31, 32, 63, 64, 65, 127, 128, 255, 256, 511, 512, 513,
                     4096, 32000, 2**31 - 1, 2**31, 2**32 - 1, 2**40, 2**63 - 1, -1, -2**31, -2**63]),
    st.integers(min_value=-2**63, max_value=2**64 - 1),
)
FLOATS = st.one_of(st.sampled_from([0.0, -0.0, 1.0, -1.0, 1e-30, 1e30, 3.4e38, float("nan"),
                                    float("inf"), float("-inf")]),
                   st.floats(width=32))
STRINGS = st.one_of(st.sampled_from(["", "llama", "gemma3", "mamba", "lfm2", "clip", "mlp", "qwen2a", "gpt2",
                                     "idefics3", "{{ bos_token }}"]),
                    st.text(max_size=40), st.binary(max_size=40))
SCALAR_TYPES = [VT.UINT8, VT.INT8, VT.UINT16, VT.INT16, VT.UINT32, VT.INT32, VT.UINT64, VT.INT64, VT.BOOL]


@st.composite
def any_value(draw: Any) -> bytes:
    """A metadata value of any type, as stored (type field included)."""
    vtype = draw(st.sampled_from(SCALAR_TYPES + [VT.FLOAT32, VT.FLOAT64, VT.STRING, VT.ARRAY]))
    if vtype in (VT.FLOAT32, VT.FLOAT64):
        return encode_value(vtype, draw(FLOATS))
    if vtype == VT.STRING:
        return encode_value(vtype, draw(STRINGS))
    if vtype == VT.ARRAY:
        atype = draw(st.sampled_from(SCALAR_TYPES + [VT.FLOAT32, VT.STRING]))
        element = FLOATS if atype == VT.FLOAT32 else STRINGS if atype == VT.STRING else INTS
        return encode_value(vtype, draw(st.lists(element, max_size=6)), atype)
    return encode_value(vtype, draw(INTS))


@st.composite
def same_type_value(draw: Any, base: Base, key: str) -> bytes:
    """A new value of the type the entry already has: out of range, off by
    one, zero, or for arrays shorter or with other elements."""
    e = base.f.kv[key]
    if e.type in (VT.FLOAT32, VT.FLOAT64):
        return encode_value(e.type, draw(FLOATS))
    if e.type == VT.STRING:
        return encode_value(e.type, draw(STRINGS))
    if e.type == VT.ARRAY:
        assert e.array_type is not None
        if e.value is None:  # a long array (the vocabulary): cut it
            n = draw(st.sampled_from([0, 1, e.array_len // 2, e.array_len - 1]))
            filler: Any = "a" if e.array_type == VT.STRING else 0
            return encode_value(e.type, [filler] * n, e.array_type)
        element = FLOATS if e.array_type in (VT.FLOAT32, VT.FLOAT64) else STRINGS if e.array_type == VT.STRING else INTS
        values = draw(st.lists(element, min_size=0, max_size=len(e.value) + 2))
        return encode_value(e.type, values, e.array_type)
    v = int(e.value)
    return encode_value(e.type, draw(st.one_of(INTS, st.sampled_from([v - 1, v + 1, 2 * v, v // 2]))))


@st.composite
def value_mutation(draw: Any, base: Base) -> Mutated:
    kind = draw(st.sampled_from(["retype", "same-type", "drop", "tensor-dim", "tensor-type",
                                 "tensor-offset", "tensor-ndims", "add-key"]))
    if kind in ("retype", "same-type", "drop", "add-key"):
        key = draw(st.sampled_from(base.keys))
        if kind == "drop":
            return Mutated(f"drop {key}", rebuild(base.data, {key: None}, f=base.f))
        if kind == "add-key":  # a key llama.cpp or clip.cpp may read, added with any type
            arch = base.f.architecture or "llama"
            key = draw(st.sampled_from([
                f"{arch}.expert_count", f"{arch}.expert_used_count", f"{arch}.attention.key_length",
                f"{arch}.attention.value_length", f"{arch}.rope.dimension_count", f"{arch}.vocab_size",
                f"{arch}.attention.sliding_window", f"{arch}.rope.scaling.type", "tokenizer.ggml.merges",
                "tokenizer.ggml.pre", "tokenizer.ggml.eot_token_id", "tokenizer.chat_template",
                "clip.vision.image_grid_pinpoints", "clip.vision.feature_layer", "clip.use_gelu",
                "clip.vision.spatial_merge_size", "clip.vision.attention.head_count_kv",
                "clip.vision.image_min_pixels", "clip.vision.image_max_pixels", "general.alignment"]))
        value = draw(any_value()) if kind != "same-type" else draw(same_type_value(base, key))
        return Mutated(f"{kind} {key}", rebuild(base.data, {key: value}, f=base.f))
    name = draw(st.sampled_from(base.tensors))
    t = base.f.tensors[name]
    offsets = tensor_field_offsets(base.f, name)
    if kind == "tensor-dim":
        i = draw(st.integers(0, len(t.dims) - 1))
        d = t.dims[i]
        v = draw(st.one_of(INTS, st.sampled_from([d - 1, d + 1, 2 * d, d // 2, 1])))
        v = max(min(v, 2**63 - 1), -2**63)
        return Mutated(f"{name} dim{i}={v}", patch(base.data, offsets[f"dim{i}"], "<q", v))
    if kind == "tensor-type":
        v = draw(st.one_of(st.integers(0, 45), st.sampled_from([2**31, 2**32 - 1])))
        return Mutated(f"{name} type={v}", patch(base.data, offsets["type"], "<I", v))
    if kind == "tensor-offset":
        v = draw(st.one_of(st.sampled_from([0, 32, t.offset + 32, max(t.offset - 32, 0), 2**40, 2**64 - 1]),
                           st.integers(0, len(base.data))))
        return Mutated(f"{name} offset={v}", patch(base.data, offsets["offset"], "<Q", v))
    v = draw(st.integers(0, 6))
    return Mutated(f"{name} n_dims={v}", patch(base.data, offsets["n_dims"], "<I", v))


@st.composite
def byte_mutation(draw: Any, base: Base) -> Mutated:
    if draw(st.integers(0, 4)) == 0:
        n = draw(st.integers(0, len(base.data) - 1))
        return Mutated(f"truncated to {n}", base.data[:n])
    b = bytearray(base.data)
    flips = draw(st.lists(st.tuples(st.integers(0, base.f.header_size - 1), st.integers(1, 255)),
                          min_size=1, max_size=8))
    for pos, mask in flips:
        b[pos] ^= mask
    return Mutated(f"bytes flipped at {[p for p, _ in flips]}", bytes(b))


# --- the properties --------------------------------------------------------------------


def _check(worker: Worker, scratch: Path, kind: str, what: str, data: bytes, base_model: Path) -> None:
    path = scratch / f"fuzz-{kind}.gguf"
    path.write_bytes(data)
    reply = worker.run({"kind": kind, "path": str(path), "base_model": str(base_model)})
    if "crash" in reply or "untyped" in reply:
        keep = scratch / f"crash-{kind}-{abs(hash(data)) % 10**8}.gguf"
        keep.write_bytes(data)
        pytest.fail(f"{what}: {reply} (file kept at {keep})")
    assert reply.get("ok") or reply.get("error"), reply


@FUZZ
@given(data=st.data())
def test_model_value_mutations(bases: dict[str, Base], worker: Worker, scratch: Path, data: Any) -> None:
    base = bases[data.draw(st.sampled_from(["llama", "llama", "mamba", "lfm2"]))]
    mutated = data.draw(value_mutation(base))
    _check(worker, scratch, "model", f"{base.path.name}: {mutated.what}", mutated, base.path)


@FUZZ
@given(data=st.data())
def test_model_byte_mutations(bases: dict[str, Base], worker: Worker, scratch: Path, data: Any) -> None:
    base = bases[data.draw(st.sampled_from(["llama", "mamba", "lfm2"]))]
    mutated = data.draw(byte_mutation(base))
    _check(worker, scratch, "model", f"{base.path.name}: {mutated.what}", mutated, base.path)


@FUZZ
@given(data=st.data())
def test_projector_value_mutations(bases: dict[str, Base], worker: Worker, scratch: Path, data: Any) -> None:
    mutated = data.draw(value_mutation(bases["vision"]))
    _check(worker, scratch, "projector", mutated.what, mutated, bases["llama"].path)


@FUZZ
@given(data=st.data())
def test_projector_byte_mutations(bases: dict[str, Base], worker: Worker, scratch: Path, data: Any) -> None:
    mutated = data.draw(byte_mutation(bases["vision"]))
    _check(worker, scratch, "projector", mutated.what, mutated, bases["llama"].path)


def test_the_originals_run(bases: dict[str, Base], worker: Worker) -> None:
    for name in ("llama", "mamba", "lfm2"):
        assert worker.run({"kind": "model", "path": str(bases[name].path)}) == {"ok": True}, name
    reply = worker.run({"kind": "projector", "path": str(bases["vision"].path),
                        "base_model": str(bases["llama"].path)})
    assert reply == {"ok": True}


def test_struct_layout_of_the_mutation_helpers(bases: dict[str, Base]) -> None:
    # the offsets the mutations write at are those of the fields they name
    base = bases["llama"]
    t = base.f.tensors["token_embd.weight"]
    offsets = tensor_field_offsets(base.f, t.name)
    assert struct.unpack_from("<I", base.data, offsets["n_dims"])[0] == len(t.dims)
    assert struct.unpack_from("<q", base.data, offsets["dim1"])[0] == t.dims[1]
    assert struct.unpack_from("<I", base.data, offsets["type"])[0] == t.type
    assert struct.unpack_from("<Q", base.data, offsets["offset"])[0] == t.offset
    same = rebuild(base.data, {}, f=base.f)
    assert same == base.data
