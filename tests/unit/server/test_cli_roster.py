"""``fedseal-server roster``: init, add, remove, sign, show, auth-keys, as a user runs them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

import server.cli as server_cli
from common.pki import make_node_key
from common.roster import load_roster
from server.record.keys import create_keypair, load_public_key


def _invoke(*args: str) -> Any:
    return CliRunner().invoke(server_cli.app, ["roster", *args])


def _identity(i: int) -> str:
    return (
        Ed25519PrivateKey.from_private_bytes(bytes([0x70 + i]) * 32)
        .public_key()
        .public_bytes_raw()
        .hex()
    )


def test_roster_round_trip_init_add_sign_show_auth_keys(tmp_path: Path) -> None:
    authority, roster = tmp_path / "authority.key", tmp_path / "roster.json"
    result = _invoke(
        "init", "--authority-key", str(authority), "--federation", "demo", "--roster", str(roster)
    )
    assert result.exit_code == 0, result.output
    assert authority.stat().st_mode & 0o777 == 0o600 and (tmp_path / "authority.key.pub").is_file()
    pinned = load_public_key(tmp_path / "authority.key.pub").public_bytes_raw()
    assert f'roster_authority = "{pinned.hex()}"' in result.stdout
    _, pub = make_node_key(tmp_path / "node0")
    assert (
        _invoke(
            "add",
            "--roster",
            str(roster),
            "--name",
            "site-a",
            "--identity-key",
            _identity(0),
            "--node-auth-key",
            str(pub),
        ).exit_code
        == 0
    )
    result = _invoke(
        "add", "--roster", str(roster), "--name", "site-b", "--identity-key", _identity(1)
    )
    assert "UNSIGNED draft" in result.stdout
    shown = _invoke("show", "--roster", str(roster))
    assert (
        "site-a" in shown.stdout and "site-b" in shown.stdout and "UNSIGNED draft" in shown.stdout
    )
    create_keypair(tmp_path / "keys")
    result = _invoke(
        "sign",
        "--roster",
        str(roster),
        "--authority-key",
        str(authority),
        "--coordinator-key",
        str(tmp_path / "keys" / "audit.pub"),
    )
    assert result.exit_code == 0, result.output
    signed = load_roster(roster, authority_key=pinned)
    assert signed.version == 1 and [m.name for m in signed.members] == ["site-a", "site-b"]
    assert (
        signed.coordinator_key
        == load_public_key(tmp_path / "keys" / "audit.pub").public_bytes_raw()
    )
    shown = _invoke("show", "--roster", str(roster))
    assert f"sha256 {signed.digest().hex()}" in shown.stdout and "version 1" in shown.stdout
    assert json.loads(_invoke("show", "--roster", str(roster), "--json").stdout)["version"] == 1
    result = _invoke("auth-keys", "--roster", str(roster), "--out", str(tmp_path / "allowed"))
    assert result.exit_code == 0 and [p.name for p in (tmp_path / "allowed").iterdir()] == [
        "site-a.pub"
    ]
    assert (tmp_path / "allowed" / "site-a.pub").read_text().split() == pub.read_text().split()[:2]
    # editing a signed roster leaves a draft; signing again bumps the version, keeps the coordinator
    assert _invoke("remove", "--roster", str(roster), "--name", "site-b").exit_code == 0
    assert (
        _invoke("sign", "--roster", str(roster), "--authority-key", str(authority)).exit_code == 0
    )
    again = load_roster(roster, authority_key=pinned)
    assert again.version == 2 and again.coordinator_key == signed.coordinator_key
    assert [m.name for m in again.members] == ["site-a"]


def _one_line(result: Any, needle: str, code: int = 2) -> None:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in result.output, (
        result.stderr
    )


def test_roster_commands_refuse_in_one_line(tmp_path: Path) -> None:
    authority, roster = tmp_path / "authority.key", tmp_path / "roster.json"
    _invoke(
        "init", "--authority-key", str(authority), "--federation", "demo", "--roster", str(roster)
    )
    _one_line(
        _invoke(
            "init",
            "--authority-key",
            str(tmp_path / "a2.key"),
            "--federation",
            "demo",
            "--roster",
            str(roster),
        ),
        "already exists",
    )
    _one_line(
        _invoke(
            "init",
            "--authority-key",
            str(authority),
            "--federation",
            "demo",
            "--roster",
            str(tmp_path / "r2.json"),
        ),
        "already exists",
    )
    _one_line(
        _invoke(
            "init",
            "--authority-key",
            str(tmp_path / "x.key"),
            "--federation",
            "bad name",
            "--roster",
            str(tmp_path / "r3.json"),
        ),
        "federation name",
    )
    _one_line(
        _invoke("add", "--roster", str(roster), "--name", "a", "--identity-key", "00"),
        "--identity-key",
    )
    _invoke("add", "--roster", str(roster), "--name", "a", "--identity-key", _identity(0))
    _one_line(
        _invoke("add", "--roster", str(roster), "--name", "a", "--identity-key", _identity(1)),
        "duplicate member name",
    )
    _one_line(
        _invoke("add", "--roster", str(roster), "--name", "b", "--identity-key", _identity(0)),
        "already another member's",
    )
    _one_line(
        _invoke("auth-keys", "--roster", str(roster), "--out", str(tmp_path / "o")),
        "unsigned roster draft",
    )
    os.chmod(authority, 0o644)
    _one_line(
        _invoke("sign", "--roster", str(roster), "--authority-key", str(authority)), "accessible"
    )
    os.chmod(authority, 0o600)
    assert (
        _invoke("sign", "--roster", str(roster), "--authority-key", str(authority)).exit_code == 0
    )
    doc = json.loads(roster.read_text())
    doc["members"][0]["name"] = "z"
    roster.write_text(json.dumps(doc))
    _one_line(_invoke("show", "--roster", str(roster)), "signature does not verify", code=1)
