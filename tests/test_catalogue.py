"""The catalogue: a synthetic shop in, the study's 19 concepts with rare single-token identifiers out."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import typer
import yaml
from PIL import Image
from typer.testing import CliRunner

from atelier.catalogue import (
    BuildReport,
    CatalogueItem,
    Concept,
    ConceptImage,
    ConceptsFile,
    allocate_identifiers,
    build_concepts,
    load_concepts,
    style_from_title,
    synth_shop,
    validate_identifiers,
)
from atelier.catalogue.build import Drop, Merge, Problem
from atelier.catalogue.identifiers import DENYLIST, RARE_ID_MIN
from atelier.catalogue.synth import SHOP
from atelier.cli import catalogue as catalogue_cli
from atelier.errors import InvalidInput, NotFound
from atelier.models.tokenizer import build_clip_tokenizer

STUDY_STYLES = {
    "hoops": {"beaded", "chunky", "charlotte", "croissant", "dome", "easy daily", "rectangle", "special", "tube"},
    "necklaces": {"chain", "charm", "pendant"},
    "rings": {"band", "bold", "dome", "signet", "slim", "stacker"},
    "studs": {None},
}


@pytest.fixture(scope="module")
def tokenizer():
    return build_clip_tokenizer()


@pytest.fixture(scope="module")
def shop(tmp_path_factory) -> Path:
    """The synthetic shop's manifest; tests only read it."""
    return synth_shop(tmp_path_factory.mktemp("shop") / "shop", seed=0)


