"""Objective probes only a synthetic world allows: the shop is drawn (atelier.catalogue.synth), so
each generated image's true metal and class are known and can be read back from its pixels.

- `metal_error` / `metal_accuracy`: the item's colour in CIELAB against its metal's (synth.METALS).
- `class_accuracy`: zero-shot classification with a CLIP encoder over one prompt per class.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from atelier.catalogue.synth import METALS
from atelier.errors import InvalidInput
from atelier.quality.metrics import MetricValue, absent, unavailable

# sRGB primaries to CIE XYZ, and the D65 white point (IEC 61966-2-1).
_RGB_TO_XYZ = np.array([
    [0.4124564, 0.3575761, 0.1804375],
    [0.2126729, 0.7151522, 0.0721750],
    [0.0193339, 0.1191920, 0.9503041],
])
_D65 = np.array([0.95047, 1.0, 1.08883])
_EPSILON = (6 / 29) ** 3

# A colour at least this far (CIE76) from the backdrop is the item's. A drawn backdrop is uniform
# (0) and the 64 px resize barely rings, but Sterling Silver lit x1.1 can sit within ~8 of a light
# backdrop, so the floor stays low: 8 is well past a just-noticeable difference (~2.3).
FOREGROUND_DELTA_E = 8.0
# Fewer foreground pixels than this share of the image is a speck, not an item: the smallest item
# drawn at 64 px (a Sterling Silver chain on a light backdrop) shows 22 pixels, this is 10.
MIN_FOREGROUND = 0.0025
# The colour is read from the item's core: foreground pixels at least this share as far from the
# backdrop as its farthest (99th percentile). At 64 px most of a thin hoop is anti-aliased edge, a
# blend with the backdrop that drags a plain median toward it (14k Gold reads as Vermeil on white,
# as Rose Gold on velvet): on the drawn shop, 74% nearest-metal with every foreground pixel, 89%
# with the core.
CORE = 0.7
# What an image with no item costs metal_error: ΔE from black to white, farther than any two
# metals (at most 67) and than a noise image's reading scores on average.
WORST_DELTA_E = 100.0


def to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB in 0-255 (any dtype, shape (..., 3)) to CIELAB under D65, shape (..., 3)."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    if c.shape[-1:] != (3,):
        raise InvalidInput(f"expected (..., 3) RGB, got {c.shape}", where="to_lab")
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = linear @ _RGB_TO_XYZ.T / _D65
    f = np.where(xyz > _EPSILON, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]),
                     200 * (f[..., 1] - f[..., 2])], axis=-1)


METAL_LAB = {name: to_lab(np.array(rgb)) for name, rgb in METALS.items()}


def _rgb(image: Image.Image | torch.Tensor) -> np.ndarray:
    """(H, W, 3) in 0-255 from a PIL image or a (3, H, W) tensor in [0, 1]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64)
    if isinstance(image, torch.Tensor) and image.ndim == 3 and image.shape[0] == 3:
        return image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy().astype(np.float64) * 255
    shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
    raise InvalidInput(f"expected a PIL image or a (3, H, W) tensor, got {shape}", where="probes")


def metal_colour(image: Image.Image | torch.Tensor) -> np.ndarray | None:
    """The item's colour in Lab (3,): the median of its core pixels, or None when nothing is drawn.

    The backdrop is the median of the border pixels; the foreground is whatever is more than
    FOREGROUND_DELTA_E from it; fewer foreground pixels than MIN_FOREGROUND of the image is None.
    """
    lab = to_lab(_rgb(image))
    border = np.concatenate([lab[0], lab[-1], lab[1:-1, 0], lab[1:-1, -1]])
    distance = np.linalg.norm(lab - np.median(border, axis=0), axis=-1)
    foreground = distance > FOREGROUND_DELTA_E
    if foreground.sum() < max(1, MIN_FOREGROUND * distance.size):
        return None
    core = distance >= CORE * np.percentile(distance[foreground], 99)
    return np.median(lab[foreground & core], axis=0)


def _nearest_metal(lab: np.ndarray) -> str:
    return min(METAL_LAB, key=lambda name: float(np.linalg.norm(METAL_LAB[name] - lab)))


def _colours(images: Sequence[Image.Image | torch.Tensor] | torch.Tensor, metals: Sequence[str],
             where: str) -> list[np.ndarray | None]:
    if len(images) == 0:
        raise InvalidInput("no images", where=where)
    if len(images) != len(metals):
        raise InvalidInput(f"{len(images)} images but {len(metals)} metals", where=where)
    unknown = sorted(set(metals) - set(METAL_LAB))
    if unknown:
        raise InvalidInput(f"unknown metals {unknown}; known: {sorted(METAL_LAB)}", where=where)
    return [metal_colour(image) for image in images]


