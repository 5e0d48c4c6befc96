"""Fine-tuned weights that sit on a base model (LoRA, textual inversion): saved and put back bit-exactly."""

from __future__ import annotations

import os
import re
from pathlib import Path

from atelier.errors import IntegrityError, InvalidInput, NotFound

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
EMBEDDINGS = "learned_embeds.safetensors"
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
# The rest of a transformer block and the ResNet convolutions: more capacity per rank.
WIDE = ["proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]
TEXT_ENCODER = ["q_proj", "k_proj", "v_proj", "out_proj"]


def lora_target_modules(wide: bool = False) -> list[str]:
    """UNet module names LoRA adapts: attention projections, plus conv/proj/ff layers if `wide`."""
    return ATTENTION + WIDE if wide else list(ATTENTION)


def add_lora(unet, rank: int = 4, alpha: int | None = None, wide: bool = False,
             text_encoder=None) -> None:
    """Add a trainable LoRA adapter ("default") to the UNet and, optionally, the text encoder."""
    from peft import LoraConfig, inject_adapter_in_model

    alpha = alpha or rank
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                target_modules=lora_target_modules(wide)))
    if text_encoder is not None:
        # transformers 5 refuses `text_encoder.add_adapter` with peft < 0.22 (0.21.2 is the newest
        # published); peft's own injection is what that method wraps, without the version gate.
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                           target_modules=TEXT_ENCODER), text_encoder)


def save_lora(unet, out_dir: str | os.PathLike, text_encoder=None) -> Path:
    """Write the LoRA adapters of `unet` (and `text_encoder`) as `pytorch_lora_weights.safetensors`."""
    from diffusers import StableDiffusionPipeline

    out = Path(out_dir)
    layers, metadata = {}, {}
    for role, module in (("unet", unet), ("text_encoder", text_encoder)):
        if module is None:
            continue
        state, config = _adapter_state(module, role)
        layers[f"{role}_lora_layers"] = state
        # Without the config in the file, loading assumes alpha == rank and silently rescales
        # every adapter trained with another alpha.
        metadata[f"{role}_lora_adapter_metadata"] = config.to_dict()
    # The peft state dict goes in as is: `convert_state_dict_to_diffusers` renames keys that
    # diffusers 0.42 then fails to match, dropping every attention adapter with only a warning.
    StableDiffusionPipeline.save_lora_weights(out, safe_serialization=True, **layers, **metadata)
    return out


def apply_lora(pipe, folder: str | os.PathLike, adapter_name: str | None = None) -> str:
    """Load a LoRA folder onto `pipe`, unfused; return the adapter's name.

    Left unfused: the result is bit-identical to the pipeline the adapter was trained in (fusing
    rounds W + s*BA), and the adapter can be unloaded or swapped on a shared base. The extra
    low-rank matmuls cost little next to attention; `pipe.fuse_lora()` is there when latency wins.
    """
    folder = Path(folder)
    if not (folder / LORA_WEIGHTS).is_file():
        raise NotFound(f"no {LORA_WEIGHTS}: not a LoRA folder", where=str(folder))
    name = _adapter_name(adapter_name or folder.name)
    state, _, metadata = pipe.lora_state_dict(str(folder), weight_name=LORA_WEIGHTS,
                                              return_lora_metadata=True)
    try:
        # What `pipe.load_lora_weights` does for the UNet; its text-encoder half goes through
        # transformers' `load_adapter`, which refuses peft < 0.22, hence the split.
        if any(k.startswith("unet.") for k in state):
            pipe.load_lora_into_unet(state, network_alphas=None, unet=pipe.unet, adapter_name=name,
                                     metadata=metadata or None, _pipeline=pipe)
        text_state = _section(state, "text_encoder")
        if text_state:
            _load_text_encoder_lora(pipe.text_encoder, text_state,
                                    _section(metadata or {}, "text_encoder"), name, folder)
    except ValueError as e:  # e.g. the adapter name is taken
        raise InvalidInput(f"cannot load the LoRA: {str(e).splitlines()[0]}", where=str(folder)) from e
    _check_loaded(pipe, state, name, folder)
    return name


