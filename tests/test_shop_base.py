"""The shop base's pack (atelier.models.shop) and its pretraining loop (atelier_jobs.pretrain),
run in-process at smoke size; the Ray Train job itself runs in tests/integration/test_quality_e2e.py."""

import json
from pathlib import Path

import pytest
import torch

from atelier.errors import IntegrityError, NotFound
from atelier.models import shop
from atelier.training.pretrain import PretrainConfig


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """The pretraining loop at smoke size, with Ray Train's report/checkpoint kept in a list."""
    import ray.train

    from atelier_jobs import pretrain

    reports = []
    saved = {}

    def report(metrics, checkpoint=None):
        folder = tmp_path_factory.mktemp("checkpoint")
        with checkpoint.as_directory() as src:
            (folder / pretrain.STATE).write_bytes((Path(src) / pretrain.STATE).read_bytes())
        saved["last"] = ray.train.Checkpoint.from_directory(str(folder))
        reports.append(metrics)

    patch = pytest.MonkeyPatch()
    patch.setattr(ray.train, "report", report)
    patch.setattr(ray.train, "get_checkpoint", lambda: None)
    pretrain.train_loop_per_worker(PretrainConfig.smoke().model_dump())
    patch.undo()
    return reports, saved["last"]


def test_every_phase_reports_a_checkpoint_and_its_measurements(pretrained):
    reports, _ = pretrained
    assert [r["phase"] for r in reports] == ["vae", "unet", "clip"]
    measured = json.loads(reports[-1]["measured"])
    assert set(measured) == {"vae", "latents", "unet", "clip"}
    assert measured["latents"]["scaling_factor"] > 0
    assert 0 <= measured["clip"]["eval_class_accuracy"] <= 1
    # What the VAE keeps of the metals' hues, beside what the drawings show.
    assert 0 <= measured["vae"]["eval_metal_accuracy"] <= 1
    assert measured["vae"]["eval_metal_accuracy_drawn"] >= 0.75
    assert all(measured[p]["steps"] == 2 for p in ("vae", "unet", "clip"))


def test_a_resumed_run_skips_the_phases_it_finished(pretrained, monkeypatch):
    import ray.train

    from atelier_jobs import pretrain

    _, last = pretrained
    reports = []
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: last)
    monkeypatch.setattr(ray.train, "report", lambda metrics, checkpoint=None: reports.append(metrics))
    called = []
    monkeypatch.setattr(pretrain, "train_vae", lambda *a: called.append("vae"))
    monkeypatch.setattr(pretrain, "train_unet", lambda *a: called.append("unet"))
    monkeypatch.setattr(pretrain, "train_clip", lambda *a: called.append("clip"))
    pretrain.train_loop_per_worker(PretrainConfig.smoke().model_dump())
    assert called == [] and reports == []


def test_the_pack_round_trips_every_trained_weight_in_fp16(tmp_path):
    components = shop.build_components(seed=4)
    with torch.no_grad():  # stand-in for training: every trained weight moves
        for module in components.values():
            for p in module.parameters():
                if p.requires_grad:
                    p.add_(0.01)
    components["vae"].register_to_config(scaling_factor=2.5)
    shop.pack(components, tmp_path, seed=4, info={"note": "test"})
    loaded = shop.unpack(tmp_path)
    for name, module in components.items():
        for key, value in module.state_dict().items():
            # Trained weights come back as their fp16 values; the frozen tables exactly.
            expected = value if key == shop.FROZEN.get(name) else value.half().float()
            assert torch.equal(loaded[name].state_dict()[key], expected), (name, key)
    assert loaded["vae"].config.scaling_factor == 2.5
    assert json.loads((tmp_path / shop.INFO).read_text())["note"] == "test"
    # The frozen tables are not stored, and the rest fits the 5 MB of committed weights allowed.
    size = (tmp_path / shop.WEIGHTS).stat().st_size
    assert size < 5_000_000, size


def test_the_vae_loss_sees_the_item_not_the_backdrop():
    from atelier_jobs.pretrain import foreground

    pixels = torch.full((2, 3, 16, 16), -0.8)
    pixels[0, :, 4:8, 6:10] = torch.tensor([0.7, 0.4, -0.6])[:, None, None]  # a gold square
    # An item running off the edge: the backdrop is still the border's most common colour.
    pixels[1, :, 0:16, 0:5] = 0.5
    mask = foreground(pixels)
    assert mask.shape == (2, 1, 16, 16)
    assert mask[0, 0].nonzero().tolist() == [[r, c] for r in range(4, 8) for c in range(6, 10)]
    assert mask[1, 0, :, :5].all() and not mask[1, 0, :, 5:].any()


