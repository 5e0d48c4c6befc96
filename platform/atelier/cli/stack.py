"""`atelier up`, `atelier down` and `atelier status`: the embedded single-machine stack."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from atelier import stack
from atelier.settings import get_settings

console = Console()


def register(app: typer.Typer) -> None:
    """Add the stack commands to the top level of `app`."""

    @app.command()
    def up() -> None:
        """Start SeaweedFS (S3) and a Ray head on this machine; a running one is left as is."""
        settings = get_settings()
        with console.status("starting SeaweedFS and the Ray head ..."):
            result = stack.up(settings)
        _print(result, f"S3 credentials: {settings.embedded_credentials_file}")

    @app.command()
    def down() -> None:
        """Stop the services `atelier up` started (and no other process)."""
        with console.status("stopping ..."):
            result = stack.down(get_settings())
        _print(result)

    @app.command()
    def status() -> None:
        """Show whether the embedded services run, with their pids and endpoints."""
        _print(stack.status(get_settings()))


def _print(result: stack.StackStatus, footer: str | None = None) -> None:
    table = Table("service", "state", "pid", "endpoint", "detail")
    for s in result.services:
        state = "[green]running[/]" if s.running else "[dim]stopped[/]"
        table.add_row(s.name, state, str(s.pid or "-"), s.endpoint or "-", s.detail)
    console.print(table)
    if footer:
        console.print(footer, highlight=False)
