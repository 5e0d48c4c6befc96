"""Progress bars for the transfers a person waits on at the terminal: models and checkpoints
going up to storage or coming down from it."""

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
