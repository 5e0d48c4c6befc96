"""Quality metrics of generated images, over pluggable encoders (atelier.quality.encoders).

- CLIP-I: mean cosine similarity between every generated and every real image's CLIP embedding
  (DreamBooth, Ruiz et al. 2023: subject fidelity).
- CLIP-T: mean cosine similarity between each image and its own prompt (prompt fidelity).
- DINO: CLIP-I's measure with a self-supervised ViT's CLS token, which tells two subjects of the
  same class apart better than CLIP (DreamBooth's preferred subject metric).
- FID and KID: torchmetrics' implementations over the encoder's image embeddings instead of
  Inception's (no Inception weights are downloaded); a score is comparable only with one made
  with the same encoder, which is why every value names its encoder.
- IS: torchmetrics' Inception Score over the CLIP encoder's zero-shot class probabilities (the
  catalogue's classes), not Inception's 1000 ImageNet classes.

A metric whose encoder is missing (None, or an `Absent` that says why) is not computed: it comes
back `unavailable` with the reason, never as a number from random weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from atelier.errors import InvalidInput
from atelier.quality.results import METRICS, MetricValue, unavailable

__all__ = ["METRICS", "Absent", "MetricValue", "absent", "unavailable", "clip_i", "clip_t", "dino",
           "fid", "kid", "inception_score"]


@dataclass(frozen=True)
class Absent:
    """An encoder that is not there, and why ("CLIP encoder s3://...: no encoder there"): passed
    where the encoder goes, every metric that needs it is unavailable with this reason."""

    reason: str


def absent(metric: str, encoder: Any, default: str) -> MetricValue | None:
    """The metric as unavailable when its encoder is missing (with the Absent's reason, or
    `default` for None); None when the encoder is there."""
    if encoder is None:
        return unavailable(metric, default)
    if isinstance(encoder, Absent):
        return unavailable(metric, encoder.reason)
    return None

def _check(generated: torch.Tensor, real: torch.Tensor | None = None) -> None:
    for name, images in (("generated", generated), ("real", real)):
        if images is not None and (images.ndim != 4 or images.shape[1] != 3 or not len(images)):
            raise InvalidInput(f"{name} images: expected (N, 3, H, W) with N >= 1, got "
                               f"{tuple(images.shape)}", where="metrics")


def _mean_pairwise(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a @ b.T).mean())


def _subject(metric: str, generated: torch.Tensor, real: torch.Tensor, encoder: Any,
             missing: str) -> MetricValue:
    """Mean cosine similarity of every generated image with every real one."""
    if (gap := absent(metric, encoder, missing)) is not None:
        return gap
    _check(generated, real)
    return MetricValue(metric=metric, value=_mean_pairwise(encoder.images(generated),
                                                            encoder.images(real)),
                       encoder=encoder.name, images=len(generated))


def clip_i(generated: torch.Tensor, real: torch.Tensor, encoder: Any) -> MetricValue:
    return _subject("clip_i", generated, real, encoder, "no CLIP encoder")


def clip_t(generated: torch.Tensor, prompts: Sequence[str], encoder: Any) -> MetricValue:
    if (gap := absent("clip_t", encoder, "no CLIP encoder")) is not None:
        return gap
    _check(generated)
    if len(prompts) != len(generated):
        raise InvalidInput(f"{len(generated)} images but {len(prompts)} prompts", where="clip_t")
    similarity = (encoder.images(generated) * encoder.texts(list(prompts))).sum(-1)
    return MetricValue(metric="clip_t", value=float(similarity.mean()), encoder=encoder.name,
                       images=len(generated))


def dino(generated: torch.Tensor, real: torch.Tensor, encoder: Any) -> MetricValue:
    return _subject("dino", generated, real, encoder, "no DINO encoder")


class _Features(torch.nn.Module):
    """An encoder's image embeddings as torchmetrics' feature extractor (float images in [0,1])."""

    def __init__(self, encoder: Any):
        super().__init__()
        self.encoder = encoder
        self.num_features = int(encoder.images(torch.rand(1, 3, 32, 32)).shape[-1])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder.images(images).double()


class _Logits(torch.nn.Module):
    def __init__(self, encoder: Any, labels: Sequence[str]):
        super().__init__()
        self.encoder, self.labels = encoder, list(labels)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder.zero_shot_logits(images, self.labels)


def fid(generated: torch.Tensor, real: torch.Tensor, encoder: Any) -> MetricValue:
    """Fréchet distance between the two sets' embedding distributions (2+ images each)."""
    if (gap := absent("fid", encoder, "no image encoder")) is not None:
        return gap
    _check(generated, real)
    if len(generated) < 2 or len(real) < 2:
        return unavailable("fid", "needs at least 2 generated and 2 real images")
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=_Features(encoder), normalize=True)
    metric.update(real, real=True)
    metric.update(generated, real=False)
    return MetricValue(metric="fid", value=max(float(metric.compute()), 0.0), encoder=encoder.name,
                       images=len(generated))


def kid(generated: torch.Tensor, real: torch.Tensor, encoder: Any,
        subset_size: int = 50) -> MetricValue:
    """Kernel Inception Distance (unbiased MMD with a cubic kernel), mean and std over subsets."""
    if (gap := absent("kid", encoder, "no image encoder")) is not None:
        return gap
    _check(generated, real)
    size = min(subset_size, len(generated), len(real))
    if size < 2:
        return unavailable("kid", "needs at least 2 generated and 2 real images")
    from torchmetrics.image.kid import KernelInceptionDistance

    metric = KernelInceptionDistance(feature=_Features(encoder), subset_size=size, normalize=True)
    metric.update(real, real=True)
    metric.update(generated, real=False)
    mean, std = metric.compute()
    return MetricValue(metric="kid", value=float(mean), spread=float(std), encoder=encoder.name,
                       images=len(generated))


def inception_score(generated: torch.Tensor, encoder: Any, labels: Sequence[str],
                    splits: int = 1) -> MetricValue:
    """exp(E[KL(p(y|x) || p(y))]) over the CLIP encoder's zero-shot probabilities of `labels`:
    high when each image is confidently one class and the set covers many."""
    if (gap := absent("is", encoder, "no CLIP encoder")) is not None:
        return gap
    if len(labels) < 2:
        return unavailable("is", "needs at least 2 classes")
    _check(generated)
    from torchmetrics.image.inception import InceptionScore

    # normalize=False: torchmetrics would turn [0, 1] floats into bytes, which only Inception wants.
    metric = InceptionScore(feature=_Logits(encoder, labels), splits=splits, normalize=False)
    metric.update(generated)
    mean, std = metric.compute()
    return MetricValue(metric="is", value=float(mean), spread=float(std), encoder=encoder.name,
                       images=len(generated))