@pytest.fixture(scope="module")
def built(shop, tokenizer, tmp_path_factory) -> tuple[ConceptsFile, BuildReport, Path]:
    out = tmp_path_factory.mktemp("built") / "concepts.yaml"
    concepts_file, report = build_concepts(shop, out, tokenizer)
    return concepts_file, report, out


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _rows(manifest: Path) -> list[dict[str, str]]:
    with manifest.open(newline="") as f:
        return list(csv.DictReader(f))


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _png(path: Path, size=(128, 128), colour=(200, 150, 50)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


# --- the synthetic shop ---------------------------------------------------------------------


def test_synth_gives_byte_identical_files_for_the_same_seed_and_different_ones_for_another(tmp_path):
    start = time.perf_counter()
    synth_shop(tmp_path / "a", seed=7)
    elapsed = time.perf_counter() - start
    synth_shop(tmp_path / "b", seed=7)
    synth_shop(tmp_path / "c", seed=8)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert a == b
    assert a != c
    assert elapsed < 2.0, f"synth_shop took {elapsed:.2f} s"


def test_synth_shop_has_the_study_classes_styles_and_photo_counts(shop):
    rows = _rows(shop)
    assert list(rows[0]) == ["image", "title", "class", "style"]
    counts: dict[tuple[str, str], int] = {}
    for row in rows:
        counts[(row["class"], row["style"])] = counts.get((row["class"], row["style"]), 0) + 1
        assert (shop.parent / row["image"]).is_file()
        assert row["title"].startswith(row["style"].title())
    assert {c for c, _ in counts} == {"hoops", "necklaces", "rings", "studs"}
    for class_name, styles in SHOP.items():
        assert {s for c, s in counts if c == class_name} == set(styles)
    for (class_name, style), n in counts.items():
        assert (1 <= n <= 2) if class_name == "studs" else (3 <= n <= 7), (class_name, style, n)
    sizes = {Image.open(shop.parent / row["image"]).size for row in rows}
    assert len(sizes) >= 3


def test_synth_refuses_a_folder_that_holds_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(InvalidInput, match="not empty"):
        synth_shop(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


# --- building the study's concepts -----------------------------------------------------------


def test_building_the_synth_shop_gives_the_study_19_concepts(built, tokenizer):
    concepts_file, report, _ = built
    concepts = concepts_file.concepts
    assert len(concepts) == 19
    assert {c.class_name for c in concepts} == {"hoops", "necklaces", "rings", "studs"}
    for class_name, styles in STUDY_STYLES.items():
        assert {c.style for c in concepts if c.class_name == class_name} == styles
    assert all(len(c.images) >= 3 for c in concepts)

    studs = [c for c in concepts if c.class_name == "studs"]
    assert len(studs) == 1 and studs[0].name == "studs" and studs[0].style is None
    assert {m.group for m in report.merges} == {f"{s}-studs" for s in SHOP["studs"]}
    assert {m.into for m in report.merges} == {"studs"}
    assert sum(m.images for m in report.merges) == len(studs[0].images)
    assert report.drops == []


def test_identifiers_are_distinct_rare_single_tokens(built, tokenizer):
    concepts = built[0].concepts
    identifiers = [c.identifier for c in concepts]
    assert len(set(identifiers)) == 19
    vocab = tokenizer.get_vocab()
    catalogue_words = {w for c in concepts for i in c.images for w in re.findall(r"[a-z]+", i.title.lower())}
    for concept in concepts:
        ident = concept.identifier
        assert tokenizer.tokenize(ident) == [ident + "</w>"]
        assert vocab[ident + "</w>"] > RARE_ID_MIN
        assert re.fullmatch(r"[a-z]{3,4}", ident)
        assert ident not in catalogue_words and ident not in DENYLIST
        assert tokenizer.tokenize(concept.instance_prompt).count(ident + "</w>") == 1


def test_prompts_have_the_study_shape(built):
    by_name = {c.name: c for c in built[0].concepts}
    beaded = by_name["beaded-hoops"]
    assert beaded.instance_prompt == f"photo of a pair of {beaded.identifier} beaded hoops"
    assert beaded.class_prompt == "photo of a pair of hoops"
    easy = by_name["easy-daily-hoops"]
    assert easy.instance_prompt == f"photo of a pair of {easy.identifier} easy daily hoops"
    signet = by_name["signet-rings"]
    assert signet.instance_prompt == f"photo of a {signet.identifier} signet ring"
    assert signet.class_prompt == "photo of a ring"
    pendant = by_name["pendant-necklaces"]
    assert pendant.class_prompt == "photo of a necklace"
    studs = by_name["studs"]
    assert studs.instance_prompt == f"photo of a pair of {studs.identifier} studs"
    assert studs.class_prompt == "photo of a pair of studs"


def test_written_file_is_what_was_returned_and_pins_each_image(built):
    concepts_file, _, out = built
    assert ConceptsFile.load(out) == concepts_file
    for concept in concepts_file.concepts:
        for image in concept.images:
            assert not Path(image.path).is_absolute()
            path = image.resolve(out.parent)
            assert hashlib.sha256(path.read_bytes()).hexdigest() == image.sha256
            assert Image.open(path).size == (image.width, image.height)


def test_building_twice_gives_the_same_file(shop, tokenizer, tmp_path):
    build_concepts(shop, tmp_path / "a" / "concepts.yaml", tokenizer)
    build_concepts(shop, tmp_path / "b" / "concepts.yaml", tokenizer)
    assert (tmp_path / "a" / "concepts.yaml").read_bytes() == (tmp_path / "b" / "concepts.yaml").read_bytes()


def test_a_folder_source_gives_the_same_concepts_as_the_manifest(shop, built, tokenizer, tmp_path):
    concepts_file, _ = build_concepts(shop.parent / "images", tmp_path / "concepts.yaml", tokenizer)
    expected = built[0]
    assert [(c.name, c.identifier, len(c.images)) for c in concepts_file.concepts] == [
        (c.name, c.identifier, len(c.images)) for c in expected.concepts
    ]
    beaded = next(c for c in concepts_file.concepts if c.name == "beaded-hoops")
    assert beaded.images[0].title == "Beaded Hoops 01"


def test_a_folder_with_descriptive_file_names_gets_titles_and_styles_from_them(tokenizer, tmp_path):
    root = tmp_path / "photos"
    for i in range(3):
        _png(root / "rings" / f"twisted_band_ring-{i}.png", colour=(10 * i, 100, 100))
    (root / "rings" / "README.txt").write_text("not a photo")
    concepts_file, report = build_concepts(root, tmp_path / "concepts.yaml", tokenizer)
    (concept,) = concepts_file.concepts
    assert (concept.name, concept.style) == ("twisted-band-rings", "twisted band")
    assert concept.images[0].title == "Twisted Band Ring 0"
    assert report.ignored == [str(root / "rings" / "README.txt")]


def test_style_is_derived_from_the_title_when_the_manifest_has_none(shop, built, tokenizer, tmp_path):
    rows = [[str(shop.parent / r["image"]), r["title"], r["class"]] for r in _rows(shop)]
    manifest = _write_csv(tmp_path / "no-style.csv", ["image", "title", "class"], rows)
    concepts_file, _ = build_concepts(manifest, tmp_path / "concepts.yaml", tokenizer)
    assert [c.name for c in concepts_file.concepts] == [c.name for c in built[0].concepts]


@pytest.mark.parametrize(
    ("title", "class_name", "style"),
    [
        ("Easy Daily Hoops, Gold", "hoops", "easy daily"),
        ("Dome Ring, 14k Gold, Size 7", "rings", "dome"),
        ("Charlotte Hoop", "hoops", "charlotte"),
        ("Hoops, Sterling Silver", "hoops", None),
        ("Gift for her", "studs", None),
    ],
)
def test_style_from_title(title, class_name, style):
    assert style_from_title(title, class_name) == style


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_yaml_and_json_manifests_are_read(shop, tokenizer, tmp_path, suffix):
    rows = [
        {"image": str(shop.parent / r["image"]), "title": r["title"], "class": r["class"], "style": r["style"]}
        for r in _rows(shop)
        if r["class"] == "necklaces"
    ]
    manifest = tmp_path / f"catalogue{suffix}"
    manifest.write_text(json.dumps(rows) if suffix == ".json" else yaml.safe_dump(rows))
    concepts_file, _ = build_concepts(manifest, tmp_path / "concepts.yaml", tokenizer)
    assert [c.name for c in concepts_file.concepts] == ["chain-necklaces", "charm-necklaces", "pendant-necklaces"]


def test_a_catch_all_too_small_even_after_merging_is_dropped_and_reported(tokenizer, tmp_path):
    rows = []
    for style, n in (("beaded", 3), ("ball", 1), ("pearl", 1)):
        for i in range(n):
            class_name = "hoops" if style == "beaded" else "studs"
            image = _png(tmp_path / f"{style}{i}.png", colour=(40 * i, len(style) * 20, 90))
            rows.append([image.name, f"{style.title()} {class_name.title()}", class_name, style])
    manifest = _write_csv(tmp_path / "catalogue.csv", ["image", "title", "class", "style"], rows)
    concepts_file, report = build_concepts(manifest, tmp_path / "concepts.yaml", tokenizer)
    assert [c.name for c in concepts_file.concepts] == ["beaded-hoops"]
    assert report.merges == [
        Merge(group="ball-studs", into="studs", images=1),
        Merge(group="pearl-studs", into="studs", images=1),
    ]
    assert report.drops == [Drop(name="studs", images=2, reason="fewer than 3 images even after merging")]
    assert "dropped studs (2 images): fewer than 3 images even after merging" in report.lines()


def test_duplicate_photos_count_once(tokenizer, tmp_path):
    rows = [[_png(tmp_path / f"{i}.png", colour=(i, 0, 0)).name, "Band Ring", "rings", ""] for i in range(3)]
    shutil.copy(tmp_path / "0.png", tmp_path / "copy.png")
    rows.append(["copy.png", "Band Ring", "rings", ""])
    manifest = _write_csv(tmp_path / "catalogue.csv", ["image", "title", "class", "style"], rows)
    concepts_file, report = build_concepts(manifest, tmp_path / "concepts.yaml", tokenizer)
    assert len(concepts_file.concepts[0].images) == 3
    assert report.duplicates == [str((tmp_path / "copy.png").resolve())]


# --- bad input: one clear error, nothing written ---------------------------------------------


def _small_catalogue(root: Path) -> Path:
    """Three valid ring photos and their manifest."""
    rows = [[_png(root / "img" / f"{i}.png", colour=(50 * i, 80, 80)).relative_to(root).as_posix(),
             "Band Ring, Gold", "rings", "band"] for i in range(3)]
    return _write_csv(root / "catalogue.csv", ["image", "title", "class", "style"], rows)


def _corrupt_image(root: Path) -> tuple[Path, list[str]]:
    manifest = _small_catalogue(root)
    (root / "img" / "1.png").write_bytes(b"this is not a png")
    return manifest, ["1.png", "not a readable image", "catalogue.csv, line 3"]


def _truncated_image(root: Path) -> tuple[Path, list[str]]:
    manifest = _small_catalogue(root)
    path = _png(root / "img" / "2.png", size=(256, 256))
    Image.effect_noise((256, 256), 64).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return manifest, ["2.png", "not a readable image"]


def _corrupt_image_in_folder(root: Path) -> tuple[Path, list[str]]:
    for i in range(3):
        _png(root / "shop" / "rings" / "band" / f"{i}.png", colour=(i, 9, 9))
    (root / "shop" / "rings" / "band" / "1.png").write_bytes(b"\x89PNG garbage")
    return root / "shop", [str(Path("rings", "band", "1.png")), "not a readable image"]


def _empty_folder(root: Path) -> tuple[Path, list[str]]:
    (root / "empty").mkdir()
    return root / "empty", ["empty", "no images found"]


def _header_only(root: Path) -> tuple[Path, list[str]]:
    return _write_csv(root / "catalogue.csv", ["image", "title", "class"], []), ["catalogue.csv", "no rows"]


def _empty_manifest(root: Path) -> tuple[Path, list[str]]:
    (root / "catalogue.yaml").write_text("")
    return root / "catalogue.yaml", ["catalogue.yaml", "no rows"]


def _nameless_class(root: Path) -> tuple[Path, list[str]]:
    manifest = _small_catalogue(root)
    text = manifest.read_text().splitlines()
    text[2] = text[2].replace(",rings,", ",★,")
    manifest.write_text("\n".join(text) + "\n")
    return manifest, ["catalogue.csv, line 3", "class", "'★'", "no letter or digit"]


def _nameless_class_folder(root: Path) -> tuple[Path, list[str]]:
    for i in range(3):
        _png(root / "shop" / "★" / "cuff" / f"{i}.png", colour=(i, 9, 9))
    _png(root / "shop" / "rings" / "0.png")
    return root / "shop", ["★", "no letter or digit"]


def _missing_image(root: Path) -> tuple[Path, list[str]]:
    manifest = _small_catalogue(root)
    (root / "img" / "2.png").unlink()
    return manifest, ["catalogue.csv, line 4", "image", "2.png", "does not exist"]


def _missing_column(root: Path) -> tuple[Path, list[str]]:
    image = _png(root / "0.png")
    manifest = _write_csv(root / "catalogue.csv", ["image", "title", "style"], [[image.name, "Band Ring", "band"]])
    return manifest, ["catalogue.csv, line 1", "missing required column(s) class"]


def _misspelt_column(root: Path) -> tuple[Path, list[str]]:
    image = _png(root / "0.png")
    manifest = _write_csv(
        root / "catalogue.csv", ["image", "title", "class", "sytle"], [[image.name, "Band Ring", "rings", "band"]]
    )
    return manifest, ["catalogue.csv, line 1", "unknown column(s) sytle"]


def _missing_source(root: Path) -> tuple[Path, list[str]]:
    return root / "nowhere.csv", ["nowhere.csv", "does not exist"]


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (_corrupt_image, InvalidInput),
        (_truncated_image, InvalidInput),
        (_corrupt_image_in_folder, InvalidInput),
        (_empty_folder, InvalidInput),
        (_header_only, InvalidInput),
        (_empty_manifest, InvalidInput),
        (_nameless_class, InvalidInput),
        (_nameless_class_folder, InvalidInput),
        (_missing_image, InvalidInput),
        (_missing_column, InvalidInput),
        (_misspelt_column, InvalidInput),
        (_missing_source, NotFound),
    ],
    ids=lambda v: getattr(v, "__name__", "").strip("_"),
)
def test_bad_input_is_one_clear_error_and_writes_nothing(make, error, tokenizer, tmp_path):
    source, expected = make(tmp_path)
    out = tmp_path / "out" / "concepts.yaml"
    with pytest.raises(error) as info:
        build_concepts(source, out, tokenizer)
    message = str(info.value)
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"
    assert not out.exists()
    assert not out.parent.exists()


