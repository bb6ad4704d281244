"""The site identity key file: made once, private, never replaced, refused when planted."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from client.identity import create_site_identity, identity_public_bytes, load_site_identity
from client.state import IDENTITY_FILE
from common.errors import ConfigurationError


def test_identity_created_0600_in_a_0700_dir_and_loaded(tmp_path: Path) -> None:
    directory = tmp_path / "site"
    public = create_site_identity(directory)
    assert len(public) == 32
    assert os.stat(directory).st_mode & 0o777 == 0o700
    assert os.stat(directory / IDENTITY_FILE).st_mode & 0o777 == 0o600
    assert identity_public_bytes(load_site_identity(directory)) == public


def test_existing_identity_never_overwritten(tmp_path: Path) -> None:
    public = create_site_identity(tmp_path / "site")
    with pytest.raises(ConfigurationError, match="refusing to replace"):
        create_site_identity(tmp_path / "site")
    assert identity_public_bytes(load_site_identity(tmp_path / "site")) == public


def test_missing_identity_names_the_command(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigurationError, match="no site identity key in .*fedseal-client identity init"
    ):
        load_site_identity(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir(mode=0o700)
    with pytest.raises(ConfigurationError, match="fedseal-client identity init"):
        load_site_identity(tmp_path / "empty")


def test_identity_readable_by_others_refused_even_after_a_cached_load(tmp_path: Path) -> None:
    directory = tmp_path / "site"
    create_site_identity(directory)
    load_site_identity(directory)  # cached now
    os.chmod(directory / IDENTITY_FILE, 0o644)
    with pytest.raises(ConfigurationError, match="accessible by group or others"):
        load_site_identity(directory)


def test_identity_in_a_shared_directory_refused(tmp_path: Path) -> None:
    directory = tmp_path / "site"
    create_site_identity(directory)
    os.chmod(directory, 0o755)
    with pytest.raises(ConfigurationError, match="site state directory .* accessible"):
        load_site_identity(directory)
    with pytest.raises(ConfigurationError, match="accessible"):
        create_site_identity(directory)


def test_identity_symlink_and_wrong_size_refused(tmp_path: Path) -> None:
    directory = tmp_path / "site"
    create_site_identity(directory)
    real = directory / IDENTITY_FILE
    moved = directory / "elsewhere.key"
    real.rename(moved)
    real.symlink_to(moved)
    with pytest.raises(ConfigurationError, match="cannot read site identity key"):
        load_site_identity(directory)
    real.unlink()
    fd = os.open(real, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"\x00" * 31)
    os.close(fd)
    with pytest.raises(ConfigurationError, match="corrupt"):
        load_site_identity(directory)
