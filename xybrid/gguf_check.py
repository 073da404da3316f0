"""Checking GGUF model and projector files before llama.cpp reads them.

llama.cpp trusts much of what a GGUF file says. Its header parser is careful,
but the layers above it are not always: a metadata value of the wrong type
(``gguf_get_val_u32`` on a string asserts), a hyper-parameter of zero (a
division by zero), or a projector tensor whose shape does not fit its
encoder (``ggml_mul_mat`` asserts while the graph is built, at the first
image) end the process instead of failing the load. This module reads the
header, the metadata and the tensor descriptions in pure Python, never the
tensor data, and raises :class:`~xybrid.errors.ModelLoadError` naming the
file, the key or tensor, and what is wrong, before llama.cpp or mtmd touch
the file.

What is checked:

* the container: magic, version, key/tensor counts bounded by the file size,
  every value type known, every string and array inside the file, no
  duplicate keys or tensor names, ``general.alignment`` a power of two;
* every tensor: a known ggml type, 1 to 4 positive dimensions whose row
  length is a multiple of the type's block size, an aligned offset, its data
  inside the file and not overlapping another tensor's;
* a text model: the hyper-parameters llama.cpp reads for the architecture
  (``<arch>.context_length``, ``embedding_length``, ``block_count``,
  ``attention.head_count[_kv]``, ``feed_forward_length``, key/value head
  sizes, RoPE and norm values) have integer or float types as expected and
  sane ranges; the ``tokenizer.ggml.*`` arrays have the types llama.cpp
  reads and one entry per token, no token text appears twice (llama.cpp
  asserts that); the special token ids are in the vocabulary;
* a text model's tensors, for the architectures in
  :data:`SHAPE_CHECKED_ARCHITECTURES`: by rule for the transformers whose
  tensors use llama.cpp's shared names (``token_embd``, ``output``,
  ``blk.N.attn_q/k/v/qkv/output``, the norms, ``ffn_gate/up/down``, the
  experts' ``ffn_*_exps`` and ``ffn_gate_inp``, shared experts): each
  tensor that plays such a role has the shape its role gives from
  ``embedding_length``, ``head_count(_kv)`` (scalar or per layer),
  ``key_length``/``value_length``, ``feed_forward_length``,
  ``expert_count`` and the vocabulary, and a usable type; every layer has
  the projections, norms and feed-forward its graph uses; and the head
  sizes satisfy the graph's assertions. ``llama``, ``mistral3``,
  ``granite``, ``granitemoe``, ``smollm3``, ``internlm2``, ``exaone``,
  ``xverse``, ``orion``, ``ernie4_5``, ``qwen2``, ``qwen2moe``, ``qwen3``,
  ``qwen3moe``, ``olmo``, ``olmo2``, ``olmoe``, ``seed_oss``,
  ``starcoder2``, ``arcee``, ``phi3``, ``stablelm``, ``command-r``,
  ``gemma``, ``gemma2`` and ``gemma3`` are checked this way; ``mamba`` and
  ``lfm2`` by their own rules. Any other architecture gets every check
  above but the tensor shapes (a file it cannot judge is never refused);
* a projector (``general.architecture = "clip"``): every key clip.cpp reads
  has exactly the type it reads it as (clip.cpp asserts otherwise), the
  encoder sizes are sane, the encoder blocks' tensors fit the encoder width,
  and for the ``mlp`` (LLaVA) and ``qwen2a`` (Qwen2-Audio) projectors the
  patch/convolution, position and projection tensors fit too.

Cost: the header is memory-mapped and walked once; only the metadata and the
tensor table are read, never the weights. Measured on the test machine (two
shared cores): Gemma 3 270M (262,144-token vocabulary, 236 tensors) takes
0.1 to 0.15 s, about half of it the check that no token text repeats
(the rest is mostly stepping over the vocabulary's strings); a tiny model
from :mod:`xybrid.testing` (32,000 tokens) about 15 ms, a tiny projector
about 1 ms.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass

from xybrid.errors import ModelLoadError

# The engine runs this module on every load; typing stays unimported.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Iterable, Sequence

__all__ = [
    "GGUFFile",
    "KeyValue",
    "TensorInfo",
    "ValueType",
    "GGML_TYPES",
    "read_gguf",
    "check_model_file",
    "check_projector_file",
]


class ValueType:
    """GGUF metadata value types (the numbers stored in the file)."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


_TYPE_NAMES = {
    0: "uint8", 1: "int8", 2: "uint16", 3: "int16", 4: "uint32", 5: "int32", 6: "float32",
    7: "bool", 8: "string", 9: "array", 10: "uint64", 11: "int64", 12: "float64",
}
# struct format of each fixed-size scalar type
_SCALAR_FORMATS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q", 12: "<d",
}
_SCALAR_SIZES = {t: struct.calcsize(f) for t, f in _SCALAR_FORMATS.items()}
_INT_TYPES = frozenset({0, 1, 2, 3, 4, 5, 10, 11})
_FLOAT_TYPES = frozenset({6, 12})

# ggml tensor types: id -> (name, elements per block, bytes per block). Ids
# that ggml retired (4, 5, 31-33, 36-38) are not listed, so they are refused.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18), 42: ("Q2_0", 64, 18),
}
_F32, _F16, _BF16 = 0, 1, 30
# Types a weight matrix may have: every float and quantized type, not the
# integer ones (and not F64) that no matrix product or row lookup takes, and
# not Q8_1 and Q8_K, which ggml only makes on the fly for the other operand
# of a product (as a weight, Q8_1 segfaults in the CPU backend).
_MATRIX_TYPES = frozenset(GGML_TYPES) - {9, 15, 24, 25, 26, 27, 28}
_FLOAT_TENSOR_TYPES = frozenset({_F32, _F16, _BF16})

_MAX_NAME = 63          # GGML_MAX_NAME (64) less the terminating NUL
_MAX_DIMS = 4
_MAX_LAYERS = 512       # LLAMA_MAX_LAYERS
_MAX_EMBD = 1 << 20
_MAX_CTX = (1 << 31) - 1
_MAX_VOCAB = (1 << 31) - 1
_INT64_MAX = (1 << 63) - 1


@dataclass(frozen=True)
class KeyValue:
    """One metadata entry. ``value`` is the scalar (a ``str`` for strings,
    bytes that are not UTF-8 replaced), or for an array a tuple of its
    elements when they are numbers and there are at most 4,096 of them, else
    None. ``offset`` is where the entry starts in the file, ``value_offset``
    where its type field ends (the value, or an array's element type)."""

    key: str
    type: int
    value: Any
    offset: int
    value_offset: int
    array_type: int | None = None
    array_len: int = 0


