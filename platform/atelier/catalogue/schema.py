"""The catalogue's data model: product photos in, DreamBooth concepts out, and the concepts file."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from atelier import config_file
from atelier.files import write_atomic

ClassName = Literal["hoops", "necklaces", "rings", "studs"]

# Class -> the noun phrase a prompt uses. The identifier and style go right before the last word,
# so "a pair of hoops" gives "photo of a pair of sks beaded hoops".
CLASSES: dict[str, str] = {
    "hoops": "a pair of hoops",
    "necklaces": "a necklace",
    "rings": "a ring",
    "studs": "a pair of studs",
}

# The singular of each class noun, for finding the noun in a title ("Dome Ring, Gold").
SINGULAR: dict[str, str] = {
    "hoops": "hoop",
    "necklaces": "necklace",
    "rings": "ring",
    "studs": "stud",
}

PROMPT_PREFIX = "photo of"

_SLUG = r"^[a-z0-9]+(-[a-z0-9]+)*$"


def instance_prompt(class_name: str, identifier: str, style: str | None) -> str:
    """The instance prompt: 'photo of a pair of sks beaded hoops', or 'photo of a pair of sks studs'."""
    head, noun = CLASSES[class_name].rsplit(" ", 1)
    words = [PROMPT_PREFIX, head, identifier] + ([style] if style else []) + [noun]
    return " ".join(words)


def class_prompt(class_name: str) -> str:
    """The prior-preservation prompt of the class: 'photo of a pair of hoops'."""
    return f"{PROMPT_PREFIX} {CLASSES[class_name]}"


class CatalogueItem(BaseModel):
    """One product photo as the catalogue lists it."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field(
        description="Image file: relative to the manifest's folder (or the source folder), or absolute."
    )
    title: str = Field(min_length=1, description='Product title, e.g. "Beaded Hoops, 14k Gold, 15 mm".')
    class_name: ClassName = Field(description="Product class: hoops, necklaces, rings or studs.")
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
    class_name: ClassName = Field(description="Product class: hoops, necklaces, rings or studs.")
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
