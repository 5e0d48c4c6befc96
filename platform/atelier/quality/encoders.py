"""The encoders quality metrics embed images and prompts with, loaded where Atelier loads models
(a folder, an s3:// prefix, or a hub id already in the local Hugging Face cache), never downloaded
while a metric runs.

- `ClipEncoder`: both towers of a transformers `CLIPModel` (CLIP-I, CLIP-T, the FID/KID features,
  and zero-shot class logits for IS). In production the public `openai/clip-vit-large-patch14`
  (or any CLIP checkpoint) copied into S3; offline, a CLIP the project trains on its own shop
  world, which is named as such and never as OpenAI's.
- `DinoEncoder`: a self-supervised ViT's CLS token (DINO): in production `facebook/dino-vits16`.

Images enter as float tensors (N, 3, H, W) in [0, 1]; each encoder resizes and normalises them
itself, with its checkpoint's own statistics.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from atelier.errors import InvalidInput, NotFound
from atelier.models.ref import Folder, HubId, S3Prefix, parse_model_ref
from atelier.quality.results import SHOP_CLIP
from atelier.settings import Settings, get_settings

# CLIP's and ImageNet's pixel statistics: what a checkpoint without a preprocessor_config.json
# was trained with (OpenAI CLIP; DINO's ViTs were trained on ImageNet).
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class EncoderMissing(NotFound):
    """An encoder's checkpoint is not where the settings say: its metrics are unavailable."""


def local_folder(ref: str, settings: Settings | None = None) -> str:
    """A folder (or a cached hub id) `from_pretrained` loads without the network. "shop-clip" is
    the shop base's CLIP, trained on the synthetic shop alone (atelier.models.shop)."""
    if ref == SHOP_CLIP:
        from atelier.models.load import resolve_model
        from atelier.models.shop import CLIP_FOLDER

        try:
            return str(Path(resolve_model("shop", settings=settings)) / CLIP_FOLDER)
        except NotFound as e:
            raise EncoderMissing(f"the shop CLIP is not there ({e.message})", where=e.where) from None
    try:
        parsed = parse_model_ref(ref, where="encoder", marker="config.json")
    except NotFound as e:
        raise EncoderMissing(f"no encoder there ({e.message})", where=e.where) from None
    match parsed:
        case Folder(path):
            return str(path)
        case S3Prefix(uri):
            from atelier.storage import Storage

            return str(Storage(settings or get_settings()).fetch_cached(uri))
        case HubId(hub_id):
            return hub_id  # loaded with local_files_only: the cache has it, or it is missing
    raise InvalidInput("an encoder is a folder, an s3:// prefix or a hub id", where=ref)


def _preprocessing(folder: str, default_mean: tuple, default_std: tuple, size: int
                   ) -> tuple[int, tuple, tuple]:
    path = Path(folder) / "preprocessor_config.json"
    if not path.exists():
        return size, default_mean, default_std
    config = json.loads(path.read_text())
    crop = config.get("crop_size") or config.get("size") or size
    side = crop.get("height") or crop.get("shortest_edge") if isinstance(crop, dict) else crop
    return int(side or size), tuple(config.get("image_mean", default_mean)), tuple(
        config.get("image_std", default_std))


def _pixels(images: torch.Tensor, side: int, mean: tuple, std: tuple) -> torch.Tensor:
    if images.ndim != 4 or images.shape[1] != 3:
        raise InvalidInput(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}",
                           where="images")
    x = F.interpolate(images.float().clamp(0, 1), size=(side, side), mode="bicubic",
                      align_corners=False, antialias=True)
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


def _load(cls: Any, folder: str, what: str) -> Any:
    try:
        return cls.from_pretrained(folder, local_files_only=True).eval()
    except (OSError, ValueError) as e:
        raise EncoderMissing(f"cannot load the {what}: {str(e).splitlines()[0][:200]}",
                             where=folder) from None


@dataclass
class ClipEncoder:
    """A CLIP: unit-length image and text embeddings in one space."""

    name: str
    model: Any  # transformers.CLIPModel
    tokenizer: Any
    side: int
    mean: tuple
    std: tuple

    @classmethod
    def load(cls, ref: str, *, name: str | None = None, settings: Settings | None = None) -> ClipEncoder:
        from transformers import CLIPModel

        folder = local_folder(ref, settings)
        model = _load(CLIPModel, folder, "CLIP model")
        tokenizer = _tokenizer(folder)
        side, mean, std = _preprocessing(folder, CLIP_MEAN, CLIP_STD,
                                         model.config.vision_config.image_size)
        return cls(name or ref, model, tokenizer, side, mean, std)

    @torch.no_grad()
    def images(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model.get_image_features(pixel_values=_pixels(images, self.side, self.mean, self.std))
        return F.normalize(_pooled(out), dim=-1)

    @torch.no_grad()
    def texts(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt",
                                max_length=self.model.config.text_config.max_position_embeddings)
        out = self.model.get_text_features(input_ids=tokens["input_ids"],
                                           attention_mask=tokens["attention_mask"])
        return F.normalize(_pooled(out), dim=-1)

    @torch.no_grad()
    def zero_shot_logits(self, images: torch.Tensor, labels: list[str]) -> torch.Tensor:
        """Logits of each image over `labels` (prompts such as "a photo of a ring")."""
        scale = self.model.logit_scale.exp()
        return scale * self.images(images) @ self.texts(labels).T


@dataclass
class DinoEncoder:
    """A self-supervised ViT: the CLS token of its last layer, unit length."""

    name: str
    model: Any  # transformers.ViTModel (or any AutoModel with a CLS token first)
    side: int
    mean: tuple
    std: tuple

    @classmethod
    def load(cls, ref: str, *, name: str | None = None, settings: Settings | None = None) -> DinoEncoder:
        from transformers import AutoModel

        folder = local_folder(ref, settings)
        model = _load(AutoModel, folder, "DINO model")
        side, mean, std = _preprocessing(folder, IMAGENET_MEAN, IMAGENET_STD,
                                         model.config.image_size)
        return cls(name or ref, model, side, mean, std)

    @torch.no_grad()
    def images(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=_pixels(images, self.side, self.mean, self.std))
        return F.normalize(out.last_hidden_state[:, 0], dim=-1)


def _pooled(out: Any) -> torch.Tensor:
    """transformers 5 returns the projected embedding as `pooler_output`; 4 returned a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _tokenizer(folder: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise EncoderMissing(f"cannot load the CLIP tokenizer: {str(e).splitlines()[0][:200]}",
                             where=folder) from None
