"""The federation roster: who the sites of a federation are, signed by a roster authority.

What a roster proves
--------------------
A roster lists, for one federation and one roster version, each member site's
name, its Ed25519 **identity key** (the private half never leaves the site)
and, optionally, its Flower node-authentication public key; it may also name
the coordinator's Ed25519 audit/instruction-signing key. The whole list is
signed with Ed25519 (RFC 8032) by the **roster authority**, whose public key
each site pins in its own policy (``trust.roster_authority``, or the roster's
digest as ``trust.roster_digest``). A site that verifies a roster under its
pin therefore knows that the authority vouched for exactly these members and
keys. The authority need not be the coordinator: the coordinator, which the
sites do not trust, can pass a roster on but cannot add a (sybil) member,
swap a member's identity key, drop or rename a member, or change the
coordinator key without the authority's private key; any such edit changes
:meth:`Roster.signed_bytes` and the signature no longer verifies. Versions
increase with every signature (:func:`sign_roster`); a site refuses a roster
older than the one it has installed (``client.site_roster``), so an old,
validly signed roster cannot be replayed to bring back a removed member.

What a roster does not prove
----------------------------
That a Flower node id belongs to a member: node ids are the coordinator's
word; protocol v3 binds them by having each site sign its messages with its
identity key, checked against the roster. Nor that the authority was honest,
or that its key was not stolen: the authority is trusted to vouch only for
real sites (``c`` colluding sites may be in the roster, as any member may).

Assumptions: Ed25519 is strongly unforgeable (``cryptography``/OpenSSL
verification, which rejects non-canonical signatures); SHA-256 is collision
resistant (a pinned digest names one roster); sites keep their pin intact.

Encoding: :meth:`Roster.signed_bytes` is a versioned, domain-separated byte
string (``b"fedseal/roster/v1\\0"``, then every field length-prefixed, members
sorted by name), so that no other fedseal signature can be read as a roster's
and two different rosters never share signed bytes. The file form is JSON
(:meth:`Roster.to_json`), keys in lowercase hex; it is parsed strictly
(unknown or duplicate keys, wrong types and sizes are refused).
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.errors import ConfigurationError, IntegrityError

__all__ = [
    "DOMAIN",
    "MAX_ROSTER_BYTES",
    "Roster",
    "RosterDraft",
    "RosterMember",
    "key_fingerprint",
    "load_roster",
    "load_roster_draft",
    "parse_roster",
    "sign_roster",
]

DOMAIN = b"fedseal/roster/v1\0"
FORMAT = "fedseal-roster"
DRAFT_FORMAT = "fedseal-roster-draft"
FORMAT_VERSION = 1
KEY_BYTES = 32
SIGNATURE_BYTES = 64
MAX_ROSTER_BYTES = 16 * 1024 * 1024
MAX_MEMBERS = 100_000
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_FEDERATION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_HEX = re.compile(r"[0-9a-f]*")


def key_fingerprint(key: bytes) -> str:
    """A short, printable name of a raw public key: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(key).hexdigest()[:16]


def _check_ed25519(key: object, what: str) -> bytes:
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        size = len(key) if isinstance(key, bytes) else type(key).__name__
        raise ConfigurationError(f"{what} must be {KEY_BYTES} raw Ed25519 bytes, got {size}")
    try:
        Ed25519PublicKey.from_public_bytes(key)
    except ValueError:
        raise ConfigurationError(f"{what} is not a valid Ed25519 public key") from None
    return key


def _check_node_auth_key(text: object, what: str) -> str:
    """The node-auth key must be in canonical OpenSSH form, ``"<type> <base64>"`` (no comment)."""
    if not isinstance(text, str) or not text.isascii():
        raise ConfigurationError(f"{what} must be OpenSSH public-key text")
    try:
        key = serialization.load_ssh_public_key(text.encode("ascii"))
        canonical = key.public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        ).decode("ascii")
    except (ValueError, UnsupportedAlgorithm, TypeError):
        raise ConfigurationError(f"{what} is not an OpenSSH public key") from None
    if canonical != text:
        raise ConfigurationError(f"{what} is not in canonical form ('<type> <base64>', no comment)")
    return text


