"""The one loading path: a model reference (see `atelier.models.ref`) to a Stable Diffusion
pipeline, a local folder or the model's native image size. Training, the Serve replicas and the CLI
all load through here."""

from __future__ import annotations

import json
from pathlib import Path

from atelier.errors import InvalidInput
from atelier.models.builtin import BUILTIN, build_model
from atelier.models.libraries import quiet_libraries
from atelier.models.ref import Builtin, Folder, HubId, ModelRef, Registered, S3Prefix, parse_model_ref
from atelier.settings import Settings, get_settings
from atelier.storage import Progress, Storage


def resolve_model(
    ref: str | ModelRef,
    *,
    settings: Settings | None = None,
    storage: Storage | None = None,
    progress: Progress | None = None,
) -> str:
    """A local folder (or, for a hub id, the id itself) that `from_pretrained` can load.

    A registry reference resolves to its folder when it is a full model; an adapter has no
    whole model of its own (load it with `load_model`)."""
    settings = settings or get_settings()
    match parse_model_ref(ref):
        case Builtin(name):
            folder = settings.cache_dir / "builtin" / f"{name}-{BUILTIN[name].digest()}"
            if not (folder / "model_index.json").exists():
                build_model(name, folder)
            return str(folder)
        case S3Prefix(uri):
            storage = storage or Storage(settings)
            return str(storage.fetch_cached(uri, progress=progress))
        case Folder(path):
            return str(path)
        case HubId(hub_id):
            return hub_id  # production only: needs a reachable hub or a pre-filled HF cache
        case Registered() as registered:
            from atelier.registry import Registry

            storage = storage or Storage(settings)
            uri, card = Registry(storage).get(str(registered))
            if card.method != "full":
                raise InvalidInput(f"{card.ref} is a {card.method} adapter, not a whole model; "
                                   "load it with its base", where=str(registered))
            return str(storage.fetch_cached(uri, progress=progress))
    raise AssertionError(ref)  # every kind is matched above


def native_resolution(ref: str | ModelRef, *, settings: Settings | None = None,
                      storage: Storage | None = None) -> int:
    """The image side a model was built for: the UNet's sample size times the VAE's downscale.
    An adapter model's is its base's."""
    settings = settings or get_settings()
    parsed = parse_model_ref(ref)
    if isinstance(parsed, Builtin):
        return BUILTIN[parsed.name].resolution  # known without building it
    if isinstance(parsed, Registered):
        from atelier.registry import Registry

        _, card = Registry(storage or Storage(settings)).get(str(parsed))
        if card.method != "full":
            return native_resolution(card.base_model, settings=settings, storage=storage)
    source = resolve_model(parsed, settings=settings, storage=storage)
    unet, vae = _config(source, "unet"), _config(source, "vae")
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def _config(source: str, component: str) -> dict:
    path = Path(source, component, "config.json")
    if not path.exists():  # a hub id: its config from the hub or the local HF cache
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(source, f"{component}/config.json"))
        except Exception as e:  # offline, gated, missing: all mean we cannot know the size
            raise InvalidInput(f"cannot read the {component} config of {source}: {e}; set resolution",
                               where=source) from e
    return json.loads(path.read_text())


def load_pipeline(
    ref: str | ModelRef,
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
        raise InvalidInput(f"cannot load the model: {str(e).splitlines()[0]}", where=str(ref)) from e
    pipe.set_progress_bar_config(disable=True)
    if device:
        pipe = pipe.to(device)
    return pipe


def load_model(
    ref: str | ModelRef,
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

    def load(text: str | ModelRef, seen: tuple[str, ...]):
        parsed = parse_model_ref(text)
        if not isinstance(parsed, Registered):
            return load_pipeline(parsed, settings=settings, storage=storage, dtype=dtype)
        uri, card = Registry(storage).get(str(parsed))
        if card.ref in seen:  # a card naming itself as base: stop rather than recurse forever
            raise InvalidInput(f"model {card.ref} is its own base ({' -> '.join(seen)})", where=str(text))
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
