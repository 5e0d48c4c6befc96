"""The model registry: versioned models under `models/<name>/<version>/` in S3, each with its card,
and each version's latest evaluation (`atelier eval`) under `evaluations/<name>/<version>/`: a model
commit is never rewritten, so its measurements live beside it."""

from __future__ import annotations

import builtins
import os
import re
import socket
import subprocess
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from atelier.errors import IntegrityError, InvalidInput, NotFound
from atelier.models.builtin import BUILTIN
from atelier.models.ref import NAME, VERSION, Method, parse_registered, validate_name
from atelier.quality.results import Evaluation
from atelier.storage import Progress, Storage

ROOT = "models"
EVALUATIONS = "evaluations"
PUBLISH_ATTEMPTS = 20
TOMBSTONE = "REMOVED"
CLAIM = "CLAIMED"  # who took a version number, and when; not part of the model


class ConceptCard(BaseModel):
    """One concept a model learned, as the card records it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description='Concept name from the concepts file, e.g. "beaded-hoops".')
    identifier: str = Field(description='Rare word that carries the concept, e.g. "sks".')
    instance_prompt: str = Field(description="Prompt the instance images were trained with.")
    class_prompt: str = Field(description="Prior-preservation prompt of the concept's class.")


class ModelCard(BaseModel):
    """What a registered model version is, where it came from and how to load it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME.pattern, description="Registry name, e.g. \"hoops\".")
    version: int = Field(ge=1, description="Version number: 1, 2, ... in publishing order.")
    method: Method = Field(
        description="full: a complete diffusers model; lora: LoRA weights on base_model; "
        "textual_inversion: learned token embeddings on base_model."
    )
    base_model: str = Field(
        description="Model the weights were trained from and, for lora/textual_inversion, apply "
        "to: built-in name, s3:// prefix, folder, hub id or registry reference."
    )
    concepts: list[ConceptCard] = Field(description="Concepts the model learned.")
    hyperparameters: dict[str, Any] = Field(description="The whole training config, as dumped.")
    dataset_sha256: str = Field(description="Content hash of the training data (concepts and images).")
    final_loss: float | None = Field(description="Mean training loss at the last step, if known.")
    code_version: str = Field(description="Atelier version, plus the git commit when known.")
    run: str | None = Field(description="Training run (checkpoint location) it came from.")
    created_at: str = Field(description="UTC time of publishing, ISO 8601.")
    token: str | None = Field(
        None,
        description="textual_inversion: the placeholder token to prompt with (single-concept "
        "models; joint ones name a token per embedding file).",
    )
    quality_curve: list[dict[str, float | None]] | None = Field(
        None, description="Per checkpoint: step, CLIP-I, CLIP-T and the colour probe (training "
        "with eval_encoder set): how quality moved with the steps.")

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"


@lru_cache(maxsize=1)
def code_version() -> str:
    """`atelier.__version__`, plus `+g<short sha>` when the package sits in a git checkout."""
    import atelier

    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(atelier.__file__).parent,
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{atelier.__version__}+g{sha}" if re.fullmatch(r"[0-9a-f]{4,40}", sha) else atelier.__version__


_atelier_version = code_version  # `publish` has a parameter of the same name


