"""Progress bars for what a person waits on at the terminal: models and checkpoints going up to
storage or coming down from it, and training jobs (DreamBooth, pretraining) as their logs stream."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from atelier.storage import Progress as ProgressHook


@contextmanager
def transfer_bar(description: str, console: Console | None = None) -> Iterator[ProgressHook | None]:
    """A hook for Storage.commit / fetch / fetch_cached (and resolve_model) that draws a bar on
    stderr while the block runs. None where stderr is not a terminal: logs and pipes get no
    bar, and the transfer no callbacks."""
    console = console or Console(stderr=True)
    if not console.is_terminal:
        yield None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
               TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(description, total=None)

        def hook(name: str, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield hook


def follow_job(job_id: str, console: Console) -> None:
    """A progress bar fed by the job's log stream as it prints (Ray's tail_job_logs)."""
    from atelier.rayjobs import Jobs
    from atelier.settings import get_settings
    from atelier.training.progress import Progress as JobProgress
    from atelier.training.progress import fold

    jobs = Jobs(get_settings())
    p = JobProgress(status="RUNNING")
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(), console=console) as bar:
        task = bar.add_task("waiting", total=None, loss="-")

        def on_line(line: str) -> None:
            failures, nodes, outages = p.worker_failures, len(p.nodes_lost), p.outages
            if not fold(p, line):
                return
            # What went wrong and was mended, above the bar, once each.
            if p.worker_failures > failures:
                bar.console.print(f"workers failed ({p.last_failure}); Ray Train starts them again from the "
                                  "last checkpoint", highlight=False)
            if len(p.nodes_lost) > nodes:
                bar.console.print(f"node {p.nodes_lost[-1]} lost; the run goes on without it", highlight=False)
            if p.outages > outages:
                bar.console.print("S3 did not answer; the job waited for it, then went on", highlight=False)
            if p.step is not None:
                bar.update(task, description=p.model or "", completed=p.step, total=p.total,
                           loss=f"{p.loss:.4f}" if p.loss is not None else "-")

        status = jobs.wait(job_id, on_line=on_line, timeout_s=7 * 24 * 3600)
    jobs.raise_for(job_id, status)
    for model in p.published:
        console.print(f"published [bold]{model}[/]")