@dataclass(frozen=True)
class TensorInfo:
    """One tensor description: ``dims`` in ggml order (``dims[0]`` is the row
    length), ``offset`` relative to the data section, ``info_offset`` where
    the description starts in the file."""

    name: str
    dims: tuple[int, ...]
    type: int
    offset: int
    info_offset: int

    @property
    def n_bytes(self) -> int:
        _, block, size = GGML_TYPES[self.type]
        n = 1
        for d in self.dims[1:]:
            n *= d
        return (self.dims[0] // block) * size * n


@dataclass
class GGUFFile:
    """What :func:`read_gguf` found: metadata, tensor table and layout."""

    path: str
    version: int
    file_size: int
    kv: dict[str, KeyValue]
    tensors: dict[str, TensorInfo]
    alignment: int
    data_offset: int
    #: where the tensor table starts, and where it ends (the header's size)
    tensor_table_offset: int
    header_size: int

    def get(self, key: str) -> Any:
        entry = self.kv.get(key)
        return None if entry is None else entry.value

    @property
    def architecture(self) -> str | None:
        value = self.get("general.architecture")
        return value if isinstance(value, str) else None


class _Reader:
    """Bounds-checked little-endian reads over a buffer."""

    __slots__ = ("buf", "pos", "size", "path")

    def __init__(self, buf: Any, size: int, path: str) -> None:
        self.buf = buf
        self.size = size
        self.pos = 0
        self.path = path

    def fail(self, what: str) -> ModelLoadError:
        return ModelLoadError(f"could not load {self.path}: {what}")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{what} runs past the end of the file (offset {self.pos}, "
                            f"{n} bytes wanted, file size {self.size}); the file is truncated or corrupt")

    def scalar(self, vtype: int, what: str) -> Any:
        n = _SCALAR_SIZES[vtype]
        self.need(n, what)
        (v,) = struct.unpack_from(_SCALAR_FORMATS[vtype], self.buf, self.pos)
        self.pos += n
        return v

    def u32(self, what: str) -> int:
        return int(self.scalar(ValueType.UINT32, what))

    def u64(self, what: str) -> int:
        return int(self.scalar(ValueType.UINT64, what))

    def string(self, what: str) -> str:
        n = self.u64(f"length of {what}")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", "replace")

    def skip_strings(self, count: int, what: str) -> None:
        unpack = struct.Struct("<Q").unpack_from
        buf, pos, size = self.buf, self.pos, self.size
        for i in range(count):
            if pos + 8 > size:
                self.pos = pos
                self.need(8, f"element {i} of {what}")
            (n,) = unpack(buf, pos)
            pos += 8 + n
            if pos > size:
                self.pos = pos - n
                self.need(n, f"element {i} of {what}")
        self.pos = pos

    def unique_strings(self, count: int, what: str) -> tuple[int, int, bytes] | None:
        """Step over ``count`` strings like :meth:`skip_strings`; return the
        indices and text of the first string seen twice, or None. An empty
        string counts as llama.cpp renames it, ``[EMPTY_<i>]``."""
        unpack = struct.Struct("<Q").unpack_from
        buf, pos, size = self.buf, self.pos, self.size
        texts: list[bytes] = []
        append = texts.append
        for i in range(count):
            if pos + 8 > size:
                self.pos = pos
                self.need(8, f"element {i} of {what}")
            (n,) = unpack(buf, pos)
            pos += 8
            end = pos + n
            if end > size:
                self.pos = pos
                self.need(n, f"element {i} of {what}")
            append(buf[pos:end])
            pos = end
        self.pos = pos
        if len(set(texts)) == count and b"" not in texts:
            return None
        # rare: find the first repeat, naming empty tokens as llama.cpp does
        seen: dict[bytes, int] = {}
        for i, text in enumerate(texts):
            key = text or b"[EMPTY_%d]" % i
            first = seen.setdefault(key, i)
            if first != i:
                return first, i, key
        return None


_ARRAY_KEEP = 4096


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Read and check the container of a GGUF file: header, metadata and
    tensor table (see the module docstring). Tensor data is never read.
    Raises :class:`ModelLoadError` for anything malformed."""
    spath = os.fsdecode(os.fspath(path))
    try:
        with open(spath, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size < 24:
                magic = fh.read(4)
                if magic != b"GGUF":
                    raise ModelLoadError(f"{spath} is not a GGUF file (magic bytes {magic!r})")
                raise ModelLoadError(f"could not load {spath}: the GGUF header runs past the end "
                                     f"of the file (file size {size}); the file is truncated or corrupt")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                return _read(mm, size, spath)
    except OSError as e:
        raise ModelLoadError(f"could not read {spath}: {e.strerror or e}") from None


def _read(buf: Any, size: int, path: str) -> GGUFFile:
    r = _Reader(buf, size, path)
    if bytes(buf[:4]) != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file (magic bytes {bytes(buf[:4])!r})")
    r.pos = 4
    version = r.u32("the version")
    if version not in (2, 3):
        raise r.fail(f"unsupported GGUF version {version} (this llama.cpp reads versions 2 and 3)")
    n_tensors = r.u64("the tensor count")
    n_kv = r.u64("the metadata count")
    # The smallest metadata entry takes 13 bytes (empty key, type, one-byte
    # value), the smallest tensor description 32 (empty name, one dim).
    if n_kv > (size - r.pos) // 13:
        raise r.fail(f"the header claims {n_kv} metadata entries, more than a file of {size} bytes can hold; "
                     "the file is truncated or corrupt")
    if n_tensors > (size - r.pos) // 32:
        raise r.fail(f"the header claims {n_tensors} tensors, more than a file of {size} bytes can hold; "
                     "the file is truncated or corrupt")

    kvs: dict[str, KeyValue] = {}
    for i in range(n_kv):
        start = r.pos
        key = r.string(f"the key of metadata entry {i}")
        what = f"metadata {key!r}"
        vtype = r.u32(f"the type of {what}")
        value_offset = r.pos
        if key in kvs:
            raise r.fail(f"metadata key {key!r} appears twice")
        if vtype not in _TYPE_NAMES:
            raise r.fail(f"{what} has an unknown value type {vtype}")
        array_type: int | None = None
        n = 0
        value: Any
        if vtype == ValueType.ARRAY:
            array_type = r.u32(f"the element type of {what}")
            n = r.u64(f"the length of {what}")
            if array_type not in _TYPE_NAMES or array_type == ValueType.ARRAY:
                raise r.fail(f"{what} is an array of unknown or nested type {array_type}")
            if array_type == ValueType.STRING:
                if n > (size - r.pos) // 8:
                    raise r.fail(f"{what} claims {n} strings, more than the file can hold; "
                                 "the file is truncated or corrupt")
                if key == "tokenizer.ggml.tokens":
                    # llama.cpp asserts that no two tokens have the same text
                    twice = r.unique_strings(n, what)
                    if twice is not None:
                        i, j, text = twice
                        raise r.fail(f"{what} holds {text!r} twice (tokens {i} and {j}); "
                                     "every token of a vocabulary must be distinct")
                else:
                    r.skip_strings(n, what)
                value = None
            else:
                width = _SCALAR_SIZES[array_type]
                if n > (size - r.pos) // width:
                    raise r.fail(f"{what} claims {n} elements of {_TYPE_NAMES[array_type]}, "
                                 "more than the file can hold; the file is truncated or corrupt")
                if n <= _ARRAY_KEEP:
                    fmt = "<" + _SCALAR_FORMATS[array_type][1] * n
                    value = struct.unpack_from(fmt, buf, r.pos)
                else:
                    value = None
                r.pos += n * width
        elif vtype == ValueType.STRING:
            value = r.string(what)
        else:
            value = r.scalar(vtype, what)
            if vtype == ValueType.BOOL:
                value = bool(value)
        kvs[key] = KeyValue(key, vtype, value, start, value_offset, array_type, n)

    alignment = 32
    if "general.alignment" in kvs:
        entry = kvs["general.alignment"]
        if entry.type != ValueType.UINT32:
            raise r.fail(f"metadata 'general.alignment' must be uint32, got {_describe(entry)}")
        alignment = int(entry.value)
        if alignment <= 0 or alignment & (alignment - 1):
            raise r.fail(f"metadata 'general.alignment' is {alignment}, not a power of two")

    tensor_table_offset = r.pos
    tensors: dict[str, TensorInfo] = {}
    for i in range(n_tensors):
        start = r.pos
        name = r.string(f"the name of tensor {i}")
        what = f"tensor {name!r}"
        if name in tensors:
            raise r.fail(f"tensor name {name!r} appears twice")
        if len(name.encode("utf-8", "replace")) > _MAX_NAME:
            raise r.fail(f"tensor {i} has a name of more than {_MAX_NAME} bytes")
        n_dims = r.u32(f"the dimension count of {what}")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise r.fail(f"{what} has {n_dims} dimensions (1 to {_MAX_DIMS} allowed)")
        r.need(8 * n_dims, f"the dimensions of {what}")
        dims = struct.unpack_from(f"<{n_dims}q", buf, r.pos)
        r.pos += 8 * n_dims
        ttype = r.u32(f"the type of {what}")
        offset = r.u64(f"the offset of {what}")
        if ttype not in GGML_TYPES:
            raise r.fail(f"{what} has an unknown ggml type {ttype}")
        if any(d <= 0 for d in dims):
            raise r.fail(f"{what} has a dimension that is not positive: {list(dims)}")
        count = 1
        for d in dims:
            count *= d
        tname, block, bsize = GGML_TYPES[ttype]
        if count > _INT64_MAX // 8:
            raise r.fail(f"{what} is too large: dimensions {list(dims)}")
        if dims[0] % block:
            raise r.fail(f"{what} of type {tname} has a row length of {dims[0]}, "
                         f"not a multiple of the type's block size {block}")
        if offset % alignment:
            raise r.fail(f"{what} has offset {offset}, not a multiple of the alignment {alignment}")
        tensors[name] = TensorInfo(name, tuple(dims), ttype, offset, start)

    header_size = r.pos
    data_offset = -(-header_size // alignment) * alignment
    available = size - data_offset
    end = 0
    last = ""
    for t in sorted(tensors.values(), key=lambda t: t.offset):
        if t.offset < end:
            raise r.fail(f"tensor {t.name!r} (offset {t.offset}) overlaps tensor {last!r}")
        end = t.offset + t.n_bytes
        last = t.name
        if end > available:
            raise r.fail(f"tensor {t.name!r} ({t.n_bytes} bytes at data offset {t.offset}) runs past the "
                         f"end of the file (not within the file bounds); the file is truncated or corrupt")
    return GGUFFile(path, version, size, kvs, tensors, alignment, data_offset,
                    tensor_table_offset, header_size)


# --------------------------------------------------------------------------
# metadata helpers
# --------------------------------------------------------------------------


def _describe(entry: KeyValue) -> str:
    if entry.type == ValueType.ARRAY:
        assert entry.array_type is not None
        return f"an array of {entry.array_len} {_TYPE_NAMES[entry.array_type]}"
    return f"{_TYPE_NAMES[entry.type]} {entry.value!r}"


class _Checker:
    def __init__(self, f: GGUFFile, what: str) -> None:
        self.f = f
        self.what = what

    def fail(self, message: str) -> ModelLoadError:
        return ModelLoadError(f"could not load {self.f.path}: {message} (a corrupt or unsupported {self.what})")

    def _entry(self, key: str, required: bool) -> KeyValue | None:
        entry = self.f.kv.get(key)
        if entry is None and required:
            raise self.fail(f"metadata {key!r} is missing")
        return entry

    def integer(self, key: str, lo: int, hi: int, *, required: bool = False,
                default: int | None = None) -> int | None:
        """An integer scalar in [lo, hi]."""
        entry = self._entry(key, required)
        if entry is None:
            return default
        if entry.type not in _INT_TYPES:
            raise self.fail(f"metadata {key!r} must be an integer, got {_describe(entry)}")
        v = int(entry.value)
        if not lo <= v <= hi:
            raise self.fail(f"metadata {key!r} is {v}, outside [{lo}, {hi}]")
        return v

    def per_layer(self, key: str, n_layer: int, lo: int, hi: int, *, required: bool = False,
                  default: int | None = None) -> list[int] | None:
        """An integer, or an array of one integer per layer, each in [lo, hi]."""
        entry = self._entry(key, required)
        if entry is None:
            return None if default is None else [default] * n_layer
        if entry.type == ValueType.ARRAY:
            if entry.array_type not in _INT_TYPES:
                raise self.fail(f"metadata {key!r} must be an integer or an integer array, got {_describe(entry)}")
            if entry.array_len != n_layer or entry.value is None:
                raise self.fail(f"metadata {key!r} has {entry.array_len} entries for {n_layer} layers")
            values = [int(v) for v in entry.value]
        elif entry.type in _INT_TYPES:
            values = [int(entry.value)] * n_layer
        else:
            raise self.fail(f"metadata {key!r} must be an integer or an integer array, got {_describe(entry)}")
        for i, v in enumerate(values):
            if not lo <= v <= hi:
                raise self.fail(f"metadata {key!r} is {v} for layer {i}, outside [{lo}, {hi}]")
        return values

    def real(self, key: str, lo: float, hi: float, *, required: bool = False, exact: int | None = None,
             lo_open: bool = False) -> float | None:
        """A finite float in [lo, hi] (or (lo, hi] with ``lo_open``);
        ``exact`` demands that value type."""
        entry = self._entry(key, required)
        if entry is None:
            return None
        if entry.type not in _FLOAT_TYPES or (exact is not None and entry.type != exact):
            want = _TYPE_NAMES[exact] if exact is not None else "a float"
            raise self.fail(f"metadata {key!r} must be {want}, got {_describe(entry)}")
        v = float(entry.value)
        if not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo):
            raise self.fail(f"metadata {key!r} is {v}, outside {'(' if lo_open else '['}{lo}, {hi}]")
        return v

    def typed(self, key: str, vtype: int, array_type: int | None = None) -> KeyValue | None:
        entry = self.f.kv.get(key)
        if entry is None:
            return None
        if entry.type != vtype or (array_type is not None and entry.array_type != array_type):
            want = _TYPE_NAMES[vtype] if array_type is None else f"an array of {_TYPE_NAMES[array_type]}"
            raise self.fail(f"metadata {key!r} must be {want}, got {_describe(entry)}")
        return entry

    # --- tensors ------------------------------------------------------------
    def tensor(self, name: str, shape: Sequence[int] | None, types: Iterable[int], *,
               required: bool = True, exact: bool = False) -> TensorInfo | None:
        """Check a tensor's type and, when ``shape`` is given, its dimensions
        (trailing dimensions of 1 may be left out on either side, unless
        ``exact``)."""
        t = self.f.tensors.get(name)
        if t is None:
            if required:
                raise self.fail(f"tensor {name!r} is missing")
            return None
        allowed = frozenset(types)
        if t.type not in allowed:
            names = "/".join(sorted(GGML_TYPES[x][0] for x in allowed)) if len(allowed) <= 3 else "a float or quantized type"
            raise self.fail(f"tensor {name!r} has type {GGML_TYPES[t.type][0]}, expected {names}")
        if shape is not None and (tuple(t.dims) != tuple(shape) if exact else
                                  _squeeze(t.dims) != _squeeze(tuple(shape))):
            raise self.fail(f"tensor {name!r} has shape {list(t.dims)}, expected {list(shape)} "
                            "for the model's hyper-parameters")
        return t


def _squeeze(dims: tuple[int, ...]) -> tuple[int, ...]:
    d = list(dims)
    while len(d) > 1 and d[-1] == 1:
        d.pop()
    return tuple(d)


# --------------------------------------------------------------------------
# text models
# --------------------------------------------------------------------------


# The special tokens llama.cpp uses while it tokenizes and generates (key
# names as llama.cpp spells them). Padding, mask and FIM ids are left out:
# llama.cpp ignores those when they are out of range.
_SPECIAL_IDS = ("bos", "eos", "eot", "eom", "unknown", "seperator")


def _check_tokenizer(c: _Checker) -> int:
    tokens = c.typed("tokenizer.ggml.tokens", ValueType.ARRAY, ValueType.STRING)
    if tokens is None:
        raise c.fail("metadata 'tokenizer.ggml.tokens' (the vocabulary) is missing")
    n_vocab = tokens.array_len
    if not 1 <= n_vocab <= _MAX_VOCAB:
        raise c.fail(f"the vocabulary 'tokenizer.ggml.tokens' has {n_vocab} tokens")
    model = c.typed("tokenizer.ggml.model", ValueType.STRING)
    if model is None:
        raise c.fail("metadata 'tokenizer.ggml.model' is missing")
    scores = c.f.kv.get("tokenizer.ggml.scores")
    if scores is not None:
        if scores.type != ValueType.ARRAY or scores.array_type not in (ValueType.FLOAT32, ValueType.INT32):
            raise c.fail(f"metadata 'tokenizer.ggml.scores' must be a float32 array, got {_describe(scores)}")
        if scores.array_len != n_vocab:
            raise c.fail(f"metadata 'tokenizer.ggml.scores' has {scores.array_len} entries for {n_vocab} tokens")
    types = c.typed("tokenizer.ggml.token_type", ValueType.ARRAY, ValueType.INT32)
    if types is not None and types.array_len != n_vocab:
        raise c.fail(f"metadata 'tokenizer.ggml.token_type' has {types.array_len} entries for {n_vocab} tokens")
    c.typed("tokenizer.ggml.merges", ValueType.ARRAY, ValueType.STRING)
    c.typed("tokenizer.ggml.pre", ValueType.STRING)
    c.typed("tokenizer.chat_template", ValueType.STRING)
    for name in _SPECIAL_IDS:
        key = f"tokenizer.ggml.{name}_token_id"
        entry = c.f.kv.get(key)
        if entry is None:
            continue
        if entry.type not in _INT_TYPES:
            raise c.fail(f"metadata {key!r} must be an integer token id, got {_describe(entry)}")
        v = int(entry.value)
        if v in (-1, 0xFFFFFFFF):  # "no such token"
            continue
        if not 0 <= v < n_vocab:
            raise c.fail(f"metadata {key!r} is {v}, not a token of the {n_vocab}-token vocabulary")
    for key in ("tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token",
                "tokenizer.ggml.add_space_prefix"):
        c.typed(key, ValueType.BOOL)
    return n_vocab


@dataclass
class _HParams:
    arch: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_ff: list[int]
    n_head: list[int]
    n_head_kv: list[int]
    head_k: int
    head_v: int
    #: head sizes of sliding-window layers (the full ones unless the file says)
    head_k_swa: int = 0
    head_v_swa: int = 0
    #: rope.dimension_count, or the key head size
    n_rot: int = 0
    n_expert: int = 0
    n_expert_used: int = 0
    #: expert_feed_forward_length per layer, expert_shared_feed_forward_length
    n_ff_exp: list[int] | None = None
    n_ff_shexp: int | None = None


def _check_hparams(c: _Checker, arch: str, n_vocab: int) -> _HParams:
    p = f"{arch}."
    c.integer(p + "context_length", 1, _MAX_CTX, required=True)
    n_embd = c.integer(p + "embedding_length", 1, _MAX_EMBD, required=True)
    n_layer = c.integer(p + "block_count", 1, _MAX_LAYERS, required=True)
    assert n_embd is not None and n_layer is not None
    vocab_size = c.integer(p + "vocab_size", 1, _MAX_VOCAB)
    if vocab_size is not None and vocab_size != n_vocab:
        raise c.fail(f"metadata {p + 'vocab_size'!r} is {vocab_size} but the vocabulary has {n_vocab} tokens")
    n_ff = c.per_layer(p + "feed_forward_length", n_layer, 0, 1 << 24, default=0)
    n_head = c.per_layer(p + "attention.head_count", n_layer, 0, 1 << 14, default=0)
    assert n_ff is not None and n_head is not None
    n_head_kv = c.per_layer(p + "attention.head_count_kv", n_layer, 0, 1 << 14) or list(n_head)
    for i, (h, kv) in enumerate(zip(n_head, n_head_kv)):
        if kv and (not h or h % kv):
            raise c.fail(f"layer {i} has {h} attention heads for {kv} KV heads; "
                         f"{p}attention.head_count must be a multiple of {p}attention.head_count_kv")
    max_head = max(n_head)
    head_default = n_embd // max_head if max_head else 0
    head_k = c.integer(p + "attention.key_length", 1, 1 << 16, default=head_default)
    head_v = c.integer(p + "attention.value_length", 1, 1 << 16, default=head_default)
    assert head_k is not None and head_v is not None
    if max_head and not head_k:
        raise c.fail(f"{p}embedding_length {n_embd} is smaller than {p}attention.head_count {max_head}")
    rope_dims = c.integer(p + "rope.dimension_count", 0, 1 << 16)
    if rope_dims is not None and max_head and rope_dims > head_k:
        raise c.fail(f"metadata {p + 'rope.dimension_count'!r} is {rope_dims}, more than the head size {head_k}")
    for key in ("rope.freq_base", "rope.freq_base_swa"):
        c.real(p + key, 0.0, 1e30, lo_open=True)
    c.real(p + "rope.freq_scale", 0.0, 1e30, lo_open=True)
    c.real(p + "rope.scaling.factor", 0.0, 1e30)
    for key in ("attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon"):
        c.real(p + key, 0.0, 1.0)
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        c.real(p + key, 0.0, 1e30)
    c.integer(p + "attention.sliding_window", 0, _MAX_CTX)
    n_expert = c.integer(p + "expert_count", 0, 1024, default=0)
    n_used = c.integer(p + "expert_used_count", 0, 1024, default=0)
    assert n_expert is not None and n_used is not None
    if n_used > n_expert:
        raise c.fail(f"{p}expert_used_count {n_used} exceeds {p}expert_count {n_expert}")
    head_k_swa = c.integer(p + "attention.key_length_swa", 1, 1 << 16, default=head_k)
    head_v_swa = c.integer(p + "attention.value_length_swa", 1, 1 << 16, default=head_v)
    n_ff_exp = c.per_layer(p + "expert_feed_forward_length", n_layer, 0, 1 << 24)
    n_ff_shexp = c.integer(p + "expert_shared_feed_forward_length", 0, 1 << 24)
    assert head_k_swa is not None and head_v_swa is not None
    return _HParams(arch, n_vocab, n_embd, n_layer, n_ff, n_head, n_head_kv, head_k, head_v,
                    head_k_swa, head_v_swa, head_k if rope_dims is None else rope_dims,
                    n_expert, n_used, n_ff_exp, n_ff_shexp)


def _check_attention(c: _Checker, h: _HParams, b: str, i: int, *, qk_norm: bool) -> None:
    M, F32 = _MATRIX_TYPES, (_F32,)
    n_q, n_kv = h.n_head[i] * h.head_k, h.n_head_kv[i] * h.head_k
    c.tensor(b + "attn_q.weight", (h.n_embd, n_q), M)
    c.tensor(b + "attn_k.weight", (h.n_embd, n_kv), M)
    c.tensor(b + "attn_v.weight", (h.n_embd, h.n_head_kv[i] * h.head_v), M)
    c.tensor(b + "attn_output.weight", (h.n_head[i] * h.head_v, h.n_embd), M)
    if qk_norm:
        c.tensor(b + "attn_q_norm.weight", (h.head_k,), F32)
        c.tensor(b + "attn_k_norm.weight", (h.head_k,), F32)


def _check_ffn(c: _Checker, h: _HParams, b: str, i: int) -> None:
    M = _MATRIX_TYPES
    if f"{b}ffn_gate_inp.weight" in c.f.tensors:  # mixture of experts: not checked further
        return
    if not h.n_ff[i]:
        raise c.fail(f"layer {i} has a feed-forward length of 0")
    c.tensor(b + "ffn_gate.weight", (h.n_embd, h.n_ff[i]), M)
    c.tensor(b + "ffn_up.weight", (h.n_embd, h.n_ff[i]), M)
    c.tensor(b + "ffn_down.weight", (h.n_ff[i], h.n_embd), M)


def _check_embeddings(c: _Checker, h: _HParams, final_norm: str) -> None:
    c.tensor("token_embd.weight", (h.n_embd, h.n_vocab), _MATRIX_TYPES)
    c.tensor(final_norm, (h.n_embd,), (_F32,))
    c.tensor("output.weight", (h.n_embd, h.n_vocab), _MATRIX_TYPES, required=False)


# --- shape rules by tensor role ------------------------------------------------
#
# Most architectures llama.cpp loads take their tensor names from one table
# (llama-arch.cpp): ``token_embd``, ``output``, ``blk.N.attn_q``, ``blk.N.ffn_up``
# and so on. What a name stands for (its role) fixes the tensor's shape in
# terms of the hyper-parameters whatever the architecture: a query projection
# takes the n_embd-wide hidden state to head_count heads of key_length values,
# a down projection takes feed_forward_length values back to n_embd. The rules
# here state those shapes the way the compute graph uses them. llama.cpp's
# loader compares each tensor with a shape of its own, for some architectures
# written in other terms (n_embd where the graph reshapes by head_count *
# key_length), so a file whose hyper-parameters disagree with each other can
# pass the loader and abort while the graph is built. A file that fits both
# is one that runs.
#
# The rules apply to the architectures in _ROLE_ARCHS, each of which was read
# in llama.cpp/src/models/<arch>.cpp: every tensor it creates under a role
# name has the role's shape, and _Arch records what it adds (which norms are
# required, whether the feed-forward has a gate, the graph's assertions on
# head sizes). A tensor whose name is no role is left to llama.cpp, which
# checks it; an architecture not listed gets the container and metadata
# checks only.


@dataclass(frozen=True)
class _Arch:
    #: norms every layer must have
    norms: tuple[str, ...] = ("attn_norm", "ffn_norm")
    #: the dense feed-forward: "gated" (ffn_gate, ffn_up, ffn_down), "plain"
    #: (ffn_up, ffn_down), or "fused" (ffn_up holds gate and up: 2 * n_ff)
    ffn: str = "gated"
    #: attn_q_norm / attn_k_norm required in every layer
    qk_norm: bool = False
    #: which layers are mixtures of experts: "never", "always", or "count"
    #: (all of them when expert_count > 0)
    experts: str = "never"
    #: the graph asserts value_length == key_length, and with rope_whole
    #: also rope.dimension_count == the head size (GGML_ASSERT: an abort)
    same_head: bool = True
    rope_whole: bool = True
    #: output_norm.weight required
    output_norm: bool = True


_GEMMA2_NORMS = ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm")
_ROLE_ARCHS: dict[str, _Arch] = {
    "llama": _Arch(experts="count"),
    "mistral3": _Arch(experts="count"),
    "granite": _Arch(experts="count"),
    "granitemoe": _Arch(experts="count", same_head=False, rope_whole=False),
    "smollm3": _Arch(),
    "internlm2": _Arch(),
    "exaone": _Arch(),
    "xverse": _Arch(),
    "orion": _Arch(),
    "ernie4_5": _Arch(),
    "qwen2": _Arch(),
    "qwen2moe": _Arch(experts="always"),
    "qwen3": _Arch(qk_norm=True),
    "qwen3moe": _Arch(qk_norm=True, experts="always"),
    "olmo": _Arch(norms=(), output_norm=False),
    "olmo2": _Arch(norms=("post_attention_norm", "post_ffw_norm"), qk_norm=True),
    "olmoe": _Arch(qk_norm=True, experts="always"),
    "seed_oss": _Arch(norms=("attn_norm", "post_attention_norm")),
    "starcoder2": _Arch(ffn="plain"),
    "arcee": _Arch(ffn="plain"),
    "phi3": _Arch(ffn="fused", rope_whole=False),
    "stablelm": _Arch(norms=("attn_norm",), rope_whole=False),
    "command-r": _Arch(norms=("attn_norm",), rope_whole=False),
    "gemma": _Arch(same_head=False, rope_whole=False),
    "gemma2": _Arch(norms=_GEMMA2_NORMS, same_head=False, rope_whole=False),
    "gemma3": _Arch(norms=_GEMMA2_NORMS, qk_norm=True, same_head=False, rope_whole=False),
}

#: the architectures whose tensor shapes are checked, for the docs and tests
SHAPE_CHECKED_ARCHITECTURES = tuple(sorted([*_ROLE_ARCHS, "mamba", "lfm2"]))

# role kinds: a weight matrix (its bias has the matrix's output length), a
# norm (weight and bias of n_embd), a vector of F32 factors
_MATRIX, _NORM, _FACTORS = "matrix", "norm", "factors"
_Shapes = dict[str, tuple[str, set[tuple[int, ...]]]]


def _global_roles(h: _HParams) -> _Shapes:
    e, v = h.n_embd, h.n_vocab
    half_rot = (h.n_rot // 2,)
    return {
        "token_embd": (_MATRIX, {(e, v)}),
        "output": (_MATRIX, {(e, v)}),
        "output_norm": (_NORM, {(e,)}),
        "token_embd_norm": (_NORM, {(e,)}),
        "rope_freqs": (_FACTORS, {half_rot}),
        "rope_factors_long": (_FACTORS, {half_rot}),
        "rope_factors_short": (_FACTORS, {half_rot}),
    }


def _layer_roles(c: _Checker, h: _HParams, a: _Arch, i: int) -> _Shapes:
    """Shapes by role for layer ``i``; a set holds every shape the graph can
    use (a sliding-window layer may have its own head sizes, a q/k norm may
    act on one head or on all of them)."""
    e, nh, nkv = h.n_embd, h.n_head[i], h.n_head_kv[i]
    roles: _Shapes = {}

    def add(role: str, kind: str, *shapes: tuple[int, ...]) -> None:
        roles.setdefault(role, (kind, set()))[1].update(_squeeze(s) for s in shapes)

    for norm in ("attn_norm", "ffn_norm", "post_attention_norm", "post_ffw_norm"):
        add(norm, _NORM, (e,))
    for hk, hv in {(h.head_k, h.head_v), (h.head_k_swa, h.head_v_swa)}:
        q, k, v, o = nh * hk, nkv * hk, nkv * hv, nh * hv
        add("attn_q", _MATRIX, (e, q))
        add("attn_k", _MATRIX, (e, k))
        add("attn_v", _MATRIX, (e, v))
        add("attn_qkv", _MATRIX, (e, q + k + v))
        add("attn_output", _MATRIX, (o, e))
        add("attn_q_norm", _NORM, (hk,), (q,), (hk, nh))
        add("attn_k_norm", _NORM, (hk,), (k,), (hk, nkv))
    f = h.n_ff[i]
    add("ffn_gate", _MATRIX, (e, f))
    add("ffn_up", _MATRIX, (e, 2 * f) if a.ffn == "fused" else (e, f))
    add("ffn_down", _MATRIX, (f, e))
    # Experts: the graph takes their width from the tensors, so the three
    # must agree with each other (llama.cpp's loader reads it from
    # expert_feed_forward_length or feed_forward_length, by architecture).
    b, t = f"blk.{i}.", c.f.tensors
    n_x = h.n_expert
    add("ffn_gate_inp", _MATRIX, (e, n_x))
    add("exp_probs_b", _NORM, (n_x,))  # a bias only
    width = _width(t.get(b + "ffn_up_exps.weight"), 1) or _width(t.get(b + "ffn_down_exps.weight"), 0) \
        or _width(t.get(b + "ffn_gate_exps.weight"), 1)
    if width:
        add("ffn_gate_exps", _MATRIX, (e, width, n_x))
        add("ffn_up_exps", _MATRIX, (e, width, n_x))
        add("ffn_down_exps", _MATRIX, (width, e, n_x))
    shared = _width(t.get(b + "ffn_up_shexp.weight"), 1) or _width(t.get(b + "ffn_down_shexp.weight"), 0)
    if shared:
        add("ffn_gate_shexp", _MATRIX, (e, shared))
        add("ffn_up_shexp", _MATRIX, (e, shared))
        add("ffn_down_shexp", _MATRIX, (shared, e))
    add("ffn_gate_inp_shexp", _MATRIX, (e,))
    return roles


def _width(t: TensorInfo | None, axis: int) -> int:
    return t.dims[axis] if t is not None and len(t.dims) > axis else 0


def _fits(c: _Checker, t: TensorInfo, kind: str, suffix: str, shapes: set[tuple[int, ...]]) -> None:
    """Check a tensor that plays a role: its type, and its shape against the
    role's shapes (a bias: the output length of the role's matrix)."""
    if suffix == "bias":
        types: frozenset[int] = _FLOAT_TENSOR_TYPES
        shapes = {s[:1] if kind == _NORM else (s[1] if len(s) > 1 else 1,) for s in shapes}
    elif kind == _MATRIX:
        types = _MATRIX_TYPES
    else:
        types = frozenset({_F32})
    c.tensor(t.name, None, types)
    got = _squeeze(t.dims)
    if got not in {_squeeze(s) for s in shapes}:
        want = " or ".join(str(list(s)) for s in sorted(shapes))
        raise c.fail(f"tensor {t.name!r} has shape {list(t.dims)}, expected {want} "
                     "for the model's hyper-parameters")


def _check_roles(c: _Checker, h: _HParams, a: _Arch) -> None:
    p, t = f"{h.arch}.", c.f.tensors
    for i in range(h.n_layer):
        if not h.n_head[i] or not h.n_head_kv[i]:
            raise c.fail(f"layer {i} has no attention heads (head_count / head_count_kv is 0)")
    # the graph's assertions on head sizes
    if a.same_head and h.head_k != h.head_v:
        raise c.fail(f"{p}attention.key_length {h.head_k} and {p}attention.value_length {h.head_v} differ; "
                     f"llama.cpp's {h.arch} graph needs one head size")
    if a.rope_whole and h.n_rot != h.head_k:
        raise c.fail(f"metadata {p + 'rope.dimension_count'!r} is {h.n_rot}, not the head size {h.head_k}; "
                     f"llama.cpp's {h.arch} graph rotates whole heads")
    moe = a.experts == "always" or (a.experts == "count" and h.n_expert > 0)
    if moe and not (h.n_expert and h.n_expert_used):
        raise c.fail(f"{p}expert_count {h.n_expert} / {p}expert_used_count {h.n_expert_used}: "
                     f"a {h.arch} model routes every layer to its experts and needs both above 0")

    # presence: what every layer needs for the graph to be built at all
    c.tensor("token_embd.weight", None, _MATRIX_TYPES)
    if a.output_norm:
        c.tensor("output_norm.weight", None, (_F32,))
    for i in range(h.n_layer):
        b = f"blk.{i}."
        need = [*a.norms, "attn_output"]
        if b + "attn_qkv.weight" not in t:
            need += ["attn_q", "attn_k", "attn_v"]
        if a.qk_norm:
            need += ["attn_q_norm", "attn_k_norm"]
        if moe:
            need += ["ffn_gate_inp", "ffn_up_exps", "ffn_down_exps"]
        else:
            if not h.n_ff[i]:
                raise c.fail(f"layer {i} has a feed-forward length of 0")
            need += ["ffn_up", "ffn_down"] + (["ffn_gate"] if a.ffn == "gated" else [])
        for role in need:
            if b + role + ".weight" not in t:
                raise c.fail(f"tensor {b + role + '.weight'!r} is missing")

    # shapes and types of every tensor that plays a role
    global_roles = _global_roles(h)
    layer_roles: dict[int, _Shapes] = {}
    for name, info in t.items():
        parts = name.split(".")
        if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit():
            i = int(parts[1])
            if i >= h.n_layer:
                continue  # llama.cpp refuses a tensor it does not expect
            if i not in layer_roles:
                layer_roles[i] = _layer_roles(c, h, a, i)
            rule = layer_roles[i].get(parts[2])
            suffix = parts[3]
        elif len(parts) == 2:
            rule = global_roles.get(parts[0])
            suffix = parts[1]
        else:
            continue
        if rule is not None and suffix in ("weight", "bias"):
            _fits(c, info, rule[0], suffix, rule[1])

def _check_mamba(c: _Checker, h: _HParams) -> None:
    F32, M = (_F32,), _MATRIX_TYPES
    p = "mamba."
    d_conv = c.integer(p + "ssm.conv_kernel", 1, 1 << 10, required=True)
    d_inner = c.integer(p + "ssm.inner_size", 1, 1 << 24, required=True)
    d_state = c.integer(p + "ssm.state_size", 1, 1 << 16, required=True)
    dt_rank = c.integer(p + "ssm.time_step_rank", 1, 1 << 20, required=True)
    assert d_conv and d_inner and d_state and dt_rank
    _check_embeddings(c, h, "output_norm.weight")
    for i in range(h.n_layer):
        b = f"blk.{i}."
        c.tensor(b + "attn_norm.weight", (h.n_embd,), F32)
        c.tensor(b + "ssm_in.weight", (h.n_embd, 2 * d_inner), M)
        c.tensor(b + "ssm_conv1d.weight", (d_conv, d_inner), F32)
        c.tensor(b + "ssm_conv1d.bias", (d_inner,), F32)
        c.tensor(b + "ssm_x.weight", (d_inner, dt_rank + 2 * d_state), M)
        c.tensor(b + "ssm_dt.weight", (dt_rank, d_inner), M)
        c.tensor(b + "ssm_dt.bias", (d_inner,), F32)
        c.tensor(b + "ssm_a", (d_state, d_inner), F32)
        c.tensor(b + "ssm_d", (d_inner,), F32)
        c.tensor(b + "ssm_out.weight", (d_inner, h.n_embd), M)


def _check_lfm2(c: _Checker, h: _HParams) -> None:
    F32, M = (_F32,), _MATRIX_TYPES
    l_cache = c.integer("lfm2.shortconv.l_cache", 1, 1 << 10, required=True)
    assert l_cache is not None
    _check_embeddings(c, h, "token_embd_norm.weight")
    for i in range(h.n_layer):
        b = f"blk.{i}."
        c.tensor(b + "attn_norm.weight", (h.n_embd,), F32)
        if h.n_head_kv[i]:
            _check_attention(c, h, b, i, qk_norm=True)
        else:
            c.tensor(b + "shortconv.conv.weight", (l_cache, h.n_embd), F32)
            c.tensor(b + "shortconv.in_proj.weight", (h.n_embd, 3 * h.n_embd), M)
            c.tensor(b + "shortconv.out_proj.weight", (h.n_embd, h.n_embd), M)
        c.tensor(b + "ffn_norm.weight", (h.n_embd,), F32)
        _check_ffn(c, h, b, i)


_ARCH_TENSORS: dict[str, Callable[[_Checker, _HParams], None]] = {
    "mamba": _check_mamba,
    "lfm2": _check_lfm2,
}


def check_model_file(path: str | os.PathLike[str], *, vocab_only: bool = False) -> GGUFFile:
    """Check a text model GGUF before llama.cpp loads it; return what was read.

    With ``vocab_only`` only the container and the tokenizer are checked
    (llama.cpp then reads nothing else). For the first file of a split
    model (``split.count`` > 1) the tensors' presence and shapes are not
    checked, since the other files hold the rest. Raises :class:`ModelLoadError`
    naming the file and the key or tensor at fault.
    """
    f = read_gguf(path)
    c = _Checker(f, "model file")
    arch_entry = c.typed("general.architecture", ValueType.STRING)
    if arch_entry is None:
        raise c.fail("metadata 'general.architecture' is missing")
    arch = str(arch_entry.value)
    if arch == "clip":
        raise ModelLoadError(f"could not load {f.path}: it is a multimodal projector (architecture 'clip'), "
                             "not a text model; pass it as the projector (mmproj)")
    c.typed("general.name", ValueType.STRING)
    n_vocab = _check_tokenizer(c)
    if vocab_only:
        return f
    h = _check_hparams(c, arch, n_vocab)
    n_split = c.integer("split.count", 0, 1 << 16, default=0)
    # The first file of a split model (gguf-split) holds only some of the
    # tensors; llama.cpp finds the rest in the other files, not checked here.
    if n_split and n_split > 1:
        return f
    check = _ARCH_TENSORS.get(arch)
    rules = _ROLE_ARCHS.get(arch)
    if check is not None:
        check(c, h)
    elif rules is not None:
        _check_roles(c, h, rules)
    return f


# --------------------------------------------------------------------------
# projectors (clip)
# --------------------------------------------------------------------------

# Every key clip.cpp reads, with the type it reads it as: clip.cpp fetches
# scalars with gguf_get_val_<type>, which asserts on any other type. "{m}"
# stands for "vision" and "audio".
_U32, _F32V, _BOOL, _STR, _I32 = ValueType.UINT32, ValueType.FLOAT32, ValueType.BOOL, ValueType.STRING, ValueType.INT32
_CLIP_KEYS: dict[str, tuple[int, int | None]] = {
    "general.name": (_STR, None),
    "general.description": (_STR, None),
    "clip.projector_type": (_STR, None),
    "clip.vision.projector_type": (_STR, None),
    "clip.audio.projector_type": (_STR, None),
    "clip.gen.audio.projector_type": (_STR, None),
    "clip.gen.audio.model_variant": (_STR, None),
    "clip.vision.mm_patch_merge_type": (_STR, None),
    "clip.has_vision_encoder": (_BOOL, None),
    "clip.has_audio_encoder": (_BOOL, None),
    "clip.has_gen_audio_encoder": (_BOOL, None),
    "clip.use_gelu": (_BOOL, None),
    "clip.use_silu": (_BOOL, None),
    "clip.minicpmv_version": (_I32, None),
    "clip.minicpmv_query_num": (_U32, None),
    "clip.vision.image_mean": (ValueType.ARRAY, _F32V),
    "clip.vision.image_std": (ValueType.ARRAY, _F32V),
    "clip.vision.image_grid_pinpoints": (ValueType.ARRAY, _I32),
    "clip.vision.projector.spatial_offsets": (ValueType.ARRAY, _I32),
    "clip.vision.wa_pattern_mode": (ValueType.ARRAY, _I32),
    "clip.vision.wa_layer_indexes": (ValueType.ARRAY, _I32),
    "clip.audio.wa_pattern_mode": (ValueType.ARRAY, _I32),
    "clip.audio.rvq.codebook_size": (ValueType.ARRAY, _I32),
    "clip.vision.swiglu_clamp": (_F32V, None),
}
for _m in ("vision", "audio"):
    for _k in ("embedding_length", "feed_forward_length", "block_count", "projection_dim",
               "attention.head_count", "attention.head_count_kv", "attention.head_dim"):
        _CLIP_KEYS[f"clip.{_m}.{_k}"] = (_U32, None)
    _CLIP_KEYS[f"clip.{_m}.attention.layer_norm_epsilon"] = (_F32V, None)
    _CLIP_KEYS[f"clip.{_m}.feature_layer"] = (ValueType.ARRAY, _I32)
for _k in ("window_size", "image_max_pixels", "image_min_pixels", "image_size", "patch_size",
           "preproc_image_size", "preproc_max_tiles", "preproc_min_tiles", "projector.query_side",
           "projector.window_side", "projector.scale_factor", "sam.block_count", "sam.embedding_length",
           "sam.head_count", "spatial_merge_size", "expert_used_count", "n_wa_pattern"):
    _CLIP_KEYS[f"clip.vision.{_k}"] = (_U32, None)
for _k in ("subsampling_factor", "window_size", "chunk_size", "conv_kernel_size", "local_block_count",
           "local_group_size", "max_pos_emb", "num_mel_bins", "projector.downsample_rate",
           "projector.head_count", "projector.stack_factor", "projector.window_size",
           "rvq.num_quantizers"):
    _CLIP_KEYS[f"clip.audio.{_k}"] = (_U32, None)
del _m, _k

_INT32_MAX = (1 << 31) - 1


def _check_tower(c: _Checker, m: str, prefix: str, proj_type: str | None) -> int | None:
    """One encoder of a projector: ``m`` is "vision" or "audio", ``prefix``
    its tensor prefix ("v" or "a"). Returns the width of its output
    embeddings when the projector type is one checked in full, else None."""
    k = f"clip.{m}."
    n_embd = c.integer(k + "embedding_length", 1, 1 << 16, required=True)
    n_ff = c.integer(k + "feed_forward_length", 1, 1 << 18, required=True)
    n_layer = c.integer(k + "block_count", 1, _MAX_LAYERS, required=True)
    n_head = c.integer(k + "attention.head_count", 1, 1 << 12, required=True)
    assert n_embd and n_ff and n_layer and n_head
    c.real(k + "attention.layer_norm_epsilon", 0.0, 1.0, required=True)
    c.integer(k + "projection_dim", 1, _MAX_EMBD)
    head_dim = c.integer(k + "attention.head_dim", 1, 1 << 12)
    n_head_kv = c.integer(k + "attention.head_count_kv", 1, 1 << 12)
    if head_dim is None and n_embd % n_head:
        raise c.fail(f"{k}embedding_length {n_embd} is not a multiple of {k}attention.head_count {n_head}")
    if n_head_kv is not None and n_head % n_head_kv:
        raise c.fail(f"{k}attention.head_count {n_head} is not a multiple of {k}attention.head_count_kv {n_head_kv}")
    feature_layers = c.f.get(k + "feature_layer")
    if feature_layers:
        for v in feature_layers:
            if not -1 <= v <= n_layer:
                raise c.fail(f"metadata {k + 'feature_layer'!r} names layer {v} of a {n_layer}-layer encoder")
    F32, M, FL = (_F32,), _MATRIX_TYPES, _FLOAT_TENSOR_TYPES
    standard = head_dim is None and n_head_kv is None
    for i in range(n_layer):
        b = f"{prefix}.blk.{i}."
        present = [n for n in c.f.tensors if n.startswith(b)]
        if not present:
            raise c.fail(f"the {m} encoder has {n_layer} blocks but tensors {b}* are missing")
        for name in ("ln1", "ln2"):
            c.tensor(b + name + ".weight", (n_embd,), FL, required=False)
            c.tensor(b + name + ".bias", (n_embd,), FL, required=False)
        # clip.cpp does not check that a block's projections are there: a
        # missing one is a null tensor in the graph (a segfault at the first
        # image). Towers with a fused QKV projection have attn_qkv instead.
        fused = b + "attn_qkv.weight" in c.f.tensors
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            shape = (n_embd, n_embd) if standard else None
            c.tensor(b + name + ".weight", shape, M, required=not fused or name == "attn_out")
            if standard:
                c.tensor(b + name + ".bias", (n_embd,), FL, required=False)
        up = c.tensor(b + "ffn_up.weight", None, M)
        down = c.tensor(b + "ffn_down.weight", None, M)
        if up is not None and down is not None:
            # clip.cpp swaps up and down of legacy files, so either way round
            # is fine as long as the two agree with each other and the width.
            if {_squeeze(up.dims), _squeeze(down.dims)} != {(n_embd, n_ff), (n_ff, n_embd)}:
                raise c.fail(f"tensors {up.name!r} {list(up.dims)} and {down.name!r} {list(down.dims)} "
                             f"do not fit an encoder of width {n_embd} and feed-forward length {n_ff}")
            # each bias has the length of its matrix's output
            c.tensor(b + "ffn_up.bias", (up.dims[1] if len(up.dims) > 1 else 1,), FL, required=False)
            c.tensor(b + "ffn_down.bias", (down.dims[1] if len(down.dims) > 1 else 1,), FL, required=False)
    if proj_type in _VIT_PROJECTORS and m == "vision":
        # a ViT stem: square images cut into patches, one position each
        image_size = c.integer(k + "image_size", 1, 1 << 14, required=True)
        patch_size = c.integer(k + "patch_size", 1, 1 << 10, required=True)
        assert image_size and patch_size
        if image_size % patch_size:
            raise c.fail(f"{k}image_size {image_size} is not a multiple of {k}patch_size {patch_size}")
        side = image_size // patch_size
        n_patches = side * side
        c.tensor("v.patch_embd.weight", (patch_size, patch_size, 3, n_embd), FL)
        c.tensor("v.patch_embd.bias", (n_embd,), FL, required=False)
        pos = c.tensor("v.position_embd.weight", None, FL)
        assert pos is not None
        if _squeeze(pos.dims)[:1] != (n_embd,) or pos.dims[1:2] not in ((n_patches,), (n_patches + 1,)):
            raise c.fail(f"tensor 'v.position_embd.weight' has shape {list(pos.dims)}, expected "
                         f"[{n_embd}, {n_patches}] for {n_patches} patches")
        for name in ("pre_ln", "post_ln"):
            c.tensor(f"v.{name}.weight", (n_embd,), FL, required=False)
            c.tensor(f"v.{name}.bias", (n_embd,), FL, required=False)
        return _VIT_PROJECTORS[proj_type](c, k, n_embd, side)
    elif proj_type == "qwen2a" and m == "audio":
        n_mel = c.integer(k + "num_mel_bins", 1, 256, required=True)
        assert n_mel
        c.tensor("a.conv1d.1.weight", (3, n_mel, n_embd), FL)
        c.tensor("a.conv1d.1.bias", (1, n_embd), F32, exact=True)
        c.tensor("a.conv1d.2.weight", (3, n_embd, n_embd), FL)
        c.tensor("a.conv1d.2.bias", (1, n_embd), F32, exact=True)
        pos = c.tensor("a.position_embd.weight", None, FL)
        assert pos is not None
        if len(pos.dims) < 2 or pos.dims[0] != n_embd or pos.dims[1] < 1500:
            raise c.fail(f"tensor 'a.position_embd.weight' has shape {list(pos.dims)}, expected "
                         f"[{n_embd}, >= 1500] (30 s of audio)")
        c.tensor("a.post_ln.weight", (n_embd,), FL, required=False)
        c.tensor("a.post_ln.bias", (n_embd,), FL, required=False)
        fc = c.tensor("mm.a.fc.weight", None, M)
        assert fc is not None
        out = fc.dims[1] if len(fc.dims) > 1 else 1
        c.tensor("mm.a.fc.weight", (n_embd, out), M)
        c.tensor("mm.a.fc.bias", (out,), FL, required=False)
        return out
    return None


def _mlp_head(c: _Checker, k: str, n_embd: int, side: int) -> int:
    """LLaVA's ``mm.0 -> GELU -> mm.2``; returns its output width."""
    M, FL = _MATRIX_TYPES, _FLOAT_TENSOR_TYPES
    mm0 = c.tensor("mm.0.weight", None, M)
    mm2 = c.tensor("mm.2.weight", None, M)
    assert mm0 is not None and mm2 is not None
    hidden = mm0.dims[1] if len(mm0.dims) > 1 else 1
    out = mm2.dims[1] if len(mm2.dims) > 1 else 1
    c.tensor("mm.0.weight", (n_embd, hidden), M)
    c.tensor("mm.0.bias", (hidden,), FL, required=False)
    c.tensor("mm.2.weight", (hidden, out), M)
    c.tensor("mm.2.bias", (out,), FL, required=False)
    return out