class Registry:
    """Publish, list, read and remove model versions. Only committed versions exist."""

    def __init__(self, storage: Storage | None = None):
        self.storage = storage or Storage()

    def uri(self, name: str, version: int | None = None) -> str:
        parts = [ROOT, validate_name(name)]
        if version is not None:
            parts.append(str(version))
        return self.storage.uri(*parts)

    # -- writing ---------------------------------------------------------------------------------
    def publish(
        self,
        local_dir: str | Path,
        *,
        name: str,
        method: Method,
        base_model: str,
        concepts: list[Any],
        hyperparameters: dict[str, Any],
        dataset_sha256: str,
        final_loss: float | None = None,
        code_version: str | None = None,
        run: str | None = None,
        token: str | None = None,
        quality_curve: list[dict[str, float | None]] | None = None,
        progress: Progress | None = None,
    ) -> tuple[str, ModelCard]:
        """Commit `local_dir` as the next version of `name`; return its URI and card.

        `concepts` are ConceptCards or anything with their fields (the catalogue's Concept).
        """
        validate_name(name)
        if name in BUILTIN:  # `load_model(name)` would load the built-in one
            raise InvalidInput(f"{name!r} is a built-in model's name", where="model name")
        folder = Path(local_dir)
        token = _check_folder(folder, method, token)
        fields: dict[str, Any] = dict(
            name=name, method=method, base_model=base_model, concepts=concepts,
            hyperparameters=hyperparameters, dataset_sha256=dataset_sha256, final_loss=final_loss,
            code_version=code_version or _atelier_version(), run=run, token=token,
            quality_curve=quality_curve,
        )
        _card(version=1, created_at=_now(), **fields)  # a bad card fails before any storage call
        version = self._last_allocated(name) + 1
        for _ in range(PUBLISH_ATTEMPTS):
            uri = self.uri(name, version)
            # The number is claimed before anything is uploaded: two publishers that both listed
            # N as free must not both upload under N, where the loser's files would replace the
            # winner's. The claim is a conditional create, so exactly one of them gets N.
            if not self.storage.create(f"{uri}/{CLAIM}", _claim()):
                version += 1
                continue
            card = _card(version=version, created_at=_now(), **fields)
            self.storage.commit(folder, uri, card.model_dump(mode="json"), progress=progress)
            return uri, card
        raise InvalidInput(f"no free version after {PUBLISH_ATTEMPTS} attempts", where=self.uri(name))

    def rm(self, ref: str, *, all_versions: bool = False, dry_run: bool = False) -> list[str]:
        """Remove "name:version", or every version of "name" when `all_versions`; return the URIs
        (with `dry_run`, only return them)."""
        name, version = (parsed := parse_registered(ref)).name, parsed.version
        if version is not None:
            targets = [self.get(ref)[0]]
        elif not all_versions:
            raise InvalidInput(f"give a version ({name}:N), or remove all versions of {name!r} "
                               "explicitly (--all-versions)", where=ref)
        else:
            self._latest(name)  # NotFound unless a committed version exists
            # Partial uploads go too: nothing loadable of the name is left behind.
            targets = [uri for uri in (self.uri(name, v) for v in reversed(self._versions(name)))
                       if not self.storage.exists(f"{uri}/{TOMBSTONE}")]
        if not dry_run:
            for uri in targets:
                self.storage.delete(uri)
                # A number is never given out twice: "name:3" in a cache or a log must keep
                # meaning the model it meant, so the removed version leaves a tombstone.
                self.storage.write_bytes(f"{uri}/{TOMBSTONE}", (_now() + "\n").encode())
        return targets

    # -- reading ---------------------------------------------------------------------------------
    def get(self, ref: str) -> tuple[str, ModelCard]:
        """(URI, card) of "name:version", or of the latest committed version of "name"."""
        name, version = (parsed := parse_registered(ref)).name, parsed.version
        if version is None:
            version = self._latest(name)
        uri = self.uri(name, version)
        try:
            manifest = self.storage.read_manifest(uri)
        except NotFound:
            raise NotFound(f"model {name!r} has no version {version}", where=uri) from None
        return uri, self._card(uri, manifest.metadata, name, version)

    def list(self, name: str | None = None) -> list[ModelCard]:
        """Cards of every committed version (of `name`), by name then version."""
        root = self.uri(name) if name is not None else self.storage.uri(ROOT)
        base = self.storage.uri(ROOT)
        cards = []
        for uri in self.storage.walk_manifests(root):
            parts = uri[len(base):].strip("/").split("/")
            # Only <name>/<version> is the registry's; anything else under the prefix is not a model.
            if len(parts) != 2 or not NAME.match(parts[0]) or not VERSION.match(parts[1]):
                continue
            cards.append(self._card(uri, self.storage.read_manifest(uri).metadata,
                                    parts[0], int(parts[1])))
        return sorted(cards, key=lambda c: (c.name, c.version))

    # -- evaluations -----------------------------------------------------------------------------
    def evaluation_uri(self, card: ModelCard) -> str:
        return self.storage.uri(EVALUATIONS, card.name, str(card.version))

    def record_evaluation(self, folder: str | Path, evaluation: Evaluation) -> str:
        """Commit an evaluation (its grids in `folder`) as the model version's latest."""
        _, card = self.get(evaluation.model)
        uri = self.evaluation_uri(card)
        self.storage.commit(folder, uri, {"kind": "evaluation",
                                          "evaluation": evaluation.model_dump(mode="json")},
                            overwrite=True)
        return uri

    def evaluation(self, card: ModelCard) -> Evaluation | None:
        """The version's latest evaluation, or None if it was never evaluated."""
        uri = self.evaluation_uri(card)
        if not self.storage.has_manifest(uri):
            return None
        metadata = self.storage.read_manifest(uri).metadata
        try:
            return Evaluation.model_validate(metadata["evaluation"])
        except (KeyError, ValidationError) as e:
            raise IntegrityError("not a valid evaluation record", where=uri) from e

    # -- internals -------------------------------------------------------------------------------
    def _versions(self, name: str) -> builtins.list[int]:  # `list` here is the method above
        """Version numbers with anything stored under them: committed, partial or removed."""
        return sorted(int(v) for v in self.storage.list_dir(self.uri(name)) if VERSION.match(v))

    def _latest(self, name: str) -> int:
        for version in reversed(self._versions(name)):
            if self.storage.has_manifest(self.uri(name, version)):
                return version
        raise NotFound(f"no model named {name!r}", where=self.uri(name))

    def _last_allocated(self, name: str) -> int:
        # Uncommitted numbers count as taken: their upload may still be in flight.
        return max(self._versions(name), default=0)

    def _card(self, uri: str, metadata: dict[str, Any], name: str, version: int) -> ModelCard:
        try:
            card = ModelCard.model_validate(metadata)
        except ValidationError as e:
            raise IntegrityError(f"not a valid model card: {e.errors()[0]['msg']}", where=uri) from e
        if (card.name, card.version) != (name, version):
            raise IntegrityError(f"card says {card.ref}, stored as {name}:{version}", where=uri)
        return card