def save_textual_inversion(text_encoder, tokenizer, token: str, out_dir: str | os.PathLike) -> Path:
    """Write the embedding of `token` (and its `token_1`, ... vectors) as `learned_embeds.safetensors`.

    The format is diffusers' own: one tensor (vectors x hidden) under the token's name, which
    `pipe.load_textual_inversion(folder)` reads back exactly, token name included.
    """
    from safetensors.torch import save_file

    vocab = tokenizer.get_vocab()
    if token not in vocab:
        raise InvalidInput(f"token {token!r} is not in the tokenizer", where="textual inversion")
    tokens = [token]
    while f"{token}_{len(tokens)}" in vocab:
        tokens.append(f"{token}_{len(tokens)}")
    ids = tokenizer.convert_tokens_to_ids(tokens)
    rows = text_encoder.get_input_embeddings().weight[ids].detach().cpu().contiguous()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({token: rows}, out / EMBEDDINGS)
    return out


def embedding_files(folder: str | os.PathLike) -> dict[str, Path]:
    """Token -> embedding file of a textual-inversion folder (the folder's own file, or one per
    sub-folder, as joint models save one per concept)."""
    from safetensors import safe_open

    folder = Path(folder)
    files = sorted([folder / EMBEDDINGS] if (folder / EMBEDDINGS).is_file()
                   else folder.glob(f"*/{EMBEDDINGS}"))
    tokens: dict[str, Path] = {}
    for path in files:
        with safe_open(path, framework="numpy") as f:
            keys = list(f.keys())
        if len(keys) != 1:
            raise InvalidInput(f"expected one token per embedding file, found {len(keys)}",
                               where=str(path))
        if keys[0] in tokens:
            raise InvalidInput(f"token {keys[0]!r} is in two files", where=str(path))
        tokens[keys[0]] = path
    if not tokens:
        raise NotFound(f"no {EMBEDDINGS}: not a textual-inversion folder", where=str(folder))
    return tokens


def apply_textual_inversion(pipe, folder: str | os.PathLike, token: str | None = None) -> list[str]:
    """Add the folder's learned token(s) to `pipe`; `token` renames a single one. Returns the tokens."""
    files = embedding_files(folder)
    if token is not None and len(files) > 1:
        raise InvalidInput("a token name can only be given for a single embedding",
                           where=str(folder))
    loaded = []
    for name, path in files.items():
        name = token or name
        try:
            pipe.load_textual_inversion(str(path.parent), token=name, weight_name=EMBEDDINGS)
        except ValueError as e:  # the token already exists in the tokenizer
            raise InvalidInput(f"cannot add token {name!r}: {str(e).splitlines()[0]}",
                               where=str(path)) from e
        loaded.append(name)
    return loaded


# -- helpers --------------------------------------------------------------------------------------
def _adapter_state(module, role: str):
    from peft.utils import get_peft_model_state_dict

    configs = getattr(module, "peft_config", None) or {}
    if len(configs) != 1:
        raise InvalidInput(f"the {role} must carry exactly one LoRA adapter, has {len(configs)}",
                           where="save_lora")
    name, config = next(iter(configs.items()))
    return get_peft_model_state_dict(module, adapter_name=name), config


def _adapter_name(text: str) -> str:
    # peft keeps adapters in ModuleDicts: no dots, not empty.
    return re.sub(r"[^A-Za-z0-9_]", "_", text) or "lora"


def _section(mapping: dict, prefix: str) -> dict:
    return {k[len(prefix) + 1:]: v for k, v in mapping.items() if k.startswith(f"{prefix}.")}


def _load_text_encoder_lora(text_encoder, state, metadata, name: str, folder: Path) -> None:
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    if not metadata:
        raise InvalidInput("the text encoder's LoRA has no adapter config in the file "
                           "(save it with atelier's save_lora)", where=str(folder))
    inject_adapter_in_model(LoraConfig(**metadata), text_encoder, adapter_name=name)
    set_peft_model_state_dict(text_encoder, state, adapter_name=name)


def _check_loaded(pipe, state, name: str, folder: Path) -> None:
    """Loading warns, not fails, on keys it cannot place: count what actually landed."""
    from peft.utils import get_peft_model_state_dict

    for role in ("unet", "text_encoder"):
        expected = _section(state, role)
        if not expected:
            continue
        loaded = get_peft_model_state_dict(getattr(pipe, role), adapter_name=name)
        if loaded.keys() != expected.keys():
            raise IntegrityError(
                f"only {len(loaded.keys() & expected.keys())} of {len(expected)} {role} LoRA "
                "tensors loaded", where=str(folder),
            )
