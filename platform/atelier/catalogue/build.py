"""Build a concepts file from a product catalogue: read, verify, group into concepts, name them."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import yaml
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from atelier.catalogue.identifiers import allocate_identifiers, validate_identifiers, words_of
from atelier.catalogue.pixels import open_rgb
from atelier.catalogue.schema import (
    PROMPT_PREFIX,
    CatalogueItem,
    Concept,
    ConceptImage,
    ConceptsFile,
    class_phrase,
    class_prompt,
    instance_prompt,
    singular,
)
from atelier.errors import InvalidInput, NotFound, describe_validation_error
from atelier.names import slug

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
REQUIRED_COLUMNS = ("image", "title", "class")
OPTIONAL_COLUMNS = ("style",)
TITLE_SIDECARS = ("titles.csv", "titles.json")
# Below a quarter of the training resolution on its short side a photo is upscaled over 4x: at
# least 15 of every 16 training pixels are interpolated, so the concept would learn blur. Between
# that and the resolution the photo still trains, with a warning; larger photos are downscaled.
MIN_SCALE = 4
_SHOWN = 5  # warnings listed one by one; the rest are counted


class Problem(BaseModel):
    """One thing wrong with one file of a catalogue, and what to do about it."""

    model_config = ConfigDict(extra="forbid")

    file: str = Field(description="The file (and manifest row) the problem is about.")
    problem: str = Field(description='What is wrong, e.g. "not a readable image".')
    fix: str = Field(description="What to do about it.")


class CatalogueInvalid(InvalidInput):
    """The catalogue has problems; `problems` lists every one of them, found in one pass."""

    def __init__(self, problems: list[Problem], source: str):
        self.problems = problems
        if len(problems) == 1:
            super().__init__(problems[0].problem, where=problems[0].file, hint=problems[0].fix)
        else:
            super().__init__(
                f"{len(problems)} problems in the catalogue, nothing was written",
                where=source,
                hint="fix each one as listed, or pass --skip-invalid to build from the rest",
            )


class Merge(BaseModel):
    """A style group too small to train alone, folded into its class's catch-all instance."""

    model_config = ConfigDict(extra="forbid")

    group: str = Field(description='The small group, e.g. "pearl-studs".')
    into: str = Field(description='The catch-all concept it joined, e.g. "studs".')
    images: int = Field(description="Images the group brought.")


class Drop(BaseModel):
    """A catch-all instance left out because even merged it has too few images."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description='The concept that was not created, e.g. "studs".')
    images: int = Field(description="Images it would have had.")
    reason: str = Field(description="Why it was left out.")


class BuildReport(BaseModel):
    """What `build_concepts` did besides the obvious: merges, drops, skipped files."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="The catalogue folder or manifest read.")
    out_path: str = Field(description="The concepts file written.")
    images: int = Field(description="Images read and verified.")
    merges: list[Merge] = Field(default_factory=list, description="Small groups merged into a catch-all.")
    drops: list[Drop] = Field(default_factory=list, description="Catch-alls dropped for too few images.")
    duplicates: list[str] = Field(
        default_factory=list, description="Images left out because an earlier one has the same bytes."
    )
    ignored: list[str] = Field(
        default_factory=list, description="Files of a source folder that are not images by their suffix."
    )
    resolution: int = Field(description="Training resolution the photos' sizes were checked against.")
    titles: dict[str, int] = Field(
        default_factory=dict,
        description='Where the titles came from and how many: "manifest", "titles.csv", "titles.json", '
        '"file names" or "folder names" (photos named 0001.jpg).',
    )
    warnings: list[Problem] = Field(
        default_factory=list, description="Photos used despite a concern, e.g. smaller than the resolution."
    )
    skipped: list[Problem] = Field(
        default_factory=list, description="Problems left out under --skip-invalid (the files were not used)."
    )

    def lines(self, skipped: bool = True) -> list[str]:
        """One human-readable line per merge, drop, duplicate, ignored file, warning and (unless
        `skipped` is False, for a caller that shows them as a table) file left out."""
        sources = ", ".join(f"{n} from {where}" for where, n in self.titles.items())
        out = [f"titles: {sources}"] if sources else []
        out += [f"merged {m.group} ({_images(m.images)}) into {m.into}" for m in self.merges]
        out += [f"dropped {d.name} ({_images(d.images)}): {d.reason}" for d in self.drops]
        out += [f"skipped duplicate image {p}" for p in self.duplicates]
        out += [f"ignored non-image file {p}" for p in self.ignored]
        shown = self.warnings if len(self.warnings) <= _SHOWN else self.warnings[: _SHOWN - 1]
        out += [f"warning: {w.file}: {w.problem} ({w.fix})" for w in shown]
        if len(shown) < len(self.warnings):
            out.append(f"warning: and {len(self.warnings) - len(shown)} more (all in the report's warnings)")
        out += [f"left out {p.file}: {p.problem}" for p in (self.skipped if skipped else [])]
        return out


