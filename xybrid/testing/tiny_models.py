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
    "write_tiny_transformer",
    "TINY_TRANSFORMER_ARCHITECTURES",
    "write_tiny_mamba",
    "write_tiny_lfm2",
    "write_tiny_recurrent",
    "write_tiny_hybrid",
    "write_tiny_mmproj_vision",
    "write_tiny_mmproj_audio",
    "write_tiny_mmproj_omni",
    "write_tiny_vlm",
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


def _with_tokens(tok: _Tokenizer, extra: Sequence[str]) -> _Tokenizer:
    """``tok`` with ``extra`` appended as user-defined tokens (type 4,
    score 0), the per-token arrays lengthened to match."""
    if not extra:
        return tok
    added = [t.encode("utf-8") for t in extra]
    grow: dict[str, tuple[Any, ...]] = {"tokenizer.ggml.tokens": tuple(added),
                                        "tokenizer.ggml.scores": (0.0,) * len(added),
                                        "tokenizer.ggml.token_type": (4,) * len(added)}
    fields = [(key, tuple(value) + grow[key] if key in grow else value, vtype, sub)
              for key, value, vtype, sub in tok.fields]
    return _Tokenizer(fields, tok.n_vocab + len(added))


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
    extra_tokens: Sequence[str] = (),
    llama_cpp_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Write a tiny random-weight ``llama``-architecture GGUF model to ``path``.

    A plain transformer (RMSNorm, RoPE, GQA attention, SwiGLU FFN), with the
    full tokenizer of ``vocab`` (see :func:`vocab_path`). The defaults give a
    ~4 MB file whose single-token decode on a CPU is dominated by
    llama.cpp's per-call overhead, which is what the binding's overhead
    benchmarks want. ``dtype`` ("f16" or "f32") is the type of the weight
    matrices; norms are always F32. ``tie_embeddings`` omits ``output.weight``
    so llama.cpp reuses the token embedding as the LM head. ``extra_tokens``
    are appended to the vocabulary as user-defined tokens (the markers some
    projectors frame images with, e.g. ``<fake_token_around_image>``).

    Deterministic: the same arguments give the same bytes. Returns the path.
    """
    gguf = _import_gguf()
    if n_embd % n_head:
        raise ValueError("n_embd must be a multiple of n_head")
    if n_head % n_head_kv:
        raise ValueError("n_head must be a multiple of n_head_kv")
    tok = _with_tokens(_read_tokenizer(vocab_path(vocab, llama_cpp_dir)), extra_tokens)
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


# What each architecture of write_tiny_transformer adds to a plain
# pre-norm transformer, as its loader in llama.cpp/src/models/ reads it:
#   norms      the per-layer norms, "layer" norm = LayerNorm (weight + bias)
#   qkv        "split" (attn_q/k/v), "split+bias", or "fused" (attn_qkv)
#   qk_norm    None, "head" (one head_dim vector) or "all" (n_head * head_dim)
#   ffn        "gated", "plain" (no gate) or "fused" (gate and up in ffn_up)
#   biases     output projection and feed-forward biases (starcoder2)
#   tied       no output.weight: the architecture always reuses token_embd
#   moe        every layer a mixture of n_expert experts
#   kv         further keys the loader requires
_TRANSFORMERS: dict[str, dict[str, Any]] = {
    "qwen2": dict(qkv="split+bias"),
    "qwen3": dict(qk_norm="head"),
    "qwen3moe": dict(qk_norm="head", moe=True),
    # llama.cpp's vocabulary loader looks up phi3's own special tokens
    "phi3": dict(qkv="fused", ffn="fused", vocab="phi-3"),
    "starcoder2": dict(norm="layer", qkv="split+bias", ffn="plain", biases=True),
    "gemma2": dict(norms=("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"), tied=True,
                   kv=[("{arch}.attention.sliding_window", 32),
                       ("{arch}.attn_logit_softcapping", 50.0), ("{arch}.final_logit_softcapping", 30.0)]),
    "olmo2": dict(norms=("post_attention_norm", "post_ffw_norm"), qk_norm="all"),
    "granite": dict(kv=[("{arch}.logit_scale", 8.0), ("{arch}.residual_scale", 0.25),
                        ("{arch}.embedding_scale", 12.0), ("{arch}.attention.scale", 0.0625)]),
    "smollm3": dict(),
    "stablelm": dict(norm="layer", norms=("attn_norm", "ffn_norm")),
}

#: the architectures :func:`write_tiny_transformer` writes
TINY_TRANSFORMER_ARCHITECTURES = tuple(sorted(_TRANSFORMERS))


def write_tiny_transformer(
    path: str | os.PathLike[str],
    arch: str,
    *,
    vocab: str | None = None,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    n_expert: int = 4,
    n_expert_used: int = 2,
    n_ctx_train: int = 4096,
    seed: int = 0,
    dtype: str = "f16",
    llama_cpp_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Write a tiny random-weight model of another transformer architecture
    llama.cpp runs (one of :data:`TINY_TRANSFORMER_ARCHITECTURES`): the
    tensors and keys that architecture's loader reads, with the shapes its
    graph uses, the weights random as in :func:`write_tiny_llama`. They are
    for tests of code that depends on the architecture, such as the GGUF
    checker (:mod:`xybrid.gguf_check`). ``vocab`` defaults to ``llama-spm``
    (``phi-3`` for phi3). ``n_expert`` / ``n_expert_used`` apply
    to the mixture-of-experts architectures only. Deterministic; returns the
    path."""
    gguf = _import_gguf()
    if arch not in _TRANSFORMERS:
        raise ValueError(f"arch must be one of {TINY_TRANSFORMER_ARCHITECTURES}, got {arch!r}")
    if n_embd % n_head or n_head % n_head_kv:
        raise ValueError("n_embd must be a multiple of n_head, n_head of n_head_kv")
    prof = _TRANSFORMERS[arch]
    layer_norm = prof.get("norm") == "layer"
    norms = prof.get("norms", ("attn_norm", "ffn_norm"))
    qkv, qk_norm, ffn = prof.get("qkv", "split"), prof.get("qk_norm"), prof.get("ffn", "gated")
    moe = bool(prof.get("moe"))
    tok = _read_tokenizer(vocab_path(vocab or prof.get("vocab", "llama-spm"), llama_cpp_dir))
    head = n_embd // n_head
    q, kv_width = n_embd, head * n_head_kv

    kv: list[tuple[str, Any]] = [
        ("{arch}.vocab_size", tok.n_vocab),
        ("{arch}.context_length", n_ctx_train),
        ("{arch}.embedding_length", n_embd),
        ("{arch}.block_count", n_layer),
        ("{arch}.attention.layer_norm_epsilon" if layer_norm else "{arch}.attention.layer_norm_rms_epsilon",
         _RMS_EPS),
        ("{arch}.feed_forward_length", n_ff),
        ("{arch}.attention.head_count", n_head),
        ("{arch}.attention.head_count_kv", n_head_kv),
        ("{arch}.rope.dimension_count", head),
        ("{arch}.rope.freq_base", 10000.0),
    ] + list(prof.get("kv", []))
    if moe:
        kv += [("{arch}.expert_count", n_expert), ("{arch}.expert_used_count", n_expert_used),
               ("{arch}.expert_feed_forward_length", n_ff)]

    w = _Weights(seed, dtype)

    def norm(name: str, n: int) -> None:
        w.ones(name + ".weight", n)
        if layer_norm:
            w.f32(name + ".bias", np.zeros(n, dtype=np.float32))

    w.matrix("token_embd.weight", (n_embd, tok.n_vocab))
    norm("output_norm", n_embd)
    if not prof.get("tied"):
        w.matrix("output.weight", (n_embd, tok.n_vocab))
    for i in range(n_layer):
        b = f"blk.{i}."
        for name in norms:
            norm(b + name, n_embd)
        if qkv == "fused":
            w.matrix(b + "attn_qkv.weight", (n_embd, q + 2 * kv_width))
        else:
            for name, width in (("attn_q", q), ("attn_k", kv_width), ("attn_v", kv_width)):
                w.matrix(b + name + ".weight", (n_embd, width))
                if qkv == "split+bias":
                    w.f32_random(b + name + ".bias", (width,))
        w.matrix(b + "attn_output.weight", (q, n_embd))
        if prof.get("biases"):
            w.f32_random(b + "attn_output.bias", (n_embd,))
        if qk_norm:
            w.ones(b + "attn_q_norm.weight", head if qk_norm == "head" else q)
            w.ones(b + "attn_k_norm.weight", head if qk_norm == "head" else kv_width)
        if moe:
            w.matrix(b + "ffn_gate_inp.weight", (n_embd, n_expert))
            w.matrix(b + "ffn_gate_exps.weight", (n_embd, n_ff, n_expert))
            w.matrix(b + "ffn_up_exps.weight", (n_embd, n_ff, n_expert))
            w.matrix(b + "ffn_down_exps.weight", (n_ff, n_embd, n_expert))
            continue
        if ffn == "gated":
            w.matrix(b + "ffn_gate.weight", (n_embd, n_ff))
        w.matrix(b + "ffn_up.weight", (n_embd, 2 * n_ff if ffn == "fused" else n_ff))
        w.matrix(b + "ffn_down.weight", (n_ff, n_embd))
        if prof.get("biases"):
            w.f32_random(b + "ffn_up.bias", (n_ff,))
            w.f32_random(b + "ffn_down.bias", (n_embd,))
    return _write(gguf, path, arch, f"xybrid-tiny-{arch}", tok, kv, w)


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


