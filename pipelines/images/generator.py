"""Seeded photo-like fruit images (Pillow), and scikit-learn's digits as PNG folders: data without downloads.

Each of the 12 classes is a shape, a colour and a texture (an orange is round, orange and dimpled;
a lime is smaller and green; a kiwi is a green cross-section with a ring of seeds...). Every image
gets its own background (a two-colour gradient), position, scale, rotation, colour jitter, a light
source (a radial brightness gradient) and sensor noise, so no two images are alike and the classes
overlap the way photos do (a lemon in dim light is close to a lime). Image ``i`` of class ``c`` with
seed ``s`` is always the same image, whatever else is generated beside it.
"""

from __future__ import annotations

import io
import math
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

FRUITS: dict[str, tuple[int, int, int]] = {
    "apple_red": (190, 30, 35),
    "apple_green": (120, 190, 60),
    "banana": (235, 210, 60),
    "orange": (245, 140, 30),
    "lemon": (245, 225, 60),
    "lime": (110, 180, 50),
    "strawberry": (215, 40, 50),
    "grape": (110, 50, 120),
    "blueberry": (50, 60, 120),
    "cherry": (150, 20, 40),
    "kiwi": (140, 190, 60),
    "pear": (200, 200, 80),
}
CLASSES = tuple(FRUITS)
_RENDER = 2


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator, amount: float = 18) -> tuple[int, int, int]:
    r, g, b = (np.asarray(rgb, dtype=float) + rng.normal(0, amount, 3)).clip(0, 255).astype(int)
    return int(r), int(g), int(b)


def _darker(rgb: tuple[int, int, int], f: float) -> tuple[int, int, int]:
    r, g, b = (int(max(0, min(255, c * f))) for c in rgb)
    return r, g, b


def _ellipse(draw: ImageDraw.ImageDraw, cx: float, cy: float, rx: float, ry: float, fill) -> None:
    draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=fill)


def _dots(draw, rng, cx, cy, rx, ry, n: int, colour, radius: float) -> None:
    """Texture: n dots inside the ellipse (dimples of citrus, seeds of a strawberry)."""
    for _ in range(n):
        a, d = rng.uniform(0, 2 * math.pi), math.sqrt(rng.uniform(0, 0.8))
        _ellipse(draw, cx + d * rx * math.cos(a), cy + d * ry * math.sin(a), radius, radius, colour)


def _stem(draw, cx, top, s, rng) -> None:
    lean = rng.uniform(-0.05, 0.05) * s
    draw.line([cx, top + 0.02 * s, cx + lean, top - 0.1 * s], fill=(90, 60, 30), width=max(1, int(0.025 * s)))


def _leaf(draw, cx, top, s, rng) -> None:
    _ellipse(draw, cx + 0.07 * s, top - 0.05 * s, 0.07 * s, 0.03 * s, _jitter((60, 140, 50), rng, 10))


