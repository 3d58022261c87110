"""Pure image functions: delivered bytes -> the contract's RGB pixels, or the rule the file broke.

Silver and the ``/classify`` endpoint call the same ``decode_image``, so a served photo is
oriented, converted and resized exactly as the training images were.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

HIST_BINS = 4  # per channel: a 4 x 4 x 4 joint colour histogram (64 values summing to 1)

# Quarantine rules of silver, each with what the sender can do about it.
RULES = {
    "not_an_image": "not a format Pillow reads (JPEG, PNG, GIF, BMP, TIFF, WebP...); deliver images only",
    "truncated": "the file ends before the image does (an interrupted copy or upload); deliver it again",
    "corrupt": "the image data cannot be decoded; re-export it from the source",
    "too_small": "smaller than the contract's min_width x min_height; deliver the original resolution",
    "bad_aspect": "longer side / shorter side above the contract's max_aspect_ratio; crop it or change the contract",
    "too_large": "over the contract's max_bytes, or more pixels than Pillow's decompression-bomb limit",
}


@dataclass(frozen=True)
class Decoded:
    pixels: bytes  # height x width x 3, uint8, row-major: what the model reads
    orig_width: int  # as delivered, after EXIF orientation
    orig_height: int
    orig_mode: str  # Pillow mode as delivered: RGB, L, P, RGBA, CMYK...
    orig_format: str  # JPEG, PNG...
    exif_transposed: bool  # an EXIF orientation tag turned the image


@dataclass(frozen=True)
class Rejected:
    rule: str  # a key of RULES
    reason: str  # what was found, for the quarantine row

    @property
    def fix(self) -> str:
        return RULES[self.rule]


def decode_image(
    data: bytes,
    width: int,
    height: int,
    *,
    min_width: int = 1,
    min_height: int = 1,
    max_aspect_ratio: float = float("inf"),
    max_bytes: int = 1 << 62,
) -> Decoded | Rejected:
    """Decode, apply the EXIF orientation, convert to RGB (transparency on white) and fit to
    ``width`` x ``height`` (centre crop to the aspect ratio, then resize); or the rule broken."""
    if len(data) > max_bytes:
        return Rejected("too_large", f"{len(data)} bytes > max_bytes {max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            fmt, mode, (raw_w, raw_h) = image.format or "?", image.mode, image.size
            if fmt == "JPEG":
                # decode at the smallest scale (1/2, 1/4, 1/8) still at least the target size: a
                # 12 MP photo resized to 32 x 32 decodes an eighth of its pixels
                image.draft("RGB", (width, height))
            image.load()
    except UnidentifiedImageError:
        return Rejected("not_an_image", f"Pillow cannot identify the file ({_head(data)})")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return Rejected("too_large", str(exc)[:200])
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        text = str(exc)
        truncated = "truncated" in text.lower() or isinstance(exc, EOFError)
        return Rejected("truncated" if truncated else "corrupt", f"{type(exc).__name__}: {text[:200]}")
    orientation = _orientation(image)
    try:
        image = ImageOps.exif_transpose(image)
    except Exception as exc:  # noqa: BLE001 - an unreadable EXIF block is a corrupt file, not a crash
        return Rejected("corrupt", f"EXIF orientation unreadable: {type(exc).__name__}: {str(exc)[:160]}")
    # the delivered size, upright: orientations 5-8 turn the image a quarter
    ow, oh = (raw_h, raw_w) if orientation in (5, 6, 7, 8) else (raw_w, raw_h)
    if ow < min_width or oh < min_height:
        return Rejected("too_small", f"{ow} x {oh} < min {min_width} x {min_height}")
    aspect = max(ow, oh) / max(min(ow, oh), 1)
    if aspect > max_aspect_ratio:
        return Rejected("bad_aspect", f"{ow} x {oh}: aspect {aspect:.2f} > max_aspect_ratio {max_aspect_ratio}")
    rgb = _to_rgb(image)
    if rgb.size != (width, height):
        rgb = ImageOps.fit(rgb, (width, height), method=Image.Resampling.BILINEAR)
    return Decoded(rgb.tobytes(), ow, oh, mode, fmt, orientation not in (None, 1))


def _orientation(image: Image.Image) -> int | None:
    try:
        return image.getexif().get(0x0112)
    except Exception:  # noqa: BLE001 - no EXIF
        return None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB") if image.mode != "RGB" else image


def _head(data: bytes) -> str:
    return f"{len(data)} bytes, starting {data[:8]!r}"


def pixel_matrix(blobs: list[bytes], pixels: int) -> np.ndarray:
    """(n, pixels) uint8 from silver's pixel bytes, without a copy per image."""
    if not blobs:
        return np.zeros((0, pixels), dtype=np.uint8)
    matrix = np.frombuffer(b"".join(blobs), dtype=np.uint8)
    return matrix.reshape(len(blobs), pixels)


def colour_histograms(matrix: np.ndarray, bins: int = HIST_BINS, chunk: int = 128) -> np.ndarray:
    """(n, bins**3) float32: each image's joint RGB histogram, summing to 1 (the baseline's features).

    Computed ``chunk`` images at a time in 16/32-bit integers: a file of 1,000 100 x 100 images in
    one int64 pass held ~700 MB of temporaries."""
    n = matrix.shape[0]
    out = np.zeros((n, bins**3), dtype=np.float32)
    if n == 0:
        return out
    pixels = matrix.shape[1] // 3
    for start in range(0, n, chunk):
        rgb = matrix[start : start + chunk].reshape(-1, pixels, 3)
        q = (rgb.astype(np.uint16) * bins) >> 8  # 0..bins-1 per channel
        index = ((q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]).astype(np.int32)
        index += (np.arange(len(rgb), dtype=np.int32) * bins**3)[:, None]
        counts = np.bincount(index.ravel(), minlength=len(rgb) * bins**3).reshape(len(rgb), bins**3)
        out[start : start + len(rgb)] = counts / pixels
    return out