# --------------------------------------------------------------------------
# multimodal projectors (mtmd "mmproj" files)
# --------------------------------------------------------------------------
#
# An mmproj file is a separate GGUF (general.architecture = "clip") that
# llama.cpp's mtmd library loads next to a text model: an encoder turns an
# image or an audio clip into a sequence of embeddings of the text model's
# width (n_embd), which are decoded in place of token embeddings. mtmd checks
# that width against the text model and refuses a mismatch (mtmd_init_from_file
# returns NULL), so the projector's output size is a parameter here.
#
# The keys and tensor names below are those tools/mtmd/clip.cpp and
# clip-impl.h read. Weights are random; their scale is 1/sqrt(fan_in) so
# activations stay O(1) through the encoder and the embeddings the text model
# receives are neither vanishing nor huge (a real image then visibly changes
# the logits).

_MMPROJ_LN_EPS = 1e-5
# mtmd's whisper-style preprocessing cuts the log-mel into 30 s windows of
# 3000 frames; the encoder's stride-2 conv halves that, so the position
# table must have at least 1500 rows.
_WHISPER_N_POS = 1500


def _fan_in(w: _Weights, name: str, ne: Sequence[int], fan_in: int) -> None:
    w.matrix(name, ne, scale=1.0 / float(np.sqrt(fan_in)))


