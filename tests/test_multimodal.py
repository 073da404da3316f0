"""Images and audio through mtmd on a tiny random-weight model and projector.

The model and projectors are real GGUF files made by xybrid.testing (real
loader, real encoders); the image and audio clip are the ones llama.cpp ships
in tools/mtmd/.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from xybrid import (
    ChatMessage,
    GenerationConfig,
    InvalidInputError,
    LlamaCppBackend,
    LlmConfig,
    ModelLoadError,
    UnsupportedInputError,
)
from xybrid._native import _engine
from xybrid.media import Audio, Image
from xybrid.testing.tiny_models import write_tiny_mmproj_vision, write_tiny_vlm

N_CTX = 1024  # an audio clip takes 750 positions with the qwen2a encoder


@pytest.fixture(scope="module")
def omni(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_tiny_vlm(tmp_path_factory.mktemp("omni"), vision=True, audio=True)


@pytest.fixture(scope="module")
def media_files(llama_cpp_dir: Path) -> tuple[Path, Path]:
    image = llama_cpp_dir / "tools" / "mtmd" / "test-1.jpeg"
    audio = llama_cpp_dir / "tools" / "mtmd" / "test-2.mp3"
    assert image.is_file() and audio.is_file()
    return image, audio


@pytest.fixture(scope="module")
def llm(omni: tuple[Path, Path]):  # type: ignore[no-untyped-def]
    model, mmproj = omni
    with LlamaCppBackend(LlmConfig(model, mmproj_path=mmproj, context_length=N_CTX,
                                   chat_template="chatml", n_threads=1)) as backend:
        yield backend


def _last_logits(model: _engine.Model, mm: _engine.Multimodal, prompt: str,
                 media: list[tuple[object, ...]]) -> np.ndarray:
    ctx = _engine.Context(model, n_ctx=N_CTX, n_threads=1)
    try:
        if media:
            chunks = mm.tokenize(prompt, media)
            n_past = ctx.eval_chunks(mm, chunks)
            assert n_past == chunks.n_pos
        else:
            ctx.decode(model.tokenize(prompt, parse_special=True))
        return np.array(ctx.logits(), dtype=np.float32)
    finally:
        ctx.close()


def test_image_and_audio_change_the_logits(omni: tuple[Path, Path],
                                           media_files: tuple[Path, Path]) -> None:
    from xybrid.media import audio_to_item, image_to_rgb

    model_path, mmproj_path = omni
    model = _engine.Model(str(model_path))
    mm = _engine.Multimodal(model, str(mmproj_path), n_threads=1)
    try:
        assert mm.vision and mm.audio and mm.audio_sample_rate == 16000
        marker = mm.marker
        plain = _last_logits(model, mm, "Describe this:", [])
        image = ("image", *image_to_rgb(Image(media_files[0])))
        with_image = _last_logits(model, mm, f"{marker}\nDescribe this:", [image])
        audio = audio_to_item(Audio(media_files[1]))
        with_audio = _last_logits(model, mm, f"{marker}\nDescribe this:", [audio])
        assert np.isfinite(with_image).all() and np.isfinite(with_audio).all()
        assert np.abs(with_image - plain).max() > 1e-4
        assert np.abs(with_audio - plain).max() > 1e-4
        assert np.abs(with_audio - with_image).max() > 1e-4
        # Same input, same logits: the media path is deterministic.
        again = _last_logits(model, mm, f"{marker}\nDescribe this:", [image])
        assert np.array_equal(again, with_image)
        chunks = mm.tokenize(f"{marker} and {marker}", [image, audio])
        assert chunks.media_tokens() == {"image": 16, "audio": 750}
        assert [kind for kind, _ in chunks.summary()].count("image") == 1
    finally:
        mm.close()
        model.close()


def test_backend_reports_media_tokens(llm: LlamaCppBackend, media_files: tuple[Path, Path]) -> None:
    caps = llm.capabilities()
    assert caps.vision and caps.audio and caps.audio_sample_rate == 16000
    greedy = GenerationConfig.greedy(max_tokens=4)
    out = llm.generate([ChatMessage.user("What is in the picture?", images=[media_files[0]])], greedy)
    assert out.media_tokens == 16
    assert out.prompt_tokens > 16 and out.tokens_generated >= 1
    assert out.cached_prompt_tokens == 0
    pcm = (0.1 * np.sin(np.linspace(0, 2 * np.pi * 440, 16000))).astype(np.float32)
    out = llm.generate([ChatMessage.user("What do you hear?", audio=[pcm])], greedy)
    assert out.media_tokens == 750
    # After a media turn, a text turn still works and starts from a clean cache.
    text = llm.generate([ChatMessage.user("Hello")], greedy)
    assert text.media_tokens == 0 and text.cached_prompt_tokens == 0


def test_every_image_source_gives_the_same_reply(llm: LlamaCppBackend,
                                                 media_files: tuple[Path, Path]) -> None:
    from PIL import Image as PILImage

    path = media_files[0]
    pil = PILImage.open(path).convert("RGB")
    png = io.BytesIO()
    pil.save(png, format="PNG")
    greedy = GenerationConfig.greedy(max_tokens=6)
    replies = {
        name: llm.generate([ChatMessage.user("Describe.", images=[src])], greedy).token_ids
        for name, src in {
            "path": path,
            "array": np.asarray(pil),
            "pil": pil,
            "png bytes": png.getvalue(),
        }.items()
    }
    assert len(set(replies.values())) == 1, replies


def test_openai_style_image_part(llm: LlamaCppBackend, media_files: tuple[Path, Path]) -> None:
    import base64

    data = base64.b64encode(media_files[0].read_bytes()).decode()
    message = {"role": "user", "content": [
        {"type": "text", "text": "Describe."},
        {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{data}"}},
    ]}
    out = llm.generate([message], GenerationConfig.greedy(max_tokens=3))
    assert out.media_tokens == 16


@pytest.mark.parametrize(("media", "error", "match"), [
    (Image(b"definitely not an image"), InvalidInputError, "could not be decoded"),
    (Image("/nonexistent/picture.png"), InvalidInputError, "not found"),
    (Image(np.zeros((4, 4), dtype=np.uint8)), InvalidInputError, "H x W x 3"),
    (Image(np.zeros((4, 4, 3), dtype=np.float32)), InvalidInputError, "uint8"),
    (Image("clip.mp4"), UnsupportedInputError, "video"),
    (Audio(np.zeros(1000, dtype=np.float64)), InvalidInputError, "float32"),
    (Audio(np.zeros((2, 1000), dtype=np.float32)), InvalidInputError, "mono"),
    (Audio(np.zeros(0, dtype=np.float32)), InvalidInputError, "no samples"),
    (Audio(np.full(100, np.nan, dtype=np.float32)), InvalidInputError, "NaN"),
    (Audio(memoryview(b"\x00\x00\x00")), InvalidInputError, "multiple of 4"),
    (Audio(b"not an audio file at all"), InvalidInputError, "wav, mp3 or flac"),
])
def test_bad_media_is_a_clear_error(llm: LlamaCppBackend, media: object, error: type,
                                    match: str) -> None:
    message = ChatMessage("user", "Look.", media=(media,))
    with pytest.raises(error, match=match):
        llm.generate([message], GenerationConfig.greedy(max_tokens=2))
    # The backend is still usable afterwards.
    assert llm.generate([ChatMessage.user("Hi")], GenerationConfig.greedy(max_tokens=2)).tokens_generated


def test_media_without_projector(tiny_llama_path: Path) -> None:
    with LlamaCppBackend(LlmConfig(tiny_llama_path, context_length=256,
                                   chat_template="chatml")) as plain:
        caps = plain.capabilities()
        assert not caps.vision and not caps.audio
        with pytest.raises(UnsupportedInputError, match="mmproj_path"):
            plain.generate([ChatMessage.user("Look.", images=[np.zeros((8, 8, 3), np.uint8)])])


def test_audio_only_projector_rejects_images(tmp_path: Path) -> None:
    model, mmproj = write_tiny_vlm(tmp_path, vision=False, audio=True)
    with LlamaCppBackend(LlmConfig(model, mmproj_path=mmproj, context_length=N_CTX,
                                   chat_template="chatml", n_threads=1)) as llm:
        with pytest.raises(UnsupportedInputError, match="no vision encoder"):
            llm.generate([ChatMessage.user("Look.", images=[np.zeros((8, 8, 3), np.uint8)])])


def test_mismatched_projector_is_refused(tmp_path: Path, omni: tuple[Path, Path]) -> None:
    wrong = write_tiny_mmproj_vision(tmp_path / "mmproj-96.gguf", text_model_n_embd=96)
    with pytest.raises(ModelLoadError, match="mismatch"):
        LlamaCppBackend(LlmConfig(omni[0], mmproj_path=wrong, chat_template="chatml"))
    not_gguf = tmp_path / "mmproj.gguf"
    not_gguf.write_bytes(b"nope" * 10)
    with pytest.raises(ModelLoadError, match="not a GGUF"):
        LlamaCppBackend(LlmConfig(omni[0], mmproj_path=not_gguf, chat_template="chatml"))


def test_marker_count_must_match_media(omni: tuple[Path, Path]) -> None:
    model = _engine.Model(str(omni[0]))
    mm = _engine.Multimodal(model, str(omni[1]), n_threads=1)
    try:
        with pytest.raises(InvalidInputError, match="media marker"):
            mm.tokenize("no marker here", [("image", bytes(8 * 8 * 3), 8, 8)])
        with pytest.raises(InvalidInputError, match="needs 192 bytes"):
            mm.tokenize(mm.marker, [("image", b"short", 8, 8)])
    finally:
        mm.close()
        model.close()
