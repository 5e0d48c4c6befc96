"""`atelier eval`'s measurement of one concept (atelier.quality.evaluation), on the tiny model and a
CLIP built like the shop's; the job and the registry round trip run in the integration tier."""

from types import SimpleNamespace

import pytest
from PIL import Image

from atelier.catalogue.synth import METALS, draw
from atelier.quality.evaluation import evaluate_concept, generate, without
from atelier.quality.results import ConceptEvaluation, EvalConfig, Evaluation, MetricValue
from test_training_precision import plan_run, train
from test_training_precision import shop as bucket  # noqa: F401 (a fixture: the shop's dataset on moto)

CONCEPT = SimpleNamespace(name="beaded-hoops", class_name="hoops", identifier="olis",
                          instance_prompt="photo of a pair of olis beaded hoops",
                          class_prompt="photo of a pair of hoops")
LABELS = {"hoops": "photo of a pair of hoops", "rings": "photo of a ring"}
CONFIG = EvalConfig(images=2, steps=2, contexts=["{instance}, on a dark background"])


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from atelier.models import shop
    from atelier.quality.encoders import ClipEncoder

    folder = tmp_path_factory.mktemp("shop")
    shop.pack(shop.build_components(0), folder / "pack", seed=0, info={})
    model = shop.materialise(folder / "model", folder / "pack")
    return ClipEncoder.load(str(model / shop.CLIP_FOLDER), name="test-clip")


@pytest.fixture(scope="module")
def pipes(tiny_model, tmp_path_factory):
    from atelier.models import build_model, load_pipeline

    other = build_model("tiny", tmp_path_factory.mktemp("other") / "tiny", seed=1)
    return load_pipeline(str(tiny_model)), load_pipeline(str(other))


@pytest.fixture(scope="module")
def real():
    import random

    return [draw("hoops", "beaded", METALS[m], (128, 128), random.Random(i)).resize((64, 64))
            for i, m in enumerate(["Rose Gold", "14k Gold", "Sterling Silver"])]


def by_name(metrics: list[MetricValue]) -> dict[str, MetricValue]:
    return {m.metric: m for m in metrics}


def test_the_same_seeds_give_the_same_images_for_every_model_run(pipes):
    a = generate(pipes[0], "photo of a ring", CONFIG)
    b = generate(pipes[0], "photo of a ring", CONFIG)
    assert [i.tobytes() for i in a] == [i.tobytes() for i in b]
    assert a[0].tobytes() != a[1].tobytes()  # image i has seed i
    assert a[0].size == (64, 64)


def test_a_model_compared_with_itself_has_no_drift_and_the_base_scores_the_same(pipes, real, clip):
    result, made = evaluate_concept(pipes[0], pipes[0], CONCEPT, real, CONFIG, clip, None, LABELS)
    tuned, base = by_name(result.metrics), by_name(result.base_metrics)
    assert tuned["prior_clip_i"].value == pytest.approx(1.0, abs=1e-5)
    assert tuned["clip_i"].value == pytest.approx(base["clip_i"].value)
    assert set(tuned) == {"clip_i", "clip_t", "dino", "fid", "kid", "is", "context_clip_t",
                          "prior_clip_i", "class_accuracy", "colour_distance"}
    assert "context_clip_t" not in base and "prior_clip_i" not in base
    assert tuned["kid"].spread is not None and tuned["clip_i"].images == CONFIG.images
    assert tuned["clip_i"].encoder == "test-clip"
    assert len(made["model"]["instance"]) == CONFIG.images and set(made["base"]) == {"instance", "class"}
    assert result.prompts["contexts"] == ["photo of a pair of olis beaded hoops, on a dark background"]


def test_another_model_drifts_from_the_base(pipes, real, clip):
    result, _ = evaluate_concept(pipes[1], pipes[0], CONCEPT, real, CONFIG, clip, None, LABELS)
    assert by_name(result.metrics)["prior_clip_i"].value < 0.999


