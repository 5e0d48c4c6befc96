"""`atelier sweep ...`: the study's search as one command (Ray Tune over training settings)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from atelier.pools import GPU_POOLS

app = typer.Typer(help="Search training settings with Ray Tune; register the best model per concept.",
                  no_args_is_help=True)
console = Console()


@app.command("run")
def run(
    sweep_file: Path = typer.Argument(..., help="Sweep file: a training config with search spaces."),
    concepts: Path = typer.Argument(..., help="Concepts file (atelier catalogue build)."),
    only: list[str] | None = typer.Option(None, "--concept", help="Search only these concepts."),
    name: str | None = typer.Option(None, help="Sweep name; reuse one to resume its trials."),
    alias: str | None = typer.Option(None, "--alias", "-a", help="Promote each concept's best model to this alias."),
    promote_if: str | None = typer.Option(
        None, "--promote-if", help='With --alias: only if its evaluation meets this gate ("clip_i > 0.8") '
        "and beats the version the alias names now."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Wait and show progress."),
    kube: bool = typer.Option(False, "--kube", help="Submit as a KubeRay RayJob instead (its worker "
                              "group holds max_concurrent trials at once; 1 when unset)."),
    gpu: str | None = typer.Option(None, "--gpu", help=f"With --kube: the GPU pool ({', '.join(GPU_POOLS)})."),
    namespace: str = typer.Option("default", help="With --kube: the namespace."),
) -> None:
    """Submit a sweep; print its job id (--kube: the RayJob's name)."""
    from atelier.cli.progress import follow_job, transfer_bar
    from atelier.errors import InvalidInput
    from atelier.settings import get_settings
    from atelier.training.sweep import Promotion, SweepConfig, submit_sweep, submit_sweep_rayjob

    if promote_if and not alias:
        raise InvalidInput("--promote-if needs --alias (the alias it would move)", where="--promote-if")
    settings = get_settings()
    sweep = SweepConfig.load(sweep_file)
    promote = Promotion(alias=alias, promote_if=promote_if, webhook=settings.promotion_webhook) if alias else None
    if kube:
        rayjob = submit_sweep_rayjob(settings, concepts, sweep, gpu=gpu or sweep.base().gpu_type or "t4",
                                     namespace=namespace, concepts=only, name=name, promote=promote,
                                     said=lambda line: console.print(line, highlight=False))
        console.print(f"RayJob {namespace}/{rayjob} created: {sweep.trials_per_concept()} trials per "
                      f"concept, {sweep.max_concurrent or 1} at once", highlight=False)
        typer.echo(rayjob)
        return
    with transfer_bar("uploading") as progress:
        job_id, spec = submit_sweep(settings, concepts, sweep, concepts=only, name=name,
                                    promote=promote, progress=progress)
    console.print(f"submitted sweep [bold]{spec.job.run_name}[/]: {sweep.trials_per_concept()} trials "
                  f"per concept, optimising {sweep.metric} ({sweep.mode})", highlight=False)
    typer.echo(job_id)
    if follow:
        follow_job(job_id, console)


@app.command("status")
def status(
    job_id: str = typer.Argument(..., help="Job id from `sweep run` (--kube: the RayJob's name)."),
    kube: bool = typer.Option(False, "--kube", help="Read a KubeRay RayJob's status instead."),
    namespace: str = typer.Option("default", help="With --kube: the namespace."),
) -> None:
    """A running sweep's trials: each one's latest checkpoint metric, or how it ended."""
    from atelier.rayjobs import Jobs
    from atelier.settings import get_settings
    from atelier.training.sweep import sweep_progress

    if kube:  # the trials are in the job's log on the cluster: `sweep show` reads the results
        from atelier.kube import rayjob_status

        for key, value in rayjob_status(get_settings(), job_id, namespace).items():
            console.print(f"{key}: {'-' if value is None else value}", highlight=False)
        return
    p = sweep_progress(Jobs(get_settings()), job_id)
    console.print(f"status: {p.status}", highlight=False)
    if p.trials:
        table = Table("concept", "trial", "settings", "step", p.trials[0].metric, "state")
        for t in p.trials:
            table.add_row(t.concept, t.trial, " ".join(f"{k}={v}" for k, v in t.settings.items()),
                          "-" if t.step is None else str(t.step),
                          "-" if t.value is None else f"{t.value:.4g}", t.state)
        console.print(table)
    for ref in p.published:
        console.print(f"registered: {ref}", highlight=False)
    for move in p.promotions:
        console.print(f"@{move.alias} -> {move.model}" if move.moved else
                      f"not promoted: {move.model} ({move.why})", highlight=False)
    if p.message and p.status in ("FAILED", "STOPPED"):
        console.print(f"message: {p.message}", highlight=False)


@app.command("show")
def show(
    name: str = typer.Argument(..., help="Sweep name."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Copy the results and plots here."),
) -> None:
    """A finished sweep's trials: settings, metric per checkpoint, speed, cost; the best per concept."""
    import shutil

    from atelier.settings import get_settings
    from atelier.training.sweep import read_results

    settings = get_settings()
    results, folder = read_results(settings, name)
    table = Table("concept", "trial", "settings", "steps", f"{results.metric} (last)", "steps/s",
                  "cost", "", title=f"sweep {results.name}: {results.metric} ({results.mode})")
    for t in sorted(results.trials, key=lambda t: (t.concept, t.trial)):
        mark = "best" if results.best_trial.get(t.concept) == t.trial else (
            "stopped" if t.stopped_early else ("failed" if t.error else ""))
        table.add_row(t.concept, t.trial, " ".join(f"{k}={v}" for k, v in t.settings.items()),
                      str(t.steps), "-" if t.final is None else f"{t.final:.4g}",
                      "-" if t.steps_per_s is None else f"{t.steps_per_s:.3g}",
                      "-" if t.cost_usd is None else f"${t.cost_usd:.4f}", mark)
    console.print(table)
    for concept, ref in sorted(results.best.items()):
        console.print(f"best for {concept}: {ref}", highlight=False)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        for f in ("results.json", "curves.png", "pareto.png"):
            shutil.copy2(folder / f, out / f)
        console.print(f"results and plots in {out}", highlight=False)
