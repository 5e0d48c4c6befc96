"""The load generator of `atelier bench serve` against a real HTTP server (no Ray): what it sends,
what it records, how passes interleave, and the summary and ratio arithmetic; the training
bench's pools."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from atelier.bench import load
from atelier.bench.load import Plan
from atelier.bench.results import BenchResult, Request, Target, Workload
from atelier.errors import InvalidInput, Unauthorized

PNG = b"\x89PNG\r\n\x1a\n" + b"x" * 100


class FakeEndpoint:
    """An HTTP server that answers like the image API: a PNG with the replica's headers, after
    `delay_s`; `status` other than 200 answers that status with an Atelier error body."""

    def __init__(self, delay_s: float = 0.01, status: int = 200, gpu: str = "T4"):
        self.delay_s, self.status, self.gpu = delay_s, status, gpu
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802  (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                endpoint.bodies.append(body)
                endpoint.headers.append(dict(self.headers))
                time.sleep(endpoint.delay_s)
                if endpoint.status != 200:
                    data = json.dumps({"error": {"message": "invalid API key"}}).encode()
                    self.send_response(endpoint.status)
                    self.send_header("Content-Type", "application/json")
                else:
                    data = PNG if body.get("response_format") == "png" else json.dumps(
                        {"data": [{"b64_json": ""}] * body.get("n", 1)}).encode()
                    self.send_response(200)
                    self.send_header("X-Atelier-GPU", endpoint.gpu)
                    self.send_header("X-Atelier-Batch-Images", "3")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoints():
    made: list[FakeEndpoint] = []

    def make(**kwargs) -> FakeEndpoint:
        made.append(FakeEndpoint(**kwargs))
        return made[-1]

    yield make
    for e in made:
        e.close()


WORKLOAD = Workload(prompts=["a ring", "a hoop"], width=64, height=64, steps=3)


def test_closed_loop_sends_the_workload_with_the_key_and_records_every_request(endpoints):
    a = endpoints()
    plan = Plan(targets=[Target(pool="t4", url=a.url, model="tiny")], workload=WORKLOAD,
                levels=[1, 3], requests_per_level=6, repeats=2, warmup=2, api_key="k1")
    outcome = load.run(plan)
    assert len(outcome.requests) == 2 * 2 * 6  # levels x passes x requests; warm-up left out
    assert len(a.bodies) == 2 * 2 * 6 + 2
    assert {r.status for r in outcome.requests} == {200}
    assert {(r.gpu, r.batch_images, r.images) for r in outcome.requests} == {("T4", 3, 1)}
    assert all(h["Authorization"] == "Bearer k1" for h in a.headers)
    assert {b["prompt"] for b in a.bodies} == {"a ring", "a hoop"}
    assert {(b["model"], b["width"], b["steps"], b["response_format"]) for b in a.bodies} == {
        ("tiny", 64, 3, "png")}
    assert plan.total_requests() == len(a.bodies)


def test_n_images_are_asked_as_json_and_counted(endpoints):
    a = endpoints()
    plan = Plan(targets=[Target(pool="t4", url=a.url)], workload=WORKLOAD.model_copy(update={"n": 3}),
                levels=[1], requests_per_level=2, repeats=1, warmup=0)
    outcome = load.run(plan)
    assert {b["response_format"] for b in a.bodies} == {"b64_json"}
    assert [r.images for r in outcome.requests] == [3, 3]


def test_a_closed_level_keeps_that_many_requests_in_flight(endpoints):
    a = endpoints(delay_s=0.2)
    plan = Plan(targets=[Target(pool="t4", url=a.url)], workload=WORKLOAD, levels=[4],
                requests_per_level=8, repeats=1, warmup=0)
    requests = sorted(load.run(plan).requests, key=lambda r: r.start_s)
    # Two waves of four: the first four are all sent before any answer comes back, the fifth
    # only once one has.
    first_answer = min(r.start_s + r.latency_s for r in requests)
    assert max(r.start_s for r in requests[:4]) < first_answer <= requests[4].start_s


def test_passes_interleave_the_pools_a_b_then_b_a(endpoints):
    a, b = endpoints(), endpoints(gpu="A100")
    plan = Plan(targets=[Target(pool="a", url=a.url), Target(pool="b", url=b.url)],
                workload=WORKLOAD, levels=[1], requests_per_level=2, repeats=3, warmup=0)
    requests = load.run(plan).requests
    order = []
    for r in sorted(requests, key=lambda r: r.start_s):
        if not order or order[-1] != (r.repeat, r.pool):
            order.append((r.repeat, r.pool))
    assert order == [(0, "a"), (0, "b"), (1, "b"), (1, "a"), (2, "a"), (2, "b")]


def test_open_loop_arrivals_do_not_wait_for_answers(endpoints):
    a = endpoints(delay_s=0.5)
    plan = Plan(targets=[Target(pool="t4", url=a.url)], workload=WORKLOAD, mode="open",
                levels=[50], requests_per_level=10, repeats=1, warmup=0)
    requests = load.run(plan).requests
    assert len(requests) == 10
    # At 50/s ten arrivals take about 0.2 s, far less than one answer's 0.5 s: a closed loop of
    # one client could not have sent the tenth before the first came back.
    assert max(r.start_s for r in requests) < min(r.start_s + r.latency_s for r in requests)


def test_a_refused_key_stops_the_run_with_the_servers_message(endpoints):
    a = endpoints(status=401)
    plan = Plan(targets=[Target(pool="t4", url=a.url)], workload=WORKLOAD, levels=[1],
                requests_per_level=5, repeats=1, warmup=1)
    with pytest.raises(Unauthorized, match="t4 answered 401: invalid API key"):
        load.run(plan)
    assert len(a.bodies) == 1  # the warm-up; nothing measured after it


def test_overload_is_recorded_not_raised(endpoints):
    a = endpoints(status=503)
    plan = Plan(targets=[Target(pool="t4", url=a.url)], workload=WORKLOAD, levels=[2],
                requests_per_level=4, repeats=1, warmup=1)
    outcome = load.run(plan)
    [level] = load.summarise(outcome.requests)
    assert (level.ok, level.error_rate, level.rate_503, level.p50_s) == (0, 1.0, 1.0, None)


def test_no_answer_is_status_0():
    plan = Plan(targets=[Target(pool="t4", url="http://127.0.0.1:9")], workload=WORKLOAD,
                levels=[1], requests_per_level=2, repeats=1, warmup=0)
    assert {r.status for r in load.run(plan).requests} == {0}


def test_replica_counts_and_requests_in_flight_are_sampled(endpoints):
    a = endpoints(delay_s=0.3)
    seen = []

    def replicas(target):
        seen.append(target.pool)
        return {"RUNNING": 2}

    plan = Plan(targets=[Target(pool="t4", url=a.url)], workload=WORKLOAD, levels=[3],
                requests_per_level=6, repeats=1, warmup=0)
    outcome = load.run(plan, replicas=replicas, sample_every_s=0.1)
    assert seen and all(s.replicas == {"RUNNING": 2} for s in outcome.samples)
    assert max(s.ongoing or 0 for s in outcome.samples) == 3


def test_cold_start_is_timed_only_from_zero_replicas(endpoints):
    a, b = endpoints(delay_s=0.2), endpoints()
    counts = {"zero": {}, "warm": {"RUNNING": 1}}
    plan = Plan(targets=[Target(pool="zero", url=a.url), Target(pool="warm", url=b.url)],
                workload=WORKLOAD, levels=[1], requests_per_level=1, repeats=1, warmup=0)
    outcome = load.run(plan, replicas=lambda t: counts[t.pool], cold_start=True)
    [cold] = outcome.cold_starts
    assert cold.pool == "zero" and cold.seconds >= 0.2 and cold.status == 200
    assert any("warm: cold start not measured (it had 1 replicas" in n for n in outcome.notes)


def _requests(pool: str, level: float, per_pass: list[list[float]]) -> list[Request]:
    """Requests of one pool and level: pass i's latencies, sent back to back from t=10*i."""
    out = []
    for repeat, latencies in enumerate(per_pass):
        t = 10.0 * repeat
        for latency in latencies:
            out.append(Request(pool=pool, level=level, repeat=repeat, start_s=t, latency_s=latency,
                               status=200, bytes=1, images=1))
            t += latency
    return out


