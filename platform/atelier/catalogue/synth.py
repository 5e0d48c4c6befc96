"""A synthetic jewelry shop drawn with PIL, shaped like the study's catalogue, for tests and demos."""

from __future__ import annotations

import csv
import io
import math
import random
import shutil
from pathlib import Path

from PIL import Image, ImageDraw

from atelier.errors import InvalidInput
from atelier.files import write_atomic

# The study's styles. Studs come in many styles with one or two photos each, so grouping merges
# them into one catch-all instance, as the study did.
SHOP: dict[str, tuple[str, ...]] = {
    "hoops": (
        "beaded", "chunky", "charlotte", "croissant", "dome", "easy daily", "rectangle", "special", "tube",
    ),
    "necklaces": ("chain", "charm", "pendant"),
    "rings": ("band", "bold", "dome", "signet", "slim", "stacker"),
    "studs": ("ball", "pearl", "star", "heart", "crystal"),
}
PHOTOS = {"hoops": (3, 7), "necklaces": (3, 7), "rings": (3, 7), "studs": (1, 2)}
NOUN = {"hoops": "Hoops", "necklaces": "Necklace", "rings": "Ring", "studs": "Studs"}
METALS = {
    "14k Gold": (212, 175, 55),
    "Sterling Silver": (192, 194, 201),
    "Rose Gold": (183, 110, 101),
    "Gold Vermeil": (230, 190, 92),
}
SIZES = ((256, 256), (320, 320), (384, 384), (384, 320))
MANIFEST = "catalogue.csv"


def synth_shop(out_dir: Path | str, seed: int = 0, sizes: tuple[tuple[int, int], ...] = SIZES) -> Path:
    """Draw the shop under out_dir/images/<class>/<style>/NN.png and write out_dir/catalogue.csv.

    Every photo is drawn from its own RNG seeded by (seed, class, style, index), so the same seed
    gives byte-identical PNGs. Returns the manifest's path.
    """
    out = Path(out_dir)
    _prepare(out)
    rows: list[tuple[str, str, str, str]] = []
    for class_name, styles in SHOP.items():
        for style in styles:
            low, high = PHOTOS[class_name]
            count = random.Random(f"{seed}:count:{class_name}:{style}").randint(low, high)
            folder = out / "images" / class_name / style.replace(" ", "-")
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(1, count + 1):
                rng = random.Random(f"{seed}:photo:{class_name}:{style}:{index}")
                metal = rng.choice(sorted(METALS))
                image = draw(class_name, style, METALS[metal], rng.choice(sizes), rng)
                path = folder / f"{index:02d}.png"
                image.save(path, format="PNG", compress_level=1)
                title = f"{style.title()} {NOUN[class_name]}, {metal}, {_measure(class_name, rng)}"
                rows.append((path.relative_to(out).as_posix(), title, class_name, style))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(("image", "title", "class", "style"))
    writer.writerows(rows)
    manifest = out / MANIFEST
    write_atomic(manifest, buffer.getvalue())
    return manifest


def _prepare(out: Path) -> None:
    # Photos of an earlier run with another seed would linger and join a folder build, so a
    # previous shop is replaced; anything else in the folder is the user's and is left alone.
    if out.exists():
        entries = {p.name for p in out.iterdir()}
        if entries - {"images", MANIFEST}:
            raise InvalidInput("folder is not empty and is not a synthetic shop", where=str(out))
        shutil.rmtree(out / "images", ignore_errors=True)
    (out / "images").mkdir(parents=True, exist_ok=True)


def _measure(class_name: str, rng: random.Random) -> str:
    if class_name == "hoops":
        return f"{rng.choice((12, 15, 20, 25, 30))} mm"
    if class_name == "necklaces":
        return f"{rng.choice((40, 45, 50))} cm"
    if class_name == "rings":
        return f"Size {rng.randint(5, 9)}"
    return f"{rng.randint(3, 8)} mm"


def _shade(colour: tuple[int, int, int], rng: random.Random) -> tuple[int, int, int]:
    # Mostly a change of light, barely of hue: silver must not turn green.
    factor = rng.uniform(0.85, 1.1)
    r, g, b = (max(0, min(255, int(c * factor) + rng.randint(-5, 5))) for c in colour)
    return r, g, b


