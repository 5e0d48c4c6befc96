"""A real shop's catalogue, not the synthetic one: its own classes, accented styles, sidecar titles,
photos in every PIL mode, and broken files, all reported in one pass."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from atelier.catalogue import (
    CatalogueInvalid,
    ConceptsFile,
    build_concepts,
    class_phrase,
    class_prompt,
    instance_prompt,
    open_rgb,
    singular,
)
from atelier.cli.main import main
from atelier.models.tokenizer import build_clip_tokenizer
from atelier.names import slug

WHITE, RED, BLUE = (255, 255, 255), (255, 0, 0), (0, 0, 255)


@pytest.fixture(scope="module")
def tokenizer():
    return build_clip_tokenizer()


def _save(image: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def _halves(size=(1024, 512), left=RED, right=BLUE) -> Image.Image:
    """Left half one colour, right half another: shows which way up an image is."""
    image = Image.new("RGB", size, right)
    image.paste(left, (0, 0, size[0] // 2, size[1]))
    return image


def _exif_rotated(path: Path) -> Path:
    """Stored 1024x512 red|blue with EXIF orientation 6 (rotate 90° clockwise to view): upright it is
    512x1024, red on top."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(_halves(), path, exif=exif, quality=95)


def _sixteen_bit(path: Path, value=32768, size=(512, 512)) -> Path:
    return _save(Image.fromarray(np.full(size[::-1], value, dtype=np.uint16)), path)


def _palette(path: Path, colour=(10, 200, 30), size=(512, 512)) -> Path:
    return _save(Image.new("RGB", size, colour).convert("P", palette=Image.Palette.ADAPTIVE, colors=4), path)


def _palette_transparent(path: Path, size=(512, 512)) -> Path:
    """Palette index 0 (black) transparent around an opaque index-1 blue square, as GIF-era exports are."""
    image = Image.new("P", size, 0)
    image.putpalette([0, 0, 0, 0, 0, 255] + [0, 0, 0] * 254)
    image.paste(1, (size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4))
    return _save(image, path, transparency=0)


def _rgba(path: Path, size=(512, 512)) -> Path:
    """Transparent background (its hidden colour is black), an opaque blue square in the middle."""
    image = Image.new("RGBA", size, (0, 0, 0, 0))
    image.paste((0, 0, 255, 255), (size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4))
    return _save(image, path)


# mode -> (writer, expected RGB of the centre pixel, expected RGB of the corner pixel)
MODES = {
    "cmyk": (lambda p: _save(Image.new("CMYK", (512, 512), (0, 255, 255, 0)), p.with_suffix(".jpg")), RED, RED),
    "palette": (_palette, (10, 200, 30), (10, 200, 30)),
    "palette-transparent": (_palette_transparent, BLUE, WHITE),
    "rgba": (_rgba, BLUE, WHITE),
    "sixteen-bit": (_sixteen_bit, (128, 128, 128), (128, 128, 128)),
    "greyscale": (lambda p: _save(Image.new("L", (512, 512), 100), p), (100, 100, 100), (100, 100, 100)),
}


def _close(actual, expected, tolerance=6) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


