"""The registry against a real SeaweedFS: publishers racing in separate processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from test_storage_seaweed import settings_for

from atelier.errors import InvalidInput
from atelier.registry import Registry
from atelier.storage import Storage

pytestmark = pytest.mark.integration

PUBLISHERS = 4


def test_racing_publishers_each_get_their_own_version_and_none_is_overwritten(seaweed, tmp_path):
    settings = settings_for(seaweed, tmp_path)
    folders = []
    for i in range(PUBLISHERS):
        folder = tmp_path / f"model-{i}"
        (folder / "unet").mkdir(parents=True)
        (folder / "model_index.json").write_text(json.dumps({"publisher": i}))
        (folder / "unet" / "weights.bin").write_bytes(os.urandom(2 * 1024 * 1024))
        folders.append(folder)
    gate = tmp_path / "gate"
    gate.mkdir()
    # Each child lists the registry, then waits until every child has listed: all of them saw
    # no version and go for number 1 at once, as publishers that listed a moment apart would.
    child = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from atelier.registry import Registry
        from atelier.settings import Settings
        from atelier.storage import Storage
        i = int(sys.argv[1])
        gate = Path({str(gate)!r})
        registry = Registry(Storage(Settings.model_validate_json({settings.model_dump_json()!r})))
        listed = registry._last_allocated
        def last_allocated(name):
            n = listed(name)
            (gate / str(i)).touch()
            while len(list(gate.iterdir())) < {PUBLISHERS}:
                time.sleep(0.01)
            return n
        registry._last_allocated = last_allocated
        _, card = registry.publish(
            sys.argv[2], name="raced", method="full", base_model="tiny", concepts=[],
            hyperparameters={{"publisher": i}}, dataset_sha256="0" * 64)
        print(card.version, flush=True)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", child, str(i), str(folder)],
                              stdout=subprocess.PIPE, text=True)
             for i, folder in enumerate(folders)]
    versions = {}
    for i, proc in enumerate(procs):
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"publisher {i} failed"
        versions[i] = int(out.split()[-1])
    # Exactly one publisher won each number.
    assert sorted(versions.values()) == list(range(1, PUBLISHERS + 1))
    # Every version holds its own publisher's card and files, intact (fetch verifies sha256).
    registry = Registry(Storage(settings))
    for i, version in versions.items():
        uri, card = registry.get(f"raced:{version}")
        assert card.hyperparameters == {"publisher": i}
        local = tmp_path / f"fetched-{version}"
        registry.storage.fetch(uri, local)
        assert json.loads((local / "model_index.json").read_text()) == {"publisher": i}
        assert (local / "unet" / "weights.bin").read_bytes() == (folders[i] / "unet" / "weights.bin").read_bytes()


def test_a_commit_never_replaces_a_manifest_another_writer_made_meanwhile(seaweed, tmp_path, monkeypatch):
    storage = Storage(settings_for(seaweed, tmp_path))
    uri = storage.uri("cond", "1")
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "file").write_text(name)
    first = storage.commit(tmp_path / "a", uri, {"writer": "a"})
    # As if b checked for a manifest before a wrote its own.
    monkeypatch.setattr(storage, "has_manifest", lambda uri: False)
    with pytest.raises(InvalidInput, match="committed by another writer meanwhile"):
        storage.commit(tmp_path / "b", uri, {"writer": "b"})
    assert storage.read_manifest(uri) == first
    assert storage.create(f"{uri}/x", b"one") is True
    assert storage.create(f"{uri}/x", b"two") is False
    assert storage.read_bytes(f"{uri}/x") == b"one"


def test_a_publish_that_meets_a_storage_outage_waits_for_s3_and_ends_under_its_number(seaweed, tmp_path):
    """SeaweedFS is SIGKILLed (by the pid it recorded) after a publication's first file is
    uploaded, and started again 5 s later. Without `outages` the publication fails with
    StorageUnavailable; with them (as the training job publishes) it waits for S3 and goes on
    under the number it claimed: version 1, intact, and no other number taken."""
    import signal
    import threading
    import time

    from atelier.errors import StorageUnavailable
    from atelier.storage import Outages

    registry = Registry(Storage(settings_for(seaweed, tmp_path)))
    folder = tmp_path / "model"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    (folder / "unet" / "weights.bin").write_bytes(os.urandom(4 * 1024 * 1024))
    kills: list[float] = []
    restarts: list[threading.Timer] = []

    def outage_after_first_file(file: str, done: int, total: int) -> None:
        if file != "model_index.json" and not kills:  # files go in sorted order
            kills.append(time.monotonic())
            os.kill(seaweed.pid, signal.SIGKILL)
            restarts.append(threading.Timer(5, seaweed.start))
            restarts[-1].start()

    def publish(name: str, outages: Outages | None):
        kills.clear()
        try:
            return registry.publish(folder, name=name, method="full", base_model="tiny", concepts=[],
                                    hyperparameters={}, dataset_sha256="0" * 64,
                                    progress=outage_after_first_file, outages=outages)
        finally:  # SeaweedFS runs again, whatever happened (the fixture stops it at the end)
            for timer in restarts:
                timer.join()

    with pytest.raises(StorageUnavailable, match="cannot reach"):
        publish("unguarded", None)
    heard: list[tuple[str, float, int]] = []
    uri, card = publish("guarded", Outages(registry.storage, wait_s=60,
                                            on_wait=lambda error, s, n: heard.append((error, s, n))))
    print(f"publish through an outage: waited {heard}, {time.monotonic() - kills[0]:.1f} s after the kill")
    assert kills and len(heard) == 1 and "cannot reach" in heard[0][0], heard
    assert card.ref == "guarded:1" and uri.endswith("/guarded/1")
    assert [c.ref for c in registry.list("guarded")] == ["guarded:1"]
    assert registry._last_allocated("guarded") == 1  # no number left claimed and empty
    registry.storage.fetch(uri, tmp_path / "fetched")  # verifies every file's sha256
    fetched = tmp_path / "fetched" / "unet" / "weights.bin"
    assert fetched.read_bytes() == (folder / "unet" / "weights.bin").read_bytes()