def test_missing_encoders_say_why_instead_of_a_number(pipes, real):
    from atelier.quality.metrics import Absent

    clip, dino = Absent("CLIP encoder s3://x/clip: no encoder there"), Absent("no DINO encoder configured")
    result, _ = evaluate_concept(pipes[0], None, CONCEPT, real, CONFIG, clip, dino, LABELS)
    metrics = by_name(result.metrics)
    for name in ("clip_i", "clip_t", "fid", "kid", "is", "context_clip_t", "class_accuracy"):
        assert metrics[name].value is None
        assert metrics[name].unavailable == clip.reason, name
    assert metrics["dino"].unavailable == dino.reason
    assert by_name(evaluate_concept(pipes[0], None, CONCEPT, real, CONFIG, None, None, LABELS)[0]
                   .metrics)["clip_i"].unavailable == "no CLIP encoder"
    assert metrics["colour_distance"].value is not None  # needs no encoder
    assert result.base_metrics == []


def test_clip_reads_prompts_without_the_identifier():
    assert without("olis", CONCEPT.instance_prompt) == "photo of a pair of beaded hoops"


def test_a_summary_averages_concepts_and_names_what_is_missing():
    def concept(v):
        return ConceptEvaluation(concept="c", prompts={}, metrics=[
            MetricValue(metric="clip_i", value=v), MetricValue(metric="dino", unavailable="no DINO")],
            base_metrics=[MetricValue(metric="clip_i", value=v / 2)])

    evaluation = Evaluation(model="m:1", base_model="shop", evaluated_at="t", config=EvalConfig(),
                            concepts=[concept(0.5), concept(0.75)])
    assert evaluation.summary()["clip_i"] == 0.625
    assert evaluation.summary(base=True)["clip_i"] == 0.3125
    assert evaluation.summary()["dino"] is None
    assert evaluation.unavailable() == {"dino": "no DINO"}


def test_images_of_other_sizes_are_measured_at_the_generated_size(pipes, clip):
    big = [Image.new("RGB", (320, 256), (200, 180, 60))] * 2
    result, _ = evaluate_concept(pipes[0], None, CONCEPT, big, CONFIG, clip, None, LABELS)
    assert by_name(result.metrics)["clip_i"].value is not None


def test_photos_are_centre_cropped_not_squashed():
    from atelier.quality.evaluation import tensor

    photo = Image.new("RGB", (128, 64), (255, 0, 0))
    photo.paste((0, 255, 0), (32, 0, 96, 64))  # the middle square is green, the sides red
    pixels = tensor([photo], side=16)
    assert pixels.shape == (1, 3, 16, 16)
    assert float(pixels[0, 1].mean()) > 0.95 and float(pixels[0, 0].mean()) < 0.05  # squashed: red 0.5


# -- per checkpoint, in the training loop ---------------------------------------------------------


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    from atelier.models import shop as shop_base

    folder = tmp_path_factory.mktemp("shopclip")
    shop_base.pack(shop_base.build_components(0), folder / "pack", seed=0, info={})
    return shop_base.materialise(folder / "model", folder / "pack") / shop_base.CLIP_FOLDER


def test_each_checkpoint_is_measured_and_the_curve_survives_a_resume(bucket, clip_folder, tmp_path):  # noqa: F811
    import json

    from atelier.training.config import TrainConfig

    cfg = TrainConfig(max_train_steps=4, checkpoint_every=2, learning_rate=1e-3, validation_steps=2,
                      eval_encoder=str(clip_folder), eval_images=2, model_name="curve")
    _, run = plan_run(bucket, cfg)
    straight = train(bucket, run, "cpu", tmp_path / "straight")
    curve = json.loads((straight.steps[4] / "training.json").read_text())["quality_curve"]
    assert [point["step"] for point in curve] == [2, 4]
    assert all(isinstance(point[k], float) for point in curve for k in ("clip_i", "clip_t", "colour_distance"))

    resumed = train(bucket, run, "cpu", tmp_path / "resumed", resume_from=straight.steps[2])
    again = json.loads((resumed.steps[4] / "training.json").read_text())["quality_curve"]
    assert again == curve  # step 2's point comes back from the checkpoint; step 4's is made again
