"""A model replica's pipelines: base pipelines shared by their LoRA and textual-inversion models,
full fine-tunes on their own, a scheduler per request, and compatible requests run as one batch.

A LoRA model is an adapter on its base's UNet (and text encoder), switched on only for its own
requests. A textual-inversion model shares its base's UNet and VAE but gets its own tokenizer and
text encoder: its tokens would otherwise change the prompts of everyone else using the base.

Everything here blocks (torch, S3): the deployment calls it from worker threads. A base's lock
is held while its pipeline runs or while an adapter is added to or removed from it, because an
adapter changes the very modules another request may be running.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from itertools import chain, count
from pathlib import Path
from typing import Any

from atelier.errors import AtelierError, ModelNotReady, NotFound, StorageUnavailable, first_line
from atelier.models import adapters
from atelier.models.load import load_model, load_pipeline, resolve_model
from atelier.models.ref import Registered, S3Prefix, parse_model_ref
from atelier.registry import ModelCard, Registry
from atelier.sampling import encode_png
from atelier.settings import Settings
from atelier.storage import Storage

log = logging.getLogger("ray.serve")

SCHEDULERS = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
}
_CLASS_TO_NAME = {cls: name for name, cls in SCHEDULERS.items()}


@dataclass(eq=False)
class Base:
    """A loaded pipeline, and the models that run on it."""

    key: str
    pipe: Any
    nbytes: int
    scheduler_class: type[Any]
    scheduler_config: dict
    source: str | None = None  # what `load_pipeline` reloads it from; None: a private pipeline
    lock: threading.Lock = field(default_factory=threading.Lock)
    users: set[str] = field(default_factory=set)

    @property
    def native_size(self) -> tuple[int, int]:
        side = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        return side, side


@dataclass(eq=False)
class Loaded:
    """One servable model: what the multiplexed loader returns and Serve evicts.

    Serve calls `__del__` when it evicts the model (LRU); removal waits for requests still
    running on it, so an eviction never pulls an adapter from under a batch.
    """

    model_id: str
    base: Base
    cache: ModelCache
    user: str = ""  # this load's name among its base's users
    adapter: str | None = None
    view: Any = None  # textual inversion: the base's UNet and VAE with its own text encoder
    nbytes: int = 0
    in_use: int = 0
    evicted: bool = False
    released: bool = False

    @property
    def pipe(self):
        return self.view if self.view is not None else self.base.pipe

    def acquire(self) -> bool:
        """Mark one request running on the model; False if it was evicted meanwhile."""
        with self.cache.guard:
            if self.evicted:
                return False
            self.in_use += 1
            return True

    def done(self) -> None:
        with self.cache.guard:
            self.in_use -= 1
            free = self.evicted and self.in_use == 0
        if free:
            self.cache.release(self)

    def __del__(self) -> None:
        # Also reached by garbage collection after Serve's explicit call: release only once.
        try:
            with self.cache.guard:
                if self.evicted:
                    return
                self.evicted = True
                free = self.in_use == 0
            if free:
                self.cache.release(self)
        except Exception:  # never raise from a finaliser
            log.exception("unloading %s failed", self.model_id)


@dataclass
class Job:
    """One request's share of a batch."""

    loaded: Loaded
    prompt: str
    negative_prompt: str | None
    n: int
    seed: int
    steps: int
    guidance_scale: float
    width: int
    height: int
    scheduler: str

    @property
    def key(self) -> tuple:
        """Requests with equal keys run as one pipeline call."""
        return (id(self.loaded), self.width, self.height, self.steps, self.scheduler,
                self.guidance_scale)


def placement(num_gpus: float, dtype: str):
    """(device, torch dtype) of a replica: fp16 on a GPU, fp32 on a CPU (where fp16 is slower),
    unless the pool names a dtype."""
    import torch

    device = "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        return device, torch.float16 if device == "cuda" else torch.float32
    return device, getattr(torch, dtype)


def tensor_bytes(*modules) -> int:
    return sum(t.numel() * t.element_size()
               for m in modules if m is not None for t in chain(m.parameters(), m.buffers()))


def pipeline_bytes(pipe) -> int:
    return tensor_bytes(pipe.unet, pipe.vae, pipe.text_encoder)