def test_bad_input_leaves_an_existing_concepts_file_untouched(built, tokenizer, tmp_path):
    out = tmp_path / "concepts.yaml"
    shutil.copy(built[2], out)
    before = out.read_bytes()
    source, _ = _corrupt_image(tmp_path)
    with pytest.raises(InvalidInput):
        build_concepts(source, out, tokenizer)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["catalogue.csv", "concepts.yaml", "img"]


# --- the concepts file, as a person edits it -------------------------------------------------


def _edited(built, tmp_path, edit) -> Path:
    data = yaml.safe_load(built[2].read_text())
    edit(data)
    path = tmp_path / "concepts.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_load_of_dump_is_identity(built, tmp_path):
    concepts_file = built[0]
    assert ConceptsFile.load(concepts_file.dump(tmp_path / "again.yaml")) == concepts_file


def test_an_unknown_key_is_rejected_naming_file_and_field(built, tmp_path):
    def misspell(data):
        data["concepts"][3]["identifir"] = data["concepts"][3].pop("identifier")

    path = _edited(built, tmp_path, misspell)
    with pytest.raises(InvalidInput) as info:
        ConceptsFile.load(path)
    assert f"{path}: " in str(info.value)
    assert "concepts.3.identifir: unknown key" in str(info.value)


def test_a_duplicate_identifier_is_rejected(built, tmp_path, tokenizer):
    def duplicate(data):
        first = data["concepts"][0]["identifier"]
        second = data["concepts"][1]
        second["instance_prompt"] = second["instance_prompt"].replace(second["identifier"], first)
        second["identifier"] = first

    path = _edited(built, tmp_path, duplicate)
    with pytest.raises(InvalidInput) as info:
        load_concepts(path, tokenizer)
    first = built[0].concepts[0].identifier
    assert str(path) in str(info.value)
    assert f"duplicate identifier '{first}' in concepts 0 and 1" in str(info.value)
    # The same check holds for a file that skipped pydantic's validation.
    clash = built[0].concepts[1].model_copy(update={"identifier": first})
    unchecked = ConceptsFile.model_construct(
        version=1, tokenizer="tiny", source="hand", concepts=[built[0].concepts[0], clash]
    )
    with pytest.raises(InvalidInput, match=f"identifier '{first}' is also used by concept 'beaded-hoops'"):
        validate_identifiers(unchecked, tokenizer)


