"""The synthetic-world probes (atelier.quality.probes): CIELAB against reference values, the metal
read back from photos the shop draws at the generated images' 64 px, blank and noise images, and
class accuracy's arithmetic on an encoder whose logits are fixed."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from atelier.catalogue import synth
from atelier.errors import InvalidInput
from atelier.quality import probes

DRAW = synth.draw


@pytest.mark.parametrize(("rgb", "lab"), [
    ((255, 255, 255), (100.0, 0.0, 0.0)),
    ((0, 0, 0), (0.0, 0.0, 0.0)),
    ((128, 128, 128), (53.59, 0.0, 0.0)),
    ((255, 0, 0), (53.24, 80.09, 67.20)),
    ((0, 255, 0), (87.73, -86.18, 83.18)),
    ((0, 0, 255), (32.30, 79.19, -107.86)),
])
def test_to_lab_matches_reference_values(rgb, lab):
    assert probes.to_lab(np.array(rgb)) == pytest.approx(lab, abs=0.01)
    assert probes.to_lab(np.full((2, 5, 3), rgb, dtype=np.uint8)).shape == (2, 5, 3)


def _seeds(dark: bool):
    """Seeds whose photo the shop draws on a dark (velvet) or a light backdrop: the draw's first
    random number decides, as in synth."""
    seed = 0
    while True:
        if (random.Random(seed).random() < 0.25) == dark:
            yield seed
        seed += 1


@pytest.fixture(scope="module")
def shop():
    """Every class, style and metal on a light and on a dark backdrop (184 photos), drawn at 128 px
    and downsampled to 64 px like generated images."""
    photos, metals = [], []
    for dark in (False, True):
        seeds = _seeds(dark)
        for class_name, styles in synth.SHOP.items():
            for style in styles:
                for metal in sorted(synth.METALS):
                    image = DRAW(class_name, style, synth.METALS[metal], (128, 128), random.Random(next(seeds)))
                    photos.append(image.resize((64, 64), Image.LANCZOS))
                    metals.append(metal)
    return photos, metals


def test_the_metal_read_from_drawn_photos_is_nearest_to_the_true_one(shop):
    photos, metals = shop
    colours = [probes.metal_colour(p) for p in photos]
    assert all(c is not None for c in colours)
    true = [float(np.linalg.norm(c - probes.METAL_LAB[m])) for c, m in zip(colours, metals, strict=True)]
    wrong = [float(np.linalg.norm(c - lab)) for c, m in zip(colours, metals, strict=True)
             for name, lab in probes.METAL_LAB.items() if name != m]
    # Measured: 89.1% nearest (164 of 184; most misses are pearl and crystal studs, whose metal is
    # at most an outline), mean ΔE 12.6 to the true metal and 47.2 to the wrong ones.
    accuracy = probes.metal_accuracy(photos, metals)
    assert accuracy.metric == "metal_accuracy" and accuracy.images == 184
    assert accuracy.value >= 0.85
    error = probes.metal_error(photos, metals)
    assert error.metric == "metal_delta_e" and error.images == 184
    assert error.value == pytest.approx(np.mean(true))
    assert error.value < 16 and np.mean(wrong) > 35 and np.mean(wrong) > 3 * error.value


def test_a_tensor_reads_as_the_same_picture(shop):
    photo = shop[0][0]
    tensor = torch.from_numpy(np.asarray(photo) / 255).permute(2, 0, 1)
    assert probes.metal_colour(tensor) == pytest.approx(probes.metal_colour(photo))


@pytest.mark.parametrize("backdrop", [(240, 232, 225), (30, 25, 45)])
def test_a_blank_photo_has_no_metal_and_counts_as_the_worst_error(shop, backdrop):
    blank = Image.new("RGB", (64, 64), backdrop)
    assert probes.metal_colour(blank) is None
    assert probes.metal_error([blank], ["Rose Gold"]).value == probes.WORST_DELTA_E == 100
    drawn = probes.metal_error(shop[0][:1], shop[1][:1]).value
    mixed = probes.metal_error([blank, shop[0][0]], ["Rose Gold", shop[1][0]])
    assert mixed.images == 2 and mixed.value == pytest.approx((100 + drawn) / 2)
    assert probes.metal_accuracy([blank], ["Rose Gold"]).value == 0


def test_noise_scores_far_worse_than_drawn_photos(shop):
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(32)]
    metals = [sorted(synth.METALS)[i % 4] for i in range(32)]
    # Measured: ΔE 70.9 and 41% nearest for noise, against 12.6 and 89% for the drawn shop.
    assert probes.metal_error(noise, metals).value > 3 * probes.metal_error(*shop).value
    assert probes.metal_accuracy(noise, metals).value < 0.5


def test_metal_probes_refuse_mismatched_input(shop):
    with pytest.raises(InvalidInput, match="2 images but 1 metals"):
        probes.metal_error(shop[0][:2], ["Rose Gold"])
    with pytest.raises(InvalidInput, match="unknown metals"):
        probes.metal_accuracy(shop[0][:1], ["Platinum"])


class FixedLogits:
    """Returns the next rows of a fixed logit table, in the order images arrive."""

    name = "fixed"

    def __init__(self, logits: list[list[float]]):
        self.logits, self.served, self.prompts = torch.tensor(logits), 0, []

    def zero_shot_logits(self, images: torch.Tensor, labels: list[str]) -> torch.Tensor:
        self.prompts.append(labels)
        rows = self.logits[self.served:self.served + len(images)]
        self.served += len(images)
        return rows


LABELS = {"rings": "a photo of a ring", "hoops": "a photo of hoop earrings", "studs": "a photo of stud earrings"}


def test_class_accuracy_counts_the_argmax_over_the_label_prompts():
    # Predicted: rings, hoops, studs, rings, studs; true: rings, hoops, hoops, studs, studs -> 3/5.
    encoder = FixedLogits([[5, 1, 0], [0, 2, 1], [0, 1, 3], [9, 0, 8], [-1, -2, 0]])
    images = torch.rand(5, 3, 8, 8)
    value = probes.class_accuracy(images, ["rings", "hoops", "hoops", "studs", "studs"], encoder, LABELS,
                                  batch_size=2)
    assert value.metric == "class_accuracy" and value.encoder == "fixed" and value.images == 5
    assert value.value == pytest.approx(3 / 5)
    assert encoder.prompts == [list(LABELS.values())] * 3  # batches of 2, 2, 1
    assert probes.chance_level(LABELS) == pytest.approx(1 / 3)


def test_class_accuracy_without_an_encoder_is_unavailable():
    value = probes.class_accuracy(torch.rand(2, 3, 8, 8), ["rings", "studs"], None, LABELS)
    assert value.value is None and value.unavailable == "no CLIP encoder"
    with pytest.raises(InvalidInput, match="no label"):
        probes.class_accuracy(torch.rand(1, 3, 8, 8), ["necklaces"], FixedLogits([[0, 0, 1]]), LABELS)
