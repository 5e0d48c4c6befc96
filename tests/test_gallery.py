"""The gallery (atelier.quality.gallery): the comparison grid's geometry and pixels, the page's
escaping, values and refusals, and the page as headless chromium shows it, with its grids loaded
or marked missing.

chromium is found on PATH (`make tools` installs Debian's); without it the browser tests skip
locally and fail under CI, as the other external tools do (support.tool)."""

from __future__ import annotations

import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFont

from atelier.errors import InvalidInput
from atelier.quality.gallery import BACKGROUND, FONT_SIZE, GalleryEntry, comparison_grid, write_gallery
from atelier.quality.metrics import MetricValue
from support import tool

RED, GREEN, BLUE = (230, 30, 30), (30, 200, 60), (40, 60, 230)
CYAN, YELLOW = (0, 210, 210), (250, 210, 0)
# The browser test's grids: colours nothing else on the page uses.
MAGENTA, ORANGE, TEAL, VIOLET = (255, 0, 255), (255, 128, 0), (0, 128, 128), (128, 0, 255)
MISSING_CAPTION = (198, 40, 40)  # .missing's background (#c62828)


def solid(colour: tuple[int, int, int], size: int | tuple[int, int] = 64) -> Image.Image:
    return Image.new("RGB", (size, size) if isinstance(size, int) else size, colour)


def checker(side: int) -> Image.Image:
    """Black and white alternating every pixel: what resampling changes most."""
    cells = (np.indices((side, side)).sum(axis=0) % 2 * 255).astype(np.uint8)
    return Image.fromarray(cells).convert("RGB")