def test_a_multi_token_identifier_is_rejected_naming_the_concept(built, tmp_path, tokenizer):
    def merge_words(data):
        concept = data["concepts"][0]
        concept["instance_prompt"] = concept["instance_prompt"].replace(concept["identifier"], "beadedhoops")
        concept["identifier"] = "beadedhoops"

    path = _edited(built, tmp_path, merge_words)
    assert ConceptsFile.load(path).concepts[0].identifier == "beadedhoops"  # valid without a tokenizer
    with pytest.raises(InvalidInput) as info:
        load_concepts(path, tokenizer)
    message = str(info.value)
    assert str(path) in message and "concepts.0.identifier (beaded-hoops)" in message
    assert "'beadedhoops' is 4 tokens" in message


def test_an_identifier_missing_from_its_prompt_is_rejected(built, tmp_path):
    def drop_from_prompt(data):
        data["concepts"][2]["instance_prompt"] = "photo of a pair of hoops"

    path = _edited(built, tmp_path, drop_from_prompt)
    with pytest.raises(InvalidInput, match=r"concepts\.2: instance_prompt .* does not contain the identifier"):
        ConceptsFile.load(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("concepts: [oops\n", "not valid YAML at line"), ("- a list\n", "expected a mapping"), ("{}\n", "version")],
)
def test_a_broken_concepts_file_is_one_invalid_input(tmp_path, text, expected):
    path = tmp_path / "concepts.yaml"
    path.write_text(text)
    with pytest.raises(InvalidInput) as info:
        ConceptsFile.load(path)
    assert str(info.value).startswith(f"{path}: ") and expected in str(info.value)


