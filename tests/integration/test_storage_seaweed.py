"""The storage seam against a real SeaweedFS server with enforced credentials."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from atelier.errors import NotFound, StorageUnavailable
from atelier.settings import S3Settings, Settings
from atelier.storage import Storage

pytestmark = pytest.mark.integration


def settings_for(seaweed, tmp_path, access=None, secret=None) -> Settings:
    creds = tmp_path / f"creds-{access or 'ok'}"
    creds.write_text(
        "[default]\n"
        f"aws_access_key_id = {access or seaweed.access_key}\n"
        f"aws_secret_access_key = {secret or seaweed.secret_key}\n"
    )
    return Settings(
        home=tmp_path / "home",
        s3=S3Settings(endpoint=seaweed.endpoint, bucket=seaweed.bucket, credentials_file=creds),
    )


def test_wrong_credentials_are_refused(seaweed, tmp_path):
    good = Storage(settings_for(seaweed, tmp_path))
    good.write_bytes(good.uri("probe.txt"), b"x")
    bad = Storage(settings_for(seaweed, tmp_path, secret="wrong-secret"))
    with pytest.raises(StorageUnavailable, match="refused the credentials"):
        bad.read_bytes(bad.uri("probe.txt"))
    unknown = Storage(settings_for(seaweed, tmp_path, access="nobody", secret="nothing"))
    with pytest.raises(StorageUnavailable, match="refused the credentials"):
        unknown.write_bytes(unknown.uri("intruder.txt"), b"x")


def test_200_mb_multipart_round_trip_keeps_sha256(seaweed, tmp_path):
    storage = Storage(settings_for(seaweed, tmp_path))
    src = tmp_path / "big"
    src.mkdir()
    h = hashlib.sha256()
    with open(src / "weights.bin", "wb") as f:
        for _ in range(25):  # 25 x 8 MiB = 200 MiB, well past the multipart threshold
            chunk = os.urandom(8 * 1024 * 1024)
            h.update(chunk)
            f.write(chunk)
    uri = storage.uri("big", "1")
    manifest = storage.commit(src, uri)
    assert manifest.files[0].size == 200 * 1024 * 1024
    assert manifest.files[0].sha256 == h.hexdigest()
    (src / "weights.bin").unlink()
    out = tmp_path / "out"
    storage.fetch(uri, out)
    got = hashlib.sha256()
    with open(out / "weights.bin", "rb") as f:
        while chunk := f.read(8 * 1024 * 1024):
            got.update(chunk)
    assert got.hexdigest() == h.hexdigest()
    storage.delete(uri)
    assert not storage.has_manifest(uri)


def test_a_killed_upload_is_never_visible_as_a_model(seaweed, tmp_path):
    settings = settings_for(seaweed, tmp_path)
    storage = Storage(settings)
    src = tmp_path / "model"
    (src / "unet").mkdir(parents=True)
    (src / "model_index.json").write_text("{}")
    (src / "unet" / "weights.bin").write_bytes(os.urandom(64 * 1024 * 1024))
    uri = storage.uri("models", "killed", "1")
    child = textwrap.dedent(f"""
        import sys, time
        from atelier.settings import Settings
        from atelier.storage import Storage
        settings = Settings.model_validate_json({settings.model_dump_json()!r})
        def progress(path, done, total):
            if path.startswith("unet/"):
                print("uploading", flush=True)
                time.sleep(30)  # killed here, mid-upload
        Storage(settings).commit({str(src)!r}, {uri!r}, progress=progress)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "uploading"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert storage.exists(uri + "/model_index.json")  # the first file did land...
    with pytest.raises(NotFound, match="no manifest"):  # ...but no reader accepts the prefix
        storage.read_manifest(uri)
    assert uri not in list(storage.walk_manifests(storage.uri("models")))
    with pytest.raises(NotFound):
        storage.fetch(uri, tmp_path / "out")


def test_committed_data_survives_a_server_restart(seaweed, tmp_path):
    storage = Storage(settings_for(seaweed, tmp_path))
    src = tmp_path / "m"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(100_000))
    uri = storage.uri("restart", "1")
    storage.commit(src, uri)
    seaweed.stop()
    seaweed.start()
    storage = Storage(settings_for(seaweed, tmp_path))  # fresh client, fresh connections
    storage.fetch(uri, tmp_path / "out")
    assert (tmp_path / "out" / "a.bin").read_bytes() == (src / "a.bin").read_bytes()
