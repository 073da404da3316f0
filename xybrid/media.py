"""Images and audio for multimodal prompts.

Images are decoded in Python with Pillow (PNG, JPEG, WebP, ... whatever
Pillow reads) and handed to mtmd as packed RGB bytes. Audio is float32 PCM at
the projector's sample rate, or an encoded wav/mp3/flac file that mtmd's
bundled decoder reads and resamples. Video is not supported.

Every input is measured before the expensive step (base64 decoding, reading a
file, decoding pixels, handing samples to mtmd) against the ``MAX_*`` limits
below; past one, :class:`InvalidInputError` names the field and the limit.
"""

from __future__ import annotations

import base64
import io
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
import sys
from pathlib import Path
from typing import Any, Final

from xybrid.errors import InvalidInputError, UnsupportedInputError

__all__ = [
    "Image", "Audio", "media_from_openai_part", "image_to_rgb", "audio_to_item",
    "MAX_MEDIA_BYTES", "MAX_IMAGE_SIDE", "MAX_IMAGE_PIXELS", "MAX_AUDIO_SECONDS",
    "MIN_AUDIO_SAMPLE_RATE", "MAX_AUDIO_SAMPLE_RATE", "MIN_AUDIO_SAMPLES",
]

#: Largest encoded image or audio file (bytes, a data URL's decoded payload, a
#: file on disk) and largest raw PCM buffer. Far above any photo or clip a
#: projector can use; it keeps a request body from costing gigabytes.
MAX_MEDIA_BYTES: Final[int] = 64 * 1024 * 1024

#: Longest image side and most pixels, read from the file header before any
#: pixel is decoded: a 100 kB PNG may declare 100,000 x 100,000 pixels (30 GB
#: of RGB). clip resizes every image to a few hundred pixels a side anyway.
MAX_IMAGE_SIDE: Final[int] = 16384
MAX_IMAGE_PIXELS: Final[int] = 40_000_000

#: Longest audio clip, as PCM samples at the projector's rate, or as the
#: duration a WAV or FLAC header declares (a compressed clip of silence may
#: declare hours). Audio encoders take 30 s windows; ten minutes is 20 of them.
MAX_AUDIO_SECONDS: Final[int] = 600

#: Fewest PCM samples in a clip: mtmd aborts the process on a single one.
MIN_AUDIO_SAMPLES: Final[int] = 2

#: Sample rates a WAV or FLAC header may declare (mtmd resamples to the
#: projector's rate; a rate of 0 or of billions makes that loop meaningless).
MIN_AUDIO_SAMPLE_RATE: Final[int] = 1000
MAX_AUDIO_SAMPLE_RATE: Final[int] = 384_000

# The rate PCM lengths are bounded at when the projector's rate is unknown.
_DEFAULT_PCM_RATE = 48_000

_VIDEO_SUFFIXES = {".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v"}


def _too_big(field: str, size: int, limit: int, unit: str) -> InvalidInputError:
    return InvalidInputError(f"{field} is too large: {size} {unit}, the limit is {limit} {unit}")


def _check_bytes(field: str, size: int) -> None:
    if size > MAX_MEDIA_BYTES:
        raise _too_big(field, size, MAX_MEDIA_BYTES, "bytes")