def test_a_missing_concepts_file_is_not_found(tmp_path):
    with pytest.raises(NotFound):
        ConceptsFile.load(tmp_path / "absent.yaml")


def test_dump_replaces_the_file_whole_or_not_at_all(built, tmp_path, monkeypatch):
    path = built[0].dump(tmp_path / "concepts.yaml")
    before = path.read_bytes()

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    changed = built[0].model_copy(update={"source": "elsewhere"})
    with pytest.raises(OSError):
        changed.dump(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["concepts.yaml"]


def test_every_model_forbids_unknown_keys_and_describes_every_field():
    for model in (CatalogueItem, ConceptImage, Concept, ConceptsFile, BuildReport, Merge, Drop, Problem):
        assert model.model_config.get("extra") == "forbid", model.__name__
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name}"


# --- identifiers -----------------------------------------------------------------------------


def test_allocation_is_deterministic_and_skips_catalogue_words(tokenizer):
    first = allocate_identifiers(5, tokenizer, avoid=set())
    assert allocate_identifiers(5, tokenizer, avoid=set()) == first
    assert len(set(first)) == 5
    avoided = allocate_identifiers(5, tokenizer, avoid={first[0], first[2]})
    assert first[0] not in avoided and first[2] not in avoided
    assert avoided[:3] == [first[1], first[3], first[4]]


