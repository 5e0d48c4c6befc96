"""`atelier schema`: write the JSON Schemas of the user-facing models."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def schema(out: Path = typer.Option(Path("schemas"), "--out", "-o", help="Folder to write into.")) -> None:
        """Write JSON Schemas (concepts file, manifest, sample request, settings)."""
        from atelier import schemas

        for path in schemas.write(out):
            typer.echo(str(path))