def test_summary_is_the_median_over_passes_with_their_range():
    requests = _requests("a", 1, [[1.0, 1.0], [2.0, 2.0], [4.0, 4.0]])
    [level] = load.summarise(requests)
    assert (level.p50_s.median, level.p50_s.low, level.p50_s.high) == (2.0, 1.0, 4.0)
    # images/s per pass: 2 images over 2, 4 and 8 s.
    assert (level.images_per_s.median, level.images_per_s.low, level.images_per_s.high) == (0.5, 0.25, 1.0)
    assert level.requests == 6 and level.ok == 6 and level.error_rate == 0


def test_a_ratio_comes_with_an_interval_that_holds_every_pass_ratio():
    a = _requests("a", 1, [[1.0] * 4, [1.1] * 4, [0.9] * 4])
    b = _requests("b", 1, [[2.0] * 4, [2.4] * 4, [1.6] * 4])
    ratios = {c.metric: c for c in load.compare(a + b, "a", "b")}
    p50 = ratios["p50_s"]
    assert p50.ratio == pytest.approx(0.5)
    assert p50.low <= 1.1 / 2.4 and p50.high >= 0.9 / 1.6  # the spread of pass ratios is inside
    assert ratios["images_per_s"].ratio == pytest.approx(2.0)


def test_one_pass_gives_no_ratio():
    a, b = _requests("a", 1, [[1.0]]), _requests("b", 1, [[2.0]])
    assert load.compare(a + b, "a", "b") == []