def metal_error(images: Sequence[Image.Image | torch.Tensor] | torch.Tensor,
                metals: Sequence[str]) -> MetricValue:
    """Mean CIE76 ΔE between each image's metal colour and its true metal's (lower is better).

    An image with no item drawn counts WORST_DELTA_E (100, black to white), never dropped.
    `images`: PIL images, (3, H, W) tensors in [0, 1], or one (N, 3, H, W) tensor.
    """
    errors = [WORST_DELTA_E if lab is None else float(np.linalg.norm(lab - METAL_LAB[metal]))
              for lab, metal in zip(_colours(images, metals, "metal_error"), metals, strict=True)]
    return MetricValue(metric="metal_delta_e", value=float(np.mean(errors)), images=len(errors))


def metal_accuracy(images: Sequence[Image.Image | torch.Tensor] | torch.Tensor,
                   metals: Sequence[str]) -> MetricValue:
    """Share of images whose colour is nearest (in Lab) to their true metal among synth.METALS;
    an image with no item drawn is wrong. Chance is 1/len(METALS)."""
    hits = [lab is not None and _nearest_metal(lab) == metal
            for lab, metal in zip(_colours(images, metals, "metal_accuracy"), metals, strict=True)]
    return MetricValue(metric="metal_accuracy", value=float(np.mean(hits)), images=len(hits))


def chance_level(labels: Mapping[str, str]) -> float:
    """class_accuracy of a guess: 1 / the number of classes."""
    return 1.0 / len(labels)


def _batch(images: Sequence[Image.Image | torch.Tensor] | torch.Tensor) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        return images
    tensors = [torch.from_numpy(_rgb(image) / 255).permute(2, 0, 1).float() for image in images]
    if len({t.shape for t in tensors}) > 1:
        raise InvalidInput("images of different sizes", where="class_accuracy")
    return torch.stack(tensors)


def class_accuracy(images: Sequence[Image.Image | torch.Tensor] | torch.Tensor, classes: Sequence[str],
                   encoder: Any, labels: Mapping[str, str], batch_size: int = 32) -> MetricValue:
    """Share of images a CLIP encoder classifies, zero-shot over `labels` (class -> prompt such as
    "a photo of a ring"), as their true class. Chance is `chance_level(labels)` (1/len(labels)),
    which a report should print beside the value; MetricValue has no field for it.
    """
    if (gap := absent("class_accuracy", encoder, "no CLIP encoder")) is not None:
        return gap
    if len(labels) < 2:
        return unavailable("class_accuracy", "needs at least 2 classes")
    names = list(labels)
    unknown = sorted(set(classes) - set(names))
    if unknown:
        raise InvalidInput(f"classes {unknown} have no label; labelled: {names}", where="class_accuracy")
    batch = _batch(images)
    if batch.ndim != 4 or batch.shape[1] != 3 or len(batch) == 0:
        raise InvalidInput(f"expected (N, 3, H, W) with N >= 1, got {tuple(batch.shape)}",
                           where="class_accuracy")
    if len(batch) != len(classes):
        raise InvalidInput(f"{len(batch)} images but {len(classes)} classes", where="class_accuracy")
    prompts = [labels[name] for name in names]
    predicted = torch.cat([encoder.zero_shot_logits(batch[i:i + batch_size], prompts).argmax(-1)
                           for i in range(0, len(batch), batch_size)])
    truth = torch.tensor([names.index(c) for c in classes])
    return MetricValue(metric="class_accuracy", value=float((predicted == truth).float().mean()),
                       encoder=getattr(encoder, "name", type(encoder).__name__), images=len(batch))


def colour_distance(generated: Sequence[Image.Image | torch.Tensor] | torch.Tensor,
                    real: Sequence[Image.Image | torch.Tensor] | torch.Tensor) -> MetricValue:
    """How far each generated item's colour is (CIE76 ΔE, lower is better) from the nearest of the
    product's photos' item colours, averaged: the colour probe for a concept whose photos come in
    several metals. A generated image with no item counts WORST_DELTA_E; a real photo with none
    is skipped (it has no colour to match)."""
    if len(generated) == 0:
        raise InvalidInput("no generated images", where="colour_distance")
    targets = [lab for lab in (metal_colour(image) for image in real) if lab is not None]
    if not targets:
        return unavailable("colour_distance", "no item found in the real photos")
    errors = [WORST_DELTA_E if lab is None else min(float(np.linalg.norm(lab - t)) for t in targets)
              for lab in (metal_colour(image) for image in generated)]
    return MetricValue(metric="colour_distance", value=float(np.mean(errors)), images=len(errors))
