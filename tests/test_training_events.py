"""A job's progress events: each kind a job writes is read back the same by every reader of its
log, through Ray's decorations of the line, and a line that is not a valid event is ignored."""

from __future__ import annotations

import typing
from types import SimpleNamespace

import pytest

from atelier.training import events

PRECISION = dict(
    computed_in="bfloat16",
    weights={"unet": {"frozen": ["bfloat16"], "trained": ["float32"]},
             "text_encoder": {"frozen": ["bfloat16"], "trained": []},
             "vae": {"frozen": ["bfloat16"], "trained": []}},
    optimizer="bitsandbytes.optim.adamw.AdamW8bit", optimizer_state_bytes={"uint8": 8192, "float32": 64},
    loss_scaling=False, gradient_checkpointing=True, attention=["AttnProcessor2_0"],
)

EXAMPLES = [
    events.Plan(models=["shop-ring", "shop-bag"]),
    events.ClassImages(prompt="a photo of rings", uri="s3://b/class-images/k", cached=False),
    events.Sampled(done=3, total=4),
    events.SamplesCommitted(uri="s3://b/class-images/k", files=4),
    events.Resumed(model="shop-ring", step=100),
    events.Start(model="shop-ring", step=0, total=200, images=3, prior=0, workers=2),
    events.Precision(model="shop-ring", **PRECISION),
    events.Step(model="shop-ring", step=10, total=200, loss=0.123456, steps_per_s=12.5,
                max_rss_mb=1024.5, eta_s=15.2),
    events.Checkpoint(model="shop-ring", step=50, loss=0.12, eval_loss=0.11,
                      quality={"clip_i": 0.81, "clip_t": 0.3, "colour_distance": None}),
    events.Published(model="shop-ring:1", uri="s3://b/registry/shop-ring/1", loss=None),
    events.Evaluated(model="shop-ring:1", concept="band-rings", done=1, total=2,
                     metrics={"clip_i": 0.8, "dino": None}),
    events.Trial(concept="band-rings", trial="0a1b2c3d4e", settings={"learning_rate": 1e-4, "method": "lora"},
                 state="running", step=50, metric="clip_i", value=0.42),
    events.StorageOutage(model="shop-ring", during="training", waited_s=12.5, outage=1,
                         error="AWS Error NETWORK_CONNECTION during PutObject operation: curlCode: 7"),
    events.StorageOutage(model="shop-ring", during="publish", waited_s=3.0, outage=1,
                         error="cannot reach the S3 endpoint"),
    events.WorkersFailed(model="shop-ring", failure=1, ranks=[1],
                         error="The actor 3f is unavailable: RpcError: failed to connect to all addresses"),
    events.NodeLost(node="0e2900", address="10.0.0.7", why="the detector has missed too many heartbeats"),
    events.Promoted(model="shop-ring:2", alias="prod", moved=False,
                    why="clip_i: shop-ring:2 has clip_i 0.4, which does not beat shop-ring:1 (0.5)"),
]

# The rest are the driver's (workers_failed: Ray Train's controller's, forwarded like a worker's).
WORKER_KINDS = {"resumed", "start", "precision", "step", "checkpoint", "evaluated", "workers_failed"}

# What Ray does to a line on its way to the job's log: a worker's lines come prefixed (coloured
# on a terminal), and its log deduplication may append a note.
AS_RAY_WRITES = [
    "{}",
    "(RayTrainWorker pid=4242) {}",
    "\x1b[36m(RayTrainWorker pid=4242)\x1b[0m {}",
    "(RayTrainWorker pid=4242, ip=10.0.0.7) {} [repeated 2x across cluster]",
]


def kinds() -> set[type]:
    union, _discriminator = typing.get_args(events.Event)
    return set(typing.get_args(union))


def test_every_kind_of_event_has_an_example_here():
    assert {type(e) for e in EXAMPLES} == kinds()


@pytest.mark.parametrize("event", EXAMPLES, ids=lambda e: e.event)
@pytest.mark.parametrize("decorate", AS_RAY_WRITES, ids=["bare", "worker", "coloured", "repeated"])
def test_an_event_a_job_writes_is_read_back_the_same(event, decorate, capsys):
    events.emit(event)
    [written] = capsys.readouterr().out.splitlines()
    assert events.parse(decorate.format(written)) == event


