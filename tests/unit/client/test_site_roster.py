"""The roster in force at a site: installed under the policy's pin, frozen, never older."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client.instructions import pinned_server_key
from client.site_policy import SiteSetup
from client.site_roster import (
    NODE_CONFIG_ROSTER_HASH,
    NODE_CONFIG_ROSTER_PATH,
    accept_roster_version,
    configured_roster,
    install_site_roster,
    roster_pin,
)
from client.state import ROSTER_FILE, ROSTER_VERSION_FILE, private_dir
from common.errors import ConfigurationError, IntegrityError
from common.roster import Roster, RosterMember, sign_roster
from policies import SitePolicy, load_site_policy
from policies.models import TrustRules

AUTHORITY = Ed25519PrivateKey.from_private_bytes(b"\x11" * 32)
AUTHORITY_RAW = AUTHORITY.public_key().public_bytes_raw()
OTHER = Ed25519PrivateKey.from_private_bytes(b"\x12" * 32)
COORDINATOR = Ed25519PrivateKey.from_private_bytes(b"\x13" * 32).public_key().public_bytes_raw()
MEMBERS = [
    RosterMember(
        f"site-{i}",
        Ed25519PrivateKey.from_private_bytes(bytes([0x50 + i]) * 32)
        .public_key()
        .public_bytes_raw(),
    )
    for i in range(2)
]


def signed(version: int = 1, authority: Ed25519PrivateKey = AUTHORITY, **changes: object) -> Roster:
    args: dict[str, object] = dict(
        federation="demo",
        version=version,
        coordinator_key=COORDINATOR,
        members=MEMBERS,
        authority=authority,
    )
    args.update(changes)
    return sign_roster(**args)  # type: ignore[arg-type]


def pinning(
    authority: bytes | None = AUTHORITY_RAW,
    digest: bytes | None = None,
    server_key: bytes | None = None,
) -> SitePolicy:
    return SitePolicy(trust=TrustRules(
        roster_authority=authority.hex() if authority else None,
        roster_digest=digest.hex() if digest else None,
        server_key=server_key.hex() if server_key else None,
    ))  # fmt: skip


def test_policy_pins_parse_and_reject_broken_values(tmp_path: Path) -> None:
    from policies.loading import PolicyFileError

    path = tmp_path / "p.toml"
    path.write_text(
        f'kind = "site"\n[trust]\nroster_authority = "{AUTHORITY_RAW.hex().upper()}"\n'
        f'roster_digest = "sha256:{"AB" * 32}"\n'
    )
    trust = load_site_policy(path).trust
    assert (
        trust.roster_authority_bytes == AUTHORITY_RAW and trust.roster_digest_bytes == b"\xab" * 32
    )
    for bad, field in (
        ('roster_authority = "00"', "trust.roster_authority"),
        ('roster_digest = "xyz"', "trust.roster_digest"),
        ("roster_authority = 5", "trust.roster_authority"),
    ):
        path.write_text(f'kind = "site"\n[trust]\n{bad}\n')
        with pytest.raises(PolicyFileError, match=f"{path}: {field}"):
            load_site_policy(path)


def test_install_verifies_under_the_pin_copies_read_only_and_records_the_version(
    tmp_path: Path,
) -> None:
    state = private_dir(tmp_path / "state")
    source = tmp_path / "roster.json"
    source.write_text(signed().to_json())
    installed = install_site_roster(source, state, pinning())
    assert installed.path == state / ROSTER_FILE and installed.path.stat().st_mode & 0o777 == 0o444
    assert (
        "version 1" in installed.summary()
        and installed.roster.digest().hex() in installed.summary()
    )
    doc = json.loads((state / ROSTER_VERSION_FILE).read_text())
    assert doc["federations"]["demo"]["version"] == 1


def test_install_without_a_pin_or_under_another_authority_refused(tmp_path: Path) -> None:
    state = private_dir(tmp_path / "state")
    source = tmp_path / "roster.json"
    source.write_text(signed().to_json())
    with pytest.raises(ConfigurationError, match="pins no roster authority"):
        install_site_roster(source, state, SitePolicy())
    source.write_text(signed(authority=OTHER).to_json())
    with pytest.raises(IntegrityError, match="not by the pinned authority"):
        install_site_roster(source, state, pinning())
    assert not (state / ROSTER_FILE).exists()


def test_digest_pin_accepts_exactly_one_roster(tmp_path: Path) -> None:
    state = private_dir(tmp_path / "state")
    source = tmp_path / "roster.json"
    one = signed()
    source.write_text(one.to_json())
    install_site_roster(source, state, pinning(authority=None, digest=one.digest()))
    source.write_text(signed(version=2).to_json())
    with pytest.raises(IntegrityError, match="pinned digest"):
        install_site_roster(source, state, pinning(authority=None, digest=one.digest()))


def test_versions_never_go_back_and_one_version_names_one_roster(tmp_path: Path) -> None:
    state = private_dir(tmp_path / "state")
    accept_roster_version(state, signed(version=3))
    accept_roster_version(state, signed(version=3))  # the same roster again: fine
    accept_roster_version(state, signed(version=4))
    with pytest.raises(IntegrityError, match="below version 4"):
        accept_roster_version(state, signed(version=3))
    with pytest.raises(IntegrityError, match="not the roster this site accepted"):
        accept_roster_version(state, signed(version=4, members=MEMBERS[:1]))
    accept_roster_version(state, signed(version=1, federation="other"))  # per federation
    (state / ROSTER_VERSION_FILE).write_text("{broken")
    with pytest.raises(ConfigurationError, match="unreadable"):
        accept_roster_version(state, signed(version=5))


def test_deployed_roster_whose_copy_changed_refused(tmp_path: Path) -> None:
    state = private_dir(tmp_path / "state")
    source = tmp_path / "roster.json"
    source.write_text(signed().to_json())
    installed = install_site_roster(source, state, pinning())
    node = {
        NODE_CONFIG_ROSTER_PATH: str(installed.path),
        NODE_CONFIG_ROSTER_HASH: installed.roster.digest().hex(),
    }
    assert configured_roster(node, None, pinning(), state) == installed.roster
    installed.path.chmod(0o644)
    installed.path.write_text(
        signed(version=2).to_json()
    )  # validly signed, but not the one put in force
    with pytest.raises(IntegrityError, match="not the one `fedseal-client start` put in force"):
        configured_roster(node, None, pinning(), state)


def test_simulated_roster_verified_under_the_setup_authority_unless_the_policy_pins(
    tmp_path: Path,
) -> None:
    state = private_dir(tmp_path / "state")
    setup = SiteSetup(tmp_path, None, signed(), AUTHORITY_RAW)
    assert configured_roster({}, setup, None, state) == setup.roster
    assert roster_pin(None, setup).authority_key == AUTHORITY_RAW
    other = OTHER.public_key().public_bytes_raw()
    with pytest.raises(IntegrityError):  # the site's own policy wins over the setup
        configured_roster({}, setup, pinning(authority=other), state)
    assert configured_roster({}, SiteSetup(tmp_path), None, state) is None
    with pytest.raises(ConfigurationError, match="pins no roster authority"):
        configured_roster({}, dataclasses.replace(setup, roster_authority=None), None, state)


def test_roster_coordinator_key_is_the_pin_unless_the_policy_names_one() -> None:
    r = signed()
    assert pinned_server_key({}, pinning(), r) == COORDINATOR
    assert pinned_server_key({}, pinning(server_key=COORDINATOR), r) == COORDINATOR
    assert pinned_server_key({}, pinning(), signed(coordinator_key=None)) is None
    with pytest.raises(ConfigurationError, match="roster's coordinator key"):
        pinned_server_key({}, pinning(server_key=AUTHORITY_RAW), r)
    with pytest.raises(ConfigurationError, match="roster's coordinator key"):
        pinned_server_key({"server-key": AUTHORITY_RAW.hex()}, None, r)


# ------------------------------------------------------------------ a local `flwr run` federation
def test_local_roster_in_the_state_dir_is_in_force_under_its_own_pin(tmp_path: Path) -> None:
    from client.site_roster import LOCAL_PIN_FILE, configured_roster, install_local_roster

    state = private_dir(tmp_path / "site-0")
    assert configured_roster({}, None, None, state) is None  # nothing installed: no roster
    roster = signed()
    install_local_roster(state, roster, AUTHORITY.public_key().public_bytes_raw())
    assert configured_roster({}, None, None, state) == roster
    # a roster the pinned authority did not sign is refused, even in the site's own directory
    forged = signed(authority=Ed25519PrivateKey.generate())
    (state / "local-roster.json").write_text(forged.to_json())
    with pytest.raises(IntegrityError):
        configured_roster({}, None, None, state)
    # a pin file others can read (planted) is refused
    (state / LOCAL_PIN_FILE).chmod(0o644)
    with pytest.raises(ConfigurationError):
        configured_roster({}, None, None, state)


def test_install_local_roster_refuses_a_roster_its_pin_does_not_sign(tmp_path: Path) -> None:
    from client.site_roster import install_local_roster

    state = private_dir(tmp_path / "site-0")
    with pytest.raises(IntegrityError):
        install_local_roster(
            state, signed(), Ed25519PrivateKey.generate().public_key().public_bytes_raw()
        )
    assert not (state / "local-roster.json").exists()
