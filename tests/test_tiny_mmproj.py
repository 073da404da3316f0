"""Pure-Python checks of the tiny multimodal projector (mmproj) writer.

The files are read back with ``gguf.GGUFReader`` and checked against what
llama.cpp's tools/mtmd/clip.cpp requires: the key names, the exact value
types (clip.cpp reads ints with ``gguf_get_val_u32``, which aborts the
process on any other type), the tensor names and shapes, and an output width
equal to the text model's ``n_embd`` (mtmd refuses a mismatch). Loading them
through mtmd is covered by the extension's own tests.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest

from xybrid.testing import tiny_models

import gguf  # the [test] extra installs it

GT = gguf.GGUFValueType


@functools.lru_cache(maxsize=None)
def _reader(path: Path):
    return gguf.GGUFReader(path)


def _field(reader, key):
    return reader.fields[key].contents()


def _type(reader, key):
    return GT(reader.fields[key].types[0])


def _tensors(reader) -> dict[str, object]:
    return {t.name: t for t in reader.tensors}


def _shape(reader, name) -> list[int]:
    """ggml order (ne[0] first), as clip.cpp sees it."""
    return [int(n) for n in _tensors(reader)[name].shape]


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny_mmproj")


@pytest.fixture(scope="module")
def vision_file(out_dir) -> Path:
    return tiny_models.write_tiny_mmproj_vision(out_dir / "mmproj-vision.gguf")


@pytest.fixture(scope="module")
def audio_file(out_dir) -> Path:
    return tiny_models.write_tiny_mmproj_audio(out_dir / "mmproj-audio.gguf")


@pytest.fixture(scope="module")
def omni_file(out_dir) -> Path:
    return tiny_models.write_tiny_mmproj_omni(out_dir / "mmproj-omni.gguf")


def _check_encoder_hparams(r, modality: str, n_embd: int, n_layer: int, n_head: int, n_ff: int, proj: int) -> None:
    p = f"clip.{modality}."
    expected = {
        "embedding_length": n_embd,
        "block_count": n_layer,
        "attention.head_count": n_head,
        "feed_forward_length": n_ff,
        "projection_dim": proj,
    }
    for key, value in expected.items():
        assert _field(r, p + key) == value, key
        assert _type(r, p + key) == GT.UINT32, key
    assert _type(r, p + "attention.layer_norm_epsilon") == GT.FLOAT32


def test_vision_file(vision_file):
    assert isinstance(vision_file, Path) and vision_file.is_file()
    assert vision_file.stat().st_size < 256 * 1024
    r = _reader(vision_file)
    assert _field(r, "general.architecture") == "clip"
    assert _field(r, "clip.projector_type") == "mlp"
    assert _field(r, "clip.has_vision_encoder") is True
    assert _field(r, "clip.has_audio_encoder") is False
    assert _type(r, "clip.has_vision_encoder") == GT.BOOL
    _check_encoder_hparams(r, "vision", n_embd=32, n_layer=2, n_head=4, n_ff=64, proj=64)
    assert _field(r, "clip.vision.image_size") == 32 and _type(r, "clip.vision.image_size") == GT.UINT32
    assert _field(r, "clip.vision.patch_size") == 8 and _type(r, "clip.vision.patch_size") == GT.UINT32
    for key in ("clip.vision.image_mean", "clip.vision.image_std"):
        f = r.fields[key]
        assert GT(f.types[0]) == GT.ARRAY and GT(f.types[-1]) == GT.FLOAT32, key  # clip.cpp: get_arr_f32
        assert len(_field(r, key)) == 3

    t = _tensors(r)
    assert _shape(r, "v.patch_embd.weight") == [8, 8, 3, 32]
    assert _shape(r, "v.position_embd.weight") == [32, 16]  # one row per patch: (32 / 8) ** 2
    for i in range(2):
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            assert _shape(r, f"v.blk.{i}.{name}.weight") == [32, 32]
        assert _shape(r, f"v.blk.{i}.ffn_up.weight") == [32, 64]
        assert _shape(r, f"v.blk.{i}.ffn_down.weight") == [64, 32]
        for name in ("ln1", "ln2"):
            assert f"v.blk.{i}.{name}.bias" in t
    assert "v.blk.2.attn_q.weight" not in t
    # the projector: clip_n_mmproj_embd() is mm.2.weight's ne[1]
    assert _shape(r, "mm.0.weight") == [32, 64]
    assert _shape(r, "mm.2.weight") == [64, 64]
    assert _shape(r, "mm.2.bias") == [64]
    assert t["mm.2.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert t["v.position_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert not any(name.startswith("a.") for name in t)
    for name, tensor in t.items():
        assert np.all(np.isfinite(np.asarray(tensor.data, dtype=np.float32))), name


def test_audio_file(audio_file):
    r = _reader(audio_file)
    assert _field(r, "general.architecture") == "clip"
    assert _field(r, "clip.projector_type") == "qwen2a"
    assert _field(r, "clip.has_vision_encoder") is False
    assert _field(r, "clip.has_audio_encoder") is True
    _check_encoder_hparams(r, "audio", n_embd=32, n_layer=2, n_head=4, n_ff=64, proj=64)
    assert _field(r, "clip.audio.num_mel_bins") == 128 and _type(r, "clip.audio.num_mel_bins") == GT.UINT32

    t = _tensors(r)
    # the first conv reads the n_mel_bins mel bands mtmd computes
    assert _shape(r, "a.conv1d.1.weight") == [3, 128, 32]
    assert _shape(r, "a.conv1d.2.weight") == [3, 32, 32]
    # conv biases broadcast over frames: {1, channels}, not {channels}
    assert _shape(r, "a.conv1d.1.bias") == [1, 32]
    assert _shape(r, "a.conv1d.2.bias") == [1, 32]
    # 30 s windows of 3000 mel frames, halved by the stride-2 conv
    assert _shape(r, "a.position_embd.weight") == [32, 1500]
    for i in range(2):
        assert f"a.blk.{i}.attn_q.bias" in t and f"a.blk.{i}.attn_v.bias" in t
        assert f"a.blk.{i}.attn_k.bias" not in t  # whisper: no K bias (clip.cpp asserts it)
        assert f"a.blk.{i}.ln1.bias" in t and f"a.blk.{i}.ln2.bias" in t
    assert _shape(r, "mm.a.fc.weight") == [32, 64]
    assert _shape(r, "mm.a.fc.bias") == [64]
    assert not any(name.startswith("v.") for name in t)


def test_omni_file(omni_file, vision_file, audio_file):
    r = _reader(omni_file)
    # per-modality projector types: a global clip.projector_type would apply to both
    assert "clip.projector_type" not in r.fields
    assert _field(r, "clip.vision.projector_type") == "mlp"
    assert _field(r, "clip.audio.projector_type") == "qwen2a"
    assert _field(r, "clip.has_vision_encoder") is True
    assert _field(r, "clip.has_audio_encoder") is True
    t = _tensors(r)
    # both towers, both projecting to the same width (mtmd refuses otherwise)
    assert set(t) == set(_tensors(_reader(vision_file))) | set(_tensors(_reader(audio_file)))
    assert _shape(r, "mm.2.weight")[1] == _shape(r, "mm.a.fc.weight")[1] == 64


@pytest.mark.parametrize("n_embd", [32, 96])
def test_output_width_follows_text_model(out_dir, n_embd):
    v = _reader(tiny_models.write_tiny_mmproj_vision(out_dir / f"v{n_embd}.gguf", text_model_n_embd=n_embd))
    a = _reader(tiny_models.write_tiny_mmproj_audio(out_dir / f"a{n_embd}.gguf", text_model_n_embd=n_embd))
    assert _shape(v, "mm.2.weight")[1] == n_embd
    assert _field(v, "clip.vision.projection_dim") == n_embd
    assert _shape(a, "mm.a.fc.weight")[1] == n_embd
    assert _field(a, "clip.audio.projection_dim") == n_embd


def test_vision_options(out_dir):
    p = tiny_models.write_tiny_mmproj_vision(
        out_dir / "v_opts.gguf", n_embd=48, n_layer=3, n_head=3, n_ff=80, image_size=56, patch_size=14,
        proj_hidden=40, dtype="f32",
    )
    r = _reader(p)
    assert _shape(r, "v.patch_embd.weight") == [14, 14, 3, 48]
    assert _shape(r, "v.position_embd.weight") == [48, 16]
    assert "v.blk.2.ffn_up.weight" in _tensors(r)
    assert _shape(r, "mm.0.weight") == [48, 40]
    assert _tensors(r)["mm.0.weight"].tensor_type == gguf.GGMLQuantizationType.F32


def test_audio_options(out_dir):
    r = _reader(tiny_models.write_tiny_mmproj_audio(out_dir / "a80.gguf", n_mel_bins=80))
    assert _field(r, "clip.audio.num_mel_bins") == 80
    assert _shape(r, "a.conv1d.1.weight") == [3, 80, 32]


def test_invalid_arguments(out_dir):
    bad = out_dir / "bad.gguf"
    with pytest.raises(ValueError, match="n_head"):
        tiny_models.write_tiny_mmproj_vision(bad, n_head=5)
    with pytest.raises(ValueError, match="patch_size"):
        tiny_models.write_tiny_mmproj_vision(bad, image_size=30)
    with pytest.raises(ValueError, match="n_ff"):
        tiny_models.write_tiny_mmproj_vision(bad, n_ff=32)
    with pytest.raises(ValueError, match="n_mel_bins"):
        tiny_models.write_tiny_mmproj_audio(bad, n_mel_bins=300)
    with pytest.raises(ValueError):
        tiny_models.write_tiny_mmproj_audio(bad, dtype="q8_0")
    assert not bad.exists()


@pytest.mark.parametrize(
    "writer", ["write_tiny_mmproj_vision", "write_tiny_mmproj_audio", "write_tiny_mmproj_omni"]
)
def test_deterministic(out_dir, writer):
    fn = getattr(tiny_models, writer)
    a = fn(out_dir / f"{writer}_a.gguf", seed=3)
    b = fn(out_dir / f"{writer}_b.gguf", seed=3)
    c = fn(out_dir / f"{writer}_c.gguf", seed=4)
    assert a.read_bytes() == b.read_bytes()
    assert a.stat().st_size == c.stat().st_size  # same layout...
    assert a.read_bytes() != c.read_bytes()  # ...different weights


def test_write_tiny_vlm(tmp_path):
    model, mmproj = tiny_models.write_tiny_vlm(tmp_path / "vlm")
    assert model.name == "model.gguf" and mmproj.name == "mmproj-vision.gguf"
    assert model.parent == mmproj.parent == tmp_path / "vlm"
    m, p = _reader(model), _reader(mmproj)
    assert _field(m, "general.architecture") == "llama"
    assert _shape(p, "mm.2.weight")[1] == _field(m, "llama.embedding_length") == 64

    _, audio = tiny_models.write_tiny_vlm(tmp_path / "alm", vision=False, audio=True, n_embd=32)
    assert audio.name == "mmproj-audio.gguf"
    assert _shape(_reader(audio), "mm.a.fc.weight")[1] == 32
    _, omni = tiny_models.write_tiny_vlm(tmp_path / "omni", audio=True)
    assert omni.name == "mmproj-omni.gguf"
    with pytest.raises(ValueError):
        tiny_models.write_tiny_vlm(tmp_path / "none", vision=False)
