"""What every S3 client shares: the checksum environment and the credentials file format."""

from __future__ import annotations

import os
import stat
import threading

import pytest

from atelier import stack
from atelier.errors import InvalidInput, StorageUnavailable
from atelier.s3 import (
    CHECKSUM_ENV,
    boto3_client,
    create_credentials_file,
    read_credentials_file,
)
from atelier.settings import Settings


def test_created_file_reads_back_and_is_private(tmp_path):
    path = tmp_path / "state" / "creds"
    assert create_credentials_file(path, "AK", "SK", comment="made by a test\nsecond line")
    assert read_credentials_file(path) == ("AK", "SK")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.read_text().startswith("# made by a test\n# second line\n[default]\n")


def test_an_existing_file_keeps_its_keys(tmp_path):
    path = tmp_path / "creds"
    assert create_credentials_file(path, "first", "one")
    assert not create_credentials_file(path, "second", "two")
    assert read_credentials_file(path) == ("first", "one")


@pytest.mark.parametrize("text, message", [
    (None, "not found or unreadable"),
    ("[other]\naws_access_key_id = a\naws_secret_access_key = b\n", r"no profile \[default\]"),
    ("[default]\naws_access_key_id = a\n", "lacks aws_secret_access_key"),
    ("aws_access_key_id = a\n", "not in INI format"),
])
def test_a_bad_file_says_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "creds"
    if text is not None:
        path.write_text(text)
    with pytest.raises(StorageUnavailable, match=message) as raised:
        read_credentials_file(path)
    assert raised.value.where == str(path)


def test_embedded_keys_are_made_once_even_by_racing_processes(tmp_path):
    settings = Settings(home=tmp_path / "home")
    found: list[tuple[str, str]] = []
    start = threading.Barrier(6)

    def ask():
        start.wait()
        found.append(stack.s3_credentials(settings))

    threads = [threading.Thread(target=ask) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(found)) == 1
    assert read_credentials_file(settings.embedded_credentials_file) == found[0]


def test_a_broken_embedded_keys_file_is_the_user_s_to_delete(tmp_path):
    settings = Settings(home=tmp_path / "home")
    settings.embedded_credentials_file.parent.mkdir(parents=True)
    settings.embedded_credentials_file.write_text("[default]\n")
    with pytest.raises(InvalidInput, match="delete the file to generate new keys"):
        stack.s3_credentials(settings)


def test_boto3_client_sets_the_checksum_environment(monkeypatch):
    for key in CHECKSUM_ENV:
        monkeypatch.delenv(key, raising=False)
    client = boto3_client("http://127.0.0.1:9", "a", "b")
    assert {k: os.environ[k] for k in CHECKSUM_ENV} == CHECKSUM_ENV
    assert client.meta.config.s3["addressing_style"] == "path"