def _gemma3_head(c: _Checker, k: str, n_embd: int, side: int) -> int:
    """Gemma 3: the patch grid average-pooled by ``projector.scale_factor``
    (default 4) per side, an RMS norm, then ``mm.input_projection``, whose
    first dimension is the output width (the graph multiplies by its
    transpose)."""
    c.integer(k + "projector.scale_factor", 1, side, default=4)
    if k + "projector.scale_factor" not in c.f.kv and side < 4:
        raise c.fail(f"a {side}x{side} patch grid is smaller than the default pooling of 4 patches a side")
    c.tensor("mm.soft_emb_norm.weight", (n_embd,), _FLOAT_TENSOR_TYPES)
    proj = c.tensor("mm.input_projection.weight", None, _MATRIX_TYPES)
    assert proj is not None
    out = proj.dims[0]
    c.tensor("mm.input_projection.weight", (out, n_embd), _MATRIX_TYPES)
    return out


def _idefics3_head(c: _Checker, k: str, n_embd: int, side: int) -> int:
    """Idefics3 / SmolVLM: a pixel shuffle that folds ``scale_factor`` x
    ``scale_factor`` patches into one (clip asserts a factor above 1, and the
    default is 1), then ``mm.model.fc``."""
    scale = c.integer(k + "projector.scale_factor", 2, 64, required=True)
    assert scale
    fc = c.tensor("mm.model.fc.weight", None, _MATRIX_TYPES)
    assert fc is not None
    out = fc.dims[1] if len(fc.dims) > 1 else 1
    c.tensor("mm.model.fc.weight", (n_embd * scale * scale, out), _MATRIX_TYPES)
    return out


