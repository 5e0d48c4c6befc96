"""The shop base: the tiny SD architecture (a narrower VAE) and a tiny CLIP, pretrained on the shop world
(`atelier.catalogue.world`) by `atelier models pretrain`, and committed with the code.

The pack keeps every trained weight in fp16 except the two CLIP token-embedding tables
(49,408 x 32 and 49,408 x 64, two thirds of the parameters): those are frozen during pretraining
at values drawn from the seed, so they are regenerated on load instead of stored, and checked
against their digests. Freezing them costs the world nothing (its captions use a few dozen
tokens) and keeps every rare token, such as a DreamBooth identifier, an untrained prior, as in SD.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from atelier.errors import IntegrityError, NotFound
from atelier.files import write_atomic

SD_ARCHITECTURE = "shop"  # the built-in whose configs the shop base has
PACK = Path(__file__).parent / "weights" / "shop"
WEIGHTS, INFO = "weights.safetensors", "shop.json"
CLIP_FOLDER = "clip"  # the shop CLIP's folder inside a materialised shop base

CLIP_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                 max_position_embeddings=77, hidden_act="quick_gelu")
CLIP_VISION = dict(image_size=64, patch_size=8, hidden_size=64, intermediate_size=128,
                   num_hidden_layers=4, num_attention_heads=4, hidden_act="quick_gelu")
CLIP_PROJECTION = 64
# The images the shop CLIP saw: 64 px, scaled to [-1, 1] (the VAE's range).
CLIP_PREPROCESSOR = {"crop_size": {"height": 64, "width": 64}, "image_mean": [0.5, 0.5, 0.5],
                     "image_std": [0.5, 0.5, 0.5]}
FROZEN = {"text_encoder": "embeddings.token_embedding.weight",  # transformers 5 CLIPTextModel
          "clip": "text_model.embeddings.token_embedding.weight"}
COMPONENTS = ("unet", "vae", "text_encoder", "clip")


def frozen_table(seed: int, component: str, rows: int, dim: int):
    """The frozen token embeddings of a component: N(0, 0.02) as CLIP initialises them, drawn
    from a generator of their own so that nothing else's randomness moves them."""
    import torch

    offset = COMPONENTS.index(component)
    generator = torch.Generator().manual_seed(seed * 100 + offset)
    return torch.randn(rows, dim, generator=generator) * 0.02


