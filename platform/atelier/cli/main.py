"""Entry point of the `atelier` command. Sub-command groups live in sibling modules."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from atelier import __version__
from atelier.errors import AtelierError

try:  # typer >= 0.26 carries its own copy of click and raises that copy's exceptions
    from typer._click import exceptions as click_errors
except ImportError:  # an older typer raises click's own
    from click import exceptions as click_errors  # type: ignore[no-redef]

app = typer.Typer(
    name="atelier",
    help="DreamBooth fine-tuning and Stable Diffusion serving on Ray, with models in S3.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err = Console(stderr=True)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"atelier {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    pass


def _register() -> None:
    # Imported here so that `atelier --help` stays fast and each group owns its module.
    if app.registered_groups:  # main() runs many times in one test process
        return
    from atelier.cli import catalogue, demo, models, schema, stack, sweep, train

    stack.register(app)
    app.add_typer(catalogue.app, name="catalogue")
    app.add_typer(models.app, name="models")
    app.add_typer(train.app, name="train")
    app.add_typer(sweep.app, name="sweep")
    demo.register(app)
    schema.register(app)
    from atelier.cli import bench, evaluate, serve

    serve.register(app)
    bench.register(app)
    evaluate.register(app)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; an AtelierError or a usage mistake becomes a line on stderr and an exit code.

    Exit codes: 0 ok (also --help, --version), 2 a usage mistake (unknown command or option, missing
    or invalid argument, a group without its command), 130 aborted, others from atelier.errors.
    """
    _register()
    try:
        # Not standalone, so that our errors reach the handlers below; --help and --version raise
        # typer.Exit(0), which app() returns as 0.
        result = app(args=argv, prog_name="atelier", standalone_mode=False)
    except AtelierError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        return e.exit_code
    except click_errors.UsageError as e:
        # A group run without its command has already printed its help (typer skips it as well).
        if type(e).__name__ != "NoArgsIsHelpError":
            _print_usage_error(e)
        return e.exit_code
    except click_errors.ClickException as e:  # e.g. a file argument that cannot be opened
        err.print(f"atelier: {e.format_message()}", markup=False, highlight=False, soft_wrap=True)
        return e.exit_code
    except typer.Abort:
        err.print("aborted")
        return 130
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    return result if isinstance(result, int) else 0


def _print_usage_error(e: click_errors.UsageError) -> None:
    """Two lines: what is wrong with which command (and click's suggestion), and where help is.

    Not click's own output: that repeats the usage line and frames the message in a box."""
    path = e.ctx.command_path if e.ctx is not None else "atelier"
    err.print(f"{path}: {e.format_message()}", markup=False, highlight=False, soft_wrap=True)
    if e.ctx is not None and e.ctx.command.get_help_option(e.ctx) is not None:
        err.print(f"Try '{path} {e.ctx.help_option_names[0]}'.", markup=False, highlight=False,
                  soft_wrap=True)


if __name__ == "__main__":
    sys.exit(main())
