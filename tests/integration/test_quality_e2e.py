"""`atelier models pretrain` as the Ray Train job it is, at smoke size, on the embedded stack; and
`atelier eval`'s refusals. (The evaluation job itself runs in the main job's test, test_demo.py.)"""

from __future__ import annotations

import json

import pytest

from atelier.models import shop
from atelier.storage import Storage

pytestmark = pytest.mark.integration


def test_pretraining_runs_as_a_ray_train_job_and_its_pack_loads(env, tmp_path, capsys):
    from atelier.cli.main import main

    out = tmp_path / "pack"
    assert main(["models", "pretrain", "--smoke", "--out", str(out), "--run-name", "smoke-pretrain"]) == 0
    printed = capsys.readouterr().out
    assert "shop base pack written to" in printed
    assert sorted(p.name for p in out.iterdir()) == [shop.INFO, shop.WEIGHTS]
    info = json.loads((out / shop.INFO).read_text())
    assert info["run"] == "smoke-pretrain" and info["pretrain"]["vae_steps"] == 2
    assert set(info["measured"]) == {"vae", "latents", "unet", "clip"}
    components = shop.unpack(out)  # verified against its digests
    assert components["vae"].config.scaling_factor == info["vae_scaling_factor"]
    # The run's checkpoints are Ray Train's, in S3: a resubmitted run resumes from them.
    storage = Storage(env)
    assert storage.list_dir(storage.uri("runs", "smoke-pretrain"))


def test_eval_of_a_model_that_is_not_registered_fails_before_any_job(env, capsys):
    from atelier.cli.main import main

    assert main(["eval", "no-such-model"]) == 3
    assert "no model named 'no-such-model'" in capsys.readouterr().err
    # A smoke run's pack never lands where the built-in shop base is read from.
    assert main(["models", "pretrain", "--smoke"]) == 2
    assert "--smoke needs --out" in capsys.readouterr().err


def test_eval_measures_a_registered_model_beside_its_base_and_writes_a_gallery(
        env, tiny_model, concepts_file, tmp_path, capsys):
    import yaml

    from atelier.cli.main import main
    from atelier.registry import Registry
    from atelier.training.dataset import commit_dataset
    from support import tool
    from test_gallery import browse, images_loaded

    storage = Storage(env)
    _, digest, concepts = commit_dataset(storage, concepts_file)
    concept = next(c for c in concepts.concepts if c.name == "beaded-hoops")
    registry = Registry(storage)
    # The tiny model registered as if fine-tuned from itself: the job's path is what is under test.
    _, card = registry.publish(tiny_model, name="eval-e2e", method="full", base_model="tiny",
                               concepts=[concept], hyperparameters={}, dataset_sha256=digest)
    clip = tmp_path / "clip-model"
    shop.pack(shop.build_components(0), tmp_path / "pack", seed=0, info={})
    shop.materialise(clip, tmp_path / "pack")
    gallery = tmp_path / "gallery"
    assert main(["eval", "eval-e2e", "--images", "2", "--steps", "2",
                 "--clip-encoder", str(clip / shop.CLIP_FOLDER), "--html", str(gallery)]) == 0
    printed = capsys.readouterr().out
    assert "beaded-hoops evaluated (1/1)" in printed and "clip_i" in printed

    evaluation = registry.evaluation(card)
    [result] = evaluation.concepts
    tuned = {m.metric: m for m in result.metrics}
    base = {m.metric: m for m in result.base_metrics}
    # The same weights and seeds as the base: the same numbers, and no drift.
    assert tuned["clip_i"].value == pytest.approx(base["clip_i"].value)
    assert tuned["prior_clip_i"].value == pytest.approx(1.0, abs=1e-4)
    assert tuned["dino"].value is None and "no DINO encoder configured" in tuned["dino"].unavailable
    assert main(["models", "show", "eval-e2e"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)["evaluation"]
    assert shown["summary"]["clip_i"] == pytest.approx(tuned["clip_i"].value)

    dom, _ = browse(tool("chromium", "run `make tools`"), gallery / "index.html", tmp_path)
    assert images_loaded(dom) == "1/1"
