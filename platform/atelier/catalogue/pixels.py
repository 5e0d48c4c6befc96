"""The one way a photo becomes pixels: upright, 8-bit RGB. Used by the catalogue builder's check and
by the training job, so what the build accepted is exactly what training sees."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageOps

# Product photos are shot on white; a transparent background composited over black would teach
# the concept a black backdrop that none of the shop's photos show.
BACKGROUND = (255, 255, 255)
_SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def open_rgb(source: Path | str | bytes) -> Image.Image:
    """Decode the whole image (so truncated files fail here, not in training), turn it upright by
    its EXIF orientation, and return it as 8-bit RGB.

    CMYK, palette, greyscale and 16-bit images are converted; transparency (an alpha band or a
    palette's transparent index) is composited over white.
    """
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    with Image.open(stream) as opened:
        opened.load()
        # exif_transpose returns a copy (or the image itself when upright), so copy to outlive `with`.
        upright = ImageOps.exif_transpose(opened)
        image = upright.copy() if upright is opened else upright
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB; see `open_rgb`."""
    if image.mode in _SIXTEEN_BIT:
        # PIL's convert("RGB") clips 16-bit values at 255, so any mid-grey comes out white; scale instead.
        image = image.convert("I").point(lambda v: v * (1 / 257)).convert("L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("LA", "La", "PA", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGBA", image.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, image).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")
