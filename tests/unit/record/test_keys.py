"""The audit key pair: private key 0600 from creation, no silent overwrite, strict loading."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from common.errors import ConfigurationError
from server.record.keys import create_keypair, load_private_key, load_public_key, load_signing_key


def test_create_keypair_private_key_mode_0600(tmp_path: Path) -> None:
    old = os.umask(0)  # even with a permissive umask
    try:
        paths = create_keypair(tmp_path / "keys")
    finally:
        os.umask(old)
    assert stat.S_IMODE(paths.private_key.stat().st_mode) == 0o600
    key = load_private_key(paths.private_key)
    pub = load_public_key(paths.public_key)
    pub.verify(key.sign(b"m"), b"m")


def test_create_keypair_existing_refused_without_force(tmp_path: Path) -> None:
    first = create_keypair(tmp_path)
    before = first.private_key.read_bytes()
    with pytest.raises(ConfigurationError, match="--force"):
        create_keypair(tmp_path)
    assert first.private_key.read_bytes() == before
    second = create_keypair(tmp_path, force=True)
    assert second.private_key.read_bytes() != before
    assert stat.S_IMODE(second.private_key.stat().st_mode) == 0o600


def test_load_private_key_group_readable_refused(tmp_path: Path) -> None:
    paths = create_keypair(tmp_path)
    paths.private_key.chmod(0o640)
    with pytest.raises(ConfigurationError, match="chmod 600"):
        load_private_key(paths.private_key)


def test_load_public_key_garbage_refused(tmp_path: Path) -> None:
    bad = tmp_path / "x.pub"
    bad.write_text("nope")
    with pytest.raises(ConfigurationError):
        load_public_key(bad)


def test_load_signing_key_missing_is_an_error_naming_the_command_and_creates_nothing(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigurationError) as info:
        load_signing_key(tmp_path / "keys")
    message = str(info.value)
    assert str(tmp_path / "keys" / "audit.key") in message
    assert f"fedseal-server keys {tmp_path / 'keys'}" in message and "\n" not in message
    assert not (tmp_path / "keys").exists()


def test_load_signing_key_loads_what_keys_created(tmp_path: Path) -> None:
    paths = create_keypair(tmp_path)
    assert load_signing_key(tmp_path).public_key() == load_public_key(paths.public_key)
