"""`atelier eval`: measure registered models (CLIP-I, CLIP-T, DINO, FID, KID, IS and the probes)
against their concepts' photos, beside their base model, as a Ray job."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from atelier.settings import get_settings

console = Console()


def metrics_table(evaluation) -> Table:
    """One row per concept and metric: base, model, and the encoder (or why there is no value)."""
    table = Table("concept", "metric", "base", "fine-tuned", "encoder / note")
    for concept in evaluation.concepts:
        base = {m.metric: m for m in concept.base_metrics}
        for m in concept.metrics:
            b = base.get(m.metric)
            table.add_row(concept.concept, m.metric, _value(b), _value(m),
                          m.unavailable if m.value is None else (m.encoder or ""))
    return table


def _value(m) -> str:
    if m is None or m.value is None:
        return "-"
    return f"{m.value:.4g}" + (f" ± {m.spread:.2g}" if m.spread is not None else "")


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def evaluate(
        models: list[str] = typer.Argument(..., help='Registered models: "name" or "name:version".'),
        images: int = typer.Option(8, help="Images per prompt."),
        steps: int = typer.Option(25, help="Denoising steps."),
        guidance_scale: float = typer.Option(7.5, "--guidance-scale", help="Classifier-free guidance."),
        clip_encoder: str | None = typer.Option(
            "shop-clip", help="CLIP folder/s3:// prefix/cached hub id; 'shop-clip' is the shop base's."),
        dino_encoder: str | None = typer.Option(None, help="DINO ViT folder/s3:// prefix/cached hub id."),
        compare_base: bool = typer.Option(True, "--compare-base/--no-compare-base",
                                          help="Also measure the base model on the same prompts and seeds."),
        html: Path | None = typer.Option(None, "--html", help="Also write a static gallery to this folder."),
    ) -> None:
        """Evaluate models: the metrics go beside each model's card (`atelier models show`)."""
        from atelier.quality.jobs import run_eval, write_html
        from atelier.quality.results import EvalConfig, EvalSpec
        from atelier.training import events

        settings = get_settings()
        config = EvalConfig(images=images, steps=steps, guidance_scale=guidance_scale,
                            clip_encoder=clip_encoder or None, dino_encoder=dino_encoder or None,
                            compare_base=compare_base)

        def show(event) -> None:
            if isinstance(event, events.Evaluated):
                console.print(f"  {event.model}: {event.concept} evaluated ({event.done}/{event.total})")

        done = []
        for model in models:
            console.print(f"evaluating {model} ({images} images per prompt)")
            evaluation = run_eval(settings, EvalSpec(model=model, config=config), on_event=show)
            console.print(metrics_table(evaluation))
            done.append(evaluation.model)
        if html:
            page = write_html(settings, done, html)
            console.print(f"gallery: {page}")
