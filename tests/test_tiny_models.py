"""Pure-Python checks of the tiny GGUF model writer (no native extension needed).

The files are read back with ``gguf.GGUFReader``; loading them through
llama.cpp is covered by the extension's own tests.
"""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from xybrid.testing import tiny_models

import gguf  # the [test] extra installs it

SPM = tiny_models.vocab_path("llama-spm")  # conftest points at the fetched llama.cpp

N_VOCAB_SPM = 32000


@functools.lru_cache(maxsize=None)
def _reader(path: Path):
    """GGUFReader parses a 32k-token vocabulary in seconds: read each file once."""
    return gguf.GGUFReader(path)


def _field(reader, key):
    return reader.fields[key].contents()


def _tensors(reader) -> dict[str, object]:
    return {t.name: t for t in reader.tensors}


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="module")
def llama_file(out_dir) -> Path:
    return tiny_models.write_tiny_llama(out_dir / "llama.gguf")


@pytest.fixture(scope="module")
def mamba_file(out_dir) -> Path:
    return tiny_models.write_tiny_recurrent(out_dir / "mamba.gguf")


@pytest.fixture(scope="module")
def lfm2_file(out_dir) -> Path:
    return tiny_models.write_tiny_hybrid(out_dir / "lfm2.gguf")


def test_vocab_path():
    assert SPM.name == "ggml-vocab-llama-spm.gguf" and SPM.is_file()
    with pytest.raises(FileNotFoundError, match="available vocabs"):
        tiny_models.vocab_path("no-such-vocab")


def test_missing_llama_cpp_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="llama.cpp"):
        tiny_models.vocab_path("llama-spm", llama_cpp_dir=tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="llama.cpp"):
        tiny_models.write_tiny_llama(tmp_path / "x.gguf", llama_cpp_dir=tmp_path / "nope")
    assert not (tmp_path / "x.gguf").exists()


