"""Atomic file and folder writes: a reader sees the old content or the new, never half of one."""

from __future__ import annotations

import os
import stat
import threading

import pytest

from atelier.files import move_into_place, write_atomic, write_new


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_write_atomic_writes_text_and_bytes_and_replaces(tmp_path):
    path = tmp_path / "f.txt"
    write_atomic(path, "first ü\n")
    assert path.read_text(encoding="utf-8") == "first ü\n"
    write_atomic(path, b"\x00second")
    assert path.read_bytes() == b"\x00second"
    assert _leftovers(tmp_path) == []


def test_mode_is_exact_whatever_the_umask_and_default_follows_it(tmp_path):
    old = os.umask(0)
    try:
        write_atomic(tmp_path / "secret", "k", mode=0o600)
        write_new(tmp_path / "new-secret", "k", mode=0o600)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "secret").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "new-secret").stat().st_mode) == 0o600
    old = os.umask(0o077)
    try:
        write_atomic(tmp_path / "shared", "x", mode=0o644)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "shared").stat().st_mode) == 0o644
    old = os.umask(0o027)
    try:
        write_atomic(tmp_path / "plain", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o640


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "f"
    write_atomic(path, "old")
    with pytest.raises(TypeError):
        write_atomic(path, 12345)  # type: ignore[arg-type]
    assert path.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_a_reader_never_sees_a_partial_file(tmp_path):
    path = tmp_path / "big"
    versions = [bytes([i]) * (4 << 20) for i in range(1, 9)]
    write_atomic(path, versions[0])
    seen: set[tuple[int, int]] = set()
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            data = path.read_bytes()
            seen.add((len(data), data[0] if data else -1))
            if data and data.count(data[0]) != len(data):
                seen.add((-1, -1))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for _ in range(3):
            for data in versions:
                write_atomic(path, data)
    finally:
        done.set()
        reader.join()
    assert seen <= {(4 << 20, i) for i in range(1, 9)}, sorted(seen)[:5]


def test_write_new_keeps_the_first_file_and_says_who_wrote_it(tmp_path):
    path = tmp_path / "keys"
    assert write_new(path, "first") is True
    assert write_new(path, "second") is False
    assert path.read_text() == "first"


def test_write_new_racing_writers_agree_on_one_winner(tmp_path):
    path = tmp_path / "keys"
    results: dict[int, bool] = {}
    start = threading.Barrier(8)

    def writer(i: int) -> None:
        start.wait()
        results[i] = write_new(path, f"writer {i}\n" * 1000)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, won in results.items() if won]
    assert len(winners) == 1
    assert path.read_text() == f"writer {winners[0]}\n" * 1000
    assert _leftovers(tmp_path) == []


def _folder(path, text):
    path.mkdir()
    (path / "a.txt").write_text(text)
    return path


def test_move_into_place_renames_a_folder_into_an_empty_place(tmp_path):
    move_into_place(_folder(tmp_path / ".tmp", "new"), tmp_path / "final", keep=lambda p: True)
    assert (tmp_path / "final" / "a.txt").read_text() == "new"
    assert not (tmp_path / ".tmp").exists()


def test_move_into_place_keeps_an_equal_folder_and_replaces_another(tmp_path):
    final = _folder(tmp_path / "final", "old")
    move_into_place(_folder(tmp_path / ".tmp1", "new"), final, keep=lambda p: True)
    assert (final / "a.txt").read_text() == "old"
    move_into_place(_folder(tmp_path / ".tmp2", "new"), final, keep=lambda p: False)
    assert (final / "a.txt").read_text() == "new"
    assert _leftovers(tmp_path) == []
