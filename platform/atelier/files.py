"""Putting finished files and folders in place atomically: a reader sees the old one or the new
one, never half of one. A leaf module: it depends on nothing else in atelier."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

__all__ = ["move_into_place", "write_atomic", "write_new"]


def write_atomic(path: str | os.PathLike, data: str | bytes, *, mode: int | None = None) -> Path:
    """Write `data` (text is UTF-8) to `path`: to a temporary file in the same folder, flushed to
    disk, then renamed over `path`. `mode` (0o600 for a secret) is the file's exact permission
    from its first byte on; without it the file gets what a plain open() gives (0o666 less the
    umask). The folder must exist."""
    path = Path(path)
    tmp = _write_temporary(path, data, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_new(path: str | os.PathLike, data: str | bytes, *, mode: int | None = None) -> bool:
    """Create `path` holding `data` unless it exists; True if this call created it. When two
    processes race, the first one's file stays (keys generated on first use must not change
    under a reader), and it is never seen half written. The folder must exist."""
    path = Path(path)
    if path.exists():
        return False
    tmp = _write_temporary(path, data, mode)
    try:
        # link, not rename: it refuses to replace what another process put there meanwhile.
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def _write_temporary(path: Path, data: str | bytes, mode: int | None) -> Path:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode)
    try:
        with os.fdopen(fd, "wb") as f:
            if mode is not None:
                os.fchmod(f.fileno(), mode)  # the umask does not narrow an explicit mode
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def move_into_place(tmp: str | os.PathLike, final: str | os.PathLike, *,
                    keep: Callable[[Path], bool]) -> None:
    """Rename the finished folder `tmp` to `final`. If `final` is there already and `keep` says it
    holds the same thing, it stays and `tmp` goes: another process (a second training worker on
    the machine) got there first and may be reading it. Otherwise the old folder is swapped out
    and deleted."""
    tmp, final = Path(tmp), Path(final)
    try:
        os.rename(tmp, final)  # atomic; refused when `final` is a folder with files in it
        return
    except OSError:
        if not final.exists():
            raise
    if keep(final):
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=final.parent))
    os.rename(final, old / "stale")
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