def _images(n: int) -> str:
    return f"{n} image" if n == 1 else f"{n} images"


@dataclass
class _Row:
    item: CatalogueItem
    path: Path  # absolute
    where: str  # the manifest row or file it came from, for error messages
    title_source: str  # "manifest", "titles.csv", "file names", ...
    file: str  # the image as the user named it (not resolved), and its manifest row, for problems


@dataclass
class _Photo:
    row: _Row
    style: str | None
    sha256: str
    width: int
    height: int


def build_concepts(
    source: Path | str,
    out_path: Path | str,
    tokenizer,
    tokenizer_name: str = "tiny",
    min_images: int = 3,
    resolution: int = 512,
    class_phrases: dict[str, str] | None = None,
    skip_invalid: bool = False,
) -> tuple[ConceptsFile, BuildReport]:
    """Read a catalogue (a <class>/<style>/ folder, or a CSV/YAML/JSON manifest) and write its concepts.

    Every problem of every file is collected in one pass and raised together (CatalogueInvalid)
    before anything is written; with `skip_invalid` the files with problems are left out and listed
    in the report instead. The file itself is written atomically, so `out_path` is either the
    complete new file or untouched. `class_phrases` overrides a class's prompt phrase, e.g.
    {"bangles": "a bangle"}.
    """
    source, out_path = Path(source), Path(out_path)
    if min_images < 1:
        raise InvalidInput(f"must be at least 1, got {min_images}", where="min_images")
    if resolution < 8:
        raise InvalidInput(f"must be at least 8, got {resolution}", where="resolution")
    phrases = dict(class_phrases or {})
    for name, phrase in phrases.items():
        if not phrase.strip():
            raise InvalidInput(f"empty phrase for class {name!r}", where="class_phrases")
    if not source.exists():
        raise NotFound("catalogue source does not exist", where=str(source))
    ignored: list[str] = []
    problems: list[Problem] = []
    rows = _read_folder(source, ignored, problems) if source.is_dir() else _read_manifest(source, problems)

    photos: list[_Photo] = []
    duplicates: list[str] = []
    warnings: list[Problem] = []
    seen: set[str] = set()
    for row in rows:
        photo = _verify(row, resolution, problems, warnings)
        if photo is None:
            continue
        if photo.sha256 in seen:
            duplicates.append(str(row.path))
            continue
        seen.add(photo.sha256)
        photos.append(photo)
    if problems and not skip_invalid:
        raise CatalogueInvalid(problems, str(source))

    groups, merges, drops = _group(photos, min_images)
    if not groups:
        raise InvalidInput(
            f"no concept has at least {min_images} images ({len(photos)} valid images in all)",
            where=str(source),
            hint="add photos, or lower --min-images",
        )

    phrase_of = {c: class_phrase(c, phrases) for (c, _) in groups}
    avoid = words_of([p.row.item.title for p in photos])
    avoid |= words_of([s for (_, s) in groups if s] + list(phrase_of.values()) + [PROMPT_PREFIX])
    identifiers = allocate_identifiers(len(groups), tokenizer, avoid)
    names = _concept_names(list(groups))

    out_dir = out_path.resolve().parent
    concepts = []
    for ((class_name, style), members), identifier, name in zip(groups.items(), identifiers, names, strict=True):
        concepts.append(
            Concept(
                name=name,
                class_name=class_name,
                style=style,
                identifier=identifier,
                instance_prompt=instance_prompt(class_name, identifier, style, phrase_of[class_name]),
                class_prompt=class_prompt(class_name, phrase_of[class_name]),
                images=[
                    ConceptImage(
                        path=_relative(p.row.path, out_dir),
                        title=p.row.item.title,
                        sha256=p.sha256,
                        width=p.width,
                        height=p.height,
                    )
                    for p in members
                ],
            )
        )
    concepts_file = ConceptsFile(version=1, tokenizer=tokenizer_name, source=str(source), concepts=concepts)
    validate_identifiers(concepts_file, tokenizer)
    concepts_file.dump(out_path)
    titles: dict[str, int] = {}
    for photo in photos:
        titles[photo.row.title_source] = titles.get(photo.row.title_source, 0) + 1
    report = BuildReport(
        source=str(source),
        out_path=str(out_path),
        images=len(photos),
        merges=merges,
        drops=drops,
        duplicates=duplicates,
        ignored=ignored,
        resolution=resolution,
        titles=titles,
        warnings=warnings,
        skipped=problems,
    )
    return concepts_file, report


