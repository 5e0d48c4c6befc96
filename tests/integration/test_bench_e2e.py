"""`atelier bench serve --local`, `atelier bench train` and `atelier report` end to end on the
embedded stack: two CPU stand-in pools served by Ray Serve, a real training job, one report."""

from __future__ import annotations

import pytest
import yaml

from atelier.bench.results import ServeResult, TrainResult, load
from atelier.endpoint.deploy import ServeCluster
from atelier.registry import Registry
from atelier.storage import Storage
from support import free_port

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def results(env, concepts_file, tmp_path_factory):
    from atelier.cli.main import main

    tmp = tmp_path_factory.mktemp("bench")
    (tmp / "serve.yaml").write_text(yaml.safe_dump({
        "http": {"port": free_port()}, "limits": {"min_side": 32}}))
    assert main(["bench", "serve", "--local", "--config", str(tmp / "serve.yaml"), "--width", "64",
                 "--height", "64", "--steps", "2", "--levels", "1,4", "--requests", "4",
                 "--repeats", "2", "--warmup", "1", "--out", str(tmp / "serve.json")]) == 0
    # The stand-ins are gone before training starts (left running, they would hold the CPUs the
    # training job waits for).
    apps = ServeCluster(env).details().get("applications") or {}
    assert not [name for name in apps if name.startswith("bench-")]
    assert main(["bench", "train", str(concepts_file), "--steps", "10", "--prices-as", "cpu=t4",
                 "--out", str(tmp / "train.json")]) == 0
    return tmp


def test_the_stand_in_pools_are_measured_under_load(results, env):
    result = load(results / "serve.json")
    assert isinstance(result, ServeResult)
    assert [(t.pool, t.stand_in, t.prices_as) for t in result.targets] == [
        ("cpu-b1", True, "t4"), ("cpu-b8", True, "t4")]
    assert len(result.requests) == 2 * 2 * 2 * 4  # pools x levels x passes x requests
    assert {r.status for r in result.requests} == {200}
    assert {r.gpu for r in result.requests} == {"cpu"}
    # The server's batch sizes: never above a pool's max_batch_images, and the batch-8 pool
    # really batched its four concurrent clients.
    batches = {pool: {r.batch_images for r in result.requests if r.pool == pool}
               for pool in ("cpu-b1", "cpu-b8")}
    assert batches["cpu-b1"] == {1} and max(batches["cpu-b8"]) > 1
    # Both started from zero replicas: the first request of each was a cold start.
    assert sorted(c.pool for c in result.cold_starts) == ["cpu-b1", "cpu-b8"]
    assert all(c.status == 200 and c.seconds > 0 for c in result.cold_starts)
    # Serve's replica counts were sampled while the load ran.
    for pool in ("cpu-b1", "cpu-b8"):
        assert any(s.replicas.get("RUNNING") for s in result.samples if s.pool == pool)
    assert {(lv.pool, lv.level) for lv in result.levels_summary} == {
        (p, lv) for p in ("cpu-b1", "cpu-b8") for lv in (1.0, 4.0)}
    assert all(lv.p95_s is not None and lv.p95_s.repeats == 2 for lv in result.levels_summary)
    assert {c.metric for c in result.comparisons} == {"images_per_s", "p50_s", "p95_s"}
    assert result.environment.packages["ray"] and result.environment.gpu is None


def test_a_training_run_is_timed_from_its_events_and_registers_its_model(results, env):
    result = load(results / "train.json")
    assert isinstance(result, TrainResult)
    [run] = result.runs
    assert (run.pool, run.stand_in, run.prices_as) == ("cpu", True, "t4")
    assert run.config["max_train_steps"] == 10 and not run.config["use_gpu"]
    assert 0 < run.time_to_first_step_s.median < run.seconds.median
    assert run.steps_per_s.median > 0 and run.peak_memory_mb
    [model] = run.models
    Registry(Storage(env)).get(model)


def test_the_report_costs_the_stand_ins_and_labels_every_gpu_figure(results, capsys):
    from atelier.cli.main import main

    out = results / "report"
    assert main(["report", str(results / "serve.json"), str(results / "train.json"),
                 "--out", str(out)]) == 0
    assert capsys.readouterr().out.split() == [str(out / "report.md"), str(out / "report.html")]
    md = (out / "report.md").read_text()
    assert "No GPU was measured" in md
    assert "cpu-b1 (CPU stand-in, priced as t4)" in md and "cpu (CPU stand-in, priced as t4)" in md
    assert "| t4 (T4) | ESTIMATE |" in md and "| a100 (A100) | ESTIMATE |" in md
    assert "## Which pool when" in md
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4 and 'src="http' not in html


def test_a_bad_target_is_one_clear_error(env, capsys):
    from atelier.cli.main import main

    assert main(["bench", "serve", "--target", "t4"]) == 2
    assert "expected NAME=VALUE" in capsys.readouterr().err
    assert main(["bench", "serve", "--local", "--target", "t4=http://x"]) == 2
    assert main(["bench", "train", "c.yaml", "--pool", "h100"]) == 2
    assert "no pool 'h100'" in capsys.readouterr().err