def build_components(seed: int = 0) -> dict[str, Any]:
    """The shop base before pretraining: the tiny SD's UNet, VAE and text encoder and the shop
    CLIP, seeded, with their token tables frozen."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    from atelier.models.builtin import build_pipeline
    from atelier.models.tokenizer import build_clip_tokenizer

    pipe = build_pipeline(SD_ARCHITECTURE, seed)
    tokenizer = build_clip_tokenizer()
    torch.manual_seed(seed + 3)
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         projection_dim=CLIP_PROJECTION, **CLIP_TEXT),
        vision_config=dict(projection_dim=CLIP_PROJECTION, **CLIP_VISION),
        projection_dim=CLIP_PROJECTION,
    ))
    components = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder, "clip": clip}
    for name, key in FROZEN.items():
        parameter = components[name].get_parameter(key)
        with torch.no_grad():
            parameter.copy_(frozen_table(seed, name, *parameter.shape))
        parameter.requires_grad_(False)
    return components


def _digest(tensor) -> str:
    return hashlib.sha256(tensor.detach().float().contiguous().numpy().tobytes()).hexdigest()


def pack(components: dict[str, Any], out_dir: Path, *, seed: int, info: dict[str, Any]) -> Path:
    """Write the pack: every component's weights in fp16 except the frozen tables, and
    `shop.json` (seed, digests, and `info`: how it was pretrained and what it measured)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors, frozen = {}, {}
    for name in COMPONENTS:
        for key, value in components[name].state_dict().items():
            if key == FROZEN.get(name):
                frozen[name] = _digest(value)
                continue
            tensors[f"{name}.{key}"] = value.detach().to("cpu").half().contiguous()
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        staged = Path(tmp) / WEIGHTS
        save_file(tensors, str(staged))
        weights_sha = hashlib.sha256(staged.read_bytes()).hexdigest()
        staged.replace(out_dir / WEIGHTS)
    record = {"seed": seed, "sd_architecture": SD_ARCHITECTURE, "weights_sha256": weights_sha,
              "frozen_sha256": frozen,
              # Measured by pretraining (latents of unit variance), so not the architecture's.
              "vae_scaling_factor": float(components["vae"].config.scaling_factor), **info}
    write_atomic(out_dir / INFO, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return out_dir


def read_info(pack_dir: Path | None = None) -> dict[str, Any]:
    pack_dir = pack_dir or PACK
    path = Path(pack_dir) / INFO
    if not path.exists():
        raise NotFound("the shop base has not been pretrained", where=str(pack_dir),
                       hint="run `atelier models pretrain` (about 90 minutes on 2 CPU cores)")
    return json.loads(path.read_text())


def unpack(pack_dir: Path | None = None) -> dict[str, Any]:
    """The pretrained components, verified: the weights file against its digest, and the
    regenerated frozen tables against theirs (a torch that draws other numbers fails here)."""
    import torch
    from safetensors.torch import load_file

    pack_dir = Path(pack_dir or PACK)
    info = read_info(pack_dir)
    blob = (pack_dir / WEIGHTS).read_bytes()
    if hashlib.sha256(blob).hexdigest() != info["weights_sha256"]:
        raise IntegrityError("the shop base's weights do not match their digest", where=str(pack_dir))
    components = build_components(info["seed"])
    tensors = load_file(str(pack_dir / WEIGHTS))
    for name in COMPONENTS:
        module = components[name]
        state = {k[len(name) + 1:]: v.float() for k, v in tensors.items() if k.startswith(name + ".")}
        frozen_key = FROZEN.get(name)
        if frozen_key:
            table = module.get_parameter(frozen_key)
            if _digest(table) != info["frozen_sha256"][name]:
                raise IntegrityError(f"the shop base's regenerated {name} token table differs from "
                                     "the one it was pretrained with (another torch version?)",
                                     where=str(pack_dir))
            state[frozen_key] = table.detach()
        with torch.no_grad():
            module.load_state_dict(state, strict=True)
        module.eval()
    components["vae"].register_to_config(scaling_factor=info["vae_scaling_factor"])
    return components


def save_folders(components: dict[str, Any], out: Path) -> Path:
    """A standard diffusers folder at `out`, with the shop CLIP (model, tokenizer, preprocessor)
    in `out/clip`: every loader downstream reads it like any checkpoint."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    from atelier.models.builtin import BUILTIN
    from atelier.models.tokenizer import build_clip_tokenizer

    tokenizer = build_clip_tokenizer()
    pipe: Any = StableDiffusionPipeline(
        vae=components["vae"], text_encoder=components["text_encoder"], tokenizer=tokenizer,
        unet=components["unet"], scheduler=PNDMScheduler(skip_prk_steps=True,
                                                         **BUILTIN[SD_ARCHITECTURE].scheduler),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    for module in (pipe.text_encoder, components["clip"]):
        # transformers 5 saves only from distributed rank 0; a Ray worker of any rank must save.
        module.should_save_on_this_rank = lambda is_main_process: is_main_process
    pipe.save_pretrained(out, safe_serialization=True)
    clip_dir = Path(out) / CLIP_FOLDER
    components["clip"].save_pretrained(clip_dir, safe_serialization=True)
    tokenizer.save_pretrained(clip_dir)
    (clip_dir / "preprocessor_config.json").write_text(json.dumps(CLIP_PREPROCESSOR, indent=2) + "\n")
    return Path(out)


def materialise(out: Path, pack_dir: Path | None = None) -> Path:
    """The committed pack as a diffusers folder at `out` (atomically)."""
    from atelier.files import move_into_place

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_folders(unpack(pack_dir), tmp)
        move_into_place(tmp, out, keep=lambda there: (there / "model_index.json").exists())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