# vision projectors whose ViT stem and projection are checked in full:
# projector type -> the projection head's check, returning its output width
_VIT_PROJECTORS: dict[str, Callable[[_Checker, str, int, int], int]] = {
    "mlp": _mlp_head,
    "gemma3": _gemma3_head,
    "idefics3": _idefics3_head,
}


def check_projector_file(path: str | os.PathLike[str], *, text_n_embd: int | None = None) -> GGUFFile:
    """Check a multimodal projector (mmproj) GGUF before mtmd loads it;
    return what was read. ``text_n_embd`` is the text model's width, which
    the projection must match. Raises :class:`ModelLoadError` naming the
    file and the key or tensor at fault."""
    f = read_gguf(path)
    c = _Checker(f, "projector file")
    arch = c.typed("general.architecture", ValueType.STRING)
    if arch is None or arch.value != "clip":
        got = "none" if arch is None else repr(arch.value)
        raise c.fail(f"a projector has architecture 'clip', this file has {got}")
    for key, (vtype, atype) in _CLIP_KEYS.items():
        entry = c.typed(key, vtype, atype)
        if entry is not None and vtype == _U32 and entry.value > _INT32_MAX:
            raise c.fail(f"metadata {key!r} is {entry.value}, more than 2**31 - 1")
    for key in ("clip.vision.image_mean", "clip.vision.image_std"):
        entry = f.kv.get(key)
        if entry is not None:
            values = entry.value or ()
            if entry.array_len < 3 or not all(math.isfinite(v) for v in values):
                raise c.fail(f"metadata {key!r} must hold 3 finite numbers, got {_describe(entry)}")
            if key.endswith("std") and any(v == 0 for v in values[:3]):
                raise c.fail(f"metadata {key!r} has a zero standard deviation")
    common = f.get("clip.projector_type")
    has_vision = bool(f.get("clip.has_vision_encoder"))
    has_audio = bool(f.get("clip.has_audio_encoder"))
    if not (has_vision or has_audio):
        raise c.fail("the projector has neither a vision nor an audio encoder")
    widths = []
    for m, prefix, flag in (("vision", "v", has_vision), ("audio", "a", has_audio)):
        if not flag:
            continue
        proj_type = f.get(f"clip.{m}.projector_type") or common
        width = _check_tower(c, m, prefix, proj_type)
        if width is not None:
            widths.append((m, width))
    if text_n_embd is not None:
        for m, dim in widths:
            if dim != text_n_embd:
                raise ModelLoadError(
                    f"could not load the projector {f.path}: its {m} encoder makes embeddings of {dim} "
                    f"values but the text model takes {text_n_embd} (a width mismatch: is it the "
                    "projector made for this model?)")
    return f
