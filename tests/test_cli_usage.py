"""Usage mistakes on every command end in exit code 2 and two short lines on stderr, never a traceback;
`--out` has `-o` and `--follow` has `-f` everywhere, and each short flag means what its long form does.

Commands are read from the CLI's own command tree, so a new command is covered without editing this
file. Mistakes go through `main()`, the path `atelier` itself takes.
"""

from __future__ import annotations

import pytest
import typer

from atelier import __version__
from atelier.cli.main import _register, app, main

# The short flag each long option should have wherever it appears.
SHORT_FLAGS = {"--out": "-o", "--follow": "-f"}


def _tree():
    """(path, click command) for the root, every group and every command, depth first."""
    _register()
    found = []

    def walk(path, command):
        found.append((path, command))
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            walk((*path, name), sub)

    walk((), typer.main.get_command(app))
    return found


TREE = _tree()
GROUPS = [(path, cmd) for path, cmd in TREE if hasattr(cmd, "commands")]
COMMANDS = [(path, cmd) for path, cmd in TREE if not hasattr(cmd, "commands")]


def _id(item):
    return " ".join(item[0]) or "atelier"


def _options(command):
    return [p for p in command.params if p.param_type_name == "option"]


def _run(capsys, *argv):
    capsys.readouterr()
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _assert_usage_error(code, out, err, path=()):
    """Exit code 2 and at most two lines on stderr, the first naming the command when it is known
    (click's parser does not say which command an option without its value belongs to)."""
    assert code == 2, err
    assert "Traceback" not in err and out == ""
    lines = err.strip().splitlines()
    assert 1 <= len(lines) <= 2, err
    assert lines[0].startswith(" ".join(("atelier", *path)) + ": "), err
    return lines[0]


def test_the_tree_has_the_groups_and_commands_users_know():
    # A guard on _tree(): an empty walk would make every test below pass vacuously.
    names = {" ".join(path) for path, _ in TREE}
    assert {"train", "train submit", "catalogue build", "serve up", "generate", "up"} <= names


@pytest.mark.parametrize("group", GROUPS, ids=_id)
def test_an_unknown_command_is_one_line_and_exit_2(group, capsys):
    path, _ = group
    first = _assert_usage_error(*_run(capsys, *path, "no-such-command"), path)
    assert "No such command 'no-such-command'" in first


@pytest.mark.parametrize("group", GROUPS, ids=_id)
def test_a_mistyped_command_gets_a_suggestion(group, capsys):
    path, command = group
    name = sorted(command.commands)[0]
    first = _assert_usage_error(*_run(capsys, *path, name + name[-1]), path)
    assert f"'{name}'" in first.partition("Did you mean")[2], first


@pytest.mark.parametrize("group", GROUPS, ids=_id)
def test_a_group_without_its_command_prints_its_help_and_exits_2(group, capsys):
    path, _ = group
    code, out, err = _run(capsys, *path)
    assert code == 2 and "Usage:" in out and "Traceback" not in out + err


@pytest.mark.parametrize("command", COMMANDS, ids=_id)
def test_an_unknown_option_is_one_line_and_exit_2(command, capsys):
    path, _ = command
    first = _assert_usage_error(*_run(capsys, *path, "--no-such-option"), path)
    assert "No such option: --no-such-option" in first


@pytest.mark.parametrize("command", COMMANDS, ids=_id)
def test_a_mistyped_option_gets_a_suggestion(command, capsys):
    path, cmd = command
    longs = [o for p in _options(cmd) for o in p.opts if o.startswith("--")] or ["--help"]
    option = longs[0]
    first = _assert_usage_error(*_run(capsys, *path, option + option[-1]), path)
    assert option in first.partition("Possible options:")[2], first


REQUIRED = [(path, cmd) for path, cmd in COMMANDS if any(p.required for p in cmd.params)]


@pytest.mark.parametrize("command", REQUIRED, ids=_id)
def test_a_missing_argument_is_one_line_and_exit_2(command, capsys):
    path, cmd = command
    first = _assert_usage_error(*_run(capsys, *path), path)
    missing = next(p for p in cmd.params if p.required)
    assert f"Missing {missing.param_type_name}" in first


VALUED = [(path, cmd, p.opts[0]) for path, cmd in COMMANDS for p in _options(cmd) if not p.is_flag]


@pytest.mark.parametrize("case", VALUED, ids=lambda c: f"{' '.join(c[0])} {c[2]}")
def test_an_option_without_its_value_is_one_line_and_exit_2(case, capsys):
    path, _, option = case
    first = _assert_usage_error(*_run(capsys, *path, option))
    assert f"Option '{option}' requires an argument" in first


def test_an_invalid_value_is_one_line_and_exit_2(capsys, tmp_path):
    first = _assert_usage_error(*_run(capsys, "catalogue", "synth", str(tmp_path), "--seed", "x"),
                                ("catalogue", "synth"))
    assert "Invalid value for '--seed'" in first
    assert not any(tmp_path.iterdir()), "nothing runs after a usage mistake"


def test_help_and_version_exit_0(capsys):
    code, out, err = _run(capsys, "--help")
    assert code == 0 and "Usage: atelier" in out and err == ""
    assert _run(capsys, "--version") == (0, f"atelier {__version__}\n", "")
    assert _run(capsys, "train", "submit", "--help")[0] == 0


# -- short flags ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", COMMANDS, ids=_id)
def test_long_options_have_their_usual_short_flag_and_no_flag_is_taken_twice(command):
    _, cmd = command
    flags = [o for p in cmd.params for o in (*p.opts, *p.secondary_opts)] + ["--help"]
    assert len(flags) == len(set(flags)), f"a flag is declared twice: {sorted(flags)}"
    for param in _options(cmd):
        for long, short in SHORT_FLAGS.items():
            if long in param.opts:
                assert short in param.opts, f"{long} without {short}"


def _parse(cmd, args, tested):
    """The values a command would be called with, without running it."""
    required = []
    for p in cmd.params:
        if p.required and p is not tested:
            required += ["some-arg"] if p.param_type_name == "argument" else [p.opts[0], "some-value"]
    with cmd.make_context(cmd.name, [*args, *required]) as ctx:
        return ctx.params


SHORT = [(path, cmd, p) for path, cmd in COMMANDS for p in _options(cmd)
         if any(len(o) == 2 for o in p.opts) and any(o.startswith("--") for o in p.opts)]


@pytest.mark.parametrize("case", SHORT, ids=lambda c: f"{' '.join(c[0])} {c[2].opts[0]}")
def test_a_short_flag_means_what_its_long_form_means(case):
    _, cmd, param = case
    long = next(o for o in param.opts if o.startswith("--"))
    short = next(o for o in param.opts if len(o) == 2)
    value = [] if param.is_flag else ["5"]  # "5" parses as a path, a name and a count alike
    by_short = _parse(cmd, [short, *value], param)
    assert by_short == _parse(cmd, [long, *value], param)
    assert by_short[param.name] not in (param.default, None)


def test_a_real_run_writes_where_o_says(tmp_path, capsys):
    # `-o` through main(), the path users take: `atelier schema -o DIR` writes the schemas into DIR.
    code, out, err = _run(capsys, "schema", "-o", str(tmp_path / "schemas"))
    assert code == 0, err
    assert any((tmp_path / "schemas").glob("*.json"))