def _card(*, concepts: list[Any], **fields) -> ModelCard:
    try:
        return ModelCard(concepts=[_concept_card(c) for c in concepts], **fields)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        raise InvalidInput(f"{field}: {err['msg']}", where="model card") from e


def _concept_card(concept: Any) -> Any:
    """The card's fields of a catalogue Concept (or anything like one); cards and dicts as is."""
    if isinstance(concept, (ConceptCard, dict)):
        return concept
    return {f: getattr(concept, f) for f in ConceptCard.model_fields if hasattr(concept, f)}


def _check_folder(folder: Path, method: Method, token: str | None) -> str | None:
    """Refuse, before uploading anything, a folder that cannot load as `method`; return the
    textual-inversion token (read from the weights when there is one)."""
    from atelier.models.adapters import LORA_WEIGHTS, embedding_files

    if not folder.is_dir():
        raise NotFound("not a folder", where=str(folder))
    if method == "full" and not (folder / "model_index.json").is_file():
        raise InvalidInput("a full model needs model_index.json (a diffusers folder)", where=str(folder))
    if method == "lora" and not (folder / LORA_WEIGHTS).is_file():
        raise InvalidInput(f"a lora model needs {LORA_WEIGHTS}", where=str(folder))
    if method != "textual_inversion":
        if token is not None:
            raise InvalidInput("a token belongs to textual_inversion models only", where="token")
        return None
    tokens = list(embedding_files(folder))
    if token is not None and tokens != [token]:
        raise InvalidInput(f"token {token!r} is not the folder's ({', '.join(tokens)})", where=str(folder))
    return tokens[0] if len(tokens) == 1 else None


def _claim() -> bytes:
    return f"{_now()} {socket.gethostname()} pid {os.getpid()}\n".encode()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


__all__ = ["ConceptCard", "ModelCard", "Registry", "code_version"]