def _scale(colour: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    r, g, b = (max(0, min(255, int(c * factor))) for c in colour)
    return r, g, b


def draw(class_name: str, style: str, metal_rgb, size: tuple[int, int], rng: random.Random,
          backdrop: str | None = None) -> Image.Image:
    """`backdrop` ("light" or "dark") fixes the backdrop; None draws it as the shop does."""
    w, h = size
    # Light backdrops mostly, a dark velvet one now and then, as product photos are. The draw is
    # taken even when the backdrop is given, so a seed's photos never depend on the argument.
    dark = rng.random() < 0.25
    if backdrop is not None:
        dark = backdrop == "dark"
    if dark:
        background = (rng.randint(20, 60), rng.randint(20, 50), rng.randint(30, 70))
    else:
        background = (rng.randint(215, 250), rng.randint(205, 245), rng.randint(200, 240))
    image = Image.new("RGB", (w, h), background)
    draw = ImageDraw.Draw(image)
    metal = _shade(metal_rgb, rng)
    s = min(w, h)
    cx = w / 2 + rng.uniform(-0.04, 0.04) * s
    cy = h / 2 + rng.uniform(-0.04, 0.04) * s
    {"hoops": _hoops, "necklaces": _necklace, "rings": _ring, "studs": _studs}[class_name](
        draw, style, metal, cx, cy, s, rng
    )
    return image


def _hoops(draw: ImageDraw.ImageDraw, style, metal, cx, cy, s, rng) -> None:
    r = s * rng.uniform(0.14, 0.18)
    widths = {"chunky": 0.065, "tube": 0.05, "dome": 0.045, "easy daily": 0.012, "croissant": 0.05}
    width = widths.get(style, 0.025)
    lw = max(2, int(s * width))
    dark, light = _scale(metal, 0.6), _scale(metal, 1.35)
    for x in (cx - s * 0.21, cx + s * 0.21):
        box = (x - r, cy - r, x + r, cy + r)
        if style == "rectangle":
            draw.rounded_rectangle(box, radius=r * 0.25, outline=metal, width=lw)
            continue
        draw.ellipse(box, outline=metal, width=lw)
        if style == "beaded":
            for k in range(14):
                a = 2 * math.pi * k / 14
                px, py, br = x + r * math.cos(a), cy + r * math.sin(a), lw * 1.6
                draw.ellipse((px - br, py - br, px + br, py + br), fill=light, outline=dark)
        elif style == "charlotte":
            cr = s * 0.03
            draw.ellipse((x - cr, cy + r - cr + lw, x + cr, cy + r + cr + lw), fill=light, outline=dark)
        elif style == "croissant":
            for k in range(18):
                a = 2 * math.pi * k / 18
                draw.line(
                    (x + (r - lw) * math.cos(a), cy + (r - lw) * math.sin(a),
                     x + r * math.cos(a + 0.15), cy + r * math.sin(a + 0.15)),
                    fill=dark, width=max(1, lw // 4),
                )
        elif style == "dome":
            inset = r - lw / 3
            draw.arc((x - inset, cy - inset, x + inset, cy + inset), 200, 320, fill=light, width=max(1, lw // 3))
        elif style == "special":
            for k, gem in enumerate(((200, 30, 60), (30, 90, 200), (40, 160, 80))):
                a = math.pi * (0.35 + 0.15 * k)
                px, py, gr = x + r * math.cos(a), cy + r * math.sin(a), lw * 1.3
                draw.ellipse((px - gr, py - gr, px + gr, py + gr), fill=gem)
        elif style == "tube":
            inner = r - lw / 2
            draw.ellipse((x - inner, cy - inner, x + inner, cy + inner), outline=dark, width=1)


def _necklace(draw: ImageDraw.ImageDraw, style, metal, cx, cy, s, rng) -> None:
    dark, light = _scale(metal, 0.6), _scale(metal, 1.35)
    half, top, depth = s * 0.36, cy - s * 0.38, s * rng.uniform(0.5, 0.6)
    points = [(cx - half + 2 * half * t / 40, top + depth * math.sin(math.pi * t / 40)) for t in range(41)]
    link = s * (0.014 if style == "chain" else 0.008)
    for px, py in points:
        box = (px - link, py - link * 0.7, px + link, py + link * 0.7)
        draw.ellipse(box, outline=metal, width=max(1, int(link / 2)))
    if style == "charm":
        for t in (10, 15, 20, 25, 30):
            px, py = points[t]
            draw.line((px, py, px, py + s * 0.04), fill=metal, width=1)
            cr = s * 0.018
            draw.ellipse((px - cr, py + s * 0.04, px + cr, py + s * 0.04 + 2 * cr), fill=light, outline=dark)
    elif style == "pendant":
        px, py = points[20]
        pr = s * 0.05
        draw.polygon([(px, py), (px - pr, py + pr * 1.4), (px + pr, py + pr * 1.4)], fill=metal)
        draw.ellipse((px - pr, py + pr * 0.8, px + pr, py + pr * 2.8), fill=metal, outline=dark)
        draw.ellipse((px - pr / 3, py + pr * 1.4, px + pr / 3, py + pr * 2.0), fill=light)


def _ring(draw: ImageDraw.ImageDraw, style, metal, cx, cy, s, rng) -> None:
    dark, light = _scale(metal, 0.6), _scale(metal, 1.35)
    rx, ry = s * rng.uniform(0.2, 0.24), s * rng.uniform(0.1, 0.13)
    widths = {"band": 0.035, "bold": 0.07, "dome": 0.05, "signet": 0.04, "slim": 0.01}
    lw = max(2, int(s * widths.get(style, 0.02)))
    offsets = (-s * 0.09, 0.0, s * 0.09) if style == "stacker" else (0.0,)
    for dy in offsets:
        draw.ellipse((cx - rx, cy + dy - ry, cx + rx, cy + dy + ry), outline=metal, width=lw)
    if style == "dome":
        box = (cx - rx + lw / 3, cy - ry + lw / 3, cx + rx - lw / 3, cy + ry - lw / 3)
        draw.arc(box, 190, 340, fill=light, width=max(1, lw // 3))
    elif style == "signet":
        fw, fh = s * 0.1, s * 0.07
        face = (cx - fw, cy - ry - fh, cx + fw, cy - ry + fh)
        draw.rounded_rectangle(face, radius=fh * 0.4, fill=metal, outline=dark, width=2)


def _studs(draw: ImageDraw.ImageDraw, style, metal, cx, cy, s, rng) -> None:
    dark, light = _scale(metal, 0.6), _scale(metal, 1.35)
    r = s * rng.uniform(0.05, 0.07)
    for x in (cx - s * 0.15, cx + s * 0.15):
        if style == "ball":
            draw.ellipse((x - r, cy - r, x + r, cy + r), fill=metal, outline=dark)
            draw.ellipse((x - r / 2, cy - r / 2, x - r / 6, cy - r / 6), fill=light)
        elif style == "pearl":
            draw.ellipse((x - r, cy - r, x + r, cy + r), fill=(240, 236, 225), outline=(200, 195, 185))
            draw.ellipse((x - r / 2, cy - r / 2, x - r / 6, cy - r / 6), fill=(255, 255, 255))
        elif style == "star":
            pts = []
            for k in range(10):
                a = -math.pi / 2 + math.pi * k / 5
                rr = r if k % 2 == 0 else r * 0.45
                pts.append((x + rr * math.cos(a), cy + rr * math.sin(a)))
            draw.polygon(pts, fill=metal, outline=dark)
        elif style == "heart":
            lobe = r * 0.55
            draw.ellipse((x - 2 * lobe, cy - lobe * 1.5, x, cy + lobe * 0.5), fill=metal)
            draw.ellipse((x, cy - lobe * 1.5, x + 2 * lobe, cy + lobe * 0.5), fill=metal)
            tip = [(x - 2 * lobe + 1, cy - lobe * 0.3), (x + 2 * lobe - 1, cy - lobe * 0.3), (x, cy + r * 1.2)]
            draw.polygon(tip, fill=metal)
        else:  # crystal
            facets = [(x, cy - r), (x + r * 0.8, cy), (x, cy + r), (x - r * 0.8, cy)]
            draw.polygon(facets, fill=(190, 225, 245), outline=metal)
            draw.line((x - r * 0.8, cy, x + r * 0.8, cy), fill=(255, 255, 255), width=1)