def test_llama_file(llama_file):
    assert isinstance(llama_file, Path) and llama_file.is_file()
    # small: two 64 x 32000 F16 matrices dominate
    assert llama_file.stat().st_size < 16 * 1024 * 1024
    r = _reader(llama_file)
    assert _field(r, "general.architecture") == "llama"
    assert _field(r, "general.name") == "xybrid-tiny-llama"
    assert _field(r, "llama.embedding_length") == 64
    assert _field(r, "llama.block_count") == 2
    assert _field(r, "llama.attention.head_count") == 4
    assert _field(r, "llama.attention.head_count_kv") == 4
    assert _field(r, "llama.feed_forward_length") == 128
    assert _field(r, "llama.context_length") == 4096
    assert _field(r, "llama.rope.dimension_count") == 16
    assert len(r.fields["tokenizer.ggml.tokens"].data) == N_VOCAB_SPM
    t = _tensors(r)
    assert list(t["token_embd.weight"].shape) == [64, N_VOCAB_SPM]
    assert list(t["output.weight"].shape) == [64, N_VOCAB_SPM]
    assert list(t["blk.1.ffn_down.weight"].shape) == [128, 64]
    assert t["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert t["output_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    w = np.asarray(t["blk.0.attn_q.weight"].data, dtype=np.float32)
    assert np.all(np.isfinite(w)) and 0.01 < w.std() < 0.04


def test_tokenizer_copied_verbatim(llama_file):
    src = _reader(SPM)
    dst = _reader(llama_file)
    src_keys = [k for k in src.fields if k.startswith("tokenizer.")]
    assert src_keys and src_keys == [k for k in dst.fields if k.startswith("tokenizer.")]
    for k in src_keys:
        assert src.fields[k].types == dst.fields[k].types, k
        assert _field(src, k) == _field(dst, k), k


def test_same_seed_same_bytes(out_dir, llama_file):
    again = tiny_models.write_tiny_llama(out_dir / "llama_again.gguf", seed=0)
    assert again.read_bytes() == llama_file.read_bytes()


def test_different_seed_different_weights(out_dir, llama_file):
    other = tiny_models.write_tiny_llama(out_dir / "llama_seed1.gguf", seed=1)
    a, b = _reader(llama_file), _reader(other)
    assert other.stat().st_size == llama_file.stat().st_size  # same layout...
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for name in ("token_embd.weight", "output.weight", "blk.0.attn_q.weight"):
        assert not np.array_equal(ta[name].data, tb[name].data), name  # ...different weights
    assert np.array_equal(ta["output_norm.weight"].data, tb["output_norm.weight"].data)  # norms are ones
    assert _field(a, "tokenizer.ggml.tokens") == _field(b, "tokenizer.ggml.tokens")


def test_llama_options(out_dir):
    p = tiny_models.write_tiny_llama(
        out_dir / "llama_opts.gguf", n_embd=32, n_layer=1, n_head=4, n_head_kv=2, n_ff=48,
        dtype="f32", tie_embeddings=True,
    )
    r = _reader(p)
    t = _tensors(r)
    assert "output.weight" not in t
    assert list(t["blk.0.attn_k.weight"].shape) == [32, 16]
    assert t["blk.0.attn_k.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert _field(r, "llama.attention.head_count_kv") == 2
    with pytest.raises(ValueError):
        tiny_models.write_tiny_llama(out_dir / "bad.gguf", dtype="q4_0")
    with pytest.raises(ValueError):
        tiny_models.write_tiny_llama(out_dir / "bad.gguf", n_head=3)


def test_other_vocab(out_dir):
    p = tiny_models.write_tiny_llama(out_dir / "gpt2.gguf", vocab="gpt-2")
    r = _reader(p)
    n = len(r.fields["tokenizer.ggml.tokens"].data)
    assert n == 50257
    assert "tokenizer.ggml.merges" in r.fields
    assert list(_tensors(r)["token_embd.weight"].shape) == [64, n]


def test_mamba_file(mamba_file):
    r = _reader(mamba_file)
    assert _field(r, "general.architecture") == "mamba"
    assert _field(r, "mamba.ssm.inner_size") == 128
    assert _field(r, "mamba.ssm.state_size") == 16
    assert _field(r, "mamba.ssm.conv_kernel") == 4
    assert _field(r, "mamba.ssm.time_step_rank") == 4
    assert len(r.fields["tokenizer.ggml.tokens"].data) == N_VOCAB_SPM
    t = _tensors(r)
    assert list(t["token_embd.weight"].shape) == [64, N_VOCAB_SPM]
    assert list(t["blk.0.ssm_in.weight"].shape) == [64, 256]
    assert list(t["blk.1.ssm_a"].shape) == [16, 128]
    assert np.all(np.asarray(t["blk.1.ssm_a"].data) < 0)  # stable recurrence


def test_lfm2_file(lfm2_file, out_dir):
    r = _reader(lfm2_file)
    assert _field(r, "general.architecture") == "lfm2"
    assert _field(r, "lfm2.attention.head_count_kv") == [0, 4]  # layer 0 conv, layer 1 attention
    assert _field(r, "lfm2.shortconv.l_cache") == 3
    assert len(r.fields["tokenizer.ggml.tokens"].data) == N_VOCAB_SPM
    t = _tensors(r)
    assert "blk.0.shortconv.in_proj.weight" in t and "blk.0.attn_q.weight" not in t
    assert "blk.1.attn_q.weight" in t and "blk.1.shortconv.in_proj.weight" not in t
    assert "token_embd_norm.weight" in t

    p = tiny_models.write_tiny_lfm2(out_dir / "lfm2_4.gguf", n_layer=4, attn_layers=[1, 3])
    assert _field(_reader(p), "lfm2.attention.head_count_kv") == [0, 4, 0, 4]
    with pytest.raises(ValueError):
        tiny_models.write_tiny_lfm2(out_dir / "bad.gguf", n_layer=2, attn_layers=[2])


@pytest.mark.parametrize("writer", ["write_tiny_mamba", "write_tiny_lfm2"])
def test_recurrent_hybrid_deterministic(out_dir, writer):
    fn = getattr(tiny_models, writer)
    a = fn(out_dir / f"{writer}_a.gguf", seed=3)
    b = fn(out_dir / f"{writer}_b.gguf", seed=3)
    c = fn(out_dir / f"{writer}_c.gguf", seed=4)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_importable_without_gguf():
    code = (
        "import sys; sys.modules['gguf'] = None\n"
        "from xybrid.testing import tiny_models\n"
        "try:\n"
        "    tiny_models.write_tiny_llama('/nonexistent/x.gguf')\n"
        "except ImportError as e:\n"
        "    assert 'pip install gguf' in str(e)\n"
        "else:\n"
        "    raise SystemExit('expected ImportError')\n"
    )
    root = Path(tiny_models.__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root,
                   env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})