def messy_shop(root: Path) -> tuple[Path, dict[str, str]]:
    """A shop export as it arrives: a class the synthetic shop lacks, an accented style, titles in a
    sidecar, photos in every mode, and four bad files. Returns the folder and {bad file: problem}."""
    shop = root / "shop"
    cuffs = shop / "bracelets" / "cuff"
    for i, name in enumerate(["a.jpg", "b.jpg", "c.jpg"]):
        _save(_halves(size=(600, 600), left=(200, 150, 40 * i), right=WHITE), cuffs / name, quality=95)
    with (cuffs / "titles.csv").open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(
            [["file", "title"], ["a.jpg", "Cuff Bracelet, Gold"], ["b.jpg", "Cuff Bracelet, Silver"],
             ["c.jpg", "Cuff Bracelet, Rose Gold"]]
        )
    for i in range(3):
        _save(Image.new("RGB", (512, 512), (240, 200, 60 + i)), shop / "studs" / "étoile" / f"IMG_000{i + 1}.png")
    band = shop / "rings" / "band"
    for mode, (write, _, _) in MODES.items():
        write(band / f"{mode}.png")
    _exif_rotated(band / "rotated.jpg")
    _save(Image.new("RGB", (24, 24), (1, 2, 3)), shop / "rings" / "tiny.png")
    (band / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (band / "empty.png").write_bytes(b"")
    (band / "unreadable.png").symlink_to(root / "gone.png")
    (shop / "notes.txt").write_text("shot on the balcony")
    bad = {
        str(shop / "rings" / "tiny.png"): "24x24 px is too small for 512 px training",
        str(band / "corrupt.png"): "not a readable image",
        str(band / "empty.png"): "the file is empty",
        str(band / "unreadable.png"): "cannot read the file",
    }
    return shop, bad


# --- every problem in one pass ----------------------------------------------------------------


def test_a_messy_catalogue_reports_every_problem_in_one_pass_and_writes_nothing(tokenizer, tmp_path):
    shop, bad = messy_shop(tmp_path)
    out = tmp_path / "out" / "concepts.yaml"
    with pytest.raises(CatalogueInvalid) as info:
        build_concepts(shop, out, tokenizer)
    problems = {p.file: p for p in info.value.problems}
    assert set(problems) == set(bad)
    for file, text in bad.items():
        assert text in problems[file].problem
        assert problems[file].fix
    assert "4 problems" in str(info.value) and "--skip-invalid" in str(info.value)
    assert not out.parent.exists()


def test_skip_invalid_builds_from_the_valid_photos_and_lists_what_it_left_out(tokenizer, tmp_path):
    shop, bad = messy_shop(tmp_path)
    concepts_file, report = build_concepts(shop, tmp_path / "concepts.yaml", tokenizer, skip_invalid=True)
    assert ConceptsFile.load(tmp_path / "concepts.yaml") == concepts_file
    by_name = {c.name: c for c in concepts_file.concepts}
    assert set(by_name) == {"cuff-bracelets", "band-rings", "etoile-studs"}
    assert {p.file for p in report.skipped} == set(bad)
    assert report.images == 3 + 3 + len(MODES) + 1
    lines = report.lines()
    for file in bad:
        assert any(line.startswith(f"left out {file}: ") for line in lines), lines


def test_any_class_noun_works_with_its_prompt_derived_from_it(tokenizer, tmp_path):
    shop, _ = messy_shop(tmp_path)
    concepts_file, _ = build_concepts(shop, tmp_path / "concepts.yaml", tokenizer, skip_invalid=True)
    cuff = next(c for c in concepts_file.concepts if c.class_name == "bracelets")
    assert cuff.class_prompt == "photo of a bracelet"
    assert cuff.instance_prompt == f"photo of a {cuff.identifier} cuff bracelet"


def test_an_accented_style_keeps_its_letters_in_the_name_and_the_prompt(tokenizer, tmp_path):
    shop, _ = messy_shop(tmp_path)
    concepts_file, _ = build_concepts(shop, tmp_path / "concepts.yaml", tokenizer, skip_invalid=True)
    etoile = next(c for c in concepts_file.concepts if c.class_name == "studs")
    assert (etoile.name, etoile.style) == ("etoile-studs", "étoile")
    assert etoile.instance_prompt == f"photo of a pair of {etoile.identifier} étoile studs"


def test_titles_come_from_a_sidecar_and_the_report_says_where_from(tokenizer, tmp_path):
    shop, _ = messy_shop(tmp_path)
    concepts_file, report = build_concepts(shop, tmp_path / "concepts.yaml", tokenizer, skip_invalid=True)
    titles = {Path(i.path).name: i.title for c in concepts_file.concepts for i in c.images}
    assert titles["a.jpg"] == "Cuff Bracelet, Gold"
    assert titles["c.jpg"] == "Cuff Bracelet, Rose Gold"
    assert titles["IMG_0001.png"] == "Img 0001"
    assert report.titles == {"titles.csv": 3, "file names": 3 + len(MODES) + 1}
    assert f"titles: 3 from titles.csv, {3 + len(MODES) + 1} from file names" in report.lines()
    assert not any("titles.csv" in p for p in report.ignored)


def test_a_titles_json_sidecar_is_read_and_a_title_for_a_missing_photo_is_a_problem(tokenizer, tmp_path):
    folder = tmp_path / "shop" / "anklets"
    for i in range(3):
        _save(Image.new("RGB", (512, 512), (i, 90, 90)), folder / f"{i}.png")
    (folder / "titles.json").write_text(json.dumps({"0.png": "Chain Anklet", "1.png": "Bead Anklet"}))
    concepts_file, report = build_concepts(tmp_path / "shop", tmp_path / "concepts.yaml", tokenizer)
    titles = sorted(i.title for i in concepts_file.concepts[0].images)
    assert titles == ["Anklets 2", "Bead Anklet", "Chain Anklet"]
    assert report.titles == {"titles.json": 2, "folder names": 1}
    assert concepts_file.concepts[0].class_prompt == "photo of an anklet"

    (folder / "titles.json").write_text(json.dumps({"0.png": "Chain Anklet", "9.png": "Gone"}))
    with pytest.raises(CatalogueInvalid) as info:
        build_concepts(tmp_path / "shop", tmp_path / "concepts.yaml", tokenizer)
    assert "'9.png', which is not an image of this folder" in str(info.value)


def test_a_manifest_takes_any_class_and_reports_every_bad_row_at_once(tokenizer, tmp_path):
    images = [_save(Image.new("RGB", (512, 512), (i, 60, 60)), tmp_path / f"{i}.png") for i in range(4)]
    (tmp_path / "3.png").write_bytes(b"garbage")
    rows = [["image", "title", "class"], ["0.png", "Chain Bracelet", "Bracelets"], ["1.png", "", "bracelets"],
            ["2.png", "Chain Bracelet", "bracelets"], ["3.png", "Chain Bracelet", "bracelets"],
            ["9.png", "Chain Bracelet", "bracelets"]]
    with (tmp_path / "catalogue.csv").open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    with pytest.raises(CatalogueInvalid) as info:
        build_concepts(tmp_path / "catalogue.csv", tmp_path / "concepts.yaml", tokenizer)
    problems = {p.file: p.problem for p in info.value.problems}
    manifest = tmp_path / "catalogue.csv"
    assert problems == {
        f"{manifest}, line 3": "title: missing or empty",
        f"{images[3]} ({manifest}, line 5)": "not a readable image: not a known image format",
        f"{manifest}, line 6": f"image: file does not exist: {tmp_path / '9.png'}",
    }
    _, report = build_concepts(manifest, tmp_path / "concepts.yaml", tokenizer, skip_invalid=True, min_images=2)
    concepts_file = ConceptsFile.load(tmp_path / "concepts.yaml")
    assert [(c.name, c.class_prompt) for c in concepts_file.concepts] == [("chain-bracelets", "photo of a bracelet")]
    assert report.titles == {"manifest": 2}


def test_the_cli_prints_one_message_and_a_table_of_every_problem_without_a_traceback(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("COLUMNS", "400")
    shop, bad = messy_shop(tmp_path)
    out = tmp_path / "concepts.yaml"
    code = main(["catalogue", "build", str(shop), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 2
    assert not out.exists()
    assert "Traceback" not in captured.err + captured.out
    assert "error:" in captured.err and "4 problems in the catalogue, nothing was written" in captured.err
    for file, problem in bad.items():
        row = next(line for line in captured.err.splitlines() if f" {file} " in line)
        assert problem in row

    code = main(["catalogue", "build", str(shop), "--out", str(out), "--skip-invalid"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "left out under --skip-invalid (4)" in captured.out
    assert all(file in captured.out for file in bad)
    assert out.exists()


def test_cli_class_phrase_overrides_the_derived_phrase(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    for i in range(3):
        _save(Image.new("RGB", (512, 512), (i, 9, 9)), tmp_path / "shop" / "bangles" / f"{i}.png")
    out = tmp_path / "concepts.yaml"
    code = main(["catalogue", "build", str(tmp_path / "shop"), "--out", str(out),
                 "--class-phrase", "bangles=a set of bangles"])
    assert code == 0, capsys.readouterr().err
    concept = ConceptsFile.load(out).concepts[0]
    assert concept.class_prompt == "photo of a set of bangles"
    assert concept.instance_prompt == f"photo of a set of {concept.identifier} bangles"


# --- class phrases and names ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("noun", "one"),
    [("bracelets", "bracelet"), ("watches", "watch"), ("brooches", "brooch"), ("bodies", "body"),
     ("boxes", "box"), ("chokers", "choker"), ("jewelry", "jewelry"), ("glass", "glass")],
)
def test_singular(noun, one):
    assert singular(noun) == one


@pytest.mark.parametrize(
    ("class_name", "phrase"),
    [("bracelets", "a bracelet"), ("anklets", "an anklet"), ("earrings", "a pair of earrings"),
     ("hoops", "a pair of hoops"), ("rings", "a ring"), ("ear-cuffs", "a pair of ear cuffs"),
     ("hair-clips", "a hair clip")],
)
def test_class_phrase_is_derived_from_the_noun_with_a_small_table_of_pairs(class_name, phrase):
    assert class_phrase(class_name) == phrase


def test_class_phrase_override_wins_and_the_identifier_goes_after_the_determiner():
    phrases = {"ear-cuffs": "an ear cuff"}
    assert class_phrase("ear-cuffs", phrases) == "an ear cuff"
    assert class_prompt("ear-cuffs", "an ear cuff") == "photo of an ear cuff"
    assert instance_prompt("ear-cuffs", "sks", "beaded") == "photo of a pair of sks beaded ear cuffs"
    assert instance_prompt("hoops", "sks", "beaded") == "photo of a pair of sks beaded hoops"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("étoile", "etoile"), ("Crème Brûlée", "creme-brulee"), ("Straße", "strasse"), ("Ørsted", "orsted"),
     ("ﬁne", "fine"), ("Beaded Hoops_2", "beaded-hoops-2"), ("星", "")],
)
def test_slug_transliterates_rather_than_dropping_letters(text, expected):
    assert slug(text) == expected


def test_styles_that_slug_alike_get_unique_recognisable_names(tokenizer, tmp_path):
    for style in ("étoile", "etoile", "星"):
        for i in range(3):
            colour = (len(style.encode()), i, 7)
            _save(Image.new("RGB", (512, 512), colour), tmp_path / "shop" / "studs" / style / f"{i}.png")
    concepts_file, _ = build_concepts(tmp_path / "shop", tmp_path / "concepts.yaml", tokenizer)
    names = {c.style: c.name for c in concepts_file.concepts}
    assert names == {"etoile": "etoile-studs", "étoile": "etoile-studs-2", "星": "style-studs"}


# --- photo size against the training resolution ----------------------------------------------


def test_a_photo_smaller_than_the_resolution_is_warned_about_and_under_a_quarter_refused(tokenizer, tmp_path):
    for i in range(3):
        _save(Image.new("RGB", (24, 24), (i, 50, 50)), tmp_path / "shop" / "rings" / f"{i}.png")
    concepts_file, report = build_concepts(tmp_path / "shop", tmp_path / "c.yaml", tokenizer, resolution=64)
    assert len(concepts_file.concepts[0].images) == 3
    assert len(report.warnings) == 3
    assert "24x24 px is smaller than the 64 px training resolution" in report.warnings[0].problem
    assert "upscaled 2.7x" in report.warnings[0].fix

    with pytest.raises(CatalogueInvalid) as info:
        build_concepts(tmp_path / "shop", tmp_path / "c.yaml", tokenizer, resolution=512)
    assert len(info.value.problems) == 3
    assert "under 128 px on the short side" in info.value.problems[0].problem


def test_a_large_photo_is_fine(tokenizer, tmp_path):
    _save(Image.new("RGB", (4096, 3072), (9, 9, 9)), tmp_path / "shop" / "rings" / "big.jpg")
    for i in range(2):
        _save(Image.new("RGB", (512, 512), (i, 50, 50)), tmp_path / "shop" / "rings" / f"{i}.png")
    concepts_file, report = build_concepts(tmp_path / "shop", tmp_path / "c.yaml", tokenizer)
    assert report.warnings == [] and report.skipped == []
    assert (4096, 3072) in {(i.width, i.height) for i in concepts_file.concepts[0].images}


# --- pixels: what training sees --------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_every_image_mode_becomes_correct_rgb(mode, tmp_path):
    write, centre, corner = MODES[mode]
    path = write(tmp_path / f"{mode}.png")
    image = open_rgb(path)
    assert image.mode == "RGB" and image.size == (512, 512)
    assert _close(image.getpixel((256, 256)), centre), image.getpixel((256, 256))
    assert _close(image.getpixel((0, 0)), corner), image.getpixel((0, 0))


def test_exif_orientation_is_applied(tmp_path):
    image = open_rgb(_exif_rotated(tmp_path / "rotated.jpg"))
    assert image.size == (512, 1024)
    assert _close(image.getpixel((256, 100)), RED, 20)
    assert _close(image.getpixel((256, 900)), BLUE, 20)


def test_the_concepts_file_records_the_upright_size(tokenizer, tmp_path):
    shop, _ = messy_shop(tmp_path)
    concepts_file, _ = build_concepts(shop, tmp_path / "concepts.yaml", tokenizer, skip_invalid=True)
    sizes = {Path(i.path).name: (i.width, i.height) for c in concepts_file.concepts for i in c.images}
    assert sizes["rotated.jpg"] == (512, 1024)


def _training_pixels(path: Path, resolution: int) -> np.ndarray:
    """The training job's own loader, as an HxWx3 uint8-like array in 0..255."""
    pytest.importorskip("ray.train")
    from atelier_jobs.dreambooth import _load_pixels

    tensor = _load_pixels(path, resolution, center_crop=True, seed=0)
    return ((tensor.permute(1, 2, 0).numpy() + 1.0) * 127.5).round()


def test_a_random_crop_is_the_same_in_every_process_for_a_seed(tmp_path):
    """DDP workers and a resumed run must crop an image alike: the crop is drawn from the seed
    and the file name, not from the process's global random state."""
    pytest.importorskip("ray.train")
    from atelier_jobs.dreambooth import _load_pixels

    path = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 256, 3), dtype=np.uint8)).save(path)
    code = ("import sys, random; from pathlib import Path; from atelier_jobs.dreambooth import _load_pixels; "
            "random.seed(int(sys.argv[2])); "
            "print(_load_pixels(Path(sys.argv[1]), 64, False, 7).sum(dim=(0, 1)).argmax().item())")
    # A wide image's random crops differ by where they sit: the column sums locate each one.
    here = [_load_pixels(path, 64, False, seed).sum().item() for seed in (7, 7, 8)]
    assert here[0] == here[1] and here[0] != here[2]
    import subprocess
    import sys

    others = {subprocess.run([sys.executable, "-c", code, str(path), str(global_seed)],
                             capture_output=True, text=True, check=True).stdout for global_seed in (1, 2)}
    assert len(others) == 1


@pytest.mark.parametrize("mode", MODES)
def test_training_loads_every_mode_as_correct_rgb(mode, tmp_path):
    write, centre, corner = MODES[mode]
    pixels = _training_pixels(write(tmp_path / f"{mode}.png"), 64)
    assert pixels.shape == (64, 64, 3)
    assert _close(pixels[32, 32], centre), pixels[32, 32]
    assert _close(pixels[0, 0], corner), pixels[0, 0]


def test_training_applies_exif_orientation(tmp_path):
    pixels = _training_pixels(_exif_rotated(tmp_path / "rotated.jpg"), 64)
    # Upright the photo is tall, red above blue; the square centre crop keeps the middle of each half.
    assert _close(pixels[4, 32], RED, 20) and _close(pixels[60, 32], BLUE, 20), (pixels[4, 32], pixels[60, 32])