def test_the_clip_loss_counts_every_image_of_a_repeated_caption_as_a_match():
    import torch.nn.functional as F

    from atelier_jobs.pretrain import contrastive_loss

    distinct = torch.randn(4, 4)
    expected = (F.cross_entropy(distinct, torch.arange(4)) + F.cross_entropy(distinct.T, torch.arange(4))) / 2
    assert torch.allclose(contrastive_loss(distinct, distinct.T, list("abcd")), expected)  # CLIP's
    captions = ["a pair of hoops", "a pair of hoops", "a ring"]
    shared = torch.tensor([[5.0, 5.0, -5.0], [5.0, 5.0, -5.0], [-5.0, -5.0, 5.0]])
    only_own = torch.eye(3) * 10 - 5  # as CLIP's one-positive targets would have it
    assert contrastive_loss(shared, shared.T, captions) < contrastive_loss(only_own, only_own.T, captions)


def test_the_clip_warms_up_then_decays_to_a_tenth():
    from atelier_jobs.pretrain import cosine

    factor = cosine(100, warmup=10)
    assert factor(0) == pytest.approx(0.1, abs=0.01) and factor(4) < factor(9)
    assert factor(9) == pytest.approx(max(factor(s) for s in range(100)))
    assert factor(100) == pytest.approx(0.1)
    assert cosine(100)(0) == 1.0


def test_changed_weights_are_refused(tmp_path):
    shop.pack(shop.build_components(0), tmp_path, seed=0, info={})
    blob = bytearray((tmp_path / shop.WEIGHTS).read_bytes())
    blob[-10] ^= 0xFF
    (tmp_path / shop.WEIGHTS).write_bytes(bytes(blob))
    with pytest.raises(IntegrityError, match="digest"):
        shop.unpack(tmp_path)


def test_a_regenerated_token_table_that_differs_is_refused(tmp_path):
    shop.pack(shop.build_components(0), tmp_path, seed=0, info={})
    info = json.loads((tmp_path / shop.INFO).read_text())
    info["frozen_sha256"]["clip"] = "0" * 64  # as if this torch drew other numbers
    (tmp_path / shop.INFO).write_text(json.dumps(info))
    with pytest.raises(IntegrityError, match="token table"):
        shop.unpack(tmp_path)


def test_no_pack_says_how_to_make_one(tmp_path):
    with pytest.raises(NotFound) as e:
        shop.unpack(tmp_path)
    assert "atelier models pretrain" in str(e.value.hint)


def test_a_materialised_base_loads_as_a_pipeline_and_its_clip_as_an_encoder(tmp_path):
    from diffusers import StableDiffusionPipeline

    from atelier.quality.encoders import ClipEncoder

    shop.pack(shop.build_components(0), tmp_path / "pack", seed=0, info={})
    folder = shop.materialise(tmp_path / "model", tmp_path / "pack")
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 64
    encoder = ClipEncoder.load(str(folder / shop.CLIP_FOLDER))
    embedding = encoder.images(torch.rand(2, 3, 64, 64))
    assert embedding.shape == (2, shop.CLIP_PROJECTION)
    assert torch.allclose(embedding.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_before_pretraining_the_shop_base_and_its_clip_say_how_to_make_them(tmp_path, monkeypatch):
    from atelier.models.builtin import BUILTIN
    from atelier.models.load import resolve_model
    from atelier.quality.encoders import ClipEncoder, EncoderMissing
    from atelier.settings import Settings

    monkeypatch.setattr(shop, "PACK", tmp_path / "no-pack")
    settings = Settings(home=tmp_path / "home")
    with pytest.raises(NotFound, match="not been pretrained") as e:
        resolve_model("shop", settings=settings)
    assert "atelier models pretrain" in str(e.value.hint)
    with pytest.raises(EncoderMissing, match="shop CLIP is not there"):
        ClipEncoder.load("shop-clip", settings=settings)
    assert BUILTIN["tiny"].digest()  # the others are unaffected


def test_a_pretrained_pack_is_named_by_its_weights(tmp_path, monkeypatch):
    from atelier.models.builtin import BUILTIN

    monkeypatch.setattr(shop, "PACK", tmp_path)
    shop.pack(shop.build_components(0), tmp_path, seed=0, info={})
    first = BUILTIN["shop"].digest()
    shop.pack(shop.build_components(1), tmp_path, seed=1, info={})
    assert BUILTIN["shop"].digest() != first != BUILTIN["tiny"].digest()


def test_the_committed_base_is_verified_fits_5_mb_and_says_how_it_was_made():
    from atelier.models.builtin import BUILTIN

    info = shop.read_info()
    assert (info["seed"], info["sd_architecture"], info["run"]) == (0, "shop", "shop-base-0-v2")
    assert (shop.PACK / shop.WEIGHTS).stat().st_size < 5_000_000
    measured = info["measured"]
    # What pretraining measured on held-out world images (the README's table).
    assert measured["vae"]["eval_metal_accuracy"] >= 0.7  # 0.715; the drawings 0.836
    assert measured["clip"]["eval_class_accuracy"] >= 0.95  # 0.984; chance 0.25
    assert BUILTIN["shop"].digest() != BUILTIN["tiny"].digest()
    shop.unpack()  # the committed weights match their digests
