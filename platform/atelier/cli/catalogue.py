"""`atelier catalogue`: draw a synthetic shop, and build a concepts file from a catalogue."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="Turn a product catalogue into DreamBooth concepts (one rare identifier per style).",
    no_args_is_help=True,
)
out = Console()


@app.command()
def synth(
    out_dir: Path = typer.Argument(..., metavar="OUT", help="Folder to draw the shop into."),
    seed: int = typer.Option(0, help="Seed of the drawing; the same seed gives the same files."),
) -> None:
    """Draw a synthetic jewelry shop (4 classes, the study's styles) and its catalogue.csv."""
    from atelier.catalogue.synth import synth_shop

    manifest = synth_shop(out_dir, seed=seed)
    with manifest.open(newline="", encoding="utf-8") as f:
        counts = Counter(row["class"] for row in csv.DictReader(f))
    out.print(f"wrote {manifest}")
    for class_name, count in counts.items():
        out.print(f"  {class_name}: {count} images")


@app.command()
def build(
    source: Path = typer.Argument(
        ...,
        help="A <class>/<style>/<image> folder, or a manifest (.csv, .yaml, .json) of image,title,class[,style].",
    ),
    out_path: Path = typer.Option(Path("concepts.yaml"), "--out", help="Concepts file to write."),
    min_images: int = typer.Option(3, help="Styles with fewer images join their class's catch-all concept."),
    tokenizer: str = typer.Option(
        "tiny", help="Base model whose tokenizer checks identifiers (SD 1.x and tiny share CLIP's)."
    ),
) -> None:
    """Group the catalogue into concepts, give each a rare identifier, write the concepts file."""
    from atelier.catalogue.build import build_concepts
    from atelier.models.tokenizer import build_clip_tokenizer

    concepts_file, report = build_concepts(
        source, out_path, build_clip_tokenizer(), tokenizer_name=tokenizer, min_images=min_images
    )
    table = Table(title=f"{len(concepts_file.concepts)} concepts from {report.images} images")
    table.add_column("name")
    table.add_column("identifier")
    table.add_column("images", justify="right")
    table.add_column("instance prompt")
    for concept in concepts_file.concepts:
        table.add_row(concept.name, concept.identifier, str(len(concept.images)), concept.instance_prompt)
    out.print(table)
    for line in report.lines():
        out.print(f"  {line}", highlight=False)
    out.print(f"wrote {out_path}")
