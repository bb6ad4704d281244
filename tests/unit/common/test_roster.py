"""The signed federation roster: encoding, signature, tamper evidence, strict parsing."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.errors import ConfigurationError, IntegrityError
from common.roster import (
    DOMAIN,
    MAX_ROSTER_BYTES,
    Roster,
    RosterDraft,
    RosterMember,
    load_roster,
    load_roster_draft,
    sign_roster,
)

AUTHORITY = Ed25519PrivateKey.from_private_bytes(b"\x01" * 32)
AUTHORITY_RAW = AUTHORITY.public_key().public_bytes_raw()
OTHER = Ed25519PrivateKey.from_private_bytes(b"\x02" * 32)
COORDINATOR = Ed25519PrivateKey.from_private_bytes(b"\x03" * 32).public_key().public_bytes_raw()


def ident(i: int) -> bytes:
    return (
        Ed25519PrivateKey.from_private_bytes(bytes([0x40 + i]) * 32).public_key().public_bytes_raw()
    )


def auth_key(seed: int) -> str:
    key = ec.derive_private_key(seed, ec.SECP384R1())
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )


def members(n: int = 3) -> list[RosterMember]:
    return [RosterMember(f"site-{i}", ident(i), auth_key(100 + i)) for i in range(n)]


def roster(**changes: object) -> Roster:
    args: dict[str, object] = dict(
        federation="demo", version=2, coordinator_key=COORDINATOR, members=members(),
        authority=AUTHORITY,
    )  # fmt: skip
    args.update(changes)
    return sign_roster(**args)  # type: ignore[arg-type]


def test_signed_roster_verifies_and_round_trips_through_json() -> None:
    r = roster()
    r.verify(AUTHORITY_RAW)
    again = Roster.from_json(r.to_json())
    assert again == r and again.digest() == r.digest()
    again.verify(AUTHORITY_RAW)
    assert r.signed_bytes().startswith(DOMAIN)
    assert [m.name for m in r.members] == ["site-0", "site-1", "site-2"]


def test_members_sorted_by_name_so_order_does_not_change_the_signed_bytes() -> None:
    assert roster(members=members()[::-1]).signed_bytes() == roster().signed_bytes()


def test_member_lookup_by_identity_and_identity_set() -> None:
    r = roster()
    assert r.member_by_identity(ident(1)) == r.members[1]
    assert r.member_by_identity(ident(9)) is None
    assert r.identity_keys() == frozenset(ident(i) for i in range(3))


def test_roster_from_another_authority_refused() -> None:
    with pytest.raises(IntegrityError, match="not by the pinned authority"):
        roster(authority=OTHER).verify(AUTHORITY_RAW)


def _flip(data: bytes, at: int = 0) -> bytes:
    return data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :]


TAMPER = {
    "federation": lambda r: dataclasses.replace(r, federation="demp"),
    "version": lambda r: dataclasses.replace(r, version=r.version + 1),
    "coordinator_key": lambda r: dataclasses.replace(r, coordinator_key=ident(7)),
    "coordinator_key_removed": lambda r: dataclasses.replace(r, coordinator_key=None),
    "member_name": lambda r: dataclasses.replace(
        r, members=(dataclasses.replace(r.members[0], name="site-x"), *r.members[1:])
    ),
    "member_identity": lambda r: dataclasses.replace(
        r, members=(dataclasses.replace(r.members[0], identity_key=ident(8)), *r.members[1:])
    ),
    "member_auth_key": lambda r: dataclasses.replace(
        r, members=(dataclasses.replace(r.members[0], node_auth_key=auth_key(9)), *r.members[1:])
    ),
    "member_auth_key_removed": lambda r: dataclasses.replace(
        r, members=(dataclasses.replace(r.members[0], node_auth_key=None), *r.members[1:])
    ),
    "member_added": lambda r: dataclasses.replace(
        r, members=(*r.members, RosterMember("sybil", ident(6)))
    ),
    "member_dropped": lambda r: dataclasses.replace(r, members=r.members[1:]),
    "signature": lambda r: dataclasses.replace(r, signature=_flip(r.signature, 5)),
}


@pytest.mark.parametrize("field", sorted(TAMPER))
def test_any_edit_after_signing_is_refused(field: str) -> None:
    edited = TAMPER[field](roster())
    with pytest.raises(IntegrityError):
        edited.verify(AUTHORITY_RAW)


def test_flipping_any_hex_digit_of_the_file_is_refused_or_rejected(tmp_path: Path) -> None:
    """Every byte of every key and of the signature in the file form is covered."""
    text = roster().to_json()
    doc = json.loads(text)
    fields = [("authority_key",), ("signature",), ("coordinator_key",)] + [
        ("members", i, "identity_key") for i in range(3)
    ]
    for path in fields:
        node = doc
        for step in path[:-1]:
            node = node[step]
        original = node[path[-1]]
        for at in range(0, len(original), 7):
            digit = "0" if original[at] != "0" else "1"
            node[path[-1]] = original[:at] + digit + original[at + 1 :]
            file = tmp_path / "r.json"
            file.write_text(json.dumps(doc))
            with pytest.raises((IntegrityError, ConfigurationError)):
                load_roster(file, authority_key=AUTHORITY_RAW)
        node[path[-1]] = original


def test_load_roster_under_pinned_authority_or_digest(tmp_path: Path) -> None:
    r = roster()
    path = tmp_path / "roster.json"
    path.write_text(r.to_json())
    assert load_roster(path, authority_key=AUTHORITY_RAW) == r
    assert load_roster(path, authority_key=None, digest=r.digest()) == r
    with pytest.raises(IntegrityError, match=f"roster {path}: .*pinned digest"):
        load_roster(path, authority_key=None, digest=b"\x00" * 32)
    with pytest.raises(IntegrityError, match=f"roster {path}: .*pinned authority"):
        load_roster(path, authority_key=OTHER.public_key().public_bytes_raw())


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (
            lambda: [RosterMember("a", ident(1)), RosterMember("a", ident(2))],
            "duplicate member name",
        ),
        (lambda: [RosterMember("a", ident(1)), RosterMember("b", ident(1))], "identity key"),
        (
            lambda: [
                RosterMember("a", ident(1), auth_key(5)),
                RosterMember("b", ident(2), auth_key(5)),
            ],
            "node-auth key is already",
        ),
    ],
)
def test_duplicates_refused(make: object, needle: str) -> None:
    with pytest.raises(ConfigurationError, match=needle):
        roster(members=make())  # type: ignore[operator]


def test_wrong_key_sizes_and_bad_names_refused() -> None:
    with pytest.raises(ConfigurationError, match="32 raw Ed25519 bytes"):
        RosterMember("a", b"\x01" * 31)
    with pytest.raises(ConfigurationError, match="member name"):
        RosterMember("a b", ident(1))
    with pytest.raises(ConfigurationError, match="canonical form"):
        RosterMember("a", ident(1), auth_key(3) + " comment")
    with pytest.raises(ConfigurationError, match="coordinator key"):
        roster(coordinator_key=b"\x00" * 33)
    with pytest.raises(ConfigurationError, match="version"):
        roster(version=0)


def _write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "roster.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_malformed_files_refused_with_one_line_naming_the_file(tmp_path: Path) -> None:
    good = json.loads(roster().to_json())
    cases = {
        "not json": "{",
        "a list": "[]",
        "unknown key": json.dumps({**good, "extra": 1}),
        "missing key": json.dumps({k: v for k, v in good.items() if k != "version"}),
        "bool version": json.dumps({**good, "version": True}),
        "upper-case hex": json.dumps({**good, "authority_key": good["authority_key"].upper()}),
        "short signature": json.dumps({**good, "signature": good["signature"][:-2]}),
        "duplicate json key": roster()
        .to_json()
        .replace('"version": 2', '"version": 2, "version": 3'),
        "draft": RosterDraft("demo").to_json(),
    }
    for what, text in cases.items():
        path = _write(tmp_path, text)
        with pytest.raises(ConfigurationError) as info:
            load_roster(path, authority_key=AUTHORITY_RAW)
        message = str(info.value)
        assert message.startswith(f"roster {path}") and "\n" not in message, (what, message)


def test_oversized_and_non_utf8_files_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="larger than"):
        load_roster(_write(tmp_path, b" " * (MAX_ROSTER_BYTES + 1)), authority_key=AUTHORITY_RAW)
    with pytest.raises(ConfigurationError, match="UTF-8"):
        load_roster(_write(tmp_path, b"\xff\xfe"), authority_key=AUTHORITY_RAW)
    with pytest.raises(ConfigurationError, match="cannot read"):
        load_roster(tmp_path / "absent.json", authority_key=AUTHORITY_RAW)


def test_draft_edit_and_sign_bumps_the_version(tmp_path: Path) -> None:
    draft = (
        RosterDraft("demo")
        .with_member(RosterMember("b", ident(2)))
        .with_member(RosterMember("a", ident(1)))
    )
    path = _write(tmp_path, draft.to_json())
    assert load_roster_draft(path) == draft
    signed = draft.sign(AUTHORITY, coordinator_key=COORDINATOR)
    assert signed.version == 1 and signed.coordinator_key == COORDINATOR
    path.write_text(signed.to_json())
    again = load_roster_draft(path).without_member("b").sign(AUTHORITY)
    assert again.version == 2 and [m.name for m in again.members] == ["a"]
    assert again.coordinator_key == COORDINATOR
    with pytest.raises(ConfigurationError, match="duplicate"):
        draft.with_member(RosterMember("a", ident(3)))
    with pytest.raises(ConfigurationError, match="no member"):
        draft.without_member("zz")
