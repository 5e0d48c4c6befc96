"""The catalogue's data model: product photos in, DreamBooth concepts out, and the concepts file."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from atelier import config_file
from atelier.files import write_atomic

_SLUG = r"^[a-z0-9]+(-[a-z0-9]+)*$"

# A class is the shop's own noun ("bracelets", "ear-cuffs"): any slug, never a fixed list.
ClassName = Annotated[str, Field(pattern=_SLUG)]

# Class -> the noun phrase a prompt uses, where the rule of `class_phrase` ("a" + the singular)
# would be wrong: things sold in pairs. Override per build with `class_phrases=` (CLI --class-phrase).
CLASSES: dict[str, str] = {
    "hoops": "a pair of hoops",
    "necklaces": "a necklace",
    "rings": "a ring",
    "studs": "a pair of studs",
    "earrings": "a pair of earrings",
    "cufflinks": "a pair of cufflinks",
    "ear-cuffs": "a pair of ear cuffs",
    "huggies": "a pair of huggies",
}

# Plurals the suffix rules of `singular` get wrong.
SINGULAR: dict[str, str] = {
    "series": "series",
    "species": "species",
    "men": "man",
    "feet": "foot",
}

PROMPT_PREFIX = "photo of"

# The determiner of a class phrase; identifier and style go right after it, before the noun.
_DETERMINER = re.compile(r"^(a pair of|a set of|an|a|the|some)\s+")


def singular(noun: str) -> str:
    """English singular of a plural noun, good enough for finding it in a title: "bracelets" -> "bracelet"."""
    if noun in SINGULAR:
        return SINGULAR[noun]
    if noun.endswith("ies") and len(noun) > 4:
        return noun[:-3] + "y"
    if noun.endswith(("ches", "shes", "sses", "xes", "zes")):
        return noun[:-2]
    if noun.endswith("s") and not noun.endswith("ss"):
        return noun[:-1]
    return noun


def class_phrase(class_name: str, overrides: dict[str, str] | None = None) -> str:
    """The class's noun phrase: the override, the table, or "a"/"an" + the singular ("a bracelet")."""
    phrase = (overrides or {}).get(class_name) or CLASSES.get(class_name)
    if phrase:
        return phrase
    words = class_name.split("-")
    words[-1] = singular(words[-1])
    article = "an" if words[0][:1] in tuple("aeiou") else "a"
    return " ".join([article, *words])


def instance_prompt(class_name: str, identifier: str, style: str | None, phrase: str | None = None) -> str:
    """The instance prompt: 'photo of a pair of sks beaded hoops', or 'photo of a pair of sks studs'."""
    phrase = phrase or class_phrase(class_name)
    match = _DETERMINER.match(phrase)
    head, noun = (match.group(1), phrase[match.end():]) if match else ("", phrase)
    words = [PROMPT_PREFIX, head, identifier] + ([style] if style else []) + [noun]
    return " ".join(w for w in words if w)


def class_prompt(class_name: str, phrase: str | None = None) -> str:
    """The prior-preservation prompt of the class: 'photo of a pair of hoops'."""
    return f"{PROMPT_PREFIX} {phrase or class_phrase(class_name)}"


class CatalogueItem(BaseModel):
    """One product photo as the catalogue lists it."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field(
        description="Image file: relative to the manifest's folder (or the source folder), or absolute."
    )
    title: str = Field(min_length=1, description='Product title, e.g. "Beaded Hoops, 14k Gold, 15 mm".')
    class_name: ClassName = Field(
        description='Product class, the shop\'s own plural noun as a slug, e.g. "rings" or "bracelets".'
    )
    style: str | None = Field(
        None,
        description='Style within the class, e.g. "beaded"; None: derived from the title, '
        "or the class's catch-all concept if the title names none.",
    )


class ConceptImage(BaseModel):
    """One training image of a concept, pinned by its hash so that edits to the file are noticed."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="Image file, relative to the concepts file's folder, or absolute.")
    title: str = Field(description="Product title the photo came with.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the file's bytes (hex).")
    width: int = Field(gt=0, description="Width in pixels.")
    height: int = Field(gt=0, description="Height in pixels.")

    def resolve(self, root: Path | str) -> Path:
        """The image's absolute path, given the folder of the concepts file."""
        path = Path(self.path)
        return path if path.is_absolute() else Path(root) / path


class Concept(BaseModel):
    """One DreamBooth instance: a rare identifier bound to a style of a class, with its photos."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        pattern=_SLUG, description='Slug, e.g. "beaded-hoops"; the catch-all is the class, e.g. "studs".'
    )
    class_name: ClassName = Field(
        description='Product class, the shop\'s own plural noun as a slug, e.g. "rings" or "bracelets".'
    )
    style: str | None = Field(
        None, description='Style, e.g. "beaded"; None for the class\'s catch-all instance.'
    )
    identifier: str = Field(
        pattern=r"^\S+$",
        description='Rare word that becomes one token of the tokenizer, e.g. "sks"; it carries the concept.',
    )
    instance_prompt: str = Field(
        description='Prompt of the instance images, e.g. "photo of a pair of sks beaded hoops".'
    )
    class_prompt: str = Field(description='Prior-preservation prompt, e.g. "photo of a pair of hoops".')
    images: list[ConceptImage] = Field(min_length=1, description="Training images of the instance.")

    @model_validator(mode="after")
    def _identifier_in_prompt(self) -> Concept:
        # Without the identifier in its prompt the instance trains nothing new; a common edit mistake.
        if self.identifier not in self.instance_prompt.split():
            raise ValueError(
                f"instance_prompt {self.instance_prompt!r} does not contain the identifier "
                f"{self.identifier!r} as a word"
            )
        return self


class ConceptsFile(BaseModel):
    """The concepts file (concepts.yaml): what a DreamBooth job trains, editable by hand."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = Field(
        description="Format version of this file; required, so a future format is never misread."
    )
    tokenizer: str = Field(
        description='Base model whose tokenizer the identifiers were checked against, e.g. "tiny".'
    )
    source: str = Field(description="Catalogue folder or manifest the file was built from.")
    concepts: list[Concept] = Field(min_length=1, description="The instances to train, one identifier each.")

    @field_validator("concepts")
    @classmethod
    def _distinct(cls, concepts: list[Concept]) -> list[Concept]:
        # Two concepts sharing an identifier would train one token towards two looks.
        for key in ("identifier", "name"):
            seen: dict[str, int] = {}
            for i, concept in enumerate(concepts):
                value = getattr(concept, key)
                if value in seen:
                    raise ValueError(f"duplicate {key} {value!r} in concepts {seen[value]} and {i}")
                seen[value] = i
        return concepts

    @classmethod
    def load(cls, path: Path | str) -> ConceptsFile:
        """Read and validate a concepts file; any problem is one InvalidInput naming file and field."""
        data = config_file.read_mapping(
            path, "concepts file", expected="a mapping with version, tokenizer, source and concepts"
        )
        return config_file.validate(cls, data, where=str(path))

    def dump(self, path: Path | str) -> Path:
        """Write the file atomically: a reader sees the old file or the new one, never half of one."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = "# Atelier concepts file. Edit identifiers and prompts freely; they are re-validated on load.\n"
        text += yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True, width=120)
        write_atomic(path, text)
        return path