def _add_encoder_layers(
    w: _Weights, prefix: str, n_layer: int, n_embd: int, n_ff: int, *, k_bias: bool
) -> None:
    """Pre-norm ViT/Whisper blocks as clip.cpp loads them (``{prefix}.blk.N.*``).

    Whisper's K projection has no bias and clip.cpp's whisper graph asserts
    that (``GGML_ASSERT(!model.layers[0].k_b)``), hence ``k_bias``."""
    zeros = np.zeros(n_embd, dtype=np.float32)
    for i in range(n_layer):
        b = f"{prefix}.blk.{i}."
        w.ones(b + "ln1.weight", n_embd)
        w.f32(b + "ln1.bias", zeros)
        for t in ("attn_q", "attn_k", "attn_v", "attn_out"):
            _fan_in(w, b + t + ".weight", (n_embd, n_embd), n_embd)
            if t != "attn_k" or k_bias:
                w.f32(b + t + ".bias", zeros)
        w.ones(b + "ln2.weight", n_embd)
        w.f32(b + "ln2.bias", zeros)
        _fan_in(w, b + "ffn_up.weight", (n_embd, n_ff), n_embd)
        w.f32(b + "ffn_up.bias", np.zeros(n_ff, dtype=np.float32))
        _fan_in(w, b + "ffn_down.weight", (n_ff, n_embd), n_ff)
        w.f32(b + "ffn_down.bias", zeros)


