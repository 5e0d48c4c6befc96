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
    out_path: Path = typer.Option(Path("concepts.yaml"), "--out", "-o", help="Concepts file to write."),
    min_images: int = typer.Option(3, help="Styles with fewer images join their class's catch-all concept."),
    tokenizer: str = typer.Option(
        "tiny", help="Base model whose tokenizer checks identifiers (SD 1.x and tiny share CLIP's)."
    ),
    resolution: int = typer.Option(
        512,
        help="Training resolution: smaller photos are warned about, under a quarter of it refused (64 for tiny).",
    ),
    skip_invalid: bool = typer.Option(
        False, "--skip-invalid", help="Build from the valid photos and list the ones left out, instead of failing."
    ),
    class_phrases: list[str] = typer.Option(
        [],
        "--class-phrase",
        metavar="CLASS=PHRASE",
        help='A class\'s prompt phrase where "a" + singular is wrong, e.g. --class-phrase "bangles=a set of bangles".',
    ),
) -> None:
    """Group the catalogue into concepts, give each a rare identifier, write the concepts file."""
    from atelier.catalogue.build import CatalogueInvalid, build_concepts
    from atelier.errors import InvalidInput
    from atelier.models.tokenizer import build_clip_tokenizer

    phrases = {}
    for value in class_phrases:
        name, sep, phrase = value.partition("=")
        if not sep or not name.strip() or not phrase.strip():
            raise InvalidInput(f"expected CLASS=PHRASE, got {value!r}", where="--class-phrase")
        phrases[name.strip()] = phrase.strip()
    try:
        concepts_file, report = build_concepts(
            source, out_path, build_clip_tokenizer(), tokenizer_name=tokenizer, min_images=min_images,
            resolution=resolution, class_phrases=phrases, skip_invalid=skip_invalid,
        )
    except CatalogueInvalid as e:
        # The table goes to stderr; the main entry point adds the one-line summary and exit code.
        if len(e.problems) > 1:
            Console(stderr=True).print(_problem_table(e.problems, "problems (nothing was written)"))
        raise
    table = Table(title=f"{len(concepts_file.concepts)} concepts from {report.images} images")
    table.add_column("name")
    table.add_column("identifier")
    table.add_column("images", justify="right")
    table.add_column("instance prompt")
    for concept in concepts_file.concepts:
        table.add_row(concept.name, concept.identifier, str(len(concept.images)), concept.instance_prompt)
    out.print(table)
    for line in report.lines(skipped=False):
        out.print(f"  {line}", highlight=False)
    if report.skipped:
        out.print(_problem_table(report.skipped, f"left out under --skip-invalid ({len(report.skipped)})"))
    out.print(f"wrote {out_path}")


def _problem_table(problems, title: str) -> Table:
    table = Table(title=title, title_justify="left", show_lines=False)
    table.add_column("file", overflow="fold")
    table.add_column("problem", overflow="fold")
    table.add_column("what to do", overflow="fold")
    for p in problems:
        table.add_row(p.file, p.problem, p.fix)
    return table
