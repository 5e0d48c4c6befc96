"""`atelier bench serve|train` measure pools into result files; `atelier report` turns result files
into the cost comparison (Markdown and HTML)."""

from __future__ import annotations

import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from atelier.errors import InvalidInput, ServiceError
from atelier.settings import get_settings

app = typer.Typer(help="Measure pools: serving load and training runs, into result files.",
                  no_args_is_help=True)
console = Console()
err = Console(stderr=True)
RESULTS = Path("bench-results")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="bench")
    root.command("report")(report)


def _pairs(values: list[str] | None, what: str) -> dict[str, str]:
    """["a=b", ...] as a dict; InvalidInput naming the option for anything else."""
    out = {}
    for value in values or []:
        key, sep, val = value.partition("=")
        if not sep or not key or not val:
            raise InvalidInput(f"{value!r}: expected NAME=VALUE", where=what)
        out[key] = val
    return out


def _levels(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InvalidInput(f"{text!r}: expected numbers separated by commas", where="--levels") from None


def _default_out(kind: str) -> Path:
    return RESULTS / f"{kind}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"


def _command() -> str:
    return shlex.join(["atelier", *sys.argv[1:]]) if sys.argv and "atelier" in sys.argv[0] else ""


@app.command()
def serve(
    target: list[str] | None = typer.Option(
        None, "--target", "-t", help="POOL=URL of an endpoint to measure (one Serve application "
        "per pool). Repeatable; the first is the one others are compared with."),
    local: bool = typer.Option(False, "--local", help="Measure two CPU stand-in pools (batch 1 "
                               "against batch 8) deployed on the embedded stack for the run."),
    model: str | None = typer.Option(None, "--model", "-m", help="Model every request asks for "
                                     "(with --local: default tiny)."),
    prompt: list[str] | None = typer.Option(None, "--prompt", help="Prompts, used in turn. Repeatable."),
    width: int = typer.Option(512, help="Width in pixels."),
    height: int = typer.Option(512, help="Height in pixels."),
    steps: int = typer.Option(25, help="Denoising steps."),
    n: int = typer.Option(1, "-n", help="Images per request."),
    scheduler: str | None = typer.Option(None, help="Sampler (the endpoint's default if unset)."),
    guidance_scale: float | None = typer.Option(None, help="Guidance scale (default: endpoint's)."),
    mode: str = typer.Option("closed", help="closed: LEVELS are concurrent clients; open: LEVELS "
                             "are Poisson arrival rates (requests/s)."),
    levels: str = typer.Option("1,4", help="Load levels, comma-separated."),
    requests: int | None = typer.Option(None, help="Requests per level, pool and pass (default 16 "
                                        "unless --duration)."),
    duration: float | None = typer.Option(None, help="Seconds per level, pool and pass."),
    repeats: int = typer.Option(3, help="Passes over the levels; pools alternate order per pass."),
    warmup: int = typer.Option(2, help="Requests per pool sent first and left out."),
    cold_start: bool = typer.Option(True, help="Time the first request where a pool has no "
                                    "replica (Serve's replica count must be readable)."),
    prices_as: list[str] | None = typer.Option(
        None, "--prices-as", help="LABEL=POOL: price a measured pool as the t4 or a100 pool; with "
        "--local, POOL prices the stand-ins. Default: a pool named t4 or a100 prices as itself, "
        "--local's stand-ins as t4 (to exercise the cost table, never shown as a T4 figure)."),
    config: Path | None = typer.Option(None, "--config", "-c", help="With --local: the serve "
                                       "config the stand-ins start from."),
    api_key_file: Path | None = typer.Option(None, help="API key file (default: $ATELIER_API_KEY, "
                                             "else the local deployment's)."),
    timeout: float = typer.Option(300, help="Seconds one request may take."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Result file (JSON)."),
) -> None:
    """Latency, throughput, errors, replicas and cold start of serving pools under load."""
    from atelier.bench import serving
    from atelier.bench.cost import priced_pool
    from atelier.bench.load import Plan
    from atelier.bench.results import Target, Workload, save
    from atelier.endpoint.config import ServeConfig
    from atelier.endpoint.deploy import ServeCluster
    from atelier.endpoint.keys import find_api_key

    settings = get_settings()
    urls = _pairs(target, "--target")
    # A bare POOL prices every stand-in of --local; LABEL=POOL prices one --target.
    pricing = _pairs([p if "=" in p else f"*={p}" for p in prices_as or []], "--prices-as")
    if bool(urls) == local:
        raise InvalidInput("give --target POOL=URL (repeatable) or --local, one of the two",
                           where="atelier bench serve")
    workload = Workload(prompts=prompt or ["photo of a pair of beaded hoops"], width=width,
                        height=height, steps=steps, n=n, scheduler=scheduler,
                        guidance_scale=guidance_scale)
    plan_args = dict(workload=workload, mode=mode, levels=_levels(levels),
                     requests_per_level=None if duration is not None and requests is None
                     else (requests or 16),
                     duration_s=duration, repeats=repeats, warmup=warmup, timeout_s=timeout)
    out = out or _default_out("serve")

    def run(targets: list[Target], cluster: ServeCluster) -> None:
        # The key is read once the targets are up: --local's deployment writes the local key file.
        plan = Plan(targets=targets, api_key=find_api_key(api_key_file, settings),
                    **plan_args)  # type: ignore[arg-type]
        total = plan.total_requests()
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[errors]} errors"), TimeElapsedColumn()]
        with Progress(*columns, console=err, transient=True) as bar:
            task = bar.add_task("requests", total=total, errors=0)
            errors = [0]

            def on_request(r) -> None:
                errors[0] += r.status != 200
                bar.update(task, advance=1, errors=errors[0],
                           description=f"{r.pool} level {r.level:g} pass {r.repeat + 1}")

            result = serving.measure(plan, replicas=serving.replica_reader(cluster),
                                     cold_start=cold_start, on_request=on_request,
                                     command=_command())
        save(result, out)
        _print_levels(result)
        failed = sorted({lv.pool for lv in result.levels_summary} - {
            lv.pool for lv in result.levels_summary if lv.ok})
        if failed:
            raise ServiceError(f"no request to {', '.join(failed)} succeeded (the result file "
                               f"records each status)", where=str(out))

    if local:
        from atelier import stack

        base = ServeConfig.load(config)
        with console.status("starting the embedded stack ..."):
            stack.up(settings)
        err.print("deploying the stand-in pools (removed when the run ends) ...")
        with serving.deployed(settings, base, model or "tiny",
                              priced_pool(pricing.get("*", "t4"))) as (targets, cluster):
            run(targets, cluster)
    else:
        targets = [Target(pool=pool, url=url, model=model,
                          prices_as=priced_pool(pricing[pool]) if pool in pricing
                          else (pool if pool in ("t4", "a100") else None))
                   for pool, url in urls.items()]
        run(targets, ServeCluster(settings))
    console.print(f"wrote {out}", highlight=False)


def _print_levels(result) -> None:
    table = Table("pool", "level", "requests", "errors", "images/s", "p50 s", "p95 s", "p99 s")

    def spread(s) -> str:
        return "-" if s is None else f"{s.median:.3g} [{s.low:.3g}-{s.high:.3g}]"

    for lv in result.levels_summary:
        table.add_row(lv.pool, f"{lv.level:g}", str(lv.requests), f"{lv.error_rate:.0%}",
                      spread(lv.images_per_s), spread(lv.p50_s), spread(lv.p95_s), spread(lv.p99_s))
    console.print(table)
    for c in result.comparisons:
        console.print(f"{c.metric} at {c.level:g}: {c.a}/{c.b} = {c.ratio:.2f} "
                      f"(95 % interval {c.low:.2f}-{c.high:.2f})", highlight=False)
    for cold in result.cold_starts:
        console.print(f"cold start {cold.pool}: {cold.seconds:.1f} s", highlight=False)
    for note in result.notes:
        console.print(f"[dim]note: {note}[/]", highlight=False)


@app.command()
def train(
    concepts: Path = typer.Argument(..., help="Concepts file (atelier catalogue build)."),
    pool: list[str] | None = typer.Option(
        None, "--pool", "-p", help="LABEL=POOL (or POOL) to train on: cpu, t4, a100. Repeatable. "
        "Default: cpu (a CPU stand-in)."),
    config: Path | None = typer.Option(None, "--config", "-c", help="Training config YAML "
                                       "(default: the study's: 200 steps, lr 1e-6)."),
    steps: int | None = typer.Option(None, "--steps", help="max_train_steps."),
    base_model: str | None = typer.Option(None, help="Base model reference."),
    concept: str | None = typer.Option(None, "--concept", help="The concept each run fine-tunes "
                                       "(default: the file's first)."),
    repeats: int = typer.Option(1, help="Runs per pool; pools alternate order per pass."),
    prices_as: list[str] | None = typer.Option(
        None, "--prices-as", help="LABEL=CATALOGUE_POOL: price a pool's runs as t4 or a100 "
        "(a GPU pool prices as itself)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Result file (JSON)."),
) -> None:
    """Seconds per fine-tune, steps/s, time to first step and peak memory, per pool."""
    from atelier.bench import training
    from atelier.bench.cost import priced_pool
    from atelier.bench.results import save
    from atelier.training.config import TrainConfig

    pricing = {k: priced_pool(v) for k, v in _pairs(prices_as, "--prices-as").items()}
    targets = [training.TrainPool.parse(p, pricing) for p in pool or ["cpu"]]
    base = TrainConfig.load(config, max_train_steps=steps, base_model=base_model)
    out = out or _default_out("train")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err, transient=True) as bar:
        task = bar.add_task("submitting", total=None)

        def on_event(label: str, event) -> None:
            from atelier.training import events

            if isinstance(event, events.Step):
                bar.update(task, description=f"{label}: {event.model}", completed=event.step,
                           total=event.total)

        result = training.measure(get_settings(), concepts, base, targets, concept=concept,
                                  repeats=repeats,
                                  on_event=on_event, command=_command())
    save(result, out)
    table = Table("pool", "seconds", "steps/s", "first step s", "peak MB")
    for r in result.runs:
        table.add_row(r.pool + (" (stand-in)" if r.stand_in else ""),
                      f"{r.seconds.median:.1f} [{r.seconds.low:.1f}-{r.seconds.high:.1f}]",
                      f"{r.steps_per_s.median:.3g}", f"{r.time_to_first_step_s.median:.1f}",
                      "-" if r.peak_memory_mb is None else f"{r.peak_memory_mb:.0f}")
    console.print(table)
    console.print(f"wrote {out}", highlight=False)