@pytest.mark.parametrize("change, where", [
    (dict(targets=[]), "--target"),
    (dict(requests_per_level=None), "--requests/--duration"),
    (dict(duration_s=5.0), "--requests/--duration"),
    (dict(levels=[1.5]), "--levels"),
    (dict(levels=[0]), "--levels"),
    (dict(mode="burst"), "--mode"),
    (dict(repeats=0), "--repeats/--warmup"),
])
def test_a_plan_that_cannot_run_is_one_clear_error(change, where):
    args = dict(targets=[Target(pool="t4", url="http://x")], workload=WORKLOAD, levels=[1],
                requests_per_level=4) | change
    with pytest.raises(InvalidInput) as e:
        Plan(**args)
    assert e.value.where == where


def test_a_result_file_round_trips_and_a_wrong_one_is_one_error(tmp_path, endpoints):
    from atelier.bench import serving
    from atelier.bench.results import load as load_result
    from atelier.bench.results import save

    a = endpoints()
    plan = Plan(targets=[Target(pool="t4", url=a.url)], workload=WORKLOAD, levels=[1],
                requests_per_level=3, repeats=2, warmup=0)
    result = serving.measure(plan, replicas=None, cold_start=False)
    path = save(result, tmp_path / "r.json")
    assert load_result(path) == result
    BenchResult.model_validate_json(path.read_text())
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(json.loads(path.read_text()) | {"format": "atelier-bench/9"}))
    with pytest.raises(InvalidInput, match="format"):
        load_result(bad)
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(InvalidInput, match="invalid JSON"):
        load_result(tmp_path / "junk.json")


# -- atelier bench train's pools -----------------------------------------------------------------
def test_train_pools_parse_and_run_on_their_gpu():
    from atelier.bench.training import TrainPool
    from atelier.training.config import TrainConfig
    from atelier_jobs.train import accelerator_type

    cpu = TrainPool.parse("cpu", {})
    assert (cpu.label, cpu.pool, cpu.stand_in, cpu.prices_as) == ("cpu", "cpu", True, None)
    assert TrainPool.parse("local=cpu", {"local": "t4"}).prices_as == "t4"
    t4 = TrainPool.parse("t4", {})
    assert (t4.stand_in, t4.prices_as) == (False, "t4")
    cfg = t4.config(TrainConfig())
    assert (cfg.use_gpu, cfg.gpu_type, cfg.gradient_checkpointing) == (True, "t4", True)
    assert accelerator_type(cfg) == "T4"
    assert accelerator_type(TrainPool.parse("a100", {}).config(TrainConfig())) == "A100"
    assert accelerator_type(cpu.config(TrainConfig())) is None
    # A setting the user gave wins over the study's default.
    assert not t4.config(TrainConfig(gradient_checkpointing=False)).gradient_checkpointing
    with pytest.raises(InvalidInput, match="no pool 'h100'"):
        TrainPool.parse("h100", {})


def test_only_a_gpu_pool_prices_a_measured_one():
    from atelier.bench.cost import priced_pool

    assert priced_pool("a100") == "a100"
    with pytest.raises(InvalidInput, match="not a GPU pool"):
        priced_pool("cpu")
