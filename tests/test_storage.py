"""The storage seam against a moto S3 server: atomic commits, verified reads, clear errors."""

from __future__ import annotations

import os

import pytest

from atelier.errors import IntegrityError, InvalidInput, NotFound, StorageUnavailable
from atelier.settings import S3Settings, Settings
from atelier.storage import MANIFEST, Manifest, Storage
from support import bucket_settings


def make_tree(root, files):
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


FILES = {"a.bin": os.urandom(1000), "sub/b.json": b'{"x": 1}', "sub/deeper/c.txt": b"hello"}


def test_commit_then_fetch_round_trips_bytes(settings, tmp_path):
    storage = Storage(settings)
    src = make_tree(tmp_path / "src", FILES)
    uri = storage.uri("models", "m", "1")
    manifest = storage.commit(src, uri, {"kind": "test"})
    assert sorted(f.path for f in manifest.files) == sorted(FILES)
    assert storage.read_manifest(uri) == manifest
    out = tmp_path / "out"
    storage.fetch(uri, out)
    for rel, data in FILES.items():
        assert (out / rel).read_bytes() == data
    assert Manifest.model_validate_json((out / MANIFEST).read_bytes()) == manifest


def test_checksum_env_is_set_where_clients_are_created(settings):
    Storage(settings).s3_options()
    assert os.environ["AWS_REQUEST_CHECKSUM_CALCULATION"] == "WHEN_REQUIRED"
    assert os.environ["AWS_RESPONSE_CHECKSUM_VALIDATION"] == "WHEN_REQUIRED"


def test_prefix_without_manifest_is_not_a_model(settings, tmp_path):
    storage = Storage(settings)
    uri = storage.uri("models", "partial", "1")
    storage.write_bytes(uri + "/unet/weights.safetensors", b"half an upload")
    with pytest.raises(NotFound, match="no manifest"):
        storage.read_manifest(uri)
    with pytest.raises(NotFound):
        storage.fetch(uri, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert list(storage.walk_manifests(storage.uri("models"))) == []


def test_names_that_spell_error_words_are_not_read_as_errors(moto_server, tmp_path):
    """A missing object is NotFound whatever its bucket and key say.

    CI once drew the bucket `t-4039db0432b8`: the "403" in pyarrow's quote of the path read as
    an HTTP 403 and a missing manifest became "the S3 endpoint refused the credentials".
    """
    import boto3

    bucket = "forbidden-403-accessdenied-connection"
    boto3.client(
        "s3", endpoint_url=moto_server, aws_access_key_id="testing",
        aws_secret_access_key="testing", region_name="us-east-1",
    ).create_bucket(Bucket=bucket)
    settings = bucket_settings(moto_server, tmp_path)
    storage = Storage(settings.model_copy(
        update={"s3": settings.s3.model_copy(update={"bucket": bucket})}))
    uri = storage.uri("403", "network-timed-out", "1")
    storage.write_bytes(uri + "/unet/weights.safetensors", b"half an upload")
    with pytest.raises(NotFound, match="no manifest"):
        storage.read_manifest(uri)
    with pytest.raises(NotFound):
        storage.fetch(uri, tmp_path / "out")


def test_tampered_object_fails_verification_and_leaves_nothing(settings, tmp_path):
    storage = Storage(settings)
    uri = storage.uri("models", "m", "2")
    storage.commit(make_tree(tmp_path / "src", FILES), uri)
    storage.write_bytes(uri + "/sub/b.json", b'{"x": 2}')  # same size, other bytes
    with pytest.raises(IntegrityError, match="sub/b.json"):
        storage.fetch(uri, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".out.") for p in tmp_path.iterdir())


def test_missing_object_listed_in_manifest_is_an_integrity_error(settings, tmp_path):
    storage = Storage(settings)
    uri = storage.uri("models", "m", "3")
    storage.commit(make_tree(tmp_path / "src", FILES), uri)
    fs, path = storage.resolve(uri + "/a.bin")
    fs.delete_file(path)
    with pytest.raises(IntegrityError, match="missing"):
        storage.fetch(uri, tmp_path / "out")


def test_commit_refuses_to_overwrite_and_empty_folders(settings, tmp_path):
    storage = Storage(settings)
    uri = storage.uri("models", "m", "4")
    src = make_tree(tmp_path / "src", FILES)
    storage.commit(src, uri)
    with pytest.raises(InvalidInput, match="already committed"):
        storage.commit(src, uri)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInput, match="empty"):
        storage.commit(tmp_path / "empty", storage.uri("models", "m", "5"))


def test_walk_manifests_finds_committed_prefixes(settings, tmp_path):
    storage = Storage(settings)
    src = make_tree(tmp_path / "src", FILES)
    for v in ("1", "2"):
        storage.commit(src, storage.uri("models", "m", v))
    assert sorted(storage.walk_manifests(storage.uri("models"))) == [
        storage.uri("models", "m", "1"), storage.uri("models", "m", "2")
    ]


def test_fetch_cached_downloads_once_per_manifest(settings, tmp_path):
    storage = Storage(settings)
    uri = storage.uri("models", "m", "6")
    storage.commit(make_tree(tmp_path / "src", FILES), uri)
    first = storage.fetch_cached(uri)
    marker = first / "a.bin"
    mtime = marker.stat().st_mtime_ns
    assert storage.fetch_cached(uri) == first
    assert marker.stat().st_mtime_ns == mtime


