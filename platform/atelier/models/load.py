"""The one loading path: a model reference (built-in name, folder, s3:// prefix or hub id) to a
Stable Diffusion pipeline. Training, the Serve replicas and the CLI all load through here."""

from __future__ import annotations

import re
from pathlib import Path

from atelier.errors import InvalidInput, NotFound
from atelier.models.builtin import BUILTIN, build_model
from atelier.settings import Settings, get_settings
from atelier.storage import Progress, Storage, is_s3

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model(
    ref: str,
    *,
    settings: Settings | None = None,
    storage: Storage | None = None,
    progress: Progress | None = None,
) -> str:
    """A local folder (or, for a hub id, the id itself) that `from_pretrained` can load."""
    settings = settings or get_settings()
    if ref in BUILTIN:
        spec = BUILTIN[ref]
        folder = settings.cache_dir / "builtin" / f"{ref}-{spec.digest()}"
        if not (folder / "model_index.json").exists():
            build_model(ref, folder)
        return str(folder)
    if is_s3(ref):
        storage = storage or Storage(settings)
        return str(storage.fetch_cached(ref, progress=progress))
    path = Path(ref).expanduser()
    if path.exists():
        if not (path / "model_index.json").exists():
            raise InvalidInput(
                "not a diffusers model folder (no model_index.json)", where=str(path)
            )
        return str(path.resolve())
    if HUB_ID.match(ref) and not ref.startswith((".", "/")):
        return ref  # production only: needs a reachable hub or a pre-filled HF cache
    raise NotFound(
        f"unknown model {ref!r}: expected one of {', '.join(BUILTIN)}, a folder, "
        "an s3:// prefix or a hub id (org/name)"
    )


def load_pipeline(
    ref: str,
    *,
    settings: Settings | None = None,
    storage: Storage | None = None,
    dtype=None,
    device: str | None = None,
):
    """Load a `StableDiffusionPipeline` for `ref` with SDPA attention (the diffusers default)."""
    import torch
    from diffusers import StableDiffusionPipeline

    quiet_libraries()
    source = resolve_model(ref, settings=settings, storage=storage)
    dtype = dtype or torch.float32
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            source, dtype=dtype, safety_checker=None, requires_safety_checker=False
        )
    except (OSError, ValueError) as e:
        raise InvalidInput(f"cannot load the model: {str(e).splitlines()[0]}", where=ref) from e
    pipe.set_progress_bar_config(disable=True)
    if device:
        pipe = pipe.to(device)
    return pipe


def quiet_libraries() -> None:
    """Keep diffusers/transformers progress bars and advisory warnings out of our output."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def is_registry_ref(text: str) -> bool:
    """Whether `load_model` reads `text` as a registry reference: built-in names, s3:// URIs,
    existing paths and hub ids ("org/name") are sources; what is left is a registry name."""
    from atelier.registry import parse_ref

    if text in BUILTIN or is_s3(text) or "/" in text or Path(text).expanduser().exists():
        return False
    try:
        parse_ref(text)
    except InvalidInput:
        return False
    return True


def load_model(
    ref: str,
    settings: Settings | None = None,
    storage: Storage | None = None,
    dtype=None,
    device: str | None = None,
):
    """A pipeline for any model reference: a registry model ("name", "name:version") with its
    adapters applied to its base, or anything `load_pipeline` takes.

    Built-in names, paths, s3:// prefixes and hub ids ("org/name") keep their meaning; the
    registry gets what is left.
    """
    from atelier.models import adapters
    from atelier.registry import Registry

    settings = settings or get_settings()
    storage = storage or Storage(settings)

    def load(text: str, seen: tuple[str, ...]):
        if not is_registry_ref(text):
            return load_pipeline(text, settings=settings, storage=storage, dtype=dtype)
        uri, card = Registry(storage).get(text)
        if card.ref in seen:  # a card naming itself as base: stop rather than recurse forever
            raise InvalidInput(f"model {card.ref} is its own base ({' -> '.join(seen)})", where=text)
        if card.method == "full":
            return load_pipeline(uri, settings=settings, storage=storage, dtype=dtype)
        # The base may itself be a registry model (e.g. a LoRA on a fine-tuned full model).
        pipe = load(card.base_model, (*seen, card.ref))
        folder = storage.fetch_cached(uri)
        if card.method == "lora":
            adapters.apply_lora(pipe, folder, adapter_name=card.ref)
        else:
            adapters.apply_textual_inversion(pipe, folder, card.token)
        return pipe

    pipe = load(ref, ())
    if device:
        pipe = pipe.to(device)  # after the adapters, so they land on the device too
    return pipe
