"""The quality metrics (atelier.quality): their arithmetic on an encoder whose geometry is known,
and the production loading path on tiny CLIP and ViT checkpoints built from configs and saved to
folders, as a real checkpoint would be."""

from __future__ import annotations

import pytest
import torch

from atelier.errors import InvalidInput
from atelier.quality import metrics
from atelier.quality.encoders import ClipEncoder, DinoEncoder, EncoderMissing

COLOURS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0)}


def solid(*names: str, side: int = 16) -> torch.Tensor:
    return torch.stack([torch.tensor(COLOURS[n]).view(3, 1, 1).expand(3, side, side) for n in names])


class ColourEncoder:
    """Embeds an image as its mean colour and a prompt as the colour it names: a CLIP whose
    answers are known, so each metric's arithmetic can be checked exactly."""

    name = "colour"

    def images(self, images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(images.mean(dim=(2, 3)), dim=-1)

    def texts(self, prompts: list[str]) -> torch.Tensor:
        return torch.stack([torch.tensor(next(v for k, v in COLOURS.items() if k in p))
                            for p in prompts])

    def zero_shot_logits(self, images: torch.Tensor, labels: list[str]) -> torch.Tensor:
        return 100 * self.images(images) @ self.texts(labels).T


def test_clip_i_is_1_for_the_same_subject_and_lower_for_another():
    enc = ColourEncoder()
    assert metrics.clip_i(solid("red", "red"), solid("red"), enc).value == pytest.approx(1.0)
    assert metrics.clip_i(solid("red", "blue"), solid("red"), enc).value == pytest.approx(0.5)
    assert metrics.dino(solid("green"), solid("blue"), enc).value == pytest.approx(0.0)


def test_clip_t_scores_each_image_against_its_own_prompt():
    enc = ColourEncoder()
    images = solid("red", "green", "blue")
    matched = metrics.clip_t(images, ["a red ring", "a green ring", "a blue ring"], enc)
    shuffled = metrics.clip_t(images, ["a green ring", "a blue ring", "a red ring"], enc)
    assert matched.value == pytest.approx(1.0) and shuffled.value == pytest.approx(0.0)
    assert (matched.encoder, matched.images) == ("colour", 3)


def test_fid_is_zero_for_the_same_set_and_both_grow_with_the_difference():
    enc = ColourEncoder()
    torch.manual_seed(0)
    base = solid(*(["red", "green", "blue"] * 4)) * 0.8 + 0.2 * torch.rand(12, 3, 1, 1)
    near = 0.9 * base + 0.1 * solid(*["blue"] * 12)  # every image a little bluer
    far = solid(*["red"] * 12)  # one colour where there were three
    fids = [metrics.fid(x, base, enc).value for x in (base, near, far)]
    assert fids[0] == pytest.approx(0.0, abs=1e-6) and 0 < fids[1] < fids[2]
    # KID is unbiased, so on 12 images the same set scores a little below zero, not exactly zero.
    kids = [metrics.kid(x, base, enc).value for x in (base, near, far)]
    assert abs(kids[0]) < kids[2] / 5 and kids[0] < kids[1] < kids[2]


def test_inception_score_counts_confidently_distinct_classes():
    enc = ColourEncoder()
    labels = ["a red ring", "a green ring", "a blue ring"]
    spread = metrics.inception_score(solid(*(["red", "green", "blue"] * 4)), enc, labels)
    single = metrics.inception_score(solid(*["red"] * 12), enc, labels)
    assert spread.value == pytest.approx(3.0, rel=1e-3) and single.value == pytest.approx(1.0, rel=1e-3)


def test_a_missing_encoder_is_a_reason_never_a_number():
    for value in (metrics.clip_i(solid("red"), solid("red"), None),
                  metrics.clip_t(solid("red"), ["red"], None),
                  metrics.dino(solid("red"), solid("red"), None),
                  metrics.fid(solid("red", "red"), solid("red", "red"), None),
                  metrics.kid(solid("red", "red"), solid("red", "red"), None),
                  metrics.inception_score(solid("red"), None, ["a", "b"])):
        assert value.value is None and value.unavailable
    assert "2" in metrics.fid(solid("red"), solid("red"), ColourEncoder()).unavailable


# -- the production path on checkpoints built from configs ----------------------------------------
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny CLIP (both towers, with the project's offline CLIP tokenizer) and a tiny ViT, saved
    with save_pretrained like the public checkpoints a user copies into S3."""
    from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

    from atelier.models.tokenizer import build_clip_tokenizer

    root = tmp_path_factory.mktemp("encoders")
    tokenizer = build_clip_tokenizer()
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, vocab_size=tokenizer.vocab_size,
                         max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=16))
    clip.save_pretrained(root / "clip")
    tokenizer.save_pretrained(root / "clip")
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, image_size=32, patch_size=8),
             add_pooling_layer=False).save_pretrained(root / "dino")
    return root


def test_a_clip_checkpoint_loads_from_a_folder_and_embeds_both_towers(checkpoints):
    enc = ClipEncoder.load(str(checkpoints / "clip"), name="test-clip")
    images = torch.rand(4, 3, 64, 48)  # any size: the encoder resizes to its own
    embedded = enc.images(images)
    assert embedded.shape == (4, 16) and torch.allclose(embedded.norm(dim=-1), torch.ones(4))
    assert enc.texts(["a ring", "a pair of beaded hoops"]).shape == (2, 16)
    assert metrics.clip_i(images[:1], images[:1], enc).value == pytest.approx(1.0, abs=1e-5)
    assert metrics.fid(images, images, enc).value == pytest.approx(0.0, abs=1e-4)
    assert metrics.clip_t(images[:2], ["a ring", "a hoop"], enc).encoder == "test-clip"


def test_a_dino_checkpoint_embeds_its_cls_token(checkpoints):
    enc = DinoEncoder.load(str(checkpoints / "dino"))
    images = torch.rand(3, 3, 40, 40)
    assert enc.images(images).shape == (3, 32)
    assert metrics.dino(images[:1], images[:1], enc).value == pytest.approx(1.0, abs=1e-5)
    assert metrics.dino(images[:1], images[1:], enc).value < 1.0


def test_a_missing_checkpoint_is_one_clear_error(tmp_path):
    with pytest.raises(EncoderMissing, match="no encoder there"):
        ClipEncoder.load(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInput, match=r"not a transformers model folder \(no config.json\)"):
        ClipEncoder.load(str(tmp_path / "empty"))
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(EncoderMissing, match="cannot load the CLIP model"):
        ClipEncoder.load(str(tmp_path / "empty"))
