"""The model registry: versioned models under `models/<name>/<version>/` in S3, each with its card,
and each version's latest evaluation (`atelier eval`) under `evaluations/<name>/<version>/`: a model
commit is never rewritten, so its measurements live beside it.

Aliases ("shop-beaded-hoops@prod") name a version that can change. Each alias is an append-only
log under `aliases/<name>/<alias>/`: move N is the object `<N>.json`, written by a conditional
create, so of two promoters who both read move N-1 exactly one writes move N and the other gets
Conflict; the alias is its latest move, and the log is its history."""

from __future__ import annotations

import builtins
import os
import re
import secrets
import socket
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from atelier.errors import Conflict, IntegrityError, InvalidInput, NotFound
from atelier.models.builtin import BUILTIN
from atelier.models.ref import NAME, VERSION, Method, parse_registered, validate_alias, validate_name
from atelier.quality.results import Evaluation
from atelier.storage import Outages, Progress, Storage

T = TypeVar("T")

ROOT = "models"
EVALUATIONS = "evaluations"
PUBLISH_ATTEMPTS = 20
TOMBSTONE = "REMOVED"
CLAIM = "CLAIMED"  # who took a version number, and when; not part of the model
ALIASES = "aliases"
MOVE = re.compile(r"^([0-9]{10})\.json$")


