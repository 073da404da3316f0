"""Images and audio for multimodal prompts.

Images are decoded in Python with Pillow (PNG, JPEG, WebP, ... whatever
Pillow reads) and handed to mtmd as packed RGB bytes. Audio is float32 PCM at
the projector's sample rate, or an encoded wav/mp3/flac file that mtmd's
bundled decoder reads and resamples. Video is not supported.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Mapping
from dataclasses import dataclass
import sys
from pathlib import Path
from typing import Any

from xybrid.errors import InvalidInputError, UnsupportedInputError

__all__ = ["Image", "Audio", "media_from_openai_part", "image_to_rgb", "audio_to_item"]

_VIDEO_SUFFIXES = {".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v"}


@dataclass(frozen=True, eq=False)
class Image:
    """An image: a path, encoded bytes, an ``H x W x 3`` uint8 array or a PIL image."""

    source: Any


@dataclass(frozen=True, eq=False)
class Audio:
    """An audio clip: a 1-D float32 PCM array (mono, at the projector's sample
    rate), raw float32 bytes wrapped in ``memoryview``, or a wav/mp3/flac path
    or encoded bytes."""

    source: Any


def _numpy_array(value: object) -> Any:
    """numpy, when ``value`` is a numpy array, else None. numpy is not
    imported for this: a caller holding an array has imported it already."""
    np = sys.modules.get("numpy")
    return np if np is not None and isinstance(value, np.ndarray) else None


def image_to_rgb(image: Image) -> tuple[bytes, int, int]:
    """Packed RGB bytes, width and height of an image."""
    src = image.source
    np = _numpy_array(src)
    if np is not None:
        if src.dtype != np.uint8 or src.ndim != 3 or src.shape[2] != 3:
            raise InvalidInputError(
                f"an image array must be H x W x 3 uint8 RGB, got shape {src.shape} dtype {src.dtype}")
        height, width = int(src.shape[0]), int(src.shape[1])
        if height == 0 or width == 0:
            raise InvalidInputError("the image array is empty")
        return np.ascontiguousarray(src).tobytes(), width, height
    try:
        from PIL import Image as PILImage
        from PIL import UnidentifiedImageError
    except ImportError as exc:  # pragma: no cover - Pillow is in the [vision] extra
        raise UnsupportedInputError("decoding images needs Pillow: pip install 'xybrid[vision]'") from exc
    if isinstance(src, PILImage.Image):
        pil = src
    elif isinstance(src, (bytes, bytearray, memoryview)):
        try:
            pil = PILImage.open(io.BytesIO(bytes(src)))
            pil.load()
        except (UnidentifiedImageError, OSError) as exc:
            raise InvalidInputError(f"the image bytes could not be decoded: {exc}") from None
    elif isinstance(src, (str, os.PathLike)):
        path = _media_file(src, "image")
        try:
            pil = PILImage.open(path)
            pil.load()
        except (UnidentifiedImageError, OSError) as exc:
            raise InvalidInputError(f"{path} is not a readable image: {exc}") from None
    else:
        raise InvalidInputError(
            f"an image must be a path, bytes, a uint8 array or a PIL image, got {type(src).__name__}")
    rgb = pil.convert("RGB")
    return rgb.tobytes(), rgb.width, rgb.height


def audio_to_item(audio: Audio) -> tuple[Any, ...]:
    """The engine's media item for an audio clip: PCM samples or an encoded file."""
    src = audio.source
    np = _numpy_array(src)
    if np is not None:
        if src.dtype != np.float32:
            raise InvalidInputError(
                f"audio samples must be float32 PCM in [-1, 1], got dtype {src.dtype} "
                "(convert with array.astype(numpy.float32))")
        if src.ndim != 1:
            raise InvalidInputError(f"audio must be mono (a 1-D array), got shape {src.shape}")
        if src.size == 0:
            raise InvalidInputError("the audio clip has no samples")
        if not np.isfinite(src).all():
            raise InvalidInputError("the audio clip contains NaN or infinite samples")
        return ("audio", np.ascontiguousarray(src).tobytes())
    if isinstance(src, memoryview):
        raw = src.tobytes()
        if not raw or len(raw) % 4:
            raise InvalidInputError("raw audio must be float32 samples: a non-empty multiple of 4 bytes")
        return ("audio", raw)
    if isinstance(src, (bytes, bytearray)):
        if not src:
            raise InvalidInputError("the audio file is empty")
        return ("audio_file", bytes(src))
    if isinstance(src, (str, os.PathLike)):
        return ("audio_file", _media_file(src, "audio").read_bytes())
    raise InvalidInputError(
        f"audio must be a float32 array, a path or encoded bytes, got {type(src).__name__}")


def _media_file(src: str | os.PathLike[str], kind: str) -> Path:
    """The existing file a media path names; video files are refused by name."""
    path = Path(src)
    if path.suffix.lower() in _VIDEO_SUFFIXES:
        raise UnsupportedInputError(f"{path.name}: video input is not supported")
    if not path.is_file():
        raise InvalidInputError(f"{kind} file not found: {path}")
    return path


def media_from_openai_part(part: Mapping[str, Any]) -> Image | Audio:
    """An :class:`Image` or :class:`Audio` from an OpenAI-style content part.

    ``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}``
    (a data URL or a local file path; remote URLs are not fetched) and
    ``{"type": "input_audio", "input_audio": {"data": "<base64>", "format": "wav"}}``.
    """
    kind = part.get("type")
    if kind == "image_url":
        spec = part.get("image_url")
        url = spec.get("url") if isinstance(spec, Mapping) else spec
        if not isinstance(url, str) or not url:
            raise InvalidInputError("an image_url part needs a url string")
        if url.startswith("data:"):
            return Image(_decode_data_url(url))
        if url.startswith(("http://", "https://")):
            raise UnsupportedInputError("remote image URLs are not fetched; pass a data: URL or a file path")
        return Image(url[len("file://"):] if url.startswith("file://") else url)
    if kind == "input_audio":
        spec = part.get("input_audio")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("data"), str):
            raise InvalidInputError("an input_audio part needs {'data': <base64>, 'format': ...}")
        try:
            return Audio(base64.b64decode(spec["data"], validate=True))
        except ValueError:
            raise InvalidInputError("input_audio.data is not valid base64") from None
    if kind in ("video", "video_url", "input_video"):
        raise UnsupportedInputError("video input is not supported")
    raise UnsupportedInputError(f"content part of type {kind!r} is not supported")


def _decode_data_url(url: str) -> bytes:
    header, _, payload = url.partition(",")
    if ";base64" not in header:
        raise InvalidInputError("only base64 data: URLs are supported for images")
    try:
        return base64.b64decode(payload, validate=True)
    except ValueError:
        raise InvalidInputError("the image data: URL is not valid base64") from None
