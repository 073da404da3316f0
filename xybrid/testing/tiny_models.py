"""Tiny random-weight GGUF models for tests and benchmarks.

The files written here are real GGUF files, loaded by llama.cpp's real
loader and run by its real compute graphs, but their weights are small
random numbers, so they are a few megabytes, load in milliseconds and decode
a token in well under a millisecond on a CPU. That makes them right for:

* tests that need *a* model (loading, tokenising, decoding, sampling, the
  KV cache / recurrent state machinery) without downloading one;
* overhead-bound benchmarks, where the cost of the Python <-> C boundary and
  of the binding's own bookkeeping must dominate the cost of the maths.

The text they generate is of course gibberish; only its determinism matters.
A given seed always gives the same bytes.

The tokenizer is a real one: every ``tokenizer.ggml.*`` field is copied from
one of llama.cpp's vocab-only test files (``llama.cpp/models/ggml-vocab-*.gguf``),
so tokenisation and detokenisation behave exactly as for the real model
family. The default, ``llama-spm``, is the 32,000-token Llama-2 SentencePiece
vocabulary.

``gguf`` (the official GGUF writer from PyPI, ``pip install gguf``) is
imported inside the functions, so importing this module never needs it.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = [
    "vocab_path",
    "write_tiny_llama",
    "write_tiny_mamba",
    "write_tiny_lfm2",
    "write_tiny_recurrent",
    "write_tiny_hybrid",
]

# Scale of the random normal weights: small enough that activations stay
# well inside the F16 range and the logits stay finite, large enough that
# different tokens get visibly different logits (greedy decoding is then
# deterministic and not a constant stream of one token).
_WEIGHT_SCALE = 0.02
_RMS_EPS = 1e-5

_DTYPES = ("f32", "f16")


# --------------------------------------------------------------------------
# locating llama.cpp and its vocab files
# --------------------------------------------------------------------------


def _default_llama_cpp_dir() -> Path:
    # xybrid/testing/tiny_models.py -> parents[2] is the repository root.
    return Path(__file__).resolve().parents[2] / "llama.cpp"


def _llama_cpp_dir(llama_cpp_dir: str | os.PathLike[str] | None) -> Path:
    """The llama.cpp source tree: the argument, else ``$XYBRID_LLAMA_CPP_DIR``,
    else ``<repo>/llama.cpp``."""
    if llama_cpp_dir is None:
        env = os.environ.get("XYBRID_LLAMA_CPP_DIR")
        d = Path(env) if env else _default_llama_cpp_dir()
    else:
        d = Path(llama_cpp_dir)
    if not d.is_dir():
        raise FileNotFoundError(
            f"llama.cpp source tree not found at {d}; the tiny models copy their "
            "tokenizer from llama.cpp/models/ggml-vocab-*.gguf. Check out the "
            "pinned llama.cpp at <repo>/llama.cpp, set XYBRID_LLAMA_CPP_DIR, or "
            "pass llama_cpp_dir=..."
        )
    return d


def vocab_path(name: str, llama_cpp_dir: str | os.PathLike[str] | None = None) -> Path:
    """Path of llama.cpp's vocab-only test file ``models/ggml-vocab-<name>.gguf``.

    ``name`` is e.g. ``"llama-spm"`` (32k SentencePiece), ``"llama-bpe"``
    (Llama-3 128k BPE), ``"gpt-2"``, ``"qwen2"``. Raises FileNotFoundError,
    listing the available names, if there is no such file.
    """
    models = _llama_cpp_dir(llama_cpp_dir) / "models"
    p = models / f"ggml-vocab-{name}.gguf"
    if not p.is_file():
        available = sorted(
            q.name[len("ggml-vocab-") : -len(".gguf")] for q in models.glob("ggml-vocab-*.gguf")
        )
        raise FileNotFoundError(f"no vocab file {p}; available vocabs: {', '.join(available) or 'none'}")
    return p


# --------------------------------------------------------------------------
# internals
# --------------------------------------------------------------------------


def _import_gguf() -> Any:
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "writing tiny GGUF models needs the 'gguf' package (pip install gguf)"
        ) from e
    return gguf


class _Tokenizer:
    """The ``tokenizer.*`` KV fields of a vocab file, ready to copy."""

    def __init__(self, fields: list[tuple[str, Any, Any, Any]], n_vocab: int) -> None:
        self.fields = fields  # (key, value, vtype, sub_type or None)
        self.n_vocab = n_vocab


def _read_tokenizer(path: Path) -> _Tokenizer:
    """Read every ``tokenizer.*`` field of a GGUF file, keeping the exact
    value types (token ids are UINT32, token types INT32, ...). Strings are
    kept as raw bytes so that tokens that are not valid UTF-8 survive.

    Parsing a 32k-token vocabulary with GGUFReader takes seconds, so the
    result is cached per file (keyed on path, size and mtime)."""
    st = path.stat()
    return _read_tokenizer_cached(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _read_tokenizer_cached(path: str, size: int, mtime_ns: int) -> _Tokenizer:
    gguf = _import_gguf()
    GT = gguf.GGUFValueType
    reader = gguf.GGUFReader(str(path), "r")
    fields: list[tuple[str, Any, Any, Any]] = []
    n_vocab = None
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        main = GT(field.types[0])
        if main == GT.ARRAY:
            sub = GT(field.types[-1])
            if sub == GT.STRING:
                value: Any = tuple(bytes(field.parts[i]) for i in field.data)
            else:
                value = tuple(field.contents())
            fields.append((key, value, main, sub))
            if key == "tokenizer.ggml.tokens":
                n_vocab = len(value)
        elif main == GT.STRING:
            fields.append((key, bytes(field.parts[field.data[0]]), main, None))
        else:
            fields.append((key, field.contents(), main, None))
    if n_vocab is None:
        raise ValueError(f"{path} has no tokenizer.ggml.tokens array")
    return _Tokenizer(fields, n_vocab)


def _add_tokenizer(writer: Any, tok: _Tokenizer) -> None:
    for key, value, vtype, sub in tok.fields:
        if sub is None:
            writer.add_key_value(key, value, vtype)
        else:
            try:
                writer.add_key_value(key, value, vtype, sub_type=sub)
            except TypeError:  # older gguf without sub_type: let it infer
                if value and isinstance(value[0], bytes):
                    value = [v.decode("utf-8", errors="replace") for v in value]
                writer.add_key_value(key, value, vtype)


class _Weights:
    """Deterministic random tensors, drawn in a fixed order from one seeded
    generator, so that the same seed and the same hyper-parameters always
    give the same file, byte for byte."""

    def __init__(self, seed: int, dtype: str) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
        self.rng = np.random.default_rng(seed)
        self.np_dtype = np.float16 if dtype == "f16" else np.float32
        self.tensors: list[tuple[str, np.ndarray]] = []

    def matrix(self, name: str, ne: Sequence[int], scale: float = _WEIGHT_SCALE) -> None:
        """A weight matrix in ``dtype``. ``ne`` is in ggml order
        (``ne[0]`` = row length), as in llama.cpp's create_tensor calls;
        numpy's shape is the reverse."""
        shape = tuple(reversed(ne))
        a = self.rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)
        self.tensors.append((name, a.astype(self.np_dtype)))

    def f32(self, name: str, value: np.ndarray) -> None:
        """A tensor stored as F32 whatever ``dtype`` is: norms, biases, and
        the small SSM/convolution tensors that ggml's CPU ops want in F32."""
        self.tensors.append((name, np.ascontiguousarray(value, dtype=np.float32)))

    def f32_random(self, name: str, ne: Sequence[int], scale: float = _WEIGHT_SCALE) -> None:
        shape = tuple(reversed(ne))
        self.f32(name, self.rng.standard_normal(shape, dtype=np.float32) * np.float32(scale))

    def ones(self, name: str, n: int) -> None:
        self.f32(name, np.ones(n, dtype=np.float32))