class AliasMove(BaseModel):
    """One move of an alias: which version it named from then on, and who moved it, when, why."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Model name.")
    alias: str = Field(description="The alias.")
    seq: int = Field(ge=1, description="Position in the alias's history (1: its first move).")
    version: int = Field(ge=1, description="The version the alias names after this move.")
    previous: int | None = Field(None, description="The version it named before (None: none).")
    action: Literal["promote", "rollback"] = Field(description="How it moved.")
    at: str = Field(description="When (UTC, ISO 8601).")
    by: str = Field(description="Host and process that moved it.")
    note: str | None = Field(None, description="Why, as the promoter said (a sweep, a gate).")

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"


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
    lineage: dict[str, Any] | None = Field(
        None, description="A sweep's best model: the sweep, the trial, the metric and its value.")

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
        lineage: dict[str, Any] | None = None,
        progress: Progress | None = None,
        outages: Outages | None = None,
    ) -> tuple[str, ModelCard]:
        """Commit `local_dir` as the next version of `name`; return its URI and card.

        `concepts` are ConceptCards or anything with their fields (the catalogue's Concept).
        `outages`: wait out an S3 outage and go on, under the number already claimed (a training
        job's publication); without it an outage is raised (StorageUnavailable).
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
            quality_curve=quality_curve, lineage=lineage,
        )
        _card(version=1, created_at=_now(), **fields)  # a bad card fails before any storage call
        guarded = outages.call if outages else _once
        version = guarded(lambda: self._last_allocated(name)) + 1
        claim = _claim()
        for _ in range(PUBLISH_ATTEMPTS):
            uri = self.uri(name, version)
            # The number is claimed before anything is uploaded: two publishers that both listed
            # N as free must not both upload under N, where the loser's files would replace the
            # winner's. The claim is a conditional create, so exactly one of them gets N.
            if not guarded(partial(self._take, uri, claim)):
                version += 1
                continue
            card = _card(version=version, created_at=_now(), **fields)
            guarded(partial(self._commit, folder, uri, card, progress))
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
        held = {a: m.version for a, m in self.aliases(name).items()}
        for uri in targets:
            aliased = sorted(a for a, v in held.items() if self.uri(name, v) == uri)
            if aliased:
                raise InvalidInput(f"{uri.rsplit('/', 1)[-1]} is what {name}@{aliased[0]} serves",
                                   where=f"{name}:{uri.rsplit('/', 1)[-1]}",
                                   hint=f"promote another version to {aliased[0]} (or roll it back) first")
        if not dry_run:
            for uri in targets:
                self.storage.delete(uri)
                # A number is never given out twice: "name:3" in a cache or a log must keep
                # meaning the model it meant, so the removed version leaves a tombstone.
                self.storage.write_bytes(f"{uri}/{TOMBSTONE}", (_now() + "\n").encode())
        return targets

    # -- reading ---------------------------------------------------------------------------------
    def get(self, ref: str) -> tuple[str, ModelCard]:
        """(URI, card) of "name:version", of the version "name@alias" names now, or of the latest
        committed version of "name"."""
        parsed = parse_registered(ref)
        name, version = parsed.name, parsed.version
        if parsed.alias is not None:
            move = self.alias(name, parsed.alias)
            if move is None:
                raise NotFound(f"model {name!r} has no alias {parsed.alias!r}", where=ref,
                               hint=f"atelier models promote {name}:VERSION --alias {parsed.alias}")
            version = move.version
        elif version is None:
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

    # -- aliases ---------------------------------------------------------------------------------
    def alias_uri(self, name: str, alias: str | None = None) -> str:
        parts = [ALIASES, validate_name(name)] + ([validate_alias(alias)] if alias is not None else [])
        return self.storage.uri(*parts)

    def alias(self, name: str, alias: str) -> AliasMove | None:
        """The alias's latest move (the version it names now), or None if it never moved."""
        seqs = self._moves(name, alias)
        return self._move(name, alias, seqs[-1]) if seqs else None

    def aliases(self, name: str) -> dict[str, AliasMove]:
        """Every alias of `name` and its latest move."""
        found = {a: self.alias(name, a) for a in self.storage.list_dir(self.alias_uri(name))}
        return {a: move for a, move in sorted(found.items()) if move is not None}

    def history(self, name: str, alias: str | None = None) -> builtins.list[AliasMove]:
        """Every move of the alias (of every alias of `name`), oldest first."""
        names = [alias] if alias is not None else self.storage.list_dir(self.alias_uri(name))
        moves = [self._move(name, a, seq) for a in names for seq in self._moves(name, a)]
        return sorted(moves, key=lambda m: (m.at, m.alias, m.seq))

    def promote(self, ref: str, alias: str, *, note: str | None = None,
                check: Callable[[AliasMove | None, ModelCard], None] | None = None) -> AliasMove:
        """Point `alias` at the version `ref` names ("name:3", "name", "name@staging"). `check`
        sees the alias's current move and the card before anything is written, and raises to
        refuse (a promotion gate); if the alias moves meanwhile, Conflict, never two winners."""
        _, card = self.get(ref)
        current = self.alias(card.name, alias)
        if check is not None:
            check(current, card)
        return self._move_to(card.name, alias, card.version, current, "promote", note)

    def rollback(self, name: str, alias: str, *, note: str | None = None) -> AliasMove:
        """Point `alias` back at the version it named before its latest move."""
        current = self.alias(name, alias)
        if current is None or current.previous is None:
            raise InvalidInput(f"{name}@{alias} has no earlier version to roll back to", where=f"{name}@{alias}")
        self.get(f"{name}:{current.previous}")  # NotFound if that version was removed since
        return self._move_to(name, alias, current.previous, current, "rollback", note)

    def _move_to(self, name: str, alias: str, version: int, current: AliasMove | None,
                 action: Literal["promote", "rollback"], note: str | None) -> AliasMove:
        seq = 1 if current is None else current.seq + 1
        move = AliasMove(name=name, alias=alias, seq=seq, version=version,
                         previous=None if current is None else current.version, action=action,
                         at=_now(), by=_who(), note=note)
        if not self.storage.create(f"{self.alias_uri(name, alias)}/{seq:010d}.json",
                                   move.model_dump_json().encode()):
            latest = self.alias(name, alias)
            raise Conflict(f"{name}@{alias} was moved by someone else meanwhile"
                           + (f" (to version {latest.version})" if latest else ""),
                           where=f"{name}@{alias}", hint="look at it again and retry")
        return move

    def _moves(self, name: str, alias: str) -> builtins.list[int]:
        found = (MOVE.match(n) for n in self.storage.list_dir(self.alias_uri(name, alias)))
        return sorted(int(m.group(1)) for m in found if m)

    def _move(self, name: str, alias: str, seq: int) -> AliasMove:
        uri = f"{self.alias_uri(name, alias)}/{seq:010d}.json"
        try:
            return AliasMove.model_validate_json(self.storage.read_bytes(uri))
        except ValidationError as e:
            raise IntegrityError("not a valid alias move", where=uri) from e

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

    def _take(self, uri: str, claim: bytes) -> bool:
        """Claim the number of `uri`: whether it is ours, which it also is when the claim there
        is this very one, written before an outage hid the answer."""
        return self.storage.create(f"{uri}/{CLAIM}", claim) or self.storage.read_bytes(f"{uri}/{CLAIM}") == claim

    def _commit(self, folder: Path, uri: str, card: ModelCard, progress: Progress | None) -> None:
        metadata = card.model_dump(mode="json")
        try:
            self.storage.commit(folder, uri, metadata, progress=progress)
        except InvalidInput:
            # Done already, when an outage hid the answer to the manifest's write: the same card.
            if not (self.storage.has_manifest(uri) and self.storage.read_manifest(uri).metadata == metadata):
                raise

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


def _who() -> str:
    """The process that writes a claim or moves an alias: host and pid."""
    return f"{socket.gethostname()} pid {os.getpid()}"


def _claim() -> bytes:
    """A claim's text: when, who, and a nonce that tells two claims of one process apart (a
    publication knows its own claim by it after an outage)."""
    return f"{_now()} {_who()} {secrets.token_hex(8)}\n".encode()


def _once(step: Callable[[], T]) -> T:
    """A step run once, outages raised (publish without `outages`)."""
    return step()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


__all__ = ["AliasMove", "ConceptCard", "ModelCard", "Registry", "code_version"]