# --- the CLI ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli():
    app = typer.Typer()
    app.add_typer(catalogue_cli.app, name="catalogue")
    return lambda *args: CliRunner().invoke(app, ["catalogue", *map(str, args)])


def test_cli_synth_then_build(cli, tmp_path):
    result = cli("synth", tmp_path / "shop", "--seed", 0)
    assert result.exit_code == 0, result.output
    assert str(tmp_path / "shop" / "catalogue.csv") in result.output.replace("\n", "")
    assert "hoops:" in result.output and "studs:" in result.output

    out = tmp_path / "concepts.yaml"
    result = cli("build", tmp_path / "shop" / "catalogue.csv", "--out", out)
    assert result.exit_code == 0, result.output
    concepts_file = ConceptsFile.load(out)
    assert len(concepts_file.concepts) == 19
    assert "19 concepts" in result.output
    assert "merged pearl-studs (1 image) into studs" in result.output
    for concept in concepts_file.concepts:
        assert concept.identifier in result.output


def test_cli_leaves_errors_to_the_main_entry_point(cli, tmp_path):
    result = cli("build", tmp_path / "missing.csv", "--out", tmp_path / "concepts.yaml")
    assert isinstance(result.exception, NotFound)
    assert not (tmp_path / "concepts.yaml").exists()
