"""What a sweep file says (atelier.training.sweep): search spaces over TrainConfig's own fields,
every value checked before any compute, the trials a search runs, and the Pareto front."""

from __future__ import annotations

import pytest
import yaml

from atelier.errors import InvalidInput, NotFound
from atelier.training.sweep import SweepConfig, pareto_front

STUDY = {
    "metric": "clip_i",
    "train": {"base_model": "shop", "eval_encoder": "shop-clip", "checkpoint_every": 50,
              "learning_rate": {"loguniform": [1e-5, 1e-3]},
              "max_train_steps": {"grid": [100, 200, 400]},
              "with_prior_preservation": {"grid": [True, False]},
              "use_identifier": {"grid": [True, False]},
              "method": {"choice": ["full", "lora", "textual_inversion"]},
              "lora_rank": {"choice": [4, 8]}},
    "samples": 2,
}


def test_the_studys_search_is_one_file_of_train_config_fields_and_spaces(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(STUDY))
    sweep = SweepConfig.load(path)
    fixed, spaces = sweep.split()
    assert fixed == {"base_model": "shop", "eval_encoder": "shop-clip", "checkpoint_every": 50}
    assert {n: s.kind for n, s in spaces.items()} == {
        "learning_rate": "loguniform", "max_train_steps": "grid", "with_prior_preservation": "grid",
        "use_identifier": "grid", "method": "choice", "lora_rank": "choice"}
    assert sweep.trials_per_concept() == 3 * 2 * 2 * 2
    assert len(sweep.grid_points()) == 12 and {"max_train_steps": 400, "with_prior_preservation": False,
                                               "use_identifier": True} in sweep.grid_points()
    base = sweep.base()
    assert (base.max_train_steps, base.learning_rate, base.method) == (100, 1e-5, "full")
    assert sweep.mode == "max" and SweepConfig(**{**STUDY, "metric": "colour_distance"}).mode == "min"


@pytest.mark.parametrize("change, why", [
    ({"train": {**STUDY["train"], "learning_rate": {"grid": [1e-4, -1]}}}, "train.learning_rate: -1"),
    ({"train": {**STUDY["train"], "method": {"grid": ["full", "dreambooth++"]}}}, "train.method: 'dreambooth++'"),
    ({"train": {**STUDY["train"], "lr": 1e-4}}, "train.lr: not a training setting"),
    ({"train": {**STUDY["train"], "max_train_steps": {"grid": [100], "choice": [200]}}}, "exactly one of"),
    ({"train": {**STUDY["train"], "learning_rate": {"loguniform": [1e-3, 1e-5]}}}, "low must be below high"),
    ({"train": {**STUDY["train"], "learning_rate": {"loguniform": [0, 1e-5]}}}, "must be positive"),
    ({"train": {**STUDY["train"], "max_train_steps": {"grid": []}}}, "at least 1"),
    ({"train": {k: v for k, v in STUDY["train"].items() if k != "eval_encoder"}}, "name an encoder"),
    ({"early_stopping": {"grace_steps": 10}}, "grace_steps (10) is less than train.checkpoint_every (50)"),
    ({"metric": "loss"}, "metric"),
])
def test_every_value_a_space_can_take_is_checked_before_any_compute(tmp_path, change, why):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**STUDY, **change}))
    with pytest.raises(InvalidInput) as e:
        SweepConfig.load(path)
    assert why in str(e.value) and str(path) in str(e.value)


def test_a_missing_or_broken_file_is_one_clear_error(tmp_path):
    with pytest.raises(NotFound):
        SweepConfig.load(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("train: [unclosed")
    with pytest.raises(InvalidInput, match="not valid YAML"):
        SweepConfig.load(tmp_path / "bad.yaml")


def test_spaces_become_ray_tune_spaces():
    from ray.tune.search.sample import Categorical, Float

    _, spaces = SweepConfig(**STUDY).split()
    assert spaces["max_train_steps"].to_tune() == {"grid_search": [100, 200, 400]}
    assert isinstance(spaces["method"].to_tune(), Categorical)
    lr = spaces["learning_rate"].to_tune()
    assert isinstance(lr, Float) and (lr.lower, lr.upper) == (1e-5, 1e-3)


def test_the_pareto_front_keeps_what_nothing_cheaper_beats():
    # (cost, clip_i): the third is dominated by the second (cheaper and better); equal points stay.
    points = [(1.0, 0.5), (2.0, 0.8), (3.0, 0.7), (4.0, 0.9), (2.0, 0.8)]
    assert pareto_front(points, "max") == [0, 1, 3, 4]
    assert pareto_front([(1.0, 30.0), (2.0, 20.0), (3.0, 25.0)], "min") == [0, 1]


def test_sweep_status_shows_each_trials_latest_report_from_the_jobs_log():
    from types import SimpleNamespace

    from atelier.training import events
    from atelier.training.sweep import sweep_progress

    def trial(trial: str, state: str, step: int | None, value: float | None) -> str:
        return "(TuneController) " + events.line(events.Trial(
            concept="studs", trial=trial, settings={"learning_rate": 1e-4}, state=state, step=step,
            metric="clip_i", value=value))

    log = [
        trial("a", "running", 10, 0.30), trial("b", "running", 10, 0.20),
        trial("a", "running", 20, 0.35),
        trial("a", "running", 10, 0.30) + " [repeated 2x across cluster]",  # Ray repeats a line late
        trial("b", "stopped", 10, 0.20), trial("b", "running", 10, 0.20),  # an end is final
        trial("a", "done", 20, 0.35),
        trial("c", "running", 20, 0.25), trial("c", "running", 10, 0.22),  # still running
        events.line(events.Published(model="shop-studs:3", uri="s3://atelier/models/x", loss=0.1)),
        events.line(events.Promoted(model="shop-studs:3", alias="prod", moved=True, previous=2)),
        "some other line",
    ]
    jobs = SimpleNamespace(info=lambda job_id: SimpleNamespace(status=SimpleNamespace(value="SUCCEEDED"),
                                                              message=None),
                           logs=lambda job_id: "\n".join(log))
    p = sweep_progress(jobs, "raysubmit_1")
    assert p.status == "SUCCEEDED" and p.published == ["shop-studs:3"]
    assert [(m.model, m.alias, m.moved, m.previous) for m in p.promotions] == [("shop-studs:3", "prod", True, 2)]
    assert [(t.trial, t.state, t.step, t.value) for t in p.trials] == [("a", "done", 20, 0.35),
                                                                      ("b", "stopped", 10, 0.20),
                                                                      ("c", "running", 20, 0.25)]


def test_the_example_sweep_file_is_valid_and_its_schema_is_committed():
    import json

    import jsonschema

    from support import REPO

    sweep = SweepConfig.load(REPO / "examples" / "sweep.yaml")
    assert sweep.trials_per_concept() == 4 and sweep.base().base_model == "shop"
    schema = json.loads((REPO / "schemas" / "sweep.schema.json").read_text())
    jsonschema.validate(yaml.safe_load((REPO / "examples" / "sweep.yaml").read_text()), schema)


def test_a_trial_is_charged_for_its_training_loop_across_a_restart_and_not_for_waiting():
    from atelier_jobs.sweep import loop_seconds

    rows = [{"step": 25, "loop_s": 10.0}, {"step": 50, "loop_s": 20.0},
            {"step": 50, "loop_s": 4.0}, {"step": 75, "loop_s": 14.0},  # a new worker resumed at 25
            {"step": None, "loop_s": float("nan")}]
    assert loop_seconds(rows) == 34.0
    assert loop_seconds([]) == 0.0
