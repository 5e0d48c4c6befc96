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