def _check_heads(n_embd: int, n_head: int, n_ff: int, what: str) -> None:
    if n_embd % n_head:
        raise ValueError(f"{what}: n_embd must be a multiple of n_head")
    if n_ff == n_embd:
        # clip.cpp "fixes" legacy files whose ffn_up/ffn_down were swapped by
        # testing ffn_down.ne[0] == n_embd; with n_ff == n_embd that test
        # cannot tell, so keep them different.
        raise ValueError(f"{what}: n_ff must differ from n_embd")


def _vision_part(
    w: _Weights,
    kv: list[tuple[str, Any, str]],
    *,
    text_model_n_embd: int,
    n_embd: int,
    n_layer: int,
    n_head: int,
    n_ff: int,
    image_size: int,
    patch_size: int,
    proj_hidden: int,
    projector_type: str = "mlp",
) -> None:
    """A LLaVA-1.5-style vision tower: CLIP ViT + 2-layer GELU MLP projector
    (clip.cpp projector type ``mlp``); or with ``projector_type`` "gemma3"
    (SigLIP-style ViT, average pooling by 2 a side, RMS norm, projection) or
    "idefics3" (pixel shuffle by 2 a side, one projection)."""
    _check_heads(n_embd, n_head, n_ff, "vision")
    if image_size % patch_size:
        raise ValueError("image_size must be a multiple of patch_size")
    n_patches = (image_size // patch_size) ** 2
    kv += [
        ("clip.vision.embedding_length", n_embd, "u32"),
        ("clip.vision.feed_forward_length", n_ff, "u32"),
        ("clip.vision.block_count", n_layer, "u32"),
        ("clip.vision.attention.head_count", n_head, "u32"),
        ("clip.vision.attention.layer_norm_epsilon", _MMPROJ_LN_EPS, "f32"),
        ("clip.vision.projection_dim", text_model_n_embd, "u32"),
        ("clip.vision.image_size", image_size, "u32"),
        ("clip.vision.patch_size", patch_size, "u32"),
        # OpenAI CLIP's normalisation, as in every LLaVA-1.5 mmproj
        ("clip.vision.image_mean", [0.48145466, 0.4578275, 0.40821073], "f32[]"),
        ("clip.vision.image_std", [0.26862954, 0.26130258, 0.27577711], "f32[]"),
    ]
    # patch embedding: a conv2d, kernel = stride = patch_size, no bias (as CLIP)
    _fan_in(w, "v.patch_embd.weight", (patch_size, patch_size, 3, n_embd), 3 * patch_size * patch_size)
    w.f32_random("v.position_embd.weight", (n_embd, n_patches))
    if projector_type != "mlp":
        kv.append(("clip.vision.projector.scale_factor", 2, "u32"))
        _add_encoder_layers(w, "v", n_layer, n_embd, n_ff, k_bias=True)
        w.ones("v.post_ln.weight", n_embd)
        w.f32("v.post_ln.bias", np.zeros(n_embd, dtype=np.float32))
        if projector_type == "gemma3":
            w.ones("mm.soft_emb_norm.weight", n_embd)
            # the graph multiplies by the transpose: [text width, n_embd]
            _fan_in(w, "mm.input_projection.weight", (text_model_n_embd, n_embd), n_embd)
        elif projector_type == "idefics3":
            _fan_in(w, "mm.model.fc.weight", (4 * n_embd, text_model_n_embd), 4 * n_embd)
        else:
            raise ValueError(f"projector_type must be mlp, gemma3 or idefics3, got {projector_type!r}")
        return
    w.ones("v.pre_ln.weight", n_embd)
    w.f32("v.pre_ln.bias", np.zeros(n_embd, dtype=np.float32))
    _add_encoder_layers(w, "v", n_layer, n_embd, n_ff, k_bias=True)
    # projector: mm.0 -> GELU -> mm.2; clip_n_mmproj_embd() is mm.2's output size
    _fan_in(w, "mm.0.weight", (n_embd, proj_hidden), n_embd)
    w.f32("mm.0.bias", np.zeros(proj_hidden, dtype=np.float32))
    _fan_in(w, "mm.2.weight", (proj_hidden, text_model_n_embd), proj_hidden)
    w.f32("mm.2.bias", np.zeros(text_model_n_embd, dtype=np.float32))


def _audio_part(
    w: _Weights,
    kv: list[tuple[str, Any, str]],
    *,
    text_model_n_embd: int,
    n_embd: int,
    n_layer: int,
    n_head: int,
    n_ff: int,
    n_mel_bins: int,
) -> None:
    """A Qwen2-Audio-style audio tower: Whisper encoder (2 conv1d, transformer,
    average pool) + one linear projector (clip.cpp projector type ``qwen2a``)."""
    _check_heads(n_embd, n_head, n_ff, "audio")
    if not 1 <= n_mel_bins <= 256:
        raise ValueError("n_mel_bins must be in [1, 256] (clip.cpp rejects others)")
    kv += [
        ("clip.audio.embedding_length", n_embd, "u32"),
        ("clip.audio.feed_forward_length", n_ff, "u32"),
        ("clip.audio.block_count", n_layer, "u32"),
        ("clip.audio.attention.head_count", n_head, "u32"),
        ("clip.audio.attention.layer_norm_epsilon", _MMPROJ_LN_EPS, "f32"),
        ("clip.audio.projection_dim", text_model_n_embd, "u32"),
        # the number of mel bands mtmd computes; the first conv's input channels
        ("clip.audio.num_mel_bins", n_mel_bins, "u32"),
    ]
    # conv1d kernels, ggml order {kernel, in_channels, out_channels}; the
    # biases are {1, channels} so they broadcast over the conv output
    # {frames, channels} (convert_hf_to_gguf unsqueezes them the same way;
    # a flat bias makes ggml_add abort while mtmd builds the graph)
    conv_bias = np.zeros((n_embd, 1), dtype=np.float32)
    _fan_in(w, "a.conv1d.1.weight", (3, n_mel_bins, n_embd), 3 * n_mel_bins)
    w.f32("a.conv1d.1.bias", conv_bias)
    _fan_in(w, "a.conv1d.2.weight", (3, n_embd, n_embd), 3 * n_embd)
    w.f32("a.conv1d.2.bias", conv_bias)
    w.f32_random("a.position_embd.weight", (n_embd, _WHISPER_N_POS))
    _add_encoder_layers(w, "a", n_layer, n_embd, n_ff, k_bias=False)
    w.ones("a.post_ln.weight", n_embd)
    w.f32("a.post_ln.bias", np.zeros(n_embd, dtype=np.float32))
    _fan_in(w, "mm.a.fc.weight", (n_embd, text_model_n_embd), n_embd)
    w.f32("mm.a.fc.bias", np.zeros(text_model_n_embd, dtype=np.float32))


def _write_mmproj(
    gguf: Any,
    path: str | os.PathLike[str],
    name: str,
    kv: list[tuple[str, Any, str]],
    weights: _Weights,
) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    GT = gguf.GGUFValueType
    types = {"u32": GT.UINT32, "f32": GT.FLOAT32, "bool": GT.BOOL, "str": GT.STRING}
    writer = gguf.GGUFWriter(str(out), "clip")
    try:
        writer.add_name(name)
        file_type = gguf.LlamaFileType.MOSTLY_F16 if weights.np_dtype == np.float16 else gguf.LlamaFileType.ALL_F32
        writer.add_file_type(int(file_type))
        for key, value, vtype in kv:
            if vtype == "f32[]":
                # clip.cpp insists on FLOAT32 elements (get_arr_f32)
                arr = [float(v) for v in value]
                try:
                    writer.add_key_value(key, arr, GT.ARRAY, sub_type=GT.FLOAT32)
                except TypeError:  # older gguf without sub_type: floats infer FLOAT32
                    writer.add_array(key, arr)
            else:
                writer.add_key_value(key, value, types[vtype])
        for tname, array in weights.tensors:
            writer.add_tensor(tname, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return out


def write_tiny_mmproj_vision(
    path: str | os.PathLike[str],
    *,
    text_model_n_embd: int = 64,
    n_embd: int = 32,
    n_layer: int = 2,
    n_head: int = 4,
    n_ff: int = 64,
    image_size: int = 32,
    patch_size: int = 8,
    proj_hidden: int = 64,
    seed: int = 0,
    dtype: str = "f16",
    projector_type: str = "mlp",
) -> Path:
    """Write a tiny random-weight *vision* projector (mmproj) GGUF to ``path``.

    Projector type ``mlp`` (LLaVA-1.5): a CLIP ViT whose patch features go
    through ``mm.0 -> GELU -> mm.2``. Of clip.cpp's vision projectors it needs
    the fewest keys and tensors, no special tokens, no M-RoPE and no dynamic
    resolution: every image is padded to a square and resized to
    ``image_size``, giving ``(image_size // patch_size) ** 2`` image tokens
    (16 by default). Like LLaVA, the encoder runs ``n_layer - 1`` of its
    blocks (the penultimate layer's features).

    ``text_model_n_embd`` must equal the text model's ``n_embd`` (64 for
    :func:`write_tiny_llama`'s defaults) or ``mtmd_init_from_file`` refuses
    the pair. ``projector_type`` "gemma3" or "idefics3" writes those
    projectors instead (4 image tokens by default). Deterministic for a given
    seed. Returns the path.
    """
    gguf = _import_gguf()
    kv: list[tuple[str, Any, str]] = [
        ("clip.projector_type", projector_type, "str"),
        ("clip.has_vision_encoder", True, "bool"),
        ("clip.has_audio_encoder", False, "bool"),
    ]
    w = _Weights(seed, dtype)
    _vision_part(
        w, kv, text_model_n_embd=text_model_n_embd, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        n_ff=n_ff, image_size=image_size, patch_size=patch_size, proj_hidden=proj_hidden,
        projector_type=projector_type,
    )
    return _write_mmproj(gguf, path, "xybrid-tiny-mmproj-vision", kv, w)


def write_tiny_mmproj_audio(
    path: str | os.PathLike[str],
    *,
    text_model_n_embd: int = 64,
    n_embd: int = 32,
    n_layer: int = 2,
    n_head: int = 4,
    n_ff: int = 64,
    n_mel_bins: int = 128,
    seed: int = 0,
    dtype: str = "f16",
) -> Path:
    """Write a tiny random-weight *audio* projector (mmproj) GGUF to ``path``.

    Projector type ``qwen2a`` (Qwen2-Audio): a Whisper encoder (conv1d k=3,
    conv1d k=3 stride 2, transformer, average pool 2) and a single linear
    layer, the fewest tensors of the whisper-style projectors (ultravox and
    voxtral add a stacking MLP). mtmd computes a 16 kHz log-mel spectrogram
    with ``n_mel_bins`` bands (Qwen2-Audio/Whisper-v3: 128, Whisper v1/v2: 80)
    and cuts it into 30 s windows: every started 30 s of audio becomes
    **750 audio tokens** (3000 frames / 2 / 2), even for a 1 s clip, so the
    text context needs room for them.

    ``text_model_n_embd`` must equal the text model's ``n_embd``.
    Deterministic for a given seed. Returns the path.
    """
    gguf = _import_gguf()
    kv: list[tuple[str, Any, str]] = [
        ("clip.projector_type", "qwen2a", "str"),
        ("clip.has_vision_encoder", False, "bool"),
        ("clip.has_audio_encoder", True, "bool"),
    ]
    w = _Weights(seed, dtype)
    _audio_part(
        w, kv, text_model_n_embd=text_model_n_embd, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        n_ff=n_ff, n_mel_bins=n_mel_bins,
    )
    return _write_mmproj(gguf, path, "xybrid-tiny-mmproj-audio", kv, w)


def write_tiny_mmproj_omni(
    path: str | os.PathLike[str],
    *,
    text_model_n_embd: int = 64,
    image_size: int = 32,
    patch_size: int = 8,
    n_mel_bins: int = 128,
    seed: int = 0,
    dtype: str = "f16",
) -> Path:
    """Write one projector GGUF carrying *both* a vision and an audio encoder.

    The vision tower of :func:`write_tiny_mmproj_vision` (``mlp``) and the
    audio tower of :func:`write_tiny_mmproj_audio` (``qwen2a``) in one file,
    selected per modality by ``clip.vision.projector_type`` and
    ``clip.audio.projector_type`` (no global ``clip.projector_type``, which
    would apply to both), as Qwen2.5-Omni-style files do. mtmd then reports
    both ``mtmd_support_vision`` and ``mtmd_support_audio``. Both towers
    project to ``text_model_n_embd`` (mtmd also refuses towers of different
    widths). Deterministic for a given seed. Returns the path.
    """
    gguf = _import_gguf()
    kv: list[tuple[str, Any, str]] = [
        ("clip.vision.projector_type", "mlp", "str"),
        ("clip.audio.projector_type", "qwen2a", "str"),
        ("clip.has_vision_encoder", True, "bool"),
        ("clip.has_audio_encoder", True, "bool"),
    ]
    w = _Weights(seed, dtype)
    _vision_part(
        w, kv, text_model_n_embd=text_model_n_embd, n_embd=32, n_layer=2, n_head=4, n_ff=64,
        image_size=image_size, patch_size=patch_size, proj_hidden=64,
    )
    _audio_part(
        w, kv, text_model_n_embd=text_model_n_embd, n_embd=32, n_layer=2, n_head=4, n_ff=64,
        n_mel_bins=n_mel_bins,
    )
    return _write_mmproj(gguf, path, "xybrid-tiny-mmproj-omni", kv, w)


def write_tiny_vlm(
    directory: str | os.PathLike[str],
    *,
    vision: bool = True,
    audio: bool = False,
    n_embd: int = 64,
    seed: int = 0,
    llama_cpp_dir: str | os.PathLike[str] | None = None,
) -> tuple[Path, Path]:
    """Write a matching (text model, projector) pair into ``directory``.

    The text model is :func:`write_tiny_llama` with ``n_embd``; the projector
    is the vision (default), audio or, with both flags, the combined
    projector, sized to that ``n_embd``. Files are named ``model.gguf`` and
    ``mmproj-{vision,audio,omni}.gguf``. Returns ``(model_path, mmproj_path)``.
    """
    if not (vision or audio):
        raise ValueError("write_tiny_vlm needs vision=True and/or audio=True")
    d = Path(directory)
    model = write_tiny_llama(d / "model.gguf", n_embd=n_embd, seed=seed, llama_cpp_dir=llama_cpp_dir)
    if vision and audio:
        mmproj = write_tiny_mmproj_omni(d / "mmproj-omni.gguf", text_model_n_embd=n_embd, seed=seed)
    elif vision:
        mmproj = write_tiny_mmproj_vision(d / "mmproj-vision.gguf", text_model_n_embd=n_embd, seed=seed)
    else:
        mmproj = write_tiny_mmproj_audio(d / "mmproj-audio.gguf", text_model_n_embd=n_embd, seed=seed)
    return model, mmproj
