"""`atelier demo`: the README's main job on the embedded default."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from atelier.settings import get_settings

console = Console()


def register(app: typer.Typer) -> None:
    @app.command()
    def demo(
        out: Path = typer.Option(Path("outputs"), "--out", "-o", help="Folder the generated images go to."),
        seed: int = typer.Option(0, help="Seed of the synthetic shop and the samples."),
    ) -> None:
        """Run the main job on the embedded stack: shop -> fine-tuned models -> metrics -> images."""
        from atelier.demo import run_demo

        result = run_demo(get_settings(), out, seed=seed, say=console.print)
        console.print(f"[bold green]done:[/] {len(result.images)} images in {out}; real photos, "
                      f"the base and the fine-tuned models side by side: {result.gallery}")