def load_concepts(path: Path | str, tokenizer) -> ConceptsFile:
    """Load a (possibly hand-edited) concepts file and check its identifiers against the tokenizer."""
    concepts_file = ConceptsFile.load(path)
    try:
        validate_identifiers(concepts_file, tokenizer)
    except InvalidInput as e:
        raise InvalidInput(e.message, where=f"{path}: {e.where}", hint=e.hint) from None
    return concepts_file


def style_from_title(title: str, class_name: str) -> str | None:
    """The words before the class noun in the title's first part: "Easy Daily Hoops, Gold" -> "easy daily"."""
    words = re.findall(r"[^\W_]+(?:'[^\W_]+)*", title.split(",")[0].lower())
    noun = class_name.split("-")[-1]
    nouns = {noun, singular(noun)}
    for i, word in enumerate(words):
        if word in nouns:
            return normalise_style(" ".join(words[:i]))
    return None


def normalise_style(style: str | None) -> str | None:
    """Lower case, '-' and '_' as spaces, single spaces; None when no letter or digit is left.

    Letters of any script are kept ("étoile" stays "étoile" in the prompt); only names are ASCII."""
    if style is None:
        return None
    text = " ".join(re.sub(r"[-_]+", " ", style).lower().split())
    return text if re.search(r"[^\W_]", text) else None


def _concept_name(class_name: str, style: str | None) -> str:
    if style is None:
        return class_name
    return f"{slug(style, fallback='style')}-{class_name}"


def _concept_names(keys: list[tuple[str, str | None]]) -> list[str]:
    """Concept names, made unique: "étoile" and "etoile" both slug to etoile-studs, the second
    becomes etoile-studs-2 (the style field keeps the exact text)."""
    names: list[str] = []
    taken: set[str] = set()
    for class_name, style in keys:
        base = name = _concept_name(class_name, style)
        n = 2
        while name in taken:
            name, n = f"{base}-{n}", n + 1
        taken.add(name)
        names.append(name)
    return names


def _relative(path: Path, out_dir: Path) -> str:
    try:
        return Path(os.path.relpath(path, out_dir)).as_posix()
    except ValueError:  # another drive on Windows: no relative path exists
        return path.as_posix()


def _humanise(stem: str) -> str:
    return " ".join(re.sub(r"[-_]+", " ", stem).split()).title()


