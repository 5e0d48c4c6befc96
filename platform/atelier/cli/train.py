"""`atelier train ...`: submit DreamBooth jobs and follow them."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from atelier.cli.progress import follow_job
from atelier.pools import GPU_POOLS
from atelier.settings import get_settings

app = typer.Typer(help="Train DreamBooth models as Ray jobs.", no_args_is_help=True)
console = Console()
err = Console(stderr=True)


@app.command()
def submit(
    concepts: Path = typer.Argument(..., help="Concepts file (atelier catalogue build)."),
    config: Path | None = typer.Option(None, "--config", "-c", help="Training config YAML."),
    method: str | None = typer.Option(None, help="full, lora or textual_inversion."),
    base_model: str | None = typer.Option(None, help="Base model reference."),
    steps: int | None = typer.Option(None, "--steps", help="max_train_steps."),
    learning_rate: float | None = typer.Option(None, "--lr", help="learning_rate."),
    resolution: int | None = typer.Option(None, help="Image side in pixels (multiple of 8)."),
    workers: int | None = typer.Option(None, help="Ray Train workers."),
    checkpoint_every: int | None = typer.Option(None, help="Steps between checkpoints."),
    concept_mode: str | None = typer.Option(None, help="per_concept or joint."),
    model_name: str | None = typer.Option(None, help="Registry name of the result."),
    only: list[str] | None = typer.Option(None, "--concept", help="Train only these concepts."),
    run_name: str | None = typer.Option(None, help="Run name; reuse one to resume that run."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Wait and show progress."),
    kube: bool = typer.Option(False, "--kube", help="Submit as a KubeRay RayJob instead."),
    gpu: str | None = typer.Option(
        None, "--gpu", help=f"GPU pool: {', '.join(GPU_POOLS)} (with --kube: the worker group)."),
    namespace: str = typer.Option("default", help="With --kube: the namespace."),
) -> None:
    """Submit a training job; print its id."""
    from atelier.cli.progress import transfer_bar
    from atelier.rayjobs import Jobs
    from atelier.training.capacity import waiting_for_cpus
    from atelier.training.config import TrainConfig
    from atelier.training.submit import submit as submit_job

    flags = dict(method=method, base_model=base_model, max_train_steps=steps,
                 learning_rate=learning_rate, resolution=resolution, num_workers=workers,
                 checkpoint_every=checkpoint_every, concept_mode=concept_mode,
                 model_name=model_name, gpu_type=gpu)
    cfg = TrainConfig.load(config, **flags)
    settings = get_settings()
    if kube:
        from atelier.kube import submit_rayjob

        name = submit_rayjob(settings, concepts, cfg, gpu=gpu or cfg.gpu_type or "t4",
                             namespace=namespace, concepts=only, run_name=run_name,
                             said=lambda line: err.print(line, highlight=False))
        console.print(f"RayJob {namespace}/{name} created")
        typer.echo(name)
        return
    with transfer_bar("uploading") as progress:
        job_id, spec = submit_job(settings, concepts, cfg, concepts=only, run_name=run_name,
                                  progress=progress)
    console.print(f"submitted run [bold]{spec.run_name}[/] ({len(spec.concepts or []) or 'all'} "
                  f"concepts, {cfg.method}, {cfg.max_train_steps} steps)", highlight=False)
    if waiting := waiting_for_cpus(Jobs(settings), cfg):
        err.print(f"[yellow]note:[/] {waiting}", highlight=False)
    typer.echo(job_id)
    if follow:
        follow_job(job_id, console)


@app.command()
def status(
    job_id: str = typer.Argument(..., help="Job id from `train submit` (--kube: RayJob name)."),
    kube: bool = typer.Option(False, "--kube", help="Read a KubeRay RayJob's status instead."),
    namespace: str = typer.Option("default", help="With --kube: the namespace."),
) -> None:
    """Status, step, loss and ETA of a training job."""
    from atelier.rayjobs import Jobs
    from atelier.training.progress import progress

    if kube:
        from atelier.kube import rayjob_status

        table = Table(show_header=False)
        for key, value in rayjob_status(get_settings(), job_id, namespace).items():
            table.add_row(key, "-" if value is None else str(value))
        console.print(table)
        return
    p = progress(Jobs(get_settings()), job_id)
    table = Table(show_header=False)
    table.add_row("status", p.status)
    if p.model:
        table.add_row("model", p.model)
        table.add_row("step", f"{p.step}/{p.total}")
    if p.loss is not None:
        table.add_row("loss", f"{p.loss:.5f}")
    if p.eta_s is not None and p.status == "RUNNING":
        table.add_row("eta", f"{p.eta_s:.0f} s")
    if p.checkpoint_step:
        table.add_row("last checkpoint", f"step {p.checkpoint_step}")
    if p.resumed_from is not None:
        table.add_row("resumed from", f"step {p.resumed_from}")
    if p.worker_failures:
        table.add_row("worker failures", f"{p.worker_failures} (Ray Train started the workers again from the "
                      f"last checkpoint); the latest: {p.last_failure}")
    if p.nodes_lost:
        table.add_row("nodes lost", f"{len(p.nodes_lost)} ({', '.join(p.nodes_lost)}): the run went on without them")
    if p.outages:
        table.add_row("storage outages", f"{p.outages} (waited for S3, then went on)")
    if p.published:
        table.add_row("published", ", ".join(p.published))
    if p.message and p.status in ("FAILED", "STOPPED"):
        table.add_row("message", p.message.strip().splitlines()[-1])
    console.print(table)


@app.command()
def logs(
    job_id: str = typer.Argument(..., help="Job id."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing until it ends."),
) -> None:
    """Print a job's logs."""
    from atelier.rayjobs import Jobs

    jobs = Jobs(get_settings())
    if not follow:
        typer.echo(jobs.logs(job_id), nl=False)
        return
    jobs.wait(job_id, on_line=typer.echo)


@app.command("list")
def list_jobs() -> None:
    """Training jobs known to the Ray cluster."""
    from atelier.rayjobs import Jobs

    table = Table("status", "run", "model", "started")
    table.add_column("job id", no_wrap=True)
    for job in Jobs(get_settings()).client.list_jobs():
        meta = job.metadata or {}
        if meta.get("atelier") != "train":
            continue
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime((job.start_time or 0) / 1000))
        table.add_row(str(job.status.value), meta.get("run", ""), meta.get("model", ""), started,
                      job.submission_id or job.job_id or "")
    console.print(table)


@app.command()
def stop(job_id: str = typer.Argument(..., help="Job id.")) -> None:
    """Stop a running job; its last checkpoint stays usable (resubmit the run to resume)."""
    from atelier.rayjobs import Jobs

    stopped = Jobs(get_settings()).stop(job_id)
    console.print("stop requested" if stopped else "job was not running")