def _check_dimensions(field: str, width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise InvalidInputError(f"{field} is empty ({width} x {height} pixels)")
    if max(width, height) > MAX_IMAGE_SIDE:
        raise _too_big(f"{field} side", max(width, height), MAX_IMAGE_SIDE, "pixels")
    if width * height > MAX_IMAGE_PIXELS:
        raise _too_big(f"{field} ({width} x {height})", width * height, MAX_IMAGE_PIXELS, "pixels")


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
        _check_dimensions("the image array", width, height)
        return np.ascontiguousarray(src).tobytes(), width, height
    try:
        from PIL import Image as PILImage
        from PIL import UnidentifiedImageError
    except ImportError as exc:  # pragma: no cover - Pillow is in the [vision] extra
        raise UnsupportedInputError("decoding images needs Pillow: pip install 'xybrid[vision]'") from exc
    if isinstance(src, PILImage.Image):
        _check_dimensions("the PIL image", src.width, src.height)
        pil = src
    elif isinstance(src, (bytes, bytearray, memoryview)):
        nbytes = src.nbytes if isinstance(src, memoryview) else len(src)
        _check_bytes("the image", nbytes)
        pil = _decode_image(io.BytesIO(bytes(src)), "the image bytes could not be decoded")
    elif isinstance(src, (str, os.PathLike)):
        path = _media_file(src, "image")
        pil = _decode_image(path, "the image file is not a readable image")
    else:
        raise InvalidInputError(
            f"an image must be a path, bytes, a uint8 array or a PIL image, got {type(src).__name__}")
    try:
        rgb = pil.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types on bad data
        raise InvalidInputError(f"the image could not be converted to RGB: {type(exc).__name__}: {exc}") from None
    return rgb.tobytes(), rgb.width, rgb.height


def _decode_image(source: Any, failure: str) -> Any:
    """Open an image, check the size its header declares, then decode it.

    Pillow reads only the header in ``open``; the pixels come in ``load``,
    which therefore runs only once the dimensions are known to be bounded.
    Malformed files make Pillow raise many exception types (OSError,
    SyntaxError, ValueError, struct.error, DecompressionBombError, ...): all
    of them are the input's fault, so all become InvalidInputError.
    """
    from PIL import Image as PILImage

    try:
        pil = PILImage.open(source)
    except InvalidInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - see above
        raise InvalidInputError(f"{failure}: {type(exc).__name__}: {exc}") from None
    _check_dimensions("the image", int(pil.width), int(pil.height))
    try:
        pil.load()
    except Exception as exc:  # noqa: BLE001 - see above
        raise InvalidInputError(f"{failure}: {type(exc).__name__}: {exc}") from None
    # Some formats change size on load (a JPEG draft, an ICO's largest entry).
    _check_dimensions("the image", int(pil.width), int(pil.height))
    return pil


def audio_to_item(audio: Audio, sample_rate: int | None = None) -> tuple[Any, ...]:
    """The engine's media item for an audio clip: PCM samples or an encoded file.

    ``sample_rate`` (the projector's) bounds the PCM length at
    :data:`MAX_AUDIO_SECONDS`; unknown, the bound assumes 48 kHz.
    """
    max_samples = MAX_AUDIO_SECONDS * (sample_rate or _DEFAULT_PCM_RATE)
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
        if src.size < MIN_AUDIO_SAMPLES:
            raise InvalidInputError(f"the audio clip has {src.size} sample, fewer than {MIN_AUDIO_SAMPLES}")
        if src.size > max_samples:
            raise _too_big("the audio clip", int(src.size), max_samples, "samples")
        if not np.isfinite(src).all():
            raise InvalidInputError("the audio clip contains NaN or infinite samples")
        return ("audio", np.ascontiguousarray(src).tobytes())
    if isinstance(src, memoryview):
        if src.nbytes > 4 * max_samples:
            raise _too_big("the raw audio", src.nbytes // 4, max_samples, "samples")
        raw = src.tobytes()
        if not raw or len(raw) % 4:
            raise InvalidInputError("raw audio must be float32 samples: a non-empty multiple of 4 bytes")
        if len(raw) < 4 * MIN_AUDIO_SAMPLES:
            raise InvalidInputError(f"the raw audio has fewer than {MIN_AUDIO_SAMPLES} samples")
        import numpy

        if not numpy.isfinite(numpy.frombuffer(raw, dtype=numpy.float32)).all():
            raise InvalidInputError("the raw audio contains NaN or infinite samples")
        return ("audio", raw)
    if isinstance(src, (bytes, bytearray)):
        if not src:
            raise InvalidInputError("the audio file is empty")
        _check_bytes("the audio file", len(src))
        data = bytes(src)
    elif isinstance(src, (str, os.PathLike)):
        path = _media_file(src, "audio")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise InvalidInputError(f"the audio file cannot be read: {exc.strerror}") from None
        if not data:
            raise InvalidInputError("the audio file is empty")
    else:
        raise InvalidInputError(
            f"audio must be a float32 array, a path or encoded bytes, got {type(src).__name__}")
    _check_audio_header(data)
    return ("audio_file", data)


def _check_audio_header(data: bytes) -> None:
    """Refuse a WAV or FLAC clip whose header declares a sample rate out of
    range or a duration past :data:`MAX_AUDIO_SECONDS` (read before mtmd
    decodes it). Other formats (mp3) declare no duration; their byte size is
    their bound."""
    rate = frames = None
    is_mp3 = data[:3] == b"ID3" or (len(data) >= 2 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0)
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        rate, frames = _wav_header(data)
    elif is_mp3:
        seconds = _mp3_seconds(data, MAX_AUDIO_SECONDS)
        if seconds > MAX_AUDIO_SECONDS:
            raise _too_big("the audio file's duration", int(seconds), MAX_AUDIO_SECONDS, "seconds")
    elif data[:4] != b"fLaC" or len(data) < 12:
        # mtmd would hand anything else to its image decoder, in an audio slot.
        raise InvalidInputError("the audio bytes are not a wav, mp3 or flac file")
    elif len(data) >= 26:
        # STREAMINFO, the first metadata block: 20 bits rate, 3 channels,
        # 5 bits per sample, 36 bits total samples (0: unknown).
        info = int.from_bytes(data[18:26], "big")
        rate, frames = info >> 44, info & ((1 << 36) - 1)
    if rate is None:
        return
    if not MIN_AUDIO_SAMPLE_RATE <= rate <= MAX_AUDIO_SAMPLE_RATE:
        raise InvalidInputError(
            f"the audio file's sample rate is {rate} Hz, outside "
            f"{MIN_AUDIO_SAMPLE_RATE}..{MAX_AUDIO_SAMPLE_RATE} Hz")
    if frames is not None and frames > MAX_AUDIO_SECONDS * rate:
        raise _too_big("the audio file's duration", frames // rate, MAX_AUDIO_SECONDS, "seconds")


# MPEG audio frame headers: kbit/s by (version is MPEG-1, layer) and index,
# sample rates by version, samples per frame by (version is MPEG-1, layer).
_MP3_KBPS = {
    (True, 1): (0, 32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448),
    (True, 2): (0, 32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384),
    (True, 3): (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    (False, 1): (0, 32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256),
    (False, 2): (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
    (False, 3): (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_MP3_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}
_MP3_SAMPLES = {(True, 1): 384, (True, 2): 1152, (True, 3): 1152,
                (False, 1): 384, (False, 2): 1152, (False, 3): 576}


# Real files have a handful (tags, a damaged frame); 64 MiB of 0xFF has 67M.
_MP3_MAX_SKIPS = 65536


def _mp3_seconds(data: bytes, limit: float) -> float:
    """Duration of the MPEG audio frames in ``data``, counted until it passes
    ``limit``. Bytes between frames are skipped to the next sync word, as a
    decoder does, so padding cannot hide frames; the walk visits at most the
    frames of ``limit`` seconds (a few thousand) and ``_MP3_MAX_SKIPS``
    false sync words, past which the file is refused as not an mp3."""
    pos = skips = 0
    if data[:3] == b"ID3" and len(data) >= 10:  # ID3v2 tag: syncsafe size
        pos = 10 + ((data[6] & 0x7F) << 21 | (data[7] & 0x7F) << 14 | (data[8] & 0x7F) << 7 | data[9] & 0x7F)
    seconds = 0.0
    while seconds <= limit:
        pos = data.find(b"\xff", pos)
        if pos < 0 or pos + 4 > len(data):
            break
        h = int.from_bytes(data[pos:pos + 4], "big")
        version, layer = (h >> 19) & 3, 4 - ((h >> 17) & 3)
        kbps_index, rate_index = (h >> 12) & 15, (h >> 10) & 3
        if (h >> 21) & 0x7FF != 0x7FF or version == 1 or layer == 4 or kbps_index in (0, 15) \
                or rate_index == 3:
            pos += 1  # not a frame header (free-format frames are skipped too)
            skips += 1
            if skips > _MP3_MAX_SKIPS:
                raise InvalidInputError(
                    f"the audio bytes are not an mp3 file: more than {_MP3_MAX_SKIPS} false frame headers")
            continue
        mpeg1 = version == 3
        kbps = _MP3_KBPS[(mpeg1, layer)][kbps_index]
        rate = _MP3_RATES[version][rate_index]
        samples = _MP3_SAMPLES[(mpeg1, layer)]
        padding = (h >> 9) & 1
        size = (12 * kbps * 1000 // rate + padding) * 4 if layer == 1 \
            else samples // 8 * kbps * 1000 // rate + padding
        seconds += samples / rate
        pos += max(size, 4)
    return seconds


def _wav_header(data: bytes) -> tuple[int | None, int | None]:
    """Sample rate and frame count of a RIFF/WAVE file, from its ``fmt `` and
    ``data`` chunks (None for what is missing)."""
    rate = block = frames = None
    pos = 12
    while pos + 8 <= len(data):
        kind, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        if kind == b"fmt " and size >= 16 and pos + 24 <= len(data):
            rate = int.from_bytes(data[pos + 12:pos + 16], "little")
            block = int.from_bytes(data[pos + 20:pos + 22], "little")
        elif kind == b"data":
            if block:
                # The declared size, not what is present: miniaudio trusts it.
                frames = size // block
            break
        pos += 8 + size + (size & 1)
    return rate, frames


def _media_file(src: str | os.PathLike[str], kind: str) -> Path:
    """The existing file a media path names; video files are refused by name."""
    try:
        path = Path(src)
    except TypeError as exc:
        raise InvalidInputError(f"the {kind} path is not a path: {exc}") from None
    if path.suffix.lower() in _VIDEO_SUFFIXES:
        raise UnsupportedInputError(f"{path.name}: video input is not supported")
    # Printable whatever the path holds (lone surrogates, 5,000 characters).
    shown = str(path)[:200].encode("utf-8", "backslashreplace").decode("utf-8")
    try:
        st = path.stat()
    except FileNotFoundError:
        raise InvalidInputError(f"{kind} file not found: {shown}") from None
    except OSError as exc:  # too long, not a folder on the way, no permission
        raise InvalidInputError(f"{kind} file {shown} cannot be used: {exc.strerror}") from None
    except ValueError:  # a NUL or a character the file system cannot encode
        raise InvalidInputError(f"{kind} file {shown} cannot be used: the path is not encodable") from None
    if not stat.S_ISREG(st.st_mode):
        raise InvalidInputError(f"{kind} file not found: {shown} is not a regular file")
    _check_bytes(f"the {kind} file {shown}", st.st_size)
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
        _check_base64("input_audio.data", spec["data"])
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
    _check_base64("the image data: URL", payload)
    try:
        return base64.b64decode(payload, validate=True)
    except ValueError:
        raise InvalidInputError("the image data: URL is not valid base64") from None


def _check_base64(field: str, text: str) -> None:
    """Bound base64 text by the size it decodes to, before decoding it."""
    _check_bytes(field, len(text) // 4 * 3)