def test_a_second_fetch_into_a_folder_in_use_leaves_its_files_alone(settings, tmp_path):
    """Two training workers on one machine fetch the same dataset into the same cache folder:
    the later one must not delete what the earlier one is reading. A stale folder is replaced."""
    storage = Storage(settings)
    uri = storage.uri("models", "m", "7")
    storage.commit(make_tree(tmp_path / "src", FILES), uri)
    out = tmp_path / "out"
    storage.fetch(uri, out)
    inode = (out / "a.bin").stat().st_ino
    storage.fetch(uri, out)
    assert (out / "a.bin").stat().st_ino == inode  # the same file, not a replacement
    (out / "sub" / "b.json").write_bytes(b"edited")  # no longer what the manifest says
    storage.fetch(uri, out)
    assert (out / "sub" / "b.json").read_bytes() == FILES["sub/b.json"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no leftovers


def test_local_paths_use_the_same_commit_protocol(settings, tmp_path):
    storage = Storage(settings)
    dest = tmp_path / "registry" / "m"
    storage.commit(make_tree(tmp_path / "src", FILES), str(dest))
    assert (dest / MANIFEST).exists()
    storage.fetch(str(dest), tmp_path / "copy")
    assert (tmp_path / "copy" / "a.bin").read_bytes() == FILES["a.bin"]


def test_unreachable_endpoint_is_a_clear_error(tmp_path):
    from support import write_credentials

    s = Settings(home=tmp_path, s3=S3Settings(
        endpoint="http://127.0.0.1:9", credentials_file=write_credentials(tmp_path / "c", "a", "b")))
    with pytest.raises(StorageUnavailable, match="cannot reach"):
        Storage(s).check()


def test_embedded_without_credentials_says_to_start_the_stack(tmp_path, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    with pytest.raises(StorageUnavailable, match="atelier up"):
        Storage(Settings(home=tmp_path)).s3_options()


def test_bad_uri_is_invalid_input(settings):
    with pytest.raises(InvalidInput, match="bucket"):
        Storage(settings).resolve("s3:///no-bucket")


def test_progress_counts_every_byte_up_and_down(settings, tmp_path, monkeypatch):
    import atelier.storage

    monkeypatch.setattr(atelier.storage, "CHUNK", 256)  # several reports per file
    storage = Storage(settings)
    uri = storage.uri("models", "m", "8")
    total = sum(len(data) for data in FILES.values())
    for transfer in ("up", "down"):
        reports: list[tuple[str, int, int]] = []

        def hook(name: str, done: int, all_: int, reports=reports) -> None:
            reports.append((name, done, all_))

        if transfer == "up":
            storage.commit(make_tree(tmp_path / "src", FILES), uri, progress=hook)
        else:
            storage.fetch(uri, tmp_path / "out", progress=hook)
        done = [d for _, d, _ in reports]
        assert done == sorted(done) and done[-1] == total, transfer
        assert {t for _, _, t in reports} == {total}
        assert {n for n, _, _ in reports} == set(FILES)
        assert len(reports) > len(FILES)


def test_a_local_manifest_is_written_whole(tmp_path, monkeypatch):
    from atelier import files
    from atelier.storage import verify_local, write_local_manifest

    folder = make_tree(tmp_path / "ckpt", FILES)
    write_local_manifest(folder)
    before = (folder / MANIFEST).read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", crash)
    (folder / "a.bin").write_bytes(b"changed")
    with pytest.raises(OSError, match="disk full"):
        write_local_manifest(folder)
    assert (folder / MANIFEST).read_bytes() == before  # the old manifest, not half a new one
    monkeypatch.undo()
    write_local_manifest(folder)
    assert verify_local(folder).files[0].size == len(b"changed")


def test_an_outage_is_told_from_other_failures_through_rays_wrappers():
    from ray.train import ControllerError, WorkerGroupError

    from atelier.errors import StorageUnavailable
    from atelier.storage import UNREACHABLE, unreachable

    curl = OSError("When uploading part for key 'runs/r/checkpoint_manager_snapshot.json' in bucket "
                   "'atelier': AWS Error NETWORK_CONNECTION during UploadPart operation: curlCode: 7, "
                   "Could not connect to server")
    assert "NETWORK_CONNECTION" in unreachable(ControllerError(curl))
    assert "NETWORK_CONNECTION" in unreachable(WorkerGroupError("[Rank 0 Error Snippet]: truncated", {0: curl}))
    assert unreachable(StorageUnavailable(UNREACHABLE, where="s3://atelier")) is not None
    caused = RuntimeError("upload failed")
    caused.__cause__ = curl
    assert unreachable(caused) is not None
    for other in (OSError("AWS Error ACCESS_DENIED during HeadObject operation: Access Denied"),
                  WorkerGroupError("NCCL error: unhandled system error (network)", {0: RuntimeError("nccl")}),
                  ValueError("a bug"), StorageUnavailable("the S3 endpoint refused the credentials")):
        assert unreachable(other) is None, other


def test_outages_runs_a_step_again_once_s3_answers_and_raises_anything_else(settings):
    from atelier.storage import UNREACHABLE, Outages

    failures = [StorageUnavailable(UNREACHABLE, where="s3://b/x")] * 2

    def step() -> str:
        if failures:
            raise failures.pop()
        return "done"

    heard: list[int] = []
    outages = Outages(Storage(settings), wait_s=5, limit=2, on_wait=lambda error, s, n: heard.append(n))
    assert outages.call(step) == "done" and heard == [1, 2]
    # Past its limit an outage is raised; so is any other failure, at once.
    failures[:] = [StorageUnavailable(UNREACHABLE, where="s3://b/x")] * 2
    beyond = Outages(Storage(settings), wait_s=5, limit=1)
    with pytest.raises(StorageUnavailable):
        beyond.call(step)
    assert beyond.count == 1
    failures[:] = [StorageUnavailable("the S3 endpoint refused the credentials")]
    refused = Outages(Storage(settings), wait_s=5)
    with pytest.raises(StorageUnavailable, match="refused"):
        refused.call(step)
    assert refused.count == 0