def _draw_fruit(draw: ImageDraw.ImageDraw, name: str, colour, rng: np.random.Generator, s: float) -> None:
    """The fruit on a transparent s x s layer, centred."""
    c = s / 2
    if name in ("apple_red", "apple_green"):
        r = 0.30 * s
        _ellipse(draw, c - 0.06 * s, c, r * 0.8, r, colour)
        _ellipse(draw, c + 0.06 * s, c, r * 0.8, r, colour)
        for _ in range(6):  # streaks of an apple's skin
            x = c + rng.uniform(-0.2, 0.2) * s
            draw.line([x, c - 0.2 * s, x + rng.uniform(-3, 3), c + 0.2 * s], fill=_darker(colour, 0.85), width=1)
        _stem(draw, c, c - r, s, rng)
        _leaf(draw, c, c - r, s, rng)
    elif name == "banana":
        box = [c - 0.42 * s, c - 0.30 * s, c + 0.42 * s, c + 0.34 * s]
        draw.chord(box, 20, 160, fill=colour)
        inner = [c - 0.34 * s, c - 0.36 * s, c + 0.34 * s, c + 0.18 * s]
        draw.chord(inner, 20, 160, fill=(0, 0, 0, 0))
        for sign in (-1, 1):
            _ellipse(draw, c + sign * 0.38 * s, c + 0.08 * s, 0.03 * s, 0.03 * s, (90, 60, 30))
    elif name in ("orange", "lemon", "lime"):
        rx, ry = {"orange": (0.32, 0.32), "lemon": (0.34, 0.25), "lime": (0.24, 0.24)}[name]
        rx, ry = rx * s, ry * s
        _ellipse(draw, c, c, rx, ry, colour)
        if name == "lemon":  # the pointed ends
            for sign in (-1, 1):
                _ellipse(draw, c + sign * rx * 0.95, c, 0.06 * s, 0.05 * s, colour)
        _dots(draw, rng, c, c, rx, ry, 40, _darker(colour, 0.88), 0.012 * s)
        if name == "orange":
            _ellipse(draw, c + 0.05 * s, c - 0.05 * s, 0.02 * s, 0.02 * s, (100, 120, 40))
    elif name == "strawberry":
        w, top, bottom = 0.30 * s, c - 0.22 * s, c + 0.32 * s
        draw.polygon([(c - w, top + 0.05 * s), (c + w, top + 0.05 * s), (c, bottom)], fill=colour)
        _ellipse(draw, c - 0.15 * s, top + 0.08 * s, 0.16 * s, 0.12 * s, colour)
        _ellipse(draw, c + 0.15 * s, top + 0.08 * s, 0.16 * s, 0.12 * s, colour)
        _dots(draw, rng, c, c, 0.2 * s, 0.2 * s, 25, (240, 220, 90), 0.01 * s)
        for k in range(5):
            a = math.pi * (0.1 + 0.2 * k)
            draw.line(
                [c, top, c + 0.16 * s * math.cos(a), top - 0.08 * s * math.sin(a)],
                fill=(50, 130, 40),
                width=max(1, int(0.04 * s)),
            )
    elif name == "grape":
        r = 0.075 * s
        rows = [4, 3, 3, 2, 1]
        y = c - 0.25 * s
        for n in rows:
            for k in range(n):
                x = c + (k - (n - 1) / 2) * 1.8 * r + rng.normal(0, 0.01 * s)
                _ellipse(draw, x, y, r, r, _jitter(colour, rng, 8))
                _ellipse(draw, x - 0.3 * r, y - 0.3 * r, 0.25 * r, 0.25 * r, _darker(colour, 1.5))
            y += 1.6 * r
        _stem(draw, c, c - 0.28 * s, s, rng)
    elif name == "blueberry":
        for _ in range(int(rng.integers(3, 6))):
            x, y, r = c + rng.uniform(-0.22, 0.22) * s, c + rng.uniform(-0.22, 0.22) * s, 0.1 * s
            _ellipse(draw, x, y, r, r, _jitter(colour, rng, 8))
            _ellipse(draw, x, y - 0.2 * r, 0.3 * r, 0.3 * r, _darker(colour, 0.5))
    elif name == "cherry":
        tip = (c + rng.uniform(-0.05, 0.05) * s, c - 0.35 * s)
        for sign in (-1, 1):
            x, y = c + sign * 0.15 * s, c + 0.12 * s
            draw.line([tip, (x, y - 0.1 * s)], fill=(70, 110, 30), width=max(1, int(0.02 * s)))
            _ellipse(draw, x, y, 0.14 * s, 0.13 * s, colour)
            _ellipse(draw, x - 0.05 * s, y - 0.05 * s, 0.03 * s, 0.03 * s, _darker(colour, 1.6))
    elif name == "kiwi":
        _ellipse(draw, c, c, 0.33 * s, 0.30 * s, (120, 90, 50))
        _ellipse(draw, c, c, 0.29 * s, 0.26 * s, colour)
        _ellipse(draw, c, c, 0.09 * s, 0.08 * s, (235, 235, 200))
        for k in range(18):
            a = 2 * math.pi * k / 18 + rng.normal(0, 0.05)
            _ellipse(draw, c + 0.15 * s * math.cos(a), c + 0.135 * s * math.sin(a), 0.012 * s, 0.02 * s, (20, 20, 10))
    elif name == "pear":
        _ellipse(draw, c, c + 0.12 * s, 0.25 * s, 0.22 * s, colour)
        _ellipse(draw, c, c - 0.12 * s, 0.14 * s, 0.16 * s, colour)
        _dots(draw, rng, c, c + 0.12 * s, 0.2 * s, 0.18 * s, 15, _darker(colour, 0.8), 0.008 * s)
        _stem(draw, c, c - 0.27 * s, s, rng)
    else:  # pragma: no cover - CLASSES is closed
        raise ValueError(f"unknown fruit {name!r}; known: {', '.join(CLASSES)}")


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A two-colour gradient in a random direction: a table, a wall, a hand's shadow."""
    a, b = rng.uniform(40, 235, 3), rng.uniform(40, 235, 3)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    t = (xx * math.cos(angle) + yy * math.sin(angle) + 1.5) / 3.0
    return a * (1 - t[..., None]) + b * t[..., None]