def _write(
    gguf: Any,
    path: str | os.PathLike[str],
    arch: str,
    model_name: str,
    tok: _Tokenizer,
    kv: list[tuple[str, Any]],
    weights: _Weights,
) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    GT = gguf.GGUFValueType
    writer = gguf.GGUFWriter(str(out), arch)
    try:
        writer.add_name(model_name)
        file_type = gguf.LlamaFileType.MOSTLY_F16 if weights.np_dtype == np.float16 else gguf.LlamaFileType.ALL_F32
        writer.add_file_type(int(file_type))
        for key, value in kv:
            key = key.format(arch=arch)
            if isinstance(value, bool):
                writer.add_key_value(key, value, GT.BOOL)
            elif isinstance(value, int):
                writer.add_key_value(key, value, GT.UINT32)
            elif isinstance(value, float):
                writer.add_key_value(key, value, GT.FLOAT32)
            elif isinstance(value, (list, tuple)):
                writer.add_array(key, [int(v) for v in value])
            else:  # pragma: no cover - programming error
                raise TypeError(f"unsupported KV value for {key}: {value!r}")
        _add_tokenizer(writer, tok)
        for name, array in weights.tensors:
            writer.add_tensor(name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return out


def _common_kv(tok: _Tokenizer, n_ctx_train: int, n_embd: int, n_layer: int) -> list[tuple[str, Any]]:
    return [
        ("{arch}.vocab_size", tok.n_vocab),
        ("{arch}.context_length", n_ctx_train),
        ("{arch}.embedding_length", n_embd),
        ("{arch}.block_count", n_layer),
        ("{arch}.attention.layer_norm_rms_epsilon", _RMS_EPS),
    ]


# --------------------------------------------------------------------------
# public writers
# --------------------------------------------------------------------------


def write_tiny_llama(
    path: str | os.PathLike[str],
    *,
    vocab: str = "llama-spm",
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int = 4,
    n_ff: int = 128,
    n_ctx_train: int = 4096,
    seed: int = 0,
    dtype: str = "f16",
    tie_embeddings: bool = False,
    llama_cpp_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Write a tiny random-weight ``llama``-architecture GGUF model to ``path``.

    A plain transformer (RMSNorm, RoPE, GQA attention, SwiGLU FFN), with the
    full tokenizer of ``vocab`` (see :func:`vocab_path`). The defaults give a
    ~4 MB file whose single-token decode on a CPU is dominated by
    llama.cpp's per-call overhead, which is what the binding's overhead
    benchmarks want. ``dtype`` ("f16" or "f32") is the type of the weight
    matrices; norms are always F32. ``tie_embeddings`` omits ``output.weight``
    so llama.cpp reuses the token embedding as the LM head.

    Deterministic: the same arguments give the same bytes. Returns the path.
    """
    gguf = _import_gguf()
    if n_embd % n_head:
        raise ValueError("n_embd must be a multiple of n_head")
    if n_head % n_head_kv:
        raise ValueError("n_head must be a multiple of n_head_kv")
    tok = _read_tokenizer(vocab_path(vocab, llama_cpp_dir))
    head_dim = n_embd // n_head
    n_embd_kv = head_dim * n_head_kv

    kv = _common_kv(tok, n_ctx_train, n_embd, n_layer) + [
        ("{arch}.feed_forward_length", n_ff),
        ("{arch}.attention.head_count", n_head),
        ("{arch}.attention.head_count_kv", n_head_kv),
        ("{arch}.rope.dimension_count", head_dim),
        ("{arch}.rope.freq_base", 10000.0),
    ]

    w = _Weights(seed, dtype)
    w.matrix("token_embd.weight", (n_embd, tok.n_vocab))
    w.ones("output_norm.weight", n_embd)
    if not tie_embeddings:
        w.matrix("output.weight", (n_embd, tok.n_vocab))
    for i in range(n_layer):
        b = f"blk.{i}."
        w.ones(b + "attn_norm.weight", n_embd)
        w.matrix(b + "attn_q.weight", (n_embd, n_embd))
        w.matrix(b + "attn_k.weight", (n_embd, n_embd_kv))
        w.matrix(b + "attn_v.weight", (n_embd, n_embd_kv))
        w.matrix(b + "attn_output.weight", (n_embd, n_embd))
        w.ones(b + "ffn_norm.weight", n_embd)
        w.matrix(b + "ffn_gate.weight", (n_embd, n_ff))
        w.matrix(b + "ffn_up.weight", (n_embd, n_ff))
        w.matrix(b + "ffn_down.weight", (n_ff, n_embd))
    return _write(gguf, path, "llama", "xybrid-tiny-llama", tok, kv, w)


def write_tiny_mamba(
    path: str | os.PathLike[str],
    *,
    vocab: str = "llama-spm",
    n_embd: int = 64,
    n_layer: int = 2,
    d_state: int = 16,
    d_conv: int = 4,
    n_ctx_train: int = 4096,
    seed: int = 0,
    dtype: str = "f16",
    llama_cpp_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Write a tiny random-weight ``mamba`` (Mamba-1) GGUF model to ``path``.

    llama.cpp classifies ``mamba`` as *recurrent*
    (``llama_model_is_recurrent`` is true): it keeps a fixed-size
    per-sequence state instead of a KV cache, so it exercises the binding's
    recurrent-memory paths (no partial sequence removal, no context shift).
    llama.cpp only supports an expansion factor of 2, so the inner size is
    ``2 * n_embd``. The SSM parameters follow Mamba's own initialisation
    (A = -[1..d_state], D = 1, softplus(dt_bias) in [1e-3, 1e-1]) so the
    recurrence is stable. Deterministic for a given seed. Returns the path.
    """
    gguf = _import_gguf()
    tok = _read_tokenizer(vocab_path(vocab, llama_cpp_dir))
    d_inner = 2 * n_embd
    dt_rank = -(-n_embd // 16)  # ceil(n_embd / 16), as in the reference model

    kv = _common_kv(tok, n_ctx_train, n_embd, n_layer) + [
        # a non-transformer: no attention heads, no FFN (as convert_hf_to_gguf writes it)
        ("{arch}.feed_forward_length", 0),
        ("{arch}.attention.head_count", 0),
        ("{arch}.ssm.conv_kernel", d_conv),
        ("{arch}.ssm.inner_size", d_inner),
        ("{arch}.ssm.state_size", d_state),
        ("{arch}.ssm.time_step_rank", dt_rank),
    ]

    w = _Weights(seed, dtype)
    w.matrix("token_embd.weight", (n_embd, tok.n_vocab))
    w.ones("output_norm.weight", n_embd)
    w.matrix("output.weight", (n_embd, tok.n_vocab))
    a = -np.tile(np.arange(1, d_state + 1, dtype=np.float32), (d_inner, 1))  # ne {d_state, d_inner}
    for i in range(n_layer):
        b = f"blk.{i}."
        w.ones(b + "attn_norm.weight", n_embd)
        w.matrix(b + "ssm_in.weight", (n_embd, 2 * d_inner))
        w.f32_random(b + "ssm_conv1d.weight", (d_conv, d_inner), scale=0.2)
        w.f32(b + "ssm_conv1d.bias", np.zeros(d_inner, dtype=np.float32))
        w.f32_random(b + "ssm_x.weight", (d_inner, dt_rank + 2 * d_state), scale=0.1)
        w.f32_random(b + "ssm_dt.weight", (dt_rank, d_inner), scale=0.1)
        dt = np.exp(w.rng.uniform(np.log(1e-3), np.log(1e-1), d_inner)).astype(np.float32)
        w.f32(b + "ssm_dt.bias", dt + np.log(-np.expm1(-dt)))  # inverse softplus
        w.f32(b + "ssm_a", a)
        w.f32(b + "ssm_d", np.ones(d_inner, dtype=np.float32))
        w.matrix(b + "ssm_out.weight", (d_inner, n_embd))
    return _write(gguf, path, "mamba", "xybrid-tiny-mamba", tok, kv, w)


def write_tiny_lfm2(
    path: str | os.PathLike[str],
    *,
    vocab: str = "llama-spm",
    n_embd: int = 64,
    n_layer: int = 2,
    attn_layers: Sequence[int] | None = None,
    n_head: int = 4,
    n_head_kv: int = 4,
    n_ff: int = 128,
    l_cache: int = 3,
    n_ctx_train: int = 4096,
    seed: int = 0,
    dtype: str = "f16",
    llama_cpp_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Write a tiny random-weight ``lfm2`` (Liquid LFM2) GGUF model to ``path``.

    llama.cpp classifies ``lfm2`` as *hybrid* (``llama_model_is_hybrid`` is
    true): some layers are gated short convolutions with a recurrent state,
    the others are attention layers with a KV cache, so it exercises the
    hybrid-memory paths. ``attn_layers`` lists the attention layers (default:
    the last one); the rest are convolution layers. In the GGUF a layer is an
    attention layer iff its ``head_count_kv`` entry is non-zero.
    Deterministic for a given seed. Returns the path.
    """
    gguf = _import_gguf()
    if n_embd % n_head:
        raise ValueError("n_embd must be a multiple of n_head")
    if n_head % n_head_kv:
        raise ValueError("n_head must be a multiple of n_head_kv")
    attn = set(range(n_layer - 1, n_layer) if attn_layers is None else attn_layers)
    if not attn <= set(range(n_layer)):
        raise ValueError(f"attn_layers {sorted(attn)} out of range for n_layer={n_layer}")
    tok = _read_tokenizer(vocab_path(vocab, llama_cpp_dir))
    head_dim = n_embd // n_head
    n_embd_kv = head_dim * n_head_kv

    kv = _common_kv(tok, n_ctx_train, n_embd, n_layer) + [
        ("{arch}.feed_forward_length", n_ff),
        ("{arch}.attention.head_count", n_head),
        ("{arch}.attention.head_count_kv", [n_head_kv if i in attn else 0 for i in range(n_layer)]),
        ("{arch}.rope.freq_base", 1000000.0),
        ("{arch}.shortconv.l_cache", l_cache),
    ]

    w = _Weights(seed, dtype)
    w.matrix("token_embd.weight", (n_embd, tok.n_vocab))
    # llama.cpp's LFM2 reads its final norm from "token_embd_norm" (a
    # historical misnomer kept for compatibility with converted models).
    w.ones("token_embd_norm.weight", n_embd)
    w.matrix("output.weight", (n_embd, tok.n_vocab))
    for i in range(n_layer):
        b = f"blk.{i}."
        w.ones(b + "attn_norm.weight", n_embd)  # the "operator norm" of both kinds of layer
        if i in attn:
            w.ones(b + "attn_q_norm.weight", head_dim)
            w.ones(b + "attn_k_norm.weight", head_dim)
            w.matrix(b + "attn_q.weight", (n_embd, n_embd))
            w.matrix(b + "attn_k.weight", (n_embd, n_embd_kv))
            w.matrix(b + "attn_v.weight", (n_embd, n_embd_kv))
            w.matrix(b + "attn_output.weight", (n_embd, n_embd))
        else:
            w.f32_random(b + "shortconv.conv.weight", (l_cache, n_embd), scale=0.2)
            w.matrix(b + "shortconv.in_proj.weight", (n_embd, 3 * n_embd))
            w.matrix(b + "shortconv.out_proj.weight", (n_embd, n_embd))
        w.ones(b + "ffn_norm.weight", n_embd)
        w.matrix(b + "ffn_gate.weight", (n_embd, n_ff))
        w.matrix(b + "ffn_up.weight", (n_embd, n_ff))
        w.matrix(b + "ffn_down.weight", (n_ff, n_embd))
    return _write(gguf, path, "lfm2", "xybrid-tiny-lfm2", tok, kv, w)


def write_tiny_recurrent(path: str | os.PathLike[str], **kwargs: Any) -> Path:
    """A tiny model llama.cpp treats as recurrent: :func:`write_tiny_mamba`."""
    return write_tiny_mamba(path, **kwargs)


def write_tiny_hybrid(path: str | os.PathLike[str], **kwargs: Any) -> Path:
    """A tiny model llama.cpp treats as hybrid (attention + recurrent
    layers): :func:`write_tiny_lfm2`."""
    return write_tiny_lfm2(path, **kwargs)
