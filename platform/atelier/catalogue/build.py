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
from atelier.catalogue.schema import (
    CLASSES,
    PROMPT_PREFIX,
    SINGULAR,
    CatalogueItem,
    Concept,
    ConceptImage,
    ConceptsFile,
    class_prompt,
    instance_prompt,
)
from atelier.errors import InvalidInput, NotFound, describe_validation_error
from atelier.names import slug

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
REQUIRED_COLUMNS = ("image", "title", "class")
OPTIONAL_COLUMNS = ("style",)
_ALLOWED = ", ".join(CLASSES)


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

    def lines(self) -> list[str]:
        """One human-readable line per merge, drop, duplicate and ignored file."""
        out = [f"merged {m.group} ({_images(m.images)}) into {m.into}" for m in self.merges]
        out += [f"dropped {d.name} ({_images(d.images)}): {d.reason}" for d in self.drops]
        out += [f"skipped duplicate image {p}" for p in self.duplicates]
        out += [f"ignored non-image file {p}" for p in self.ignored]
        return out


def _images(n: int) -> str:
    return f"{n} image" if n == 1 else f"{n} images"


@dataclass
class _Row:
    item: CatalogueItem
    path: Path  # absolute
    where: str  # the manifest row or file it came from, for error messages


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
) -> tuple[ConceptsFile, BuildReport]:
    """Read a catalogue (a <class>/<style>/ folder, or a CSV/YAML/JSON manifest) and write its concepts.

    Every problem with the input is raised before anything is written, and the file itself is
    written atomically, so `out_path` is either the complete new file or untouched.
    """
    source, out_path = Path(source), Path(out_path)
    if min_images < 1:
        raise InvalidInput(f"must be at least 1, got {min_images}", where="min_images")
    if not source.exists():
        raise NotFound("catalogue source does not exist", where=str(source))
    ignored: list[str] = []
    rows = _read_folder(source, ignored) if source.is_dir() else _read_manifest(source)

    photos: list[_Photo] = []
    duplicates: list[str] = []
    seen: set[str] = set()
    for row in rows:
        photo = _verify(row)
        if photo.sha256 in seen:
            duplicates.append(str(row.path))
            continue
        seen.add(photo.sha256)
        photos.append(photo)

    groups, merges, drops = _group(photos, min_images)
    if not groups:
        raise InvalidInput(
            f"no concept has at least {min_images} images ({len(photos)} images in all)",
            where=str(source),
            hint="add photos, or lower --min-images",
        )

    avoid = words_of([p.row.item.title for p in photos])
    avoid |= words_of([s for (_, s) in groups if s] + list(CLASSES.values()) + [PROMPT_PREFIX])
    identifiers = allocate_identifiers(len(groups), tokenizer, avoid)

    out_dir = out_path.resolve().parent
    concepts = []
    for ((class_name, style), members), identifier in zip(groups.items(), identifiers, strict=True):
        concepts.append(
            Concept(
                name=_concept_name(class_name, style),
                class_name=class_name,
                style=style,
                identifier=identifier,
                instance_prompt=instance_prompt(class_name, identifier, style),
                class_prompt=class_prompt(class_name),
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
    report = BuildReport(
        source=str(source),
        out_path=str(out_path),
        images=len(photos),
        merges=merges,
        drops=drops,
        duplicates=duplicates,
        ignored=ignored,
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
    words = re.findall(r"[a-z0-9']+", title.split(",")[0].lower())
    nouns = {class_name, SINGULAR[class_name]}
    for i, word in enumerate(words):
        if word in nouns:
            return normalise_style(" ".join(words[:i]))
    return None


def normalise_style(style: str | None) -> str | None:
    """Lower case, '-' and '_' as spaces, single spaces; None when nothing prompt-worthy is left."""
    if style is None:
        return None
    text = " ".join(re.sub(r"[-_]+", " ", style).lower().split())
    return text if re.search(r"[a-z0-9]", text) else None


def _concept_name(class_name: str, style: str | None) -> str:
    if style is None:
        return class_name
    return f"{slug(style)}-{class_name}"


def _relative(path: Path, out_dir: Path) -> str:
    try:
        return Path(os.path.relpath(path, out_dir)).as_posix()
    except ValueError:  # another drive on Windows: no relative path exists
        return path.as_posix()


def _humanise(stem: str) -> str:
    return " ".join(re.sub(r"[-_]+", " ", stem).split()).title()


def _check_class(value: str, where: str) -> str:
    name = (value or "").strip().lower()
    if name not in CLASSES:
        raise InvalidInput(f"class: unknown class {value!r} (allowed: {_ALLOWED})", where=where)
    return name


def _make_item(image: str, title: str, class_name: str, style: str | None, where: str) -> CatalogueItem:
    try:
        return CatalogueItem(image=image, title=title, class_name=class_name, style=normalise_style(style))
    except ValidationError as e:
        raise InvalidInput(describe_validation_error(e), where=where) from None


def _read_folder(root: Path, ignored: list[str]) -> list[_Row]:
    rows = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or path.is_dir():
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            ignored.append(str(path))
            continue
        if len(rel.parts) == 1 or len(rel.parts) > 3:
            raise InvalidInput(
                "image is not in a <class>/<style>/ or <class>/ folder", where=str(path)
            )
        class_name = _check_class(rel.parts[0], where=str(root / rel.parts[0]))
        style = rel.parts[1] if len(rel.parts) == 3 else None
        title = _humanise(path.stem)
        if not re.search(r"[A-Za-z]", title):
            # Photos named 01.png carry no title; the folders say what they show.
            title = " ".join(filter(None, [_humanise(style or ""), class_name.title(), title]))
        rows.append(_Row(_make_item(str(rel), title, class_name, style, str(path)), path.resolve(), str(path)))
    if not rows:
        raise InvalidInput(
            "no images found (expected <class>/<style>/<image> files, classes: " + _ALLOWED + ")",
            where=str(root),
        )
    return rows


def _read_manifest(manifest: Path) -> list[_Row]:
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
        for column in ("image", "title"):
            if not (record.get(column) or "").strip():
                raise InvalidInput(f"{column}: missing or empty", where=where)
        class_name = _check_class(record.get("class") or "", where)
        image = record["image"].strip()
        path = Path(image) if Path(image).is_absolute() else manifest.parent / image
        if not path.is_file():
            raise NotFound(f"image: file does not exist: {path}", where=where)
        item = _make_item(image, record["title"].strip(), class_name, record.get("style"), where)
        rows.append(_Row(item, path.resolve(), where))
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


def _verify(row: _Row) -> _Photo:
    try:
        data = row.path.read_bytes()
    except OSError as e:
        raise InvalidInput(f"cannot read the image: {e.strerror or e}", where=str(row.path)) from None
    hint = None if row.where == str(row.path) else f"listed at {row.where}"
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
        # verify() leaves the image unusable and misses truncated pixel data; decoding catches it.
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            width, height = image.size
    except UnidentifiedImageError:
        message = "not a readable image: not a known image format"
        raise InvalidInput(message, where=str(row.path), hint=hint) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise InvalidInput(f"not a readable image: {e}", where=str(row.path), hint=hint) from None
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
    for class_name in CLASSES:
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
