"""The site's state directory and state key are private: 0700/0600, this user's, never /tmp."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from client.state import KEY_BYTES, STATE_KEY_FILE, private_dir, site_dir, state_key
from common.errors import ConfigurationError

posix = pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_site_dir_without_state_dir_root_or_flwr_home_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("FLWR_HOME", raising=False)
    with pytest.raises(ConfigurationError, match="--state-dir.*FLWR_HOME"):
        site_dir({"partition-id": 0}, 7, None)


def test_site_dir_under_flwr_home_created_0700_despite_the_umask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    old = os.umask(0)
    try:
        path = site_dir({}, 7, None)
    finally:
        os.umask(old)
    assert path == tmp_path / "fedseal-sites" / "node-7"
    assert _mode(path) == 0o700


def test_site_dir_state_dir_and_site_root_created_0700(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        explicit = site_dir({"state-dir": str(tmp_path / "a" / "site")}, 1, None)
        simulated = site_dir({"partition-id": 3}, 1, tmp_path / "sites")
    finally:
        os.umask(old)
    assert simulated == tmp_path / "sites" / "site-3"
    assert _mode(explicit) == 0o700 and _mode(simulated) == 0o700


@posix
@pytest.mark.parametrize("mode", [0o755, 0o750, 0o701])
def test_existing_state_dir_open_to_group_or_others_refused(tmp_path: Path, mode: int) -> None:
    shared = tmp_path / "site"
    shared.mkdir()
    shared.chmod(mode)
    with pytest.raises(ConfigurationError, match="accessible by group or others") as info:
        private_dir(shared)
    assert "\n" not in str(info.value) and "chmod 700" in str(info.value)


@posix
@pytest.mark.skipif(os.name == "posix" and os.getuid() != 0, reason="needs root to chown")
def test_state_dir_owned_by_another_user_refused(tmp_path: Path) -> None:
    foreign = tmp_path / "site"
    foreign.mkdir(mode=0o700)
    os.chown(foreign, 4242, -1)
    with pytest.raises(ConfigurationError, match="owned by uid 4242"):
        private_dir(foreign)


def test_state_dir_that_is_a_file_refused(tmp_path: Path) -> None:
    (tmp_path / "site").write_text("x")
    with pytest.raises(ConfigurationError, match="not a directory"):
        private_dir(tmp_path / "site")


def test_state_key_created_0600_and_stable(tmp_path: Path) -> None:
    directory = private_dir(tmp_path / "site")
    old = os.umask(0)
    try:
        key = state_key(directory)
    finally:
        os.umask(old)
    assert len(key) == KEY_BYTES and state_key(directory) == key
    assert _mode(directory / STATE_KEY_FILE) == 0o600


@posix
@pytest.mark.parametrize("mode", [0o666, 0o644, 0o640, 0o604])
def test_planted_state_key_open_to_group_or_others_refused(tmp_path: Path, mode: int) -> None:
    directory = private_dir(tmp_path / "site")
    planted = directory / STATE_KEY_FILE
    planted.write_bytes(b"\x00" * KEY_BYTES)
    planted.chmod(mode)
    with pytest.raises(ConfigurationError, match="accessible by group or others"):
        state_key(directory)


@posix
def test_state_key_symlink_refused(tmp_path: Path) -> None:
    directory = private_dir(tmp_path / "site")
    target = tmp_path / "elsewhere.key"
    target.write_bytes(b"\x01" * KEY_BYTES)
    target.chmod(0o600)
    (directory / STATE_KEY_FILE).symlink_to(target)
    with pytest.raises(ConfigurationError, match="cannot read state key"):
        state_key(directory)


@posix
@pytest.mark.skipif(os.name == "posix" and os.getuid() != 0, reason="needs root to chown")
def test_state_key_owned_by_another_user_refused(tmp_path: Path) -> None:
    directory = private_dir(tmp_path / "site")
    planted = directory / STATE_KEY_FILE
    planted.write_bytes(b"\x02" * KEY_BYTES)
    planted.chmod(0o600)
    os.chown(planted, 4242, -1)
    with pytest.raises(ConfigurationError, match="owned by uid 4242"):
        state_key(directory)