def fruit_image(name: str, index: int, *, size: int = 64, seed: int = 0) -> Image.Image:
    """Image ``index`` of fruit ``name``: deterministic in (name, index, size, seed)."""
    if name not in FRUITS:
        raise ValueError(f"unknown fruit {name!r}; known: {', '.join(CLASSES)}")
    rng = np.random.default_rng([seed, CLASSES.index(name), index])
    big = size * _RENDER  # drawn at twice the size, downsampled below
    scale = rng.uniform(0.7, 1.05)
    side = max(2, int(big * scale))
    layer = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    _draw_fruit(ImageDraw.Draw(layer), name, _jitter(FRUITS[name], rng), rng, side)
    small = max(1, side // _RENDER)
    dx, dy = rng.uniform(-0.12, 0.12, 2) * size
    offset = (int(dx + (size - small) / 2), int(dy + (size - small) / 2))
    # downsampled first (anti-aliased edges, as a lens gives), then turned: rotating the big layer cost 4x
    layer = layer.resize((small, small), Image.Resampling.BOX).rotate(
        float(rng.uniform(0, 360)), resample=Image.Resampling.BILINEAR
    )
    photo = Image.fromarray(_background(size, rng).astype(np.uint8), "RGB")
    photo.paste(layer, offset, layer)
    if rng.random() < 0.3:  # out of focus
        photo = photo.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    pixels = np.asarray(photo, dtype=np.float32)
    # light: brighter towards a random point, plus an overall exposure
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    lx, ly = rng.uniform(0, 1, 2)
    light = rng.uniform(0.7, 1.2) * (1.15 - 0.4 * np.sqrt((xx - lx) ** 2 + (yy - ly) ** 2))
    noise = rng.standard_normal(pixels.shape, dtype=np.float32) * np.float32(rng.uniform(2, 8))
    pixels = pixels * light[..., None] + noise
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "RGB")


def fruit_files(
    per_class: int, *, size: int = 64, seed: int = 0, classes: tuple[str, ...] = CLASSES, fmt: str = "jpeg"
) -> Iterator[tuple[str, bytes]]:
    """(relative path ``<class>/<class>-<i>.<ext>``, encoded bytes) for every image, class by class."""
    ext = {"jpeg": "jpg", "png": "png"}[fmt]
    for i in range(per_class):
        for name in classes:
            buf = io.BytesIO()
            fruit_image(name, i, size=size, seed=seed).save(
                buf, format=fmt.upper(), **({"quality": 90} if fmt == "jpeg" else {})
            )
            yield f"{name}/{name}-{i:06d}.{ext}", buf.getvalue()


def write_fruit_folder(root: Path | str, per_class: int, **kwargs) -> Path:
    """A delivery folder: one sub-folder per class (see ``fruit_files`` for the options)."""
    root = Path(root)
    for rel, data in fruit_files(per_class, **kwargs):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def write_fruit_zip(path: Path | str, per_class: int, **kwargs) -> Path:
    """The same delivery as one zip (images stored, not recompressed: JPEG does not shrink further)."""
    path = Path(path)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for rel, data in fruit_files(per_class, **kwargs):
            zf.writestr(rel, data)
    return path


def write_digits(root: Path | str) -> Path:
    """scikit-learn's 1,797 handwritten digits (8x8, grey levels 0-16) as PNGs in folders ``0``..``9``."""
    from sklearn.datasets import load_digits

    root = Path(root)
    digits = load_digits()
    for i, (image, target) in enumerate(zip(digits.images, digits.target, strict=True)):
        folder = root / str(int(target))
        folder.mkdir(parents=True, exist_ok=True)
        grey = (np.asarray(image) * (255.0 / 16.0)).round().astype(np.uint8)
        Image.fromarray(grey, "L").save(folder / f"digit-{i:04d}.png")
    return root