def _class_of(value: str) -> str:
    """The class name of a folder or manifest value: the shop's own noun as a slug, "" if none."""
    return slug((value or "").strip())


def _make_item(image: str, title: str, class_name: str, style: str | None, where: str) -> CatalogueItem:
    try:
        return CatalogueItem(image=image, title=title, class_name=class_name, style=normalise_style(style))
    except ValidationError as e:
        raise InvalidInput(describe_validation_error(e), where=where) from None


def _read_folder(root: Path, ignored: list[str], problems: list[Problem]) -> list[_Row]:
    rows = []
    sidecars: dict[Path, tuple[dict[str, str], str] | None] = {}
    images_in: dict[Path, set[str]] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or path.is_dir():
            continue
        if path.name.lower() in TITLE_SIDECARS:
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            ignored.append(str(path))
            continue
        if len(rel.parts) == 1 or len(rel.parts) > 3:
            problems.append(Problem(
                file=str(path),
                problem="image is not in a <class>/<style>/ or <class>/ folder",
                fix="move it into a <class>/ or <class>/<style>/ folder of the catalogue",
            ))
            continue
        class_name = _class_of(rel.parts[0])
        if not class_name:
            folder = str(root / rel.parts[0])
            if not any(p.file == folder for p in problems):  # one line for the folder, not one per photo
                problems.append(Problem(
                    file=folder,
                    problem=f"class folder {rel.parts[0]!r} has no letter or digit that can make a name",
                    fix="rename the folder with Latin letters, e.g. bracelets/",
                ))
            continue
        style = rel.parts[1] if len(rel.parts) == 3 else None
        if path.parent not in sidecars:
            sidecars[path.parent] = _sidecar_titles(path.parent, problems)
        images_in.setdefault(path.parent, set()).add(path.name)
        sidecar = sidecars[path.parent]
        if sidecar and path.name in sidecar[0]:
            title, title_source = sidecar[0][path.name], sidecar[1]
        else:
            title, title_source = _humanise(path.stem), "file names"
            if not re.search(r"[^\W\d_]", title):
                # Photos named 01.png carry no title; the folders say what they show.
                title = " ".join(filter(None, [_humanise(style or ""), _humanise(class_name), title]))
                title_source = "folder names"
        try:
            item = _make_item(str(rel), title, class_name, style, str(path))
        except InvalidInput as e:
            problems.append(Problem(file=str(path), problem=e.message, fix="rename the file or folder"))
            continue
        rows.append(_Row(item, path.resolve(), str(path), title_source, str(path)))
    for image_dir, found in sidecars.items():
        if found is None:
            continue
        titles, sidecar_name = found
        for name in sorted(set(titles) - images_in[image_dir]):
            problems.append(Problem(
                file=str(image_dir / sidecar_name),
                problem=f"has a title for {name!r}, which is not an image of this folder",
                fix="correct the file name in the sidecar, or remove the line",
            ))
    if not rows and not problems:
        raise InvalidInput(
            "no images found (expected <class>/<style>/<image> files, e.g. rings/band/1.jpg)",
            where=str(root),
        )
    return rows


