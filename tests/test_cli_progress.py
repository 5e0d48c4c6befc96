"""Transfers a person waits on show a bar on a terminal's stderr, and nothing in a pipe."""

from __future__ import annotations

import io

from rich.console import Console

from atelier.cli.progress import transfer_bar
from atelier.storage import Storage
from test_storage import FILES, make_tree


def test_no_terminal_no_bar_and_no_callbacks():
    with transfer_bar("uploading", Console(file=io.StringIO(), force_terminal=False)) as hook:
        assert hook is None


def test_a_commit_draws_a_bar_that_ends_full(settings, tmp_path):
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=100)
    with transfer_bar("uploading tiny", console) as hook:
        Storage(settings).commit(make_tree(tmp_path / "src", FILES), Storage(settings).uri("m"),
                                 progress=hook)
    drawn = screen.getvalue()
    total = sum(len(d) for d in FILES.values())
    assert "uploading tiny" in drawn
    assert f"{total / 1000:.1f}/{total / 1000:.1f} kB" in drawn
