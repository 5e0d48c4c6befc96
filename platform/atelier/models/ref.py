"""What a model reference names: a built-in model, a folder, an s3:// prefix, a hub id or a
registry model ("name", "name:version" or "name@alias"). Parsed once here; every loader and checker dispatches
on the type it gets back instead of asking the question again."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from atelier.errors import InvalidInput, NotFound
from atelier.models.builtin import BUILTIN

NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
VERSION = re.compile(r"^[1-9][0-9]{0,8}$")
ALIAS = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

Method = Literal["full", "lora", "textual_inversion"]
"""What a trained model holds: a whole model, LoRA weights on its base, or learned embeddings."""


@dataclass(frozen=True)
class Builtin:
    """A model built here from its architecture's configs (`atelier.models.builtin`)."""

    name: str

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Folder:
    """A diffusers model folder on this machine."""

    path: Path

    def __str__(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class S3Prefix:
    """A model committed to S3 (a prefix with a manifest)."""

    uri: str

    def __str__(self) -> str:
        return self.uri


@dataclass(frozen=True)
class HubId:
    """A Hugging Face hub id ("org/name"): production only, from a reachable hub or a filled cache."""

    id: str

    def __str__(self) -> str:
        return self.id


@dataclass(frozen=True)
class Registered:
    """A registry model: a version, an alias ("prod", moved by `atelier models promote`), or
    neither, which means the latest version."""

    name: str
    version: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        if self.alias is not None:
            return f"{self.name}@{self.alias}"
        return self.name if self.version is None else f"{self.name}:{self.version}"


ModelRef = Builtin | Folder | S3Prefix | HubId | Registered
"""Anything a model can be loaded from."""

Source = Builtin | Folder | S3Prefix | HubId
"""A reference that names a whole diffusers model by itself (no registry card to read)."""

_KINDS = ("a built-in name ({}), a folder, an s3:// prefix, a hub id (org/name) or a registry "
          "name[:version] or name@alias")


def validate_name(name: str) -> str:
    """A registry name that stays one path segment under the registry prefix, or InvalidInput."""
    if not isinstance(name, str) or not NAME.match(name) or ".." in name:
        raise InvalidInput(
            f"invalid model name {name!r}: 1-63 of a-z 0-9 . _ - starting with a letter or digit, "
            "no '..'", where="model name"
        )
    return name


def validate_alias(alias: str) -> str:
    """An alias name ("prod", "canary"), or InvalidInput."""
    if not isinstance(alias, str) or not ALIAS.match(alias):
        raise InvalidInput(f"invalid alias {alias!r}: 1-32 of a-z 0-9 - starting with a letter",
                           where="alias")
    return alias


def parse_registered(text: str) -> Registered:
    """The registry syntax alone: "name" (latest version), "name:version" or "name@alias"."""
    name, at, alias = str(text).partition("@")
    if at:
        validate_name(name)
        return Registered(name, alias=validate_alias(alias))
    name, sep, version = str(text).partition(":")
    validate_name(name)
    if not sep:
        return Registered(name)
    if not VERSION.match(version):
        raise InvalidInput(f"invalid version {version!r}: a positive integer", where=str(text))
    return Registered(name, int(version))


MARKERS = {"model_index.json": "a diffusers model", "config.json": "a transformers model"}


def parse_model_ref(text: str | Path | ModelRef, *, where: str = "model",
                    marker: str = "model_index.json") -> ModelRef:
    """What `text` names. Built-in names, s3:// prefixes and existing folders come first, so a
    folder named like a registry model is the folder; what is left is a hub id ("org/name") or a
    registry name. A path that does not exist is NotFound, not a guess.

    `marker` is the file that makes a folder a model: a diffusers pipeline's model_index.json,
    or config.json for a transformers model (the quality metrics' encoders)."""
    if isinstance(text, (Builtin, Folder, S3Prefix, HubId, Registered)):
        return text
    text = str(text)
    if text in BUILTIN:
        return Builtin(text)
    if text.startswith("s3://"):
        if not re.match(r"^s3://[^/]+/.", text):
            raise InvalidInput("an s3:// model reference needs a bucket and a prefix", where=text)
        return S3Prefix(text.rstrip("/"))
    path = Path(text).expanduser()
    if path.exists():
        if not (path / marker).exists():
            raise InvalidInput(f"not {MARKERS.get(marker, 'a model')} folder (no {marker})",
                               where=str(path))
        return Folder(path.resolve())
    if text.startswith((".", "/", "~")):
        raise NotFound("model folder not found", where=str(path))
    if HUB_ID.match(text):
        return HubId(text)
    try:
        return parse_registered(text)
    except InvalidInput:
        raise NotFound(f"unknown model {text!r}: expected " + _KINDS.format(", ".join(BUILTIN)),
                       where=where) from None