def test_the_grid_is_the_label_strip_plus_one_square_per_column_and_one_row_per_label():
    rows = [("real photos", [solid(RED), solid(GREEN), solid(BLUE)]),
            ("base model", [solid(CYAN)] * 5),
            ("fine-tuned", [solid(YELLOW), solid(RED), solid(GREEN), solid(BLUE), solid(CYAN)])]
    side = 48
    grid = comparison_grid(rows, side=side)
    strip = grid.width - 5 * side

    assert grid.height == 3 * side
    font = ImageFont.load_default(size=FONT_SIZE)
    assert strip > max(font.getlength(label) for label, _ in rows)
    for r, (_, images) in enumerate(rows):
        for c in range(5):
            want = images[c].getpixel((0, 0)) if c < len(images) else BACKGROUND
            left, top = strip + c * side, r * side
            # Centre and both corners: a cell shifted by one pixel shows at a corner.
            for x, y in ((left + side // 2, top + side // 2), (left, top), (left + side - 1, top + side - 1)):
                assert grid.getpixel((x, y)) == want, (r, c, x, y)
        label = np.asarray(grid.crop((0, r * side, strip, (r + 1) * side)).convert("L"))
        assert (label < 100).sum() > 30, f"row {r}: no label drawn"


def test_small_images_grow_crisp_and_large_ones_shrink_smoothly():
    # Upscaled 64 -> 128 with NEAREST: every pixel still black or white, in 2x2 blocks.
    grown = comparison_grid([("fine-tuned", [checker(64)])], side=128)
    cell = np.asarray(grown.crop((grown.width - 128, 0, grown.width, 128)))
    assert set(np.unique(cell)) == {0, 255}
    assert (cell[::2, ::2] == cell[1::2, 1::2]).all()
    # Downscaled 256 -> 128 with LANCZOS: the one-pixel pattern averages out to grey.
    shrunk = comparison_grid([("real photos", [checker(256)])], side=128)
    cell = np.asarray(shrunk.crop((shrunk.width - 128, 0, shrunk.width, 128)).convert("L"))
    assert 100 < cell.mean() < 155 and (cell > 60).all() and (cell < 195).all()


def test_a_photo_that_is_not_square_is_centre_cropped_not_stretched():
    photo = solid(GREEN, (128, 64))
    photo.paste(RED, (0, 0, 32, 64))
    photo.paste(BLUE, (96, 0, 128, 64))
    grid = comparison_grid([("real photos", [photo])], side=64)
    cell = grid.crop((grid.width - 64, 0, grid.width, 64))
    assert cell.getcolors() == [(64 * 64, GREEN)]


@pytest.mark.parametrize("rows, words", [
    ([], "no rows"),
    ([("real photos", [solid(RED)]), ("base model", [])], "'base model' has no images"),
])
def test_a_grid_without_rows_or_with_an_empty_row_is_refused(rows, words):
    with pytest.raises(InvalidInput, match=words):
        comparison_grid(rows)


class _Page(HTMLParser):
    """The page's table rows (cell texts) and every src and href."""

    def __init__(self, text: str):
        super().__init__()
        self.rows: list[list[str]] = []
        self.links: list[str] = []
        self.images: list[dict[str, str | None]] = []
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        named = dict(attrs)
        self.links += [v for k, v in attrs if k in ("src", "href") and v is not None]
        if tag == "img":
            self.images.append(named)
        elif tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def entry(**fields) -> GalleryEntry:
    values = {"model": "shop-beaded-hoops:v1", "concept": "beaded hoops", "grid": "grids/hoops.png",
              "metrics": [], "note": None} | fields
    return GalleryEntry(**values)


def test_the_page_escapes_every_text_and_links_only_its_own_grids(tmp_path):
    bad = entry(model="<script>alert(1)</script>:v1", concept='rings & "hoops"', note="<b>bold</b> claim",
                grid="grids/a b#1.png")
    page = write_gallery(tmp_path, [bad], title="Q3 <review>").read_text()

    for raw in ("<script>alert(1)", "<b>bold</b>", '"hoops"', "<review>"):
        assert raw not in page
    for escaped in ("&lt;script&gt;alert(1)&lt;/script&gt;:v1", "rings &amp; &quot;hoops&quot;",
                    "&lt;b&gt;bold&lt;/b&gt; claim", "Q3 &lt;review&gt;"):
        assert escaped in page
    parsed = _Page(page)
    assert [img["src"] for img in parsed.images] == ["grids/a%20b%231.png"]
    assert "rings & \"hoops\"" in (parsed.images[0]["alt"] or "")
    # Inline CSS and script only: nothing fetched from anywhere else.
    assert parsed.links == ["grids/a%20b%231.png"]
    assert "<link" not in page and "://" not in page


def test_the_metrics_table_shows_base_and_fine_tuned_values_and_why_one_is_missing(tmp_path):
    tuned = [MetricValue(metric="clip_i", value=0.812345, encoder="clip-b32", images=8),
             MetricValue(metric="kid", value=0.0123456, spread=0.002, encoder="clip-b32", images=8),
             MetricValue(metric="dino", unavailable="no DINO encoder")]
    base = [MetricValue(metric="clip_i", value=0.61, encoder="clip-b32", images=8),
            MetricValue(metric="fid", value=123.456789, encoder="clip-l14", images=8)]
    page = write_gallery(tmp_path, [entry(metrics=tuned, base_metrics=base)], title="t").read_text()

    assert _Page(page).rows == [
        ["metric", "base", "fine-tuned", "encoder"],
        ["clip_i", "0.61", "0.8123", "clip-b32"],
        ["kid", "—", "0.01235 ± 0.002", "clip-b32"],
        ["dino", "—", "unavailable: no DINO encoder", "—"],
        ["fid", "123.5", "—", "clip-l14"],
    ]


@pytest.mark.parametrize("grid", ["../x.png", "/abs.png", "grids/../../x.png", "C:\\x.png", "..\\x.png"])
def test_a_grid_path_that_is_absolute_or_leaves_the_gallery_folder_is_refused(tmp_path, grid):
    with pytest.raises(InvalidInput, match="gallery"):
        write_gallery(tmp_path / "gallery", [entry(grid="grids/ok.png"), entry(grid=grid)], title="t")
    assert not (tmp_path / "gallery" / "index.html").exists()


# --- the page in a real browser -----------------------------------------------------------------


@pytest.fixture
def chromium() -> str:
    return tool("chromium", "run `make tools` (Debian's chromium, apt-get)")


def two_model_gallery(folder: Path) -> Path:
    """A gallery of two models whose grids are real PNGs, each in colours of its own."""
    (folder / "grids").mkdir(parents=True)
    entries = []
    for name, (photo, sample) in {"hoops": (MAGENTA, ORANGE), "studs": (TEAL, VIOLET)}.items():
        grid = comparison_grid([("real photos", [solid(photo)] * 3), ("base model", [solid(sample)] * 4),
                                ("fine-tuned", [solid(sample)] * 4)], side=96)
        grid.save(folder / "grids" / f"{name}.png")
        entries.append(entry(model=f"shop-{name}:v1", concept=name, grid=f"grids/{name}.png",
                             metrics=[MetricValue(metric="clip_i", value=0.8, encoder="clip-b32")]))
    return write_gallery(folder, entries, title="Shop models")


def browse(chromium: str, page: Path, folder: Path) -> tuple[str, np.ndarray]:
    """The page's DOM after its scripts ran, and a 1280x1600 screenshot of it."""
    base = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--force-device-scale-factor=1", f"--user-data-dir={folder / 'profile'}",
            "--virtual-time-budget=5000"]
    shot = folder / "shot.png"
    done = subprocess.run([*base, f"--screenshot={shot}", "--window-size=1280,1600", page.as_uri()],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    dom = subprocess.run([*base, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=60)
    assert dom.returncode == 0, dom.stderr[-2000:]
    with Image.open(shot) as image:
        assert image.size == (1280, 1600)
        return dom.stdout, np.asarray(image.convert("RGB")).astype(int)


def pixels(screenshot: np.ndarray, colour: tuple[int, int, int]) -> int:
    """How many pixels of the screenshot are `colour` (within a little colour management)."""
    return int((np.abs(screenshot - np.array(colour)).max(axis=-1) <= 4).sum())


def images_loaded(dom: str) -> str:
    found = re.search(r'<body[^>]*\bdata-images-loaded="([^"]*)"', dom)
    assert found, f"the page's script did not run: {dom[:500]}"
    return found.group(1)


def test_chromium_shows_every_grid_of_the_gallery(chromium, tmp_path):
    page = two_model_gallery(tmp_path / "gallery")
    dom, shot = browse(chromium, page, tmp_path)

    assert images_loaded(dom) == "2/2"
    assert "<figcaption" not in dom
    cell = 96 * 96
    # Each colour fills 3 (photos) or 8 (samples) cells: drawn at full size, not a blank page.
    for colour, cells in ((MAGENTA, 3), (ORANGE, 8), (TEAL, 3), (VIOLET, 8)):
        assert pixels(shot, colour) >= 0.95 * cells * cell, colour
    assert pixels(shot, MISSING_CAPTION) == 0


def test_chromium_marks_a_grid_that_is_gone_as_missing(chromium, tmp_path):
    page = two_model_gallery(tmp_path / "gallery")
    (tmp_path / "gallery" / "grids" / "studs.png").unlink()
    dom, shot = browse(chromium, page, tmp_path)

    assert images_loaded(dom) == "1/2"
    assert re.findall(r'<figcaption class="missing">([^<]*)<', dom) == ["image missing: grids/studs.png"]
    assert pixels(shot, MAGENTA) >= 0.95 * 3 * 96 * 96
    assert pixels(shot, TEAL) == pixels(shot, VIOLET) == 0
    assert pixels(shot, MISSING_CAPTION) > 500, "the missing image's caption is not visible"
