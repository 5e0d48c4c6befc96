"""The storage seam: every read and write of `s3://` or local paths goes through here.

Directories (checkpoints, models, datasets) are committed atomically: every file is uploaded and
its size checked first, then `manifest.json` (sizes, sha256, metadata) is written last. Readers
trust only a manifest and verify every hash, so a partial upload is never visible as a model.

Creating an object only if it is absent (`create`: the manifest of a commit that must not
overwrite, a registry version's claim) is an S3 conditional write, `If-None-Match: *`, which
pyarrow cannot send: those writes go through boto3. The server must honour the header (AWS S3
since 2024-08, MinIO, SeaweedFS 4.x; checked against SeaweedFS 4.48).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlparse

import pyarrow.fs as pafs
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from atelier.errors import (
    AtelierError,
    IntegrityError,
    InvalidInput,
    NotFound,
    StorageUnavailable,
    first_line,
)
from atelier.files import move_into_place, write_atomic, write_new
from atelier.s3 import boto3_client, read_credentials_file, set_checksum_env
from atelier.settings import Settings, get_settings
from atelier.waiting import wait_until

T = TypeVar("T")

MANIFEST = "manifest.json"
CHUNK = 8 * 1024 * 1024
CONFLICT_ATTEMPTS = 5

Progress = Callable[[str, int, int], None]  # (file, bytes done, bytes total)


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(description="Path relative to the committed prefix, '/'-separated.")
    size: int = Field(ge=0, description="Size in bytes.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="Hex SHA-256 of the bytes.")


class Manifest(BaseModel):
    """What a committed prefix holds. Written last; its presence is the commit."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["atelier-manifest/1"] = Field(
        "atelier-manifest/1", description="Manifest format version."
    )
    created_at: str = Field(description="UTC time of the commit, ISO 8601.")
    files: list[FileEntry] = Field(description="Every file of the prefix except the manifest.")
    metadata: dict[str, Any] = Field(default_factory=dict, description="What the files are.")

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_bytes(self) -> bytes:
        return (self.model_dump_json(indent=2) + "\n").encode()

    @property
    def digest(self) -> str:
        """Content address of the whole commit (hash of the manifest's bytes)."""
        return hashlib.sha256(self.to_bytes()).hexdigest()


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("s3://")


def join(uri: str, *parts: str) -> str:
    return "/".join([str(uri).rstrip("/"), *(p.strip("/") for p in parts)])


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _classifiable(text: str, uri: str) -> str:
    """The error's own words, without the object's name.

    Names are the user's data: a bucket `t-4039db...` or a key `forbidden/...` must not read
    as an HTTP 403, nor a key `connection/...` as a network fault. pyarrow quotes the path with
    or without the scheme, so both go, and so does any other path-like token.
    """
    for name in (uri, uri.removeprefix("s3://")):
        if name:
            text = text.replace(name, " ")
    return re.sub(r"\S*/\S*", " ", text).lower()


UNREACHABLE = "cannot reach the S3 endpoint"
# How pyarrow's and boto3's S3 clients say that the endpoint did not answer at all.
_UNREACHABLE = re.compile(r"aws error network_connection|curlcode: (6|7|28)\b|could not connect to the "
                          r"endpoint url", re.IGNORECASE)


def _translate(err: OSError, uri: str) -> AtelierError:
    text = str(err)
    lower = _classifiable(text, str(uri))
    squashed = lower.replace("_", "").replace(" ", "")
    if any(k in squashed for k in ("accessdenied", "invalidaccesskeyid", "signaturedoesnotmatch",
                                   "forbidden")) or re.search(r"\b403\b", lower):
        return StorageUnavailable("the S3 endpoint refused the credentials", where=uri,
                                  hint=text.splitlines()[0][:200])
    if any(k in lower for k in ("connection", "network", "timed out", "curl", "resolve")):
        return StorageUnavailable(UNREACHABLE, where=uri,
                                  hint="is it running? for the embedded stack: `atelier up`")
    if "nosuchbucket" in lower or "bucket does not exist" in lower:
        return NotFound("bucket does not exist", where=uri)
    if isinstance(err, FileNotFoundError) or "not found" in lower or "nosuchkey" in lower:
        return NotFound("no such object", where=uri)
    return StorageUnavailable(text.splitlines()[0][:300] if text else type(err).__name__, where=uri)