def _sidecar_titles(folder: Path, problems: list[Problem]) -> tuple[dict[str, str], str] | None:
    """Titles from a titles.csv (columns file,title) or titles.json ({"file": "title"}) in `folder`."""
    found = [folder / name for name in TITLE_SIDECARS if (folder / name).is_file()]
    if not found:
        return None
    path = found[0]
    if len(found) > 1:
        problems.append(Problem(
            file=str(folder), problem="has both titles.csv and titles.json", fix="keep one of them"
        ))
        return None
    fix = 'write titles.csv with a header "file,title", or titles.json as {"photo.jpg": "Title"}'
    try:
        text = path.read_text(encoding="utf-8-sig")
        if path.suffix == ".json":
            data = json.loads(text)
            if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
                raise ValueError("expected an object of file name -> title")
            titles = {str(k).strip(): v.strip() for k, v in data.items()}
        else:
            reader = csv.DictReader(io.StringIO(text))
            columns = [c.strip().lower() for c in reader.fieldnames or []]
            if "title" not in columns or not ({"file", "image"} & set(columns)):
                raise ValueError(f"columns are {', '.join(columns) or 'none'}, expected file,title")
            key = "file" if "file" in columns else "image"
            titles = {}
            for record in reader:
                record = {(k or "").strip().lower(): (v or "").strip() for k, v in record.items()}
                if record.get(key):
                    titles[record[key]] = record.get("title", "")
    except (OSError, UnicodeDecodeError, ValueError, csv.Error) as e:
        problems.append(Problem(file=str(path), problem=f"cannot read the titles: {e}", fix=fix))
        return None
    empty = sorted(k for k, v in titles.items() if not v)
    for name in empty:
        problems.append(Problem(file=str(path), problem=f"empty title for {name!r}", fix="write the title"))
    return {k: v for k, v in titles.items() if v}, path.name


def _read_manifest(manifest: Path, problems: list[Problem]) -> list[_Row]:
    suffix = manifest.suffix.lower()
    try:
        text = manifest.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidInput(f"cannot read the manifest: {e}", where=str(manifest)) from None
    if suffix == ".csv":
        records = _csv_records(manifest, text)
    elif suffix in (".yaml", ".yml", ".json"):
        records = _structured_records(manifest, text, suffix)
    else:
        raise InvalidInput(
            f"unsupported manifest type {suffix or '(none)'}: use .csv, .yaml, .yml or .json, or a folder",
            where=str(manifest),
        )
    if not records:
        raise InvalidInput("manifest has no rows", where=str(manifest))
    rows = []
    for where, record in records:
        missing = [c for c in ("image", "title", "class") if not (record.get(c) or "").strip()]
        if missing:
            problems.append(Problem(
                file=where, problem=f"{', '.join(missing)}: missing or empty", fix="fill in the row"
            ))
            continue
        class_name = _class_of(record["class"])
        if not class_name:
            problems.append(Problem(
                file=where,
                problem=f"class: {record['class']!r} has no letter or digit that can make a name",
                fix="write the class as a plural noun in Latin letters, e.g. bracelets",
            ))
            continue
        image = record["image"].strip()
        path = Path(image) if Path(image).is_absolute() else manifest.parent / image
        if not path.is_file():
            problems.append(Problem(
                file=where, problem=f"image: file does not exist: {path}", fix="correct the path, or remove the row"
            ))
            continue
        try:
            item = _make_item(image, record["title"].strip(), class_name, record.get("style"), where)
        except InvalidInput as e:
            problems.append(Problem(file=where, problem=e.message, fix="correct the row"))
            continue
        rows.append(_Row(item, path.resolve(), where, "manifest", f"{path} ({where})"))
    return rows


def _csv_records(manifest: Path, text: str) -> list[tuple[str, dict[str, str]]]:
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None:
        raise InvalidInput("manifest has no rows", where=str(manifest))
    columns = [c.strip().lower() for c in header]
    _check_columns(columns, f"{manifest}, line 1")
    records = []
    for values in reader:
        if not any(v.strip() for v in values):
            continue
        where = f"{manifest}, line {reader.line_num}"
        if len(values) > len(columns):
            raise InvalidInput(f"{len(values)} values for {len(columns)} columns", where=where)
        records.append((where, dict(zip(columns, values, strict=True))))
    return records