class ModelCache:
    """Pipelines of one replica, keyed by what they were loaded from."""

    def __init__(self, settings: Settings, *, base_models: dict[str, str], device: str, dtype):
        self.settings = settings
        self.storage = Storage(settings)
        self.registry = Registry(self.storage)
        self.base_models = base_models
        self.device = device
        self.dtype = dtype
        self.bases: dict[str, Base] = {}
        self.adapter_bytes = 0
        self.guard = threading.Lock()  # bases, users, in_use/evicted flags
        self._loads = count()

    # -- loading ---------------------------------------------------------------------------------
    def model_id(self, ref: str) -> str:
        """The id requests for `ref` arrive under: the ingress sends a registered model as
        "name:version", with the latest version filled in."""
        return ref if ref in self.base_models else self.registry.get(ref)[1].ref

    def load(self, model_id: str) -> Loaded:
        """Load `model_id` (a base name or "name:version"); every failure but "no such model" and
        "storage down" becomes ModelNotReady carrying the reason."""
        try:
            return self._load_or_prune(model_id)
        except (NotFound, StorageUnavailable):
            raise
        except AtelierError as e:
            reason = e.message + (f" ({e.hint})" if e.hint else "")
            raise ModelNotReady(f"cannot load model {model_id!r}: {reason}", where="model") from e
        except Exception as e:  # corrupt weights, bad configs, out of memory: anything torch says
            raise ModelNotReady(f"cannot load model {model_id!r}: {first_line(e)}", where="model") from e

    def _load_or_prune(self, model_id: str) -> Loaded:
        # Each load counts on its base under its own name: an evicted model whose last request
        # still runs and its reloaded successor are two users, not one.
        user = f"{model_id}#{next(self._loads)}"
        try:
            return self._load(model_id, user)
        except BaseException:
            # A base taken (or loaded) for a model that then failed serves nobody.
            with self.guard:
                for base in self.bases.values():
                    base.users.discard(user)
            self._prune()
            raise

    def _load(self, model_id: str, user: str) -> Loaded:
        if model_id in self.base_models:
            return self._loaded(self._source_base(self.base_models[model_id], user), model_id, user)
        uri, card = self.registry.get(model_id)
        if card.method == "full":
            return self._loaded(self._source_base(uri, user, key=f"registry:{card.ref}"), model_id, user)
        base = self._base_of(card, user)
        if base is None or (card.method == "textual_inversion" and base.source is None):
            # The base is itself an adapter model: stacking adapters on a shared pipeline would
            # need both active at once (and a private pipeline has no files to take a fresh
            # text encoder from), so this one gets a pipeline of its own.
            if base is not None:
                self._leave(base, user)
            return self._loaded(self._private(model_id, user), model_id, user)
        folder = self.storage.fetch_cached(uri)
        if card.method == "lora":
            return self._add_lora(base, card, folder, model_id, user)
        return self._add_embeddings(base, card, folder, model_id, user)

    def _base_of(self, card: ModelCard, user: str) -> Base | None:
        ref = card.base_model
        if not isinstance(parse_model_ref(ref), Registered):
            return self._source_base(ref, user)
        uri, base_card = self.registry.get(ref)
        if base_card.method != "full":
            return None
        return self._source_base(uri, user, key=f"registry:{base_card.ref}")

    def _source_base(self, source: str, user: str, key: str | None = None) -> Base:
        return self._base(key or f"source:{source}", user, lambda: self._place(load_pipeline(
            source, settings=self.settings, storage=self.storage, dtype=self.dtype)), source)

    def _private(self, model_id: str, user: str) -> Base:
        return self._base(f"private:{model_id}", user, lambda: self._place(load_model(
            model_id, settings=self.settings, storage=self.storage, dtype=self.dtype)))

    def _base(self, key: str, user: str, make, source: str | None = None) -> Base:
        """The base under `key`, loaded with `make` if needed, with `user` counted on it at once:
        a model released meanwhile (in another thread) must not drop a base being taken."""
        with self.guard:
            base = self.bases.get(key)
            if base is not None:
                base.users.add(user)
                return base
        pipe = make()
        base = Base(key=key, pipe=pipe, nbytes=pipeline_bytes(pipe), source=source,
                    scheduler_class=type(pipe.scheduler), scheduler_config=dict(pipe.scheduler.config))
        base.users.add(user)
        with self.guard:
            self.bases[key] = base
        return base

    def _leave(self, base: Base, user: str) -> None:
        with self.guard:
            base.users.discard(user)
        self._drop_if_unused(base)

    def _place(self, pipe):
        pipe = pipe.to(self.device)
        if self.device == "cuda":
            try:  # xformers where installed; PyTorch SDPA (the diffusers default) otherwise
                import xformers  # noqa: F401

                pipe.enable_xformers_memory_efficient_attention()
            except Exception:
                pass
        return pipe

    def _add_lora(self, base: Base, card: ModelCard, folder: Path, model_id: str, user: str) -> Loaded:
        with base.lock:
            before = pipeline_bytes(base.pipe)
            # Named per load: a reloaded model may meet its evicted self still finishing a batch.
            adapter = adapters.apply_lora(base.pipe, folder,
                                          adapter_name=f"{card.name}_{card.version}_{user.rsplit('#', 1)[1]}")
            # Loading leaves the new adapter active on every layer: back to "no adapter" until a
            # request for this model selects it.
            _activate(base.pipe, None)
            added = max(0, pipeline_bytes(base.pipe) - before)
        loaded = self._loaded(base, model_id, user, adapter=adapter, nbytes=added)
        with self.guard:
            self.adapter_bytes += added
        return loaded

    def _add_embeddings(self, base: Base, card: ModelCard, folder: Path, model_id: str,
                        user: str) -> Loaded:
        from diffusers import StableDiffusionPipeline

        # A fresh text encoder and tokenizer from the base's own files: the shared ones may
        # carry LoRA layers and other models' tokens.
        assert base.source is not None, "a shared base always has its source"
        source = resolve_model(base.source, settings=self.settings, storage=self.storage)
        tokenizer = type(base.pipe.tokenizer).from_pretrained(source, subfolder="tokenizer")
        text_encoder = type(base.pipe.text_encoder).from_pretrained(
            source, subfolder="text_encoder", dtype=self.dtype).to(self.device)
        view: Any = StableDiffusionPipeline(
            vae=base.pipe.vae, unet=base.pipe.unet, text_encoder=text_encoder, tokenizer=tokenizer,
            scheduler=base.pipe.scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
        view.set_progress_bar_config(disable=True)
        adapters.apply_textual_inversion(view, folder, card.token)
        added = tensor_bytes(view.text_encoder)
        loaded = self._loaded(base, model_id, user, view=view, nbytes=added)
        with self.guard:
            self.adapter_bytes += added
        return loaded

    def _loaded(self, base: Base, model_id: str, user: str, **kwargs) -> Loaded:
        return Loaded(model_id=model_id, base=base, cache=self, user=user, **kwargs)

    # -- unloading -------------------------------------------------------------------------------
    def release(self, loaded: Loaded) -> None:
        """Take the model off its base; drop the base when nothing runs on it any more."""
        with self.guard:
            if loaded.released:
                return
            loaded.released = True
        base = loaded.base
        if loaded.adapter:
            with base.lock:
                _delete_adapter(base.pipe, loaded.adapter)
        loaded.view = None
        with self.guard:
            self.adapter_bytes -= loaded.nbytes
        self._leave(base, loaded.user)

    def _prune(self) -> None:
        with self.guard:
            unused = [base for base in self.bases.values() if not base.users]
        for base in unused:
            self._drop_if_unused(base)

    def _drop_if_unused(self, base: Base) -> None:
        with self.guard:
            if not base.users and self.bases.get(base.key) is base:
                del self.bases[base.key]
                dropped = True
            else:
                dropped = False
        if dropped and self.device == "cuda":
            import torch

            torch.cuda.empty_cache()

    def bytes_loaded(self) -> int:
        """Weights held now: every base pipeline plus what adapters added to them."""
        with self.guard:
            return sum(b.nbytes for b in self.bases.values()) + self.adapter_bytes

    def estimate(self, model_id: str) -> int:
        """Bytes loading `model_id` would add, from the sizes its manifests record (0 when
        unknown, e.g. a built-in base before it is first built)."""
        try:
            if model_id in self.base_models:
                return 0 if f"source:{self.base_models[model_id]}" in self.bases else self._source_bytes(
                    self.base_models[model_id])
            uri, card = self.registry.get(model_id)
            size = self.storage.read_manifest(uri).total_bytes
            if card.method != "full" and isinstance(parse_model_ref(card.base_model), Registered):
                base_uri, base_card = self.registry.get(card.base_model)
                if f"registry:{base_card.ref}" not in self.bases:
                    size += self.storage.read_manifest(base_uri).total_bytes
            elif card.method != "full" and f"source:{card.base_model}" not in self.bases:
                size += self._source_bytes(card.base_model)
            return size
        except AtelierError:
            return 0  # the load itself will report the problem

    def _source_bytes(self, source: str) -> int:
        if isinstance(parse_model_ref(source), S3Prefix):
            return self.storage.read_manifest(source).total_bytes
        return 0

    # -- generating ------------------------------------------------------------------------------
    def run(self, jobs: list[Job]) -> list[list[bytes]]:
        """Run compatible jobs (equal `Job.key`) as one pipeline call; PNGs per job."""
        import torch

        first = jobs[0]
        base, pipe = first.loaded.base, first.loaded.pipe
        prompts, negatives, generators = [], [], []
        for job in jobs:
            for i in range(job.n):
                prompts.append(job.prompt)
                negatives.append(job.negative_prompt or "")
                # A CPU generator per image: its noise depends on its seed alone, not on the
                # device, nor on which other requests share the batch.
                generators.append(torch.Generator(device="cpu").manual_seed(job.seed + i))
        # The base's lock even for a view: the UNet it runs is the base's.
        with base.lock:
            _activate(pipe, first.loaded.adapter)
            pipe.scheduler = self.scheduler(base, first.scheduler)
            with torch.inference_mode():
                images = pipe(
                    prompt=prompts, negative_prompt=negatives,
                    num_inference_steps=first.steps, guidance_scale=first.guidance_scale,
                    width=first.width, height=first.height, generator=generators,
                ).images
        pngs = [encode_png(image) for image in images]
        out, at = [], 0
        for job in jobs:
            out.append(pngs[at:at + job.n])
            at += job.n
        return out

    @staticmethod
    def scheduler(base: Base, name: str):
        """A fresh scheduler (they keep per-run state) built from the model's own config, so
        switching never compounds and never reloads weights."""
        import diffusers

        wanted = SCHEDULERS.get(name)
        if wanted is None or wanted == base.scheduler_class.__name__:
            cls = base.scheduler_class
        else:
            cls = getattr(diffusers, wanted)
        return cls.from_config(base.scheduler_config)


def scheduler_name(base: Base) -> str:
    """The request-level name of the scheduler the model was saved with (its class name when it
    is none of ours)."""
    name = base.scheduler_class.__name__
    return _CLASS_TO_NAME.get(name, name)


# -- adapters on a shared base --------------------------------------------------------------------
def _activate(pipe, adapter: str | None) -> None:
    """Make `adapter` the only active LoRA on UNet and text encoder; None: none at all.

    Done per component and per layer (peft's own switches) because a text encoder's adapters are
    injected by peft directly, which the pipeline-level `set_adapters` does not see.
    """
    from diffusers.utils.peft_utils import set_adapter_layers, set_weights_and_activate_adapters

    for component in (pipe.unet, pipe.text_encoder):
        present = list(getattr(component, "peft_config", None) or {})
        if adapter is not None and adapter in present:
            set_adapter_layers(component, enabled=True)
            set_weights_and_activate_adapters(component, [adapter], [1.0])
        elif present:
            set_adapter_layers(component, enabled=False)


def _delete_adapter(pipe, adapter: str) -> None:
    pipe.delete_adapters([adapter])
    # diffusers removes the text encoder's layers but not its config entry (it only tracks
    # adapters that transformers loaded), so the name would still be listed as present.
    config = getattr(pipe.text_encoder, "peft_config", None)
    if config is not None:
        config.pop(adapter, None)

