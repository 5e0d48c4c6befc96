"""Evaluating a model: per concept, images from fixed prompts and seeds, by the model and by its
base, measured against the concept's real photos (`atelier eval MODEL`, run by the
`atelier_jobs.evaluate` Ray job).

Prompts per concept:
- the instance prompt (with the identifier): CLIP-I, DINO, FID, KID against the photos; CLIP-T
  against the prompt without the identifier (CLIP has never seen the rare word); the probes;
- the class prompt, by both models: `prior_clip_i` is how alike the model's class images are to
  the base's (1: no language drift; DreamBooth's prior preservation is meant to keep it high);
- new contexts ("..., on a dark background"): CLIP-T, whether the concept recombines.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from atelier.quality import metrics, probes
from atelier.quality.results import ConceptEvaluation, EvalConfig, MetricValue


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def generate(pipe, prompt: str, cfg: EvalConfig) -> list[Image.Image]:
    """cfg.images images of `prompt`, image i from seed cfg.seed + i (the same for every model)."""
    generators = [torch.Generator("cpu").manual_seed(cfg.seed + i) for i in range(cfg.images)]
    side = int(pipe.unet.config.sample_size) * pipe.vae_scale_factor
    with torch.no_grad():
        return list(pipe([prompt] * cfg.images, num_inference_steps=cfg.steps,
                         guidance_scale=cfg.guidance_scale, generator=generators, width=side,
                         height=side).images)


def tensor(images: Sequence[Image.Image], side: int | None = None) -> torch.Tensor:
    """PIL images as (N, 3, H, W) floats in [0, 1], centre-cropped and resized to a common side
    (the first's), as training crops its photos: a 384x320 photo is not squashed."""
    side = side or images[0].width
    arrays = [torch.from_numpy(np.asarray(ImageOps.fit(i.convert("RGB"), (side, side), Image.Resampling.LANCZOS),
                                          dtype=np.float32) / 255) for i in images]
    return torch.stack(arrays).permute(0, 3, 1, 2)


def without(identifier: str, prompt: str) -> str:
    """The prompt with the identifier word taken out: what a public CLIP can read."""
    return " ".join(w for w in prompt.split() if w != identifier)


def measure(images: dict[str, list[Image.Image]], real: list[Image.Image], concept: Any,
            prompts: dict[str, list[str]], clip, dino, labels: dict[str, str],
            base_class_images: list[Image.Image] | None) -> list[MetricValue]:
    """Every metric of one model's images of one concept. `images`: instance, class, and
    context_<i> lists; `labels`: class name -> class prompt, for IS and class accuracy; `clip`
    and `dino`: encoders, or None / metrics.Absent where there is none."""
    instance = images["instance"]
    side = instance[0].width
    gen, ref = tensor(instance, side), tensor(real, side)
    clip_prompts = [without(concept.identifier, prompts["instance"][0])] * len(instance)
    out = [
        metrics.clip_i(gen, ref, clip),
        metrics.clip_t(gen, clip_prompts, clip),
        metrics.dino(gen, ref, dino),
        metrics.fid(gen, ref, clip),
        metrics.kid(gen, ref, clip),
        metrics.inception_score(tensor(instance + images["class"], side), clip, list(labels.values())),
    ]
    contexts = [(p, images[f"context_{i}"]) for i, p in enumerate(prompts["contexts"])]
    if contexts:
        context_images = [im for _, ims in contexts for im in ims]
        context_prompts = [without(concept.identifier, p) for p, ims in contexts for _ in ims]
        value = metrics.clip_t(tensor(context_images, side), context_prompts, clip)
        out.append(value.model_copy(update={"metric": "context_clip_t"}))
    if base_class_images is not None:
        out.append(prior_similarity(images["class"], base_class_images, clip, side))
    if concept.class_name in labels:
        both = instance + images["class"]
        out.append(probes.class_accuracy(tensor(both, side), [concept.class_name] * len(both), clip,
                                         labels))
    out.append(probes.colour_distance(instance, real))
    return out


def prior_similarity(model_images: list[Image.Image], base_images: list[Image.Image], clip,
                     side: int) -> MetricValue:
    """Language drift: the mean CLIP cosine of the model's and the base's class-prompt images,
    paired by seed (1: the class prompt still draws what the base drew)."""
    if (gap := metrics.absent("prior_clip_i", clip, "no CLIP encoder")) is not None:
        return gap
    a, b = clip.images(tensor(model_images, side)), clip.images(tensor(base_images, side))
    return MetricValue(metric="prior_clip_i", value=float((a * b).sum(-1).mean()), encoder=clip.name,
                       images=len(model_images))


def evaluate_concept(pipe, base_pipe, concept: Any, real: list[Image.Image], cfg: EvalConfig,
                     clip, dino, labels: dict[str, str]) -> tuple[ConceptEvaluation, dict]:
    """The concept's evaluation, and the images made for it (model's and base's, by prompt kind)."""
    prompts = {"instance": [concept.instance_prompt], "class": [concept.class_prompt],
               "contexts": [c.format(instance=concept.instance_prompt) for c in cfg.contexts]}
    kinds = [("instance", concept.instance_prompt), ("class", concept.class_prompt)] + [
        (f"context_{i}", p) for i, p in enumerate(prompts["contexts"])]
    made = {kind: generate(pipe, prompt, cfg) for kind, prompt in kinds}
    base_made: dict[str, list[Image.Image]] = {}
    if base_pipe is not None:
        base_made = {kind: generate(base_pipe, prompt, cfg) for kind, prompt in kinds[:2]}
    tuned = measure(made, real, concept, prompts, clip, dino, labels, base_made.get("class"))
    base = measure(base_made, real, concept, {**prompts, "contexts": []}, clip, dino, labels,
                   None) if base_made else []
    return ConceptEvaluation(concept=concept.name, prompts=prompts, metrics=tuned,
                             base_metrics=base), {"model": made, "base": base_made}
