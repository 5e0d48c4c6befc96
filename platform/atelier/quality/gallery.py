"""The gallery a person looks at: comparison grids (real photos, base model, fine-tuned; one seed
per column) and a static HTML page that shows each model's grid beside its metrics."""

from __future__ import annotations

import html
from pathlib import Path, PurePosixPath, PureWindowsPath
from urllib.parse import quote

from PIL import Image, ImageDraw, ImageFont, ImageOps
from pydantic import BaseModel, ConfigDict, Field

from atelier.errors import InvalidInput
from atelier.files import write_atomic
from atelier.quality.results import MetricValue

BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
PAD = 8
FONT_SIZE = 14


def _cell(image: Image.Image, side: int) -> Image.Image:
    """`image` as a side x side square, centre-cropped. NEAREST when it grows, so that a 64 px
    sample stays as crisp as the model made it; LANCZOS when it shrinks, so photos do not alias."""
    image = image.convert("RGB")
    grows = min(image.size) < side
    method = Image.Resampling.NEAREST if grows else Image.Resampling.LANCZOS
    return image if image.size == (side, side) else ImageOps.fit(image, (side, side), method=method)


def comparison_grid(rows: list[tuple[str, list[Image.Image]]], *, side: int = 128) -> Image.Image:
    """One row per (label, images), each image a side x side cell, the labels in a strip on the
    left. Rows may hold different counts; the cells a shorter row lacks stay background."""
    if side < 1:
        raise InvalidInput(f"side must be at least 1, got {side}", where="comparison grid")
    if not rows:
        raise InvalidInput("no rows", where="comparison grid")
    for label, images in rows:
        if not images:
            raise InvalidInput(f"row {label!r} has no images", where="comparison grid")
    font = ImageFont.load_default(size=FONT_SIZE)
    strip = int(max(font.getlength(label) for label, _ in rows)) + 2 * PAD
    columns = max(len(images) for _, images in rows)
    grid = Image.new("RGB", (strip + columns * side, len(rows) * side), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for r, (label, images) in enumerate(rows):
        top = r * side
        # "lm": left edge, vertical middle, so the label sits level with its row's centre.
        draw.text((PAD, top + side / 2), label, fill=INK, font=font, anchor="lm")
        for c, image in enumerate(images):
            grid.paste(_cell(image, side), (strip + c * side, top))
    return grid


class GalleryEntry(BaseModel):
    """One fine-tuned model on the gallery page: its comparison grid and its metrics."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="The model's registry reference, e.g. shop-beaded-hoops:v1.")
    concept: str = Field(description="The concept it was fine-tuned on.")
    grid: str = Field(description="Path of the comparison grid PNG, relative to the gallery folder.")
    metrics: list[MetricValue] = Field(description="The fine-tuned model's metrics.")
    base_metrics: list[MetricValue] = Field(
        default_factory=list, description="The base model's metrics on the same prompts and seeds; may be empty.")
    note: str | None = Field(None, description="Free text shown under the entry's heading.")


def _check_grid_path(grid: str) -> None:
    """The page names the grid by a relative path: one that is absolute or climbs out of the
    gallery folder would point at a file the gallery does not hold (or at nothing once copied)."""
    where = f"gallery grid {grid!r}"
    if not grid.strip():
        raise InvalidInput("empty path", where=where)
    if PurePosixPath(grid).is_absolute() or PureWindowsPath(grid).is_absolute() or PureWindowsPath(grid).drive:
        raise InvalidInput("must be relative to the gallery folder", where=where)
    if ".." in PureWindowsPath(grid).parts:  # splits on both "/" and "\"
        raise InvalidInput("must stay inside the gallery folder (no '..')", where=where)


def _value(metric: MetricValue | None) -> str:
    if metric is None:
        return "—"
    if metric.value is None:
        return f"unavailable: {metric.unavailable or 'no reason given'}"
    text = f"{metric.value:.4g}"
    return text if metric.spread is None else f"{text} ± {metric.spread:.4g}"


def _by_name(metrics: list[MetricValue], where: str) -> dict[str, MetricValue]:
    named: dict[str, MetricValue] = {}
    for metric in metrics:
        if metric.metric in named:
            raise InvalidInput(f"metric {metric.metric!r} listed twice", where=where)
        named[metric.metric] = metric
    return named


def _table(entry: GalleryEntry) -> str:
    tuned = _by_name(entry.metrics, f"{entry.model} metrics")
    base = _by_name(entry.base_metrics, f"{entry.model} base_metrics")
    if not tuned and not base:
        return "<p class=\"none\">No metrics.</p>"
    rows = []
    for name in [*tuned, *(n for n in base if n not in tuned)]:
        pair = (base.get(name), tuned.get(name))
        # A score compares only with one made by the same encoder: show both when they differ.
        encoders = dict.fromkeys(m.encoder for m in pair if m is not None and m.encoder)
        cells = [name, _value(pair[0]), _value(pair[1]), " / ".join(encoders) or "—"]
        rows.append("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in cells) + "</tr>")
    return ("<table><thead><tr><th>metric</th><th>base</th><th>fine-tuned</th><th>encoder</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def _section(entry: GalleryEntry) -> str:
    e = html.escape
    alt = f"{entry.model} ({entry.concept}): real photos, base model and fine-tuned, one seed per column"
    note = f"<p class=\"note\">{e(entry.note)}</p>" if entry.note else ""
    return (f"<section><h2>{e(entry.model)} <span class=\"concept\">{e(entry.concept)}</span></h2>{note}"
            f"<figure><img src=\"{e(quote(entry.grid))}\" alt=\"{e(alt)}\"></figure>{_table(entry)}</section>")


_STYLE = """
body { font: 15px/1.4 system-ui, sans-serif; margin: 24px; color: #141414; background: #fafafa; }
section { background: #fff; border: 1px solid #ddd; padding: 12px 16px; margin-bottom: 24px; }
h2 { margin: 0 0 8px; font-size: 18px; } .concept { font-weight: normal; color: #555; }
figure { margin: 8px 0; } img { max-width: 100%; image-rendering: pixelated; display: block; }
.missing { display: inline-block; margin-top: 4px; padding: 4px 10px; background: #c62828; color: #fff; }
table { border-collapse: collapse; } th, td { border: 1px solid #ddd; padding: 3px 10px; text-align: left; }
"""

# Run on load, when every image has either loaded or failed: a failed one gets a caption a person
# sees, and the body records the count that a headless browser (the test) reads back.
_SCRIPT = """
window.addEventListener("load", function () {
  var images = document.querySelectorAll("img"), ok = 0;
  images.forEach(function (img) {
    if (img.complete && img.naturalWidth > 0) { ok += 1; return; }
    var caption = document.createElement("figcaption");
    caption.className = "missing";
    caption.textContent = "image missing: " + img.getAttribute("src");
    img.insertAdjacentElement("afterend", caption);
  });
  document.body.dataset.imagesLoaded = ok + "/" + images.length;
});
"""


def write_gallery(out_dir: Path, entries: list[GalleryEntry], *, title: str) -> Path:
    """Write out_dir/index.html: one section per entry (its grid, its metrics beside the base
    model's), self-contained apart from the grids it names. Returns the page's path."""
    for entry in entries:
        _check_grid_path(entry.grid)
    sections = "".join(_section(entry) for entry in entries) or "<p class=\"none\">No models.</p>"
    page = (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head>\n<body><h1>{html.escape(title)}</h1>\n{sections}\n"
            f"<script>{_SCRIPT}</script></body></html>\n")
    out_dir.mkdir(parents=True, exist_ok=True)
    return write_atomic(out_dir / "index.html", page)