@pytest.mark.parametrize("line", [
    "",
    "plain output of a library",
    "ATELIER is a word, not an event",
    'ATELIER {"event": "step", "model": "m", "step": 1',  # cut off mid-line
    'ATELIER {"event": "teleported", "model": "m"}',  # a kind this version does not know
    'ATELIER {"event": "step", "model": "m"}',  # fields missing
    'ATELIER {"event": "plan", "models": ["m"], "colour": "red"}',  # a field no event has
    'ATELIER {"event": "checkpoint", "model": "m", "step": "ten", "loss": 1, "eval_loss": 1}',
    'ATELIER {"done": 1, "stage": "sample", "total": 2}',  # the sampling job's old, unmarked form
    'ATELIER {not json}',
    "ATELIER [1, 2]",
])
def test_a_line_that_is_not_a_valid_event_is_ignored(line):
    assert events.parse(line) is None
    assert events.parse(f"(RayTrainWorker pid=1) {line}") is None


def test_a_jobs_status_folds_its_events_read_from_the_log():
    from atelier.training.progress import progress

    driver = [events.line(e) for e in EXAMPLES if e.event not in WORKER_KINDS]
    # A worker's line reaches the job's log twice: as its own, and forwarded by the driver.
    workers = [x for e in EXAMPLES if e.event in WORKER_KINDS
               for x in (events.line(e), f"(RayTrainWorker pid=7) {events.line(e)}")]
    log = "\n".join(["some library's output", *driver[:-1], *workers, driver[-1],
                     'ATELIER {"event": "step", "step": "garbled"'])
    jobs = SimpleNamespace(
        info=lambda job_id: SimpleNamespace(status=SimpleNamespace(value="RUNNING"), message=None),
        logs=lambda job_id: log,
    )
    p = progress(jobs, "raysubmit_1")
    assert (p.status, p.models) == ("RUNNING", ["shop-ring", "shop-bag"])
    assert (p.model, p.step, p.total, p.loss, p.eta_s) == ("shop-ring", 10, 200, 0.123456, 15.2)
    assert (p.checkpoint_step, p.resumed_from, p.outages) == (50, 100, 2)
    assert (p.worker_failures, p.nodes_lost) == (1, ["10.0.0.7"])
    assert p.last_failure and p.last_failure.startswith("The actor 3f is unavailable")
    assert p.published == ["shop-ring:1"]


def test_the_demo_says_each_event_once_though_ray_forwards_a_workers_line_twice():
    from atelier.demo import _event_printer

    said: list[str] = []
    on_line = _event_printer(said.append)
    step = events.line(EXAMPLES[7])
    for line in ("noise", step, f"(RayTrainWorker pid=7) {step}", events.line(EXAMPLES[8])):
        on_line(line)
    assert said == ["  shop-ring: step 10/200 loss 0.1235 (12.5 steps/s, eta 15 s)",
                    "  shop-ring: checkpoint at step 50 (eval loss 0.1100, clip_i 0.81, clip_t 0.3)"]


def test_the_step_clock_reports_the_rate_since_its_last_event_and_the_eta_at_it(monkeypatch, capsys):
    clock_times = iter([100.0, 102.0, 112.0])
    monkeypatch.setattr(events.time, "monotonic", lambda: next(clock_times))
    clock = events.StepClock("shop-ring", total=100, start=20)  # resumed at step 20
    first = clock.emit(30, 0.5)  # 10 steps in 2 s
    second = clock.emit(40, 0.4)  # 10 more in 10 s: the rate since the last event, not the start
    assert (first.steps_per_s, first.eta_s) == (5.0, 14.0)
    assert (second.steps_per_s, second.eta_s) == (1.0, 60.0)
    assert second.max_rss_mb > 0 and second.max_gpu_mb is None
    lines = capsys.readouterr().out.splitlines()
    assert [events.parse(line) for line in lines] == [first, second]


def test_following_a_job_says_each_failure_node_loss_and_outage_once(monkeypatch):
    """`atelier train run -f` prints what went wrong and was mended above its progress bar: once
    per event, though Ray forwards a line twice."""
    from rich.console import Console

    import atelier.rayjobs
    from atelier.cli.progress import follow_job

    class Jobs:
        def __init__(self, settings):
            pass

        def wait(self, job_id, on_line, timeout_s):
            for e in EXAMPLES:
                on_line(events.line(e))
                on_line(f"(TrainController pid=3) {events.line(e)}")
            return "SUCCEEDED"

        def raise_for(self, job_id, status):
            pass

    monkeypatch.setattr(atelier.rayjobs, "Jobs", Jobs)
    console = Console(record=True, width=200)
    follow_job("raysubmit_1", console)
    said = console.export_text()
    assert said.count("workers failed (The actor 3f is unavailable") == 1, said
    assert said.count("node 10.0.0.7 lost") == 1, said
    assert said.count("S3 did not answer") == 2, said  # one while training, one while publishing
    assert "published shop-ring:1" in said