@dataclass(frozen=True, slots=True)
class RosterMember:
    """One site of the federation.

    Attributes
    ----------
    name : str
        The site's name (letters, digits, ``.``, ``_``, ``-``; at most 64).
    identity_key : bytes
        The site's 32 raw Ed25519 public-key bytes (RFC 8032 §5.1.5).
    node_auth_key : str or None
        The site's Flower SuperNode public key in canonical OpenSSH form
        (``"<type> <base64>"``, the key file's text without its comment), or None.
    """

    name: str
    identity_key: bytes
    node_auth_key: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ConfigurationError(
                f"member name {self.name!r} must be 1-64 letters, digits, '.', '_' or '-' "
                "(starting with a letter or digit)"
            )
        _check_ed25519(self.identity_key, f"member {self.name}: identity key")
        if self.node_auth_key is not None:
            _check_node_auth_key(self.node_auth_key, f"member {self.name}: node-auth key")


def _check_members(members: Iterable[RosterMember]) -> tuple[RosterMember, ...]:
    """The members sorted by name; refuses duplicate names, identity keys or node-auth keys.

    A duplicate identity key would let one site count twice (or two names
    share one site's signature); a duplicate node-auth key would let one
    SuperNode log in as two members.
    """
    items = tuple(members)
    if len(items) > MAX_MEMBERS:
        raise ConfigurationError(f"a roster holds at most {MAX_MEMBERS} members")
    names: set[str] = set()
    identities: set[bytes] = set()
    auth: set[str] = set()
    for m in items:
        if not isinstance(m, RosterMember):
            raise ConfigurationError(f"roster members must be RosterMember, got {type(m).__name__}")
        if m.name in names:
            raise ConfigurationError(f"duplicate member name {m.name!r}")
        if m.identity_key in identities:
            raise ConfigurationError(
                f"member {m.name}: identity key {key_fingerprint(m.identity_key)} "
                "is already another member's"
            )
        if m.node_auth_key is not None and m.node_auth_key in auth:
            raise ConfigurationError(f"member {m.name}: node-auth key is already another member's")
        names.add(m.name)
        identities.add(m.identity_key)
        if m.node_auth_key is not None:
            auth.add(m.node_auth_key)
    return tuple(sorted(items, key=lambda m: m.name))


def _check_header(federation: object, version: object, coordinator_key: object) -> None:
    if not isinstance(federation, str) or not _FEDERATION.fullmatch(federation):
        raise ConfigurationError(
            f"federation name {federation!r} must be 1-128 letters, digits, '.', '_' or '-'"
        )
    if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version < 2**63:
        raise ConfigurationError(f"roster version must be an integer >= 0, got {version!r}")
    if coordinator_key is not None:
        _check_ed25519(coordinator_key, "coordinator key")


