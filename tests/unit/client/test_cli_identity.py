"""``fedseal-client identity init|show`` and what ``start --roster`` puts in force."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from client.cli import _roster_config, app
from client.site_roster import NODE_CONFIG_ROSTER_HASH, NODE_CONFIG_ROSTER_PATH
from client.state import IDENTITY_FILE
from common.errors import ConfigurationError, IntegrityError
from common.roster import RosterMember, sign_roster

AUTHORITY = Ed25519PrivateKey.from_private_bytes(b"\x51" * 32)


def _invoke(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def _policy(tmp_path: Path, pin: bool = True) -> Path:
    path = tmp_path / "policy.toml"
    raw = AUTHORITY.public_key().public_bytes_raw().hex()
    path.write_text('kind = "site"\n' + (f'[trust]\nroster_authority = "{raw}"\n' if pin else ""))
    return path


def _roster(tmp_path: Path, identity: bytes | None, version: int = 1) -> Path:
    members = [
        RosterMember(
            "other",
            Ed25519PrivateKey.from_private_bytes(b"\x52" * 32).public_key().public_bytes_raw(),
        )
    ]
    if identity is not None:
        members.append(RosterMember("this-site", identity))
    roster = sign_roster(
        federation="demo",
        version=version,
        coordinator_key=None,
        members=members,
        authority=AUTHORITY,
    )
    path = tmp_path / f"roster-v{version}-{len(members)}.json"
    path.write_text(roster.to_json())
    return path


def test_identity_init_prints_the_public_key_and_show_repeats_it(tmp_path: Path) -> None:
    state = tmp_path / "agent"
    made = _invoke("identity", "init", "--state-dir", str(state))
    assert made.exit_code == 0, made.output
    public = made.stdout.strip()
    assert len(bytes.fromhex(public)) == 32
    assert (state / "site" / IDENTITY_FILE).stat().st_mode & 0o777 == 0o600
    assert _invoke("identity", "show", "--state-dir", str(state)).stdout.strip() == public
    again = _invoke("identity", "init", "--state-dir", str(state))
    assert again.exit_code == 2 and "refusing to replace" in again.stderr
    missing = _invoke("identity", "show", "--state-dir", str(tmp_path / "none"))
    assert missing.exit_code == 2 and "fedseal-client identity init" in missing.stderr


def test_start_roster_installs_it_and_pins_its_hash(tmp_path: Path) -> None:
    state = tmp_path / "agent"
    public = bytes.fromhex(_invoke("identity", "init", "--state-dir", str(state)).stdout.strip())
    site = state / "site"
    node = _roster_config(_roster(tmp_path, public), site, _policy(tmp_path))
    assert Path(node[NODE_CONFIG_ROSTER_PATH]) == site / "roster.json"
    assert len(node[NODE_CONFIG_ROSTER_HASH]) == 64
    assert _roster_config(None, site, _policy(tmp_path)) == {}


def test_start_roster_refused_without_membership_pin_identity_or_when_older(tmp_path: Path) -> None:
    state = tmp_path / "agent"
    site = state / "site"
    with pytest.raises(ConfigurationError, match="no site identity key"):
        _roster_config(_roster(tmp_path, None), site, _policy(tmp_path))
    public = bytes.fromhex(_invoke("identity", "init", "--state-dir", str(state)).stdout.strip())
    with pytest.raises(ConfigurationError, match="is not in roster"):
        _roster_config(_roster(tmp_path, None), site, _policy(tmp_path))
    assert not (site / "roster.json").exists() and not (site / "roster-version.json").exists()
    with pytest.raises(ConfigurationError, match="pins no roster authority"):
        _roster_config(_roster(tmp_path, public), site, _policy(tmp_path, pin=False))
    _roster_config(_roster(tmp_path, public, version=3), site, _policy(tmp_path))
    with pytest.raises(IntegrityError, match="below version 3"):
        _roster_config(_roster(tmp_path, public, version=2), site, _policy(tmp_path))
    with pytest.raises(ConfigurationError, match="roster not found"):
        _roster_config(tmp_path / "absent.json", site, _policy(tmp_path))