def report(
    results: list[Path] = typer.Argument(..., help="Result files of atelier bench and "
                                         "benchmarks/gpu_sd.py."),
    out: Path = typer.Option(Path("report"), "--out", "-o", help="Folder for report.md, "
                             "report.html and the plots."),
    prices: Path | None = typer.Option(None, help="Price catalogue YAML (default: the shipped one)."),
    market: str = typer.Option("on_demand", help="on_demand or spot."),
    p95_target: float | None = typer.Option(None, help="Latency target in seconds: cost per "
                                            "image is at the highest throughput whose p95 meets it."),
    idle_timeout: float = typer.Option(300.0, help="Seconds a scaled-to-zero replica stays after "
                                       "its last request."),
) -> None:
    """Which pool is cheaper per image and per fine-tune, at what latency and traffic."""
    from atelier.bench import results as bench_results
    from atelier.bench.cost import Catalogue
    from atelier.bench.report import write_report

    if market not in ("on_demand", "spot"):
        raise InvalidInput(f"{market!r}: on_demand or spot", where="--market")
    loaded = [bench_results.load(p) for p in results]
    written = write_report(loaded, out, catalogue=Catalogue.load(prices), market=market,  # type: ignore[arg-type]
                           p95_target_s=p95_target, idle_timeout_s=idle_timeout,
                           sources=[str(p) for p in results])
    for path in written:
        if path.suffix in (".md", ".html"):
            typer.echo(str(path))