def _field(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _optional(data: bytes | None) -> bytes:
    return b"\x00" if data is None else b"\x01" + _field(data)


@dataclass(frozen=True, slots=True)
class Roster:
    """A signed federation roster (see the module docstring for what it proves).

    Construct with :func:`sign_roster` or :meth:`from_json`; a value that
    exists is well formed (sizes, names, no duplicates), but only
    :meth:`verify` says whether its signature holds.
    """

    federation: str
    version: int
    coordinator_key: bytes | None
    members: tuple[RosterMember, ...]
    authority_key: bytes
    signature: bytes
    _by_identity: dict[bytes, RosterMember] = field(
        init=False, repr=False, compare=False, hash=False, default_factory=dict
    )
    # The canonical signed bytes and their digest, made once: every message a site handles
    # checks the roster, and at a thousand members the bytes take milliseconds to build.
    _signed: bytes = field(init=False, repr=False, compare=False, hash=False, default=b"")
    _digest: bytes = field(init=False, repr=False, compare=False, hash=False, default=b"")

    def __post_init__(self) -> None:
        _check_header(self.federation, self.version, self.coordinator_key)
        if self.version < 1:
            raise ConfigurationError("a signed roster's version is at least 1")
        members = _check_members(self.members)
        object.__setattr__(self, "members", members)
        _check_ed25519(self.authority_key, "roster authority key")
        if not isinstance(self.signature, bytes) or len(self.signature) != SIGNATURE_BYTES:
            raise ConfigurationError(f"roster signature must be {SIGNATURE_BYTES} bytes")
        object.__setattr__(self, "_by_identity", {m.identity_key: m for m in members})
        signed = _signed_bytes(
            self.federation, self.version, self.coordinator_key, members, self.authority_key
        )
        object.__setattr__(self, "_signed", signed)
        object.__setattr__(self, "_digest", hashlib.sha256(signed).digest())

    def __hash__(self) -> int:
        # Equal rosters have equal digests (and signatures): consistent with the field-wise
        # equality, without hashing a thousand members on every cache look-up.
        return hash((self._digest, self.signature))

    def signed_bytes(self) -> bytes:
        """The canonical bytes the authority signs: domain, then each field length-prefixed.

        ``DOMAIN || federation || version (u64) || coordinator key (flag, key)
        || authority key || member count (u32) || per member, sorted by name:
        name || identity key || node-auth key (flag, text)``; every variable
        field is prefixed with its length (u32, big-endian).
        """
        return self._signed

    def digest(self) -> bytes:
        """SHA-256 of :meth:`signed_bytes` (32 bytes): what ``trust.roster_digest`` pins."""
        return self._digest

    def member_by_identity(self, identity_key: bytes) -> RosterMember | None:
        """The member with this identity key (32 raw bytes), or None."""
        return self._by_identity.get(identity_key)

    def identity_keys(self) -> frozenset[bytes]:
        """Every member's identity key."""
        return frozenset(self._by_identity)

    def verify(self, authority_key: bytes) -> None:
        """Check that the pinned ``authority_key`` signed exactly this roster.

        Stops a **coordinator-edited roster** (a sybil member added, an
        identity key swapped, a member dropped, the coordinator key changed:
        the signature no longer verifies) and a **roster from another
        authority** (one the coordinator signed itself).

        Raises
        ------
        IntegrityError
            The roster names another authority, or the Ed25519 signature
            (RFC 8032 §5.1.7) does not verify over :meth:`signed_bytes`.
        """
        if authority_key != self.authority_key:
            raise IntegrityError(
                f"roster is signed by authority {key_fingerprint(self.authority_key)}, "
                f"not by the pinned authority {key_fingerprint(authority_key)}"
            )
        try:
            Ed25519PublicKey.from_public_bytes(authority_key).verify(
                self.signature, self.signed_bytes()
            )
        except (InvalidSignature, ValueError):
            raise IntegrityError(
                f"roster signature does not verify under authority {key_fingerprint(authority_key)}"
            ) from None

    def to_json(self) -> str:
        """The file form: JSON, keys as lowercase hex, members sorted by name."""
        doc = {
            "format": FORMAT,
            "v": FORMAT_VERSION,
            **_body(self.federation, self.version, self.coordinator_key, self.members),
            "authority_key": self.authority_key.hex(),
            "signature": self.signature.hex(),
        }
        return json.dumps(doc, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Roster:
        """Parse :meth:`to_json` output (strictly); the signature is NOT checked here.

        Raises
        ------
        ConfigurationError
            Malformed JSON, unknown/duplicate/missing keys, wrong types or
            sizes, a draft, duplicate members.
        """
        doc = _parse_document(text)
        if doc.get("format") == DRAFT_FORMAT:
            raise ConfigurationError("this is an unsigned roster draft; sign it first")
        _expect_keys(doc, _SIGNED_KEYS)
        if doc["format"] != FORMAT or doc["v"] != FORMAT_VERSION:
            raise ConfigurationError(
                f"not a fedseal roster (format {doc['format']!r}, v {doc['v']!r})"
            )
        federation, version, coordinator, members = _read_body(doc)
        return cls(
            federation,
            version,
            coordinator,
            members,
            _hex(doc["authority_key"], "authority_key", KEY_BYTES),
            _hex(doc["signature"], "signature", SIGNATURE_BYTES),
        )

    def summary(self) -> str:
        """One line: federation, version, members and digest."""
        return (
            f"roster of federation {self.federation!r}, version {self.version}, "
            f"{len(self.members)} members, sha256 {self.digest().hex()}"
        )


def _signed_bytes(
    federation: str,
    version: int,
    coordinator_key: bytes | None,
    members: tuple[RosterMember, ...],
    authority_key: bytes,
) -> bytes:
    parts = [
        DOMAIN,
        _field(federation.encode("utf-8")),
        struct.pack(">Q", version),
        _optional(coordinator_key),
        _field(authority_key),
        struct.pack(">I", len(members)),
    ]
    for m in members:
        parts.append(_field(m.name.encode("utf-8")))
        parts.append(_field(m.identity_key))
        parts.append(_optional(None if m.node_auth_key is None else m.node_auth_key.encode()))
    return b"".join(parts)


def sign_roster(
    *,
    federation: str,
    version: int,
    coordinator_key: bytes | None,
    members: Iterable[RosterMember],
    authority: Ed25519PrivateKey,
) -> Roster:
    """Sign a roster with the authority's Ed25519 key.

    Parameters
    ----------
    federation : str
        The federation's name.
    version : int
        The roster's version (>= 1); a new roster for the same federation
        must have a higher one, or sites that installed the old one refuse it.
    coordinator_key : bytes or None
        The coordinator's raw 32-byte audit/instruction-signing public key.
    members : iterable of RosterMember
        The sites (any order; stored sorted by name).
    authority : Ed25519PrivateKey
        The roster authority's key.

    Raises
    ------
    ConfigurationError
        A bad name, version or key, or duplicate members.
    """
    _check_header(federation, version, coordinator_key)
    if version < 1:
        raise ConfigurationError("a signed roster's version is at least 1")
    ordered = _check_members(members)
    authority_key = authority.public_key().public_bytes_raw()
    signature = authority.sign(
        _signed_bytes(federation, version, coordinator_key, ordered, authority_key)
    )
    return Roster(federation, version, coordinator_key, ordered, authority_key, signature)


@dataclass(frozen=True, slots=True)
class RosterDraft:
    """An unsigned roster being edited (``fedseal-server roster add``); sites never accept one.

    ``version`` is the version of the last signed roster it was made from (0:
    never signed); signing it gives version ``version + 1``.
    """

    federation: str
    version: int = 0
    coordinator_key: bytes | None = None
    members: tuple[RosterMember, ...] = ()

    def __post_init__(self) -> None:
        _check_header(self.federation, self.version, self.coordinator_key)
        object.__setattr__(self, "members", _check_members(self.members))

    @classmethod
    def of(cls, roster: Roster) -> RosterDraft:
        """A draft to edit, starting from a signed roster."""
        return cls(roster.federation, roster.version, roster.coordinator_key, roster.members)

    def with_member(self, member: RosterMember) -> RosterDraft:
        """This draft with ``member`` added (ConfigurationError on any duplicate)."""
        return RosterDraft(
            self.federation, self.version, self.coordinator_key, (*self.members, member)
        )

    def without_member(self, name: str) -> RosterDraft:
        """This draft without the member called ``name`` (ConfigurationError if absent)."""
        kept = tuple(m for m in self.members if m.name != name)
        if len(kept) == len(self.members):
            raise ConfigurationError(f"no member named {name!r}")
        return RosterDraft(self.federation, self.version, self.coordinator_key, kept)

    def sign(self, authority: Ed25519PrivateKey, *, coordinator_key: bytes | None = None) -> Roster:
        """The signed roster, version ``version + 1`` (``coordinator_key`` replaces the draft's)."""
        return sign_roster(
            federation=self.federation,
            version=self.version + 1,
            coordinator_key=coordinator_key
            if coordinator_key is not None
            else self.coordinator_key,
            members=self.members,
            authority=authority,
        )

    def to_json(self) -> str:
        doc = {
            "format": DRAFT_FORMAT,
            "v": FORMAT_VERSION,
            **_body(self.federation, self.version, self.coordinator_key, self.members),
        }
        return json.dumps(doc, indent=2, sort_keys=True) + "\n"


# ---------------------------------------------------------------------- file form

_BODY_KEYS = frozenset({"format", "v", "federation", "version", "coordinator_key", "members"})
_SIGNED_KEYS = _BODY_KEYS | {"authority_key", "signature"}
_MEMBER_KEYS = frozenset({"name", "identity_key", "node_auth_key"})


def _body(
    federation: str, version: int, coordinator_key: bytes | None, members: tuple[RosterMember, ...]
) -> dict[str, Any]:
    return {
        "federation": federation,
        "version": version,
        "coordinator_key": None if coordinator_key is None else coordinator_key.hex(),
        "members": [
            {"name": m.name, "identity_key": m.identity_key.hex(), "node_auth_key": m.node_auth_key}
            for m in members
        ],
    }


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ConfigurationError(f"duplicate JSON key {key!r}")
        out[key] = value
    return out


def _parse_document(text: str) -> dict[str, Any]:
    try:
        doc = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as exc:
        raise ConfigurationError(f"not valid JSON ({exc.msg}, line {exc.lineno})") from None
    except RecursionError:
        raise ConfigurationError("not valid JSON (nested too deeply)") from None
    if not isinstance(doc, dict):
        raise ConfigurationError("a roster is a JSON object")
    return doc


def _expect_keys(doc: Mapping[str, Any], allowed: frozenset[str], where: str = "roster") -> None:
    if unknown := sorted(set(doc) - allowed):
        raise ConfigurationError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}")
    if missing := sorted(allowed - set(doc)):
        raise ConfigurationError(f"{where}: missing key(s) {', '.join(map(repr, missing))}")


def _hex(value: object, what: str, size: int) -> bytes:
    if not isinstance(value, str) or len(value) != 2 * size or not _HEX.fullmatch(value):
        raise ConfigurationError(f"{what} must be {2 * size} lowercase hex digits ({size} bytes)")
    return bytes.fromhex(value)


def _read_body(
    doc: Mapping[str, Any],
) -> tuple[str, int, bytes | None, tuple[RosterMember, ...]]:
    federation, version = doc["federation"], doc["version"]
    if isinstance(version, bool) or not isinstance(version, int):
        raise ConfigurationError(f"version must be an integer, got {version!r}")
    raw_coordinator = doc["coordinator_key"]
    coordinator = (
        None if raw_coordinator is None else _hex(raw_coordinator, "coordinator_key", KEY_BYTES)
    )
    raw_members = doc["members"]
    if not isinstance(raw_members, list):
        raise ConfigurationError("members must be a list")
    members = []
    for i, item in enumerate(raw_members):
        if not isinstance(item, dict):
            raise ConfigurationError(f"members[{i}] must be an object")
        _expect_keys(item, _MEMBER_KEYS, f"members[{i}]")
        auth = item["node_auth_key"]
        members.append(
            RosterMember(
                item["name"],
                _hex(item["identity_key"], f"members[{i}].identity_key", KEY_BYTES),
                auth,
            )
        )
    return federation, version, coordinator, tuple(members)


def _read_text(path: Path) -> str:
    try:
        with Path(path).open("rb") as fh:
            data = fh.read(MAX_ROSTER_BYTES + 1)
    except OSError as exc:
        raise ConfigurationError(f"cannot read roster {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_ROSTER_BYTES:
        raise ConfigurationError(f"roster {path} is larger than {MAX_ROSTER_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigurationError(f"roster {path} is not UTF-8 text") from None


def parse_roster(
    text: str, *, authority_key: bytes | None, digest: bytes | None = None, label: str = "roster"
) -> Roster:
    """Parse a roster and verify it under a pin (see :func:`load_roster`); ``label`` names it."""
    try:
        roster = Roster.from_json(text)
    except ConfigurationError as exc:
        raise ConfigurationError(f"{label}: {exc}") from None
    try:
        if digest is not None and roster.digest() != digest:
            raise IntegrityError(
                f"roster sha256 {roster.digest().hex()[:16]}... is not the pinned digest "
                f"{digest.hex()[:16]}..."
            )
        roster.verify(authority_key if authority_key is not None else roster.authority_key)
    except IntegrityError as exc:
        raise IntegrityError(f"{label}: {exc}") from None
    return roster


def load_roster(path: Path, *, authority_key: bytes | None, digest: bytes | None = None) -> Roster:
    """Read and verify a roster file.

    Parameters
    ----------
    path : Path
        The roster file (:meth:`Roster.to_json`), at most 16 MiB.
    authority_key : bytes or None
        The pinned roster authority (32 raw bytes): the roster must name it
        and carry its valid signature. ``None`` checks the signature under
        the authority the roster itself names: that proves only that the
        file is intact and self-consistent, which is all a coordinator needs
        (sites always pin, ``client.site_roster``).
    digest : bytes or None
        A pinned SHA-256 of :meth:`Roster.signed_bytes`: the roster must be
        exactly that one (its signature is checked too).

    Raises
    ------
    ConfigurationError
        The file is unreadable, too large, not UTF-8, malformed JSON, a draft,
        or holds duplicate names, identity keys or node-auth keys, or keys of
        the wrong size; the message names the file.
    IntegrityError
        The roster names another authority, its signature does not verify, or
        its digest is not the pinned one; the message names the file.
    """
    return parse_roster(
        _read_text(path), authority_key=authority_key, digest=digest, label=f"roster {path}"
    )


def load_roster_draft(path: Path) -> RosterDraft:
    """Read a draft, or a signed roster as a draft to edit (its signature is dropped, not checked).

    Raises
    ------
    ConfigurationError
        As :func:`load_roster`, naming the file.
    """
    text = _read_text(path)
    try:
        doc = _parse_document(text)
        if doc.get("format") != DRAFT_FORMAT:
            return RosterDraft.of(Roster.from_json(text))
        _expect_keys(doc, _BODY_KEYS)
        if doc["v"] != FORMAT_VERSION:
            raise ConfigurationError(f"unsupported draft format v {doc['v']!r}")
        return RosterDraft(*_read_body(doc))
    except ConfigurationError as exc:
        raise ConfigurationError(f"roster {path}: {exc}") from None