def _structured_records(manifest: Path, text: str, suffix: str) -> list[tuple[str, dict[str, str]]]:
    try:
        data = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise InvalidInput(f"not valid {suffix[1:].upper()}: {e}", where=str(manifest)) from None
    if data is None:
        return []
    if not isinstance(data, list):
        raise InvalidInput("expected a list of rows with image, title, class[, style]", where=str(manifest))
    records = []
    for i, row in enumerate(data):
        where = f"{manifest}, row {i}"
        if not isinstance(row, dict):
            raise InvalidInput("expected a mapping with image, title, class[, style]", where=where)
        columns = [str(k).strip().lower() for k in row]
        _check_columns(columns, where)
        records.append(
            (where, {str(k).strip().lower(): ("" if v is None else str(v)) for k, v in row.items()})
        )
    return records


def _check_columns(columns: list[str], where: str) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise InvalidInput(
            f"missing required column(s) {', '.join(missing)} (expected image, title, class[, style])",
            where=where,
        )
    unknown = [c for c in columns if c not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]
    if unknown:
        raise InvalidInput(
            f"unknown column(s) {', '.join(unknown)} (expected image, title, class[, style])", where=where
        )


def _verify(row: _Row, resolution: int, problems: list[Problem], warnings: list[Problem]) -> _Photo | None:
    """Decode the photo as training will (`open_rgb`); None, with a problem recorded, if it cannot be used."""
    file = row.file
    try:
        data = row.path.read_bytes()
    except OSError as e:
        problems.append(Problem(
            file=file, problem=f"cannot read the file: {e.strerror or e}", fix="check the file and its permissions"
        ))
        return None
    fix = "re-export the photo as JPEG or PNG, or remove it"
    if not data:
        problems.append(Problem(file=file, problem="not a readable image: the file is empty", fix=fix))
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
        # verify() misses truncated pixel data; decoding the way training does catches it.
        width, height = open_rgb(data).size
    except UnidentifiedImageError:
        problems.append(Problem(file=file, problem="not a readable image: not a known image format", fix=fix))
        return None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        problems.append(Problem(file=file, problem=f"not a readable image: {e}", fix=fix))
        return None
    short = min(width, height)
    if short * MIN_SCALE < resolution:
        problems.append(Problem(
            file=file,
            problem=f"{width}x{height} px is too small for {resolution} px training "
            f"(under {-(-resolution // MIN_SCALE)} px on the short side, it would be upscaled over {MIN_SCALE}x)",
            fix=f"use a photo of at least {resolution} px on its short side, or remove it",
        ))
        return None
    if short < resolution:
        warnings.append(Problem(
            file=file,
            problem=f"{width}x{height} px is smaller than the {resolution} px training resolution",
            fix=f"it will be upscaled {resolution / short:.1f}x; a larger photo trains sharper",
        ))
    style = row.item.style or style_from_title(row.item.title, row.item.class_name)
    return _Photo(row, style, hashlib.sha256(data).hexdigest(), width, height)


def _group(
    photos: list[_Photo], min_images: int
) -> tuple[dict[tuple[str, str | None], list[_Photo]], list[Merge], list[Drop]]:
    """Group by (class, style); small groups join the class's catch-all (style None)."""
    by_key: dict[tuple[str, str | None], list[_Photo]] = {}
    for photo in photos:
        by_key.setdefault((photo.row.item.class_name, photo.style), []).append(photo)
    groups: dict[tuple[str, str | None], list[_Photo]] = {}
    merges: list[Merge] = []
    drops: list[Drop] = []
    for class_name in sorted({c for (c, _) in by_key}):
        catch_all = list(by_key.get((class_name, None), []))
        styles = sorted(s for (c, s) in by_key if c == class_name and s is not None)
        for style in styles:
            members = by_key[(class_name, style)]
            if len(members) >= min_images:
                groups[(class_name, style)] = members
            else:
                merges.append(Merge(group=_concept_name(class_name, style), into=class_name, images=len(members)))
                catch_all += members
        if catch_all and len(catch_all) >= min_images:
            groups[(class_name, None)] = catch_all
        elif catch_all:
            drops.append(
                Drop(
                    name=class_name,
                    images=len(catch_all),
                    reason=f"fewer than {min_images} images even after merging",
                )
            )
    return groups, merges, drops