def unreachable(error: BaseException) -> str | None:
    """The line that says `error`, or an error behind it, is the S3 endpoint not answering (not
    refused credentials, a missing object or a bug): what waiting out an outage can mend; None
    otherwise. Ray carries a run's causes as controller_failure and worker_failures."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, StorageUnavailable) and e.message == UNREACHABLE:
            return str(e)
        for line in str(e).splitlines():
            if _UNREACHABLE.search(line):
                return line.strip()[:300]
        todo += [e.__cause__, e.__context__, getattr(e, "controller_failure", None),
                 *(getattr(e, "worker_failures", None) or {}).values()]
    return None



class Outages:
    """Waits out S3 outages for work that must survive one (a training job's run and its
    model's publication): `call` runs a step again, once S3 answers, when it failed because S3
    did not answer (`unreachable`); any other failure, or more than `limit` outages, is raised
    as it is. `on_wait(error, waited_s, n)` hears of each outage waited out."""

    def __init__(self, storage: Storage, *, wait_s: float = 600.0, limit: int = 3,
                 on_wait: Callable[[str, float, int], None] | None = None):
        self.storage, self.wait_s, self.limit, self.on_wait = storage, wait_s, limit, on_wait
        self.count = 0

    def call(self, step: Callable[[], T]) -> T:
        while True:
            try:
                return step()
            except Exception as e:
                error = unreachable(e)
                if error is None or self.count >= self.limit:
                    raise
            self.wait(error)

    def wait(self, error: str) -> None:
        """Until S3 answers again (a ServiceError after `wait_s`)."""
        def answers() -> bool:
            self.storage.check()
            return True

        self.count += 1
        started = time.monotonic()
        wait_until(answers, timeout_s=self.wait_s, interval_s=2.0, what="S3 to answer again",
                   retry_on=(AtelierError,))
        if self.on_wait:
            self.on_wait(error, round(time.monotonic() - started, 1), self.count)


class Storage:
    """S3-compatible object storage and local folders behind one interface."""

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or get_settings()
        self._s3: pafs.S3FileSystem | None = None
        self._boto3: Any = None
        self._local = pafs.LocalFileSystem()

    # -- clients -------------------------------------------------------------------------------
    def credentials(self) -> tuple[str, str] | None:
        """Explicit keys, or None to let the AWS default chain (env, IRSA, instance role) decide."""
        s3 = self.settings.s3
        if s3.credentials_file:
            return read_credentials_file(s3.credentials_file, s3.profile)
        if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
            return os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]
        if self.settings.embedded_s3:
            path = self.settings.embedded_credentials_file
            if not path.exists():
                raise StorageUnavailable(
                    "the embedded S3 has no credentials yet", where=str(path),
                    hint="start it with `atelier up`",
                )
            return read_credentials_file(path, "default")
        return None

    def s3_options(self) -> dict[str, Any]:
        """Keyword arguments for `pyarrow.fs.S3FileSystem` (also used by Ray Train's storage)."""
        set_checksum_env()
        endpoint = urlparse(self.settings.s3_endpoint)
        opts: dict[str, Any] = dict(
            region=self.settings.s3.region,
            endpoint_override=endpoint.netloc,
            scheme=endpoint.scheme or "https",
            force_virtual_addressing=False,
            connect_timeout=5,
            request_timeout=60,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3),
        )
        creds = self.credentials()
        if creds:
            opts["access_key"], opts["secret_key"] = creds
        return opts

    @property
    def s3(self) -> pafs.S3FileSystem:
        if self._s3 is None:
            self._s3 = pafs.S3FileSystem(**self.s3_options())
        return self._s3

    @property
    def boto3(self) -> Any:
        """A boto3 client of the same server, for what pyarrow cannot send (conditional writes)."""
        if self._boto3 is None:
            access_key, secret_key = self.credentials() or (None, None)
            self._boto3 = boto3_client(
                self.settings.s3_endpoint, access_key, secret_key, region=self.settings.s3.region,
                connect_timeout=5, read_timeout=60, retries={"mode": "standard", "max_attempts": 3})
        return self._boto3

    def resolve(self, uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
        """(filesystem, path) for an `s3://bucket/key` URI or a local path."""
        text = str(uri)
        if is_s3(text):
            parsed = urlparse(text)
            if not parsed.netloc:
                raise InvalidInput("an S3 URI needs a bucket: s3://bucket/prefix", where=text)
            return self.s3, f"{parsed.netloc}/{parsed.path.lstrip('/')}".rstrip("/")
        return self._local, str(Path(text).expanduser().resolve())

    def uri(self, *parts: str) -> str:
        """`s3://<configured bucket>/<parts...>`."""
        return join(f"s3://{self.settings.s3.bucket}", *parts)

    def check(self) -> None:
        """Fail fast, with the reason, if the configured bucket cannot be read."""
        uri = f"s3://{self.settings.s3.bucket}"
        fs, path = self.resolve(uri)
        try:
            info = fs.get_file_info(path)
        except OSError as e:
            raise _translate(e, uri) from e
        if info.type == pafs.FileType.NotFound:
            raise NotFound("bucket does not exist", where=uri)

    # -- small objects -------------------------------------------------------------------------
    def read_bytes(self, uri: str) -> bytes:
        fs, path = self.resolve(uri)
        try:
            with fs.open_input_stream(path) as f:
                return f.read()
        except OSError as e:
            raise _translate(e, uri) from e

    def write_bytes(self, uri: str, data: bytes) -> None:
        fs, path = self.resolve(uri)
        try:
            if fs is self._local:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            with fs.open_output_stream(path) as f:
                f.write(data)
        except OSError as e:
            raise _translate(e, uri) from e

    def create(self, uri: str, data: bytes) -> bool:
        """Write `data` at `uri` unless something is there: True if this call created it. Of any
        number of writers racing, in threads, processes or on other machines, exactly one wins."""
        if not is_s3(uri):
            _, path = self.resolve(uri)
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            return write_new(path, data)
        from botocore.exceptions import BotoCoreError, ClientError

        parsed = urlparse(uri)
        bucket, key = parsed.netloc, parsed.path.lstrip("/")
        for _ in range(CONFLICT_ATTEMPTS):
            try:
                self.boto3.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
                return True
            except ClientError as e:
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if status == 412:  # PreconditionFailed: another writer's object is there
                    return False
                if status == 409:  # ConditionalRequestConflict: a racing write is in flight
                    continue
                code = e.response.get("Error", {}).get("Code", "")
                if code == "NoSuchBucket":
                    raise NotFound("bucket does not exist", where=uri) from e
                raise StorageUnavailable(f"{code or status}: {first_line(e)}", where=uri) from e
            except BotoCoreError as e:
                raise StorageUnavailable(first_line(e), where=uri) from e
        # Still conflicting: whichever write lands, it is not known to be ours.
        return False

    def exists(self, uri: str) -> bool:
        fs, path = self.resolve(uri)
        try:
            return fs.get_file_info(path).type != pafs.FileType.NotFound
        except OSError as e:
            raise _translate(e, uri) from e

    def list_dir(self, uri: str) -> list[str]:
        """Names directly under a prefix (empty if it does not exist)."""
        fs, path = self.resolve(uri)
        try:
            infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        except OSError as e:
            raise _translate(e, uri) from e
        return sorted(i.base_name for i in infos)

    def delete(self, uri: str) -> None:
        """Remove a committed prefix: the manifest first, so it stops being visible at once."""
        fs, path = self.resolve(uri)
        try:
            if fs.get_file_info(f"{path}/{MANIFEST}").type == pafs.FileType.File:
                fs.delete_file(f"{path}/{MANIFEST}")
            if fs.get_file_info(path).type == pafs.FileType.Directory:
                fs.delete_dir(path)
        except OSError as e:
            raise _translate(e, uri) from e

    # -- atomic commits ------------------------------------------------------------------------
    def commit(
        self,
        local_dir: str | os.PathLike,
        dest: str,
        metadata: dict[str, Any] | None = None,
        *,
        overwrite: bool = False,
        progress: Progress | None = None,
    ) -> Manifest:
        """Upload every file under `local_dir` to `dest`, verify, then write the manifest."""
        src = Path(local_dir)
        if not src.is_dir():
            raise NotFound("not a folder", where=str(src))
        files = sorted(p for p in src.rglob("*") if p.is_file() and p.name != MANIFEST)
        if not files:
            raise InvalidInput("nothing to commit: the folder is empty", where=str(src))
        fs, root = self.resolve(dest)
        if not overwrite and self.has_manifest(dest):
            raise InvalidInput("already committed; refusing to overwrite", where=dest)
        entries: list[FileEntry] = []
        tally = _Tally(progress, sum(p.stat().st_size for p in files))
        try:
            if fs is self._local:
                Path(root).mkdir(parents=True, exist_ok=True)
            for p in files:
                rel = p.relative_to(src).as_posix()
                if fs is self._local:
                    Path(root, rel).parent.mkdir(parents=True, exist_ok=True)
                with open(p, "rb") as f, fs.open_output_stream(f"{root}/{rel}") as out:
                    size, sha256 = tally.copy(rel, f, out)
                entries.append(FileEntry(path=rel, size=size, sha256=sha256))
            # Some S3 servers report success for writes that did not land: check every object
            # before the manifest makes the commit visible.
            infos = fs.get_file_info([f"{root}/{e.path}" for e in entries])
            for entry, info in zip(entries, infos, strict=True):
                if info.type != pafs.FileType.File or info.size != entry.size:
                    raise IntegrityError(
                        f"uploaded object has size {info.size}, expected {entry.size}",
                        where=join(dest, entry.path),
                    )
            manifest = Manifest(
                created_at=datetime.now(UTC).isoformat(timespec="seconds"),
                files=entries,
                metadata=metadata or {},
            )
            if overwrite:
                with fs.open_output_stream(f"{root}/{MANIFEST}") as out:
                    out.write(manifest.to_bytes())
            elif not self.create(join(dest, MANIFEST), manifest.to_bytes()):
                # The check above passed, so another committer won the race meanwhile.
                raise InvalidInput("committed by another writer meanwhile; refusing to overwrite",
                                   where=dest)
        except OSError as e:
            raise _translate(e, dest) from e
        return manifest

    def has_manifest(self, uri: str) -> bool:
        return self.exists(join(uri, MANIFEST))

    def read_manifest(self, uri: str) -> Manifest:
        where = join(uri, MANIFEST)
        try:
            raw = self.read_bytes(where)
        except NotFound as e:
            raise NotFound("no manifest: not a committed model or checkpoint", where=str(uri)) from e
        try:
            return Manifest.model_validate_json(raw)
        except ValidationError as e:
            raise IntegrityError(f"manifest is not valid: {e.errors()[0]['msg']}", where=where) from e

    def fetch(
        self,
        uri: str,
        local_dir: str | os.PathLike,
        *,
        progress: Progress | None = None,
    ) -> Manifest:
        """Download a committed prefix into `local_dir`, verifying every size and sha256.

        Files land in a temporary sibling folder that is renamed into place only when all of them
        verified, so `local_dir` is either complete or absent.
        """
        manifest = self.read_manifest(uri)
        fs, root = self.resolve(uri)
        final = Path(local_dir)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        try:
            tally = _Tally(progress, manifest.total_bytes)
            for entry in manifest.files:
                target = tmp / entry.path
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    with fs.open_input_stream(f"{root}/{entry.path}") as f, open(target, "wb") as out:
                        size, sha256 = tally.copy(entry.path, f, out)
                except OSError as e:
                    err = _translate(e, join(uri, entry.path))
                    if isinstance(err, NotFound):
                        raise IntegrityError("file listed in the manifest is missing",
                                             where=join(uri, entry.path)) from e
                    raise err from e
                if size != entry.size or sha256 != entry.sha256:
                    raise IntegrityError(
                        f"content does not match the manifest (size {size} vs {entry.size}, "
                        f"sha256 {sha256[:12]} vs {entry.sha256[:12]})",
                        where=join(uri, entry.path),
                    )
            (tmp / MANIFEST).write_bytes(manifest.to_bytes())
            move_into_place(tmp, final, keep=lambda there: _holds(there, manifest))
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return manifest

    def fetch_cached(self, uri: str, *, progress: Progress | None = None) -> Path:
        """A verified local copy of a committed prefix, downloaded once per manifest content."""
        manifest = self.read_manifest(uri)
        target = self.settings.cache_dir / "objects" / manifest.digest
        if (target / MANIFEST).exists():
            return target
        self.fetch(uri, target, progress=progress)
        return target

    def walk_manifests(self, uri: str) -> Iterator[str]:
        """Prefixes under `uri` (any depth) that hold a committed manifest."""
        fs, root = self.resolve(uri)
        try:
            infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
        except OSError as e:
            raise _translate(e, uri) from e
        for info in infos:
            if info.base_name == MANIFEST and info.type == pafs.FileType.File:
                rel = info.path[len(root):].strip("/")
                yield join(uri, rel.rsplit("/", 1)[0]) if "/" in rel else uri


class _Tally:
    """Bytes moved so far of one transfer, reported to its Progress hook after every chunk."""

    def __init__(self, progress: Progress | None, total: int):
        self.progress = progress
        self.total = total
        self.done = 0

    def copy(self, name: str, src, out) -> tuple[int, str]:
        """Copy stream `src` to `out`; return the size and sha256 of what passed."""
        h = hashlib.sha256()
        size = 0
        while chunk := src.read(CHUNK):
            h.update(chunk)
            out.write(chunk)
            size += len(chunk)
            self.done += len(chunk)
            if self.progress:
                self.progress(name, self.done, self.total)
        return size, h.hexdigest()


def _holds(folder: Path, manifest: Manifest) -> bool:
    try:
        return verify_local(folder).files == manifest.files
    except IntegrityError:
        return False


def write_local_manifest(folder: str | os.PathLike, metadata: dict[str, Any] | None = None) -> Manifest:
    """Hash a local folder into its manifest.json, for folders that another uploader copies
    (Ray Train checkpoints): the manifest travels with the files and readers verify them."""
    root = Path(folder)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = Manifest(
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        files=[FileEntry(path=p.relative_to(root).as_posix(), size=p.stat().st_size,
                         sha256=sha256_file(p)) for p in files],
        metadata=metadata or {},
    )
    write_atomic(root / MANIFEST, manifest.to_bytes())
    return manifest


def verify_local(folder: str | os.PathLike) -> Manifest:
    """Check a local folder against its manifest.json; raise IntegrityError on any mismatch."""
    root = Path(folder)
    try:
        manifest = Manifest.model_validate_json((root / MANIFEST).read_bytes())
    except FileNotFoundError as e:
        raise IntegrityError("no manifest.json: incomplete copy", where=str(root)) from e
    except ValidationError as e:
        raise IntegrityError("manifest.json is not valid", where=str(root)) from e
    for entry in manifest.files:
        path = root / entry.path
        if not path.is_file() or path.stat().st_size != entry.size or sha256_file(path) != entry.sha256:
            raise IntegrityError("file does not match the manifest", where=str(path))
    return manifest
