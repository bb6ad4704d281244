"""Signed heads over the audit chain, and verification of a whole sealed history.

Guarantee
---------
A :class:`SignedHead` binds ``(record_id, seq, head_hash, time)`` under the
server's Ed25519 key. Because ``head_hash`` commits to every earlier event
(:mod:`common.audit.chain`), a valid signed head proves that the holder of the
private key vouched for the *entire* history up to ``seq`` at ``time``. Against
whom: anyone who can edit the central database but does not hold the server's
signing key (an insider with DB access, a backup restored from elsewhere, a
compromised replica). Sites keep the signed heads they receive; a history that
no longer contains a head they hold is detectably rewritten
(:mod:`common.audit.witness`).

Verification (:func:`verify_chain`) walks the chain
(:func:`common.audit.chain.find_chain_break`) and checks every seal against
it, naming the lowest bad seq; besides the chain's own findings:

* **bad seal**: a seal's Ed25519 signature does not verify under the trusted
  key, it is for another record, or it names a ``(seq, head_hash)`` that the
  chain no longer holds (the event at that seq was changed);
* **truncated tail**: a seal names a seq beyond the last event. Every seal
  records ``(seq, head_hash)``; the chain is *complete* only if the newest
  seal covers the last event. Removing sealed events from the end therefore
  leaves a seal pointing past the head, and is named by the first missing seq;
* **unsealed tail**: events after the newest seal. A closed record (the server
  seals at every round end and when a run ends) has none; appending forged
  events at the end (with correct hashes, which needs no key) is caught here.

Key rotation: the key that may seal changes only through the record itself.
A ``key_rotated`` event (:data:`KEY_ROTATED`, payload
:func:`rotation_payload`) names the new public key and must be sealed, at its
own seq, by the key in force before it; from that seq on only the new key
seals. :func:`key_schedule` follows these rotations from the verifier's
trusted key, so a verifier holding only the original key accepts every
properly rotated successor, and rejects:

* **unknown key**: a seal whose signature verifies under no key in force at
  its seq (a key planted by whoever can write the database, with no rotation
  introducing it, or a new key backdating seals before its rotation);
* **unsealed rotation**: a ``key_rotated`` event not sealed by the retiring
  key (an attacker appending a rotation to a key of their own: the event is
  easy to forge, the retiring key's signature over it is not).

What verification against the record alone cannot catch: an attacker with
write access to the database who deletes the newest events *together with*
the seals that cover them, cutting exactly at a remaining seal. The chain
that is left is then a consistent, sealed prefix. That is why sites keep the
signed heads they received (:mod:`common.audit.witness`): a site's newer head
names a seq and hash the truncated history no longer contains
(:func:`common.audit.witness.verify_with_witnesses`; a cut after the newest
head any site holds stays invisible, hence the final head goes to every site).
Nor can a trusted key be replaced by one the verifier reads from the record:
the trust anchor comes from outside it.

Assumptions: Ed25519 is existentially unforgeable (RFC 8032); the verifier
has the genuine public key (out of band, ``--public-key``); the server does
not sign two conflicting heads (it would be caught by any two sites
comparing heads).

Message layout (version 1): the ASCII domain label ``fedseal/audit-head/v1``,
a zero byte, then the canonical JSON of ``{"v": 1, "record_id", "seq",
"head_hash", "time"}``. The label keeps these signatures from being replayed
as any other fedseal signature.

References
----------
RFC 8032 (Edwards-Curve Digital Signature Algorithm), Section 5.1.
Laurie, Langley, Kasper, RFC 6962 (Certificate Transparency): signed tree
heads witnessed by third parties.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.audit.chain import (
    MAX_FIELD_CHARS,
    AuditEvent,
    canonical_json,
    find_chain_break,
    is_hex_digest,
)
from common.errors import ConfigurationError, DataError, IntegrityError

__all__ = [
    "HEAD_DOMAIN",
    "HEAD_VERSION",
    "KEY_ROTATED",
    "MAX_ENCODED_HEAD_BYTES",
    "KeyEpoch",
    "KeySchedule",
    "SignedHead",
    "VerifyReport",
    "key_schedule",
    "load_public_key_pem",
    "public_key_hex",
    "public_key_from_hex",
    "rotation_payload",
    "sign_head",
    "verify_chain",
]

HEAD_VERSION = 1
HEAD_DOMAIN = b"fedseal/audit-head/v1\x00"
SIGNATURE_BYTES = 64
MAX_ENCODED_HEAD_BYTES = 1024
"""Upper bound on :meth:`SignedHead.encode` output; :meth:`SignedHead.decode` refuses more."""


def _validate(record_id: object, seq: object, head_hash: object, time: object) -> None:
    if not isinstance(record_id, str) or not record_id or len(record_id) > MAX_FIELD_CHARS:
        raise DataError("signed head: record_id must be a non-empty string of <= 256 characters")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
        raise DataError("signed head: seq must be a positive int")
    if not is_hex_digest(head_hash):
        raise DataError("signed head: head_hash must be 64 lowercase hex characters")
    if not isinstance(time, str) or not time or len(time) > MAX_FIELD_CHARS:
        raise DataError("signed head: time must be a non-empty string")


@dataclass(frozen=True, slots=True)
class SignedHead:
    """The server's signature over the chain head ``(record_id, seq, head_hash, time)``."""

    record_id: str
    seq: int
    head_hash: str
    time: str
    signature: bytes

    def __post_init__(self) -> None:
        _validate(self.record_id, self.seq, self.head_hash, self.time)
        if not isinstance(self.signature, bytes) or len(self.signature) != SIGNATURE_BYTES:
            raise DataError("signed head: signature must be 64 bytes")

    def message(self) -> bytes:
        """The exact bytes that are signed."""
        return _message(self.record_id, self.seq, self.head_hash, self.time)

    def verify(self, public_key: Ed25519PublicKey) -> None:
        """Check the signature.

        Raises
        ------
        IntegrityError
            If the signature does not verify under ``public_key``.
        """
        try:
            public_key.verify(self.signature, self.message())
        except InvalidSignature:
            raise IntegrityError("signed head: signature does not verify") from None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (signature in hex)."""
        return {
            "v": HEAD_VERSION,
            "record_id": self.record_id,
            "seq": self.seq,
            "head_hash": self.head_hash,
            "time": self.time,
            "signature": self.signature.hex(),
        }

    def encode(self) -> bytes:
        """Versioned canonical-JSON bytes, at most :data:`MAX_ENCODED_HEAD_BYTES`."""
        return canonical_json(self.to_dict())

    @classmethod
    def from_dict(cls, data: object) -> SignedHead:
        """Validate a dict as produced by :meth:`to_dict` (raises :class:`DataError`)."""
        if not isinstance(data, dict):
            raise DataError("signed head: expected a JSON object")
        expected = {"v", "record_id", "seq", "head_hash", "time", "signature"}
        if set(data) != expected:
            raise DataError(f"signed head: fields must be exactly {sorted(expected)}")
        version = data["v"]
        if isinstance(version, bool) or version != HEAD_VERSION:
            raise DataError(f"signed head: unsupported version {version!r}")
        signature = data["signature"]
        if not isinstance(signature, str) or len(signature) != 2 * SIGNATURE_BYTES:
            raise DataError("signed head: signature must be 128 hex characters")
        try:
            raw = bytes.fromhex(signature)
        except ValueError:
            raise DataError("signed head: signature is not hex") from None
        return cls(
            record_id=data["record_id"],
            seq=data["seq"],
            head_hash=data["head_hash"],
            time=data["time"],
            signature=raw,
        )

    @classmethod
    def decode(cls, data: bytes) -> SignedHead:
        """Parse :meth:`encode` output, checking size, version and every field.

        Raises
        ------
        DataError
            If ``data`` is too long, not UTF-8 JSON, or any field is invalid.
        """
        if not isinstance(data, bytes):
            raise DataError("signed head: expected bytes")
        if len(data) > MAX_ENCODED_HEAD_BYTES:
            raise DataError(f"signed head: {len(data)} bytes exceeds {MAX_ENCODED_HEAD_BYTES}")
        try:
            value = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise DataError("signed head: not UTF-8 JSON") from None
        return cls.from_dict(value)


def _message(record_id: str, seq: int, head_hash: str, time: str) -> bytes:
    body = {
        "v": HEAD_VERSION,
        "record_id": record_id,
        "seq": seq,
        "head_hash": head_hash,
        "time": time,
    }
    return HEAD_DOMAIN + canonical_json(body)


def sign_head(
    private_key: Ed25519PrivateKey, record_id: str, seq: int, head_hash: str, time: str
) -> SignedHead:
    """Sign the head ``(record_id, seq, head_hash, time)`` with the server's Ed25519 key.

    Raises
    ------
    DataError
        If any field is invalid (see :class:`SignedHead`).
    """
    _validate(record_id, seq, head_hash, time)
    signature = private_key.sign(_message(record_id, seq, head_hash, time))
    return SignedHead(record_id, seq, head_hash, time, signature)


def public_key_hex(public_key: Ed25519PublicKey) -> str:
    """The raw 32-byte public key in hex."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return raw.hex()


def public_key_from_hex(text: str) -> Ed25519PublicKey:
    """Parse a raw 32-byte Ed25519 public key given in hex (raises :class:`DataError`)."""
    try:
        raw = bytes.fromhex(text)
    except (TypeError, ValueError):
        raise DataError("public key is not hex") from None
    if len(raw) != 32:
        raise DataError("an Ed25519 public key is 32 bytes")
    return Ed25519PublicKey.from_public_bytes(raw)


def load_public_key_pem(data: bytes) -> Ed25519PublicKey:
    """Parse a PEM SubjectPublicKeyInfo holding an Ed25519 key.

    Raises
    ------
    ConfigurationError
        If the data is not PEM or the key is not Ed25519.
    """
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        raise ConfigurationError("not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigurationError("the public key is not an Ed25519 key")
    return key


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """Outcome of :func:`verify_chain`.

    ``first_bad_seq`` is the lowest seq at which something is wrong (``None``
    when ``ok``); ``problem`` says what, in one line.
    """

    ok: bool
    n_events: int
    n_seals: int
    first_bad_seq: int | None = None
    problem: str | None = None

    def summary(self) -> str:
        """``OK: N events, M seals`` or ``FAILED at seq S: <problem>``."""
        if self.ok:
            return f"OK: {self.n_events} events, {self.n_seals} seals"
        return f"FAILED at seq {self.first_bad_seq}: {self.problem}"


KEY_ROTATED = "key_rotated"
"""Kind of the audit event that hands sealing over to a new key (see :func:`key_schedule`)."""


def rotation_payload(previous: Ed25519PublicKey, new: Ed25519PublicKey) -> dict[str, str]:
    """The payload of a ``key_rotated`` event: the retiring and the new public key (hex)."""
    return {"previous_key": public_key_hex(previous), "public_key": public_key_hex(new)}


@dataclass(frozen=True, slots=True)
class KeyEpoch:
    """One signing key and the seqs its seals may name: ``first_seq <= seq <= last_seq``.

    ``last_seq`` is ``None`` for the key still in force. At a rotation's seq
    both the retiring and the new key may seal (the retiring key seals the
    rotation itself, the new key its first head).
    """

    public_key: Ed25519PublicKey
    key_hex: str
    first_seq: int
    last_seq: int | None = None

    def covers(self, seq: int) -> bool:
        """Whether a seal naming ``seq`` may be made with this key."""
        return self.first_seq <= seq and (self.last_seq is None or seq <= self.last_seq)


@dataclass(frozen=True, slots=True)
class KeySchedule:
    """The keys in force along a history, from a trusted key through its sealed rotations.

    ``problem`` is the first rotation that was refused (its seq and why);
    rotations after it are not followed, so later seals by the keys they
    name are refused too.
    """

    epochs: tuple[KeyEpoch, ...]
    problem: tuple[int, str] | None = None

    def keys_at(self, seq: int) -> list[Ed25519PublicKey]:
        """The keys a seal naming ``seq`` may be signed with."""
        return [e.public_key for e in self.epochs if e.covers(seq)]

    def accepts(self, head: SignedHead) -> bool:
        """Whether ``head`` is signed by a key in force at its seq."""
        for key in self.keys_at(head.seq):
            try:
                head.verify(key)
            except IntegrityError:
                continue
            return True
        return False

    @property
    def current(self) -> KeyEpoch:
        """The key in force after the last accepted rotation."""
        return self.epochs[-1]


def _rotation_keys(event: AuditEvent) -> tuple[str, Ed25519PublicKey, str]:
    """``(previous hex, new key, new hex)`` of a ``key_rotated`` event (raises :class:`DataError`)."""
    payload = event.payload()
    previous, new = payload.get("previous_key"), payload.get("public_key")
    if set(payload) != {"previous_key", "public_key"}:
        raise DataError("fields must be exactly previous_key and public_key")
    if not isinstance(previous, str) or not isinstance(new, str):
        raise DataError("keys must be hex strings")
    return previous, public_key_from_hex(new), new


def key_schedule(
    events: Sequence[AuditEvent],
    seals: Sequence[SignedHead],
    trusted_key: Ed25519PublicKey,
    record_id: str | None = None,
) -> KeySchedule:
    """Follow the history's key rotations from ``trusted_key``.

    Defends against a **planted signing key**: whoever can write the
    database can add seals under a key of their own, and can append a
    ``key_rotated`` event naming it, but cannot make the key in force sign
    that event. A rotation is therefore accepted only if a seal at the
    event's own seq, for this record and over the event's hash, verifies
    under the key in force before it, and the event names that key as the
    previous one. The first refused rotation ends the schedule.

    Parameters
    ----------
    events
        The history in seq order.
    seals
        Signed heads that may seal rotations (the record's seals, and any
        witnessed heads).
    trusted_key
        The key the verifier trusts for the start of the history.
    record_id
        If given, only seals for this record count.
    """
    epochs = [KeyEpoch(trusted_key, public_key_hex(trusted_key), 1)]
    by_seq: dict[int, list[SignedHead]] = {}
    for seal in seals:
        if record_id is None or seal.record_id == record_id:
            by_seq.setdefault(seal.seq, []).append(seal)
    for event in events:
        if event.kind != KEY_ROTATED:
            continue
        current = epochs[-1]
        at = f"key rotation at seq {event.seq}"
        try:
            previous_hex, new_key, new_hex = _rotation_keys(event)
        except DataError as exc:
            return KeySchedule(tuple(epochs), (event.seq, f"{at} is malformed: {exc}"))
        if previous_hex != current.key_hex:
            return KeySchedule(
                tuple(epochs),
                (
                    event.seq,
                    f"{at} claims to retire key {previous_hex[:16]}..., "
                    f"but the key in force is {current.key_hex[:16]}...",
                ),
            )
        if new_hex == current.key_hex:
            return KeySchedule(tuple(epochs), (event.seq, f"{at} names the key already in force"))
        signed = [s for s in by_seq.get(event.seq, []) if s.head_hash == event.hash]
        retiring = KeySchedule((current,))
        if not any(retiring.accepts(s) for s in signed):
            return KeySchedule(
                tuple(epochs),
                (
                    event.seq,
                    f"{at} is not sealed by the key in force before it "
                    "(a rotation counts only when the retiring key signs it)",
                ),
            )
        epochs[-1] = KeyEpoch(current.public_key, current.key_hex, current.first_seq, event.seq)
        epochs.append(KeyEpoch(new_key, new_hex, event.seq))
    return KeySchedule(tuple(epochs))


def _check_seals(
    events: Sequence[AuditEvent],
    seals: Sequence[SignedHead],
    schedule: KeySchedule | None,
    record_id: str | None,
) -> tuple[int, str] | None:
    """Check every seal; the problem with the lowest seq, or ``None``."""
    found: list[tuple[int, str]] = []
    if schedule is not None and schedule.problem is not None:
        found.append(schedule.problem)
    by_seq = {event.seq: event for event in events}
    last_seq = events[-1].seq if events else 0
    previous = 0
    for number, seal in enumerate(seals, start=1):
        if record_id is not None and seal.record_id != record_id:
            found.append((seal.seq, f"bad seal #{number}: it is for record {seal.record_id!r}"))
            continue
        if schedule is not None and not schedule.accepts(seal):
            found.append(
                (
                    seal.seq,
                    f"bad seal #{number}: signature does not verify under the key in force "
                    f"at seq {seal.seq} (the trusted key, or one a sealed key rotation introduced)",
                )
            )
            continue
        if seal.seq < previous:
            found.append((seal.seq, f"bad seal #{number}: seals are out of order"))
            continue
        previous = seal.seq
        if seal.seq > last_seq:
            found.append(
                (
                    last_seq + 1,
                    f"truncated tail: seal #{number} covers seq {seal.seq} but the last "
                    f"event is {last_seq}",
                )
            )
            continue
        sealed = by_seq.get(seal.seq)
        if sealed is None or sealed.hash != seal.head_hash:
            found.append(
                (
                    max(seal.seq, 1),
                    f"bad seal #{number}: the sealed head hash no longer matches event {seal.seq}",
                )
            )
    newest = max((seal.seq for seal in seals), default=0)
    if last_seq > newest:
        found.append(
            (
                newest + 1,
                f"unsealed tail: events {newest + 1}..{last_seq} come after the last seal",
            )
        )
    return min(found, key=lambda item: item[0]) if found else None


def verify_chain(
    events: Sequence[AuditEvent],
    seals: Sequence[SignedHead],
    public_key: Ed25519PublicKey | None,
    record_id: str | None = None,
) -> VerifyReport:
    """Recompute the whole chain and check every seal.

    Parameters
    ----------
    events
        The events in storage order (by seq), first seq 1.
    seals
        The signed heads in the order they were made.
    public_key
        The Ed25519 key the verifier trusts for the start of the history; seals
        may also be made by keys that sealed ``key_rotated`` events introduced
        (:func:`key_schedule`). ``None`` skips signature checks (seal positions
        and hashes are still checked).
    record_id
        If given, every seal must be for this record.

    Returns
    -------
    VerifyReport
        ``ok`` only if the chain is intact, every seal is good, and the newest
        seal covers the last event. Otherwise the lowest bad seq and what is
        wrong there (on a tie, the chain problem is named before the seal one).
    """
    problems = [
        p
        for p in (
            find_chain_break(events),
            _check_seals(
                events,
                seals,
                key_schedule(events, seals, public_key, record_id)
                if public_key is not None
                else None,
                record_id,
            ),
        )
        if p is not None
    ]
    if not problems:
        return VerifyReport(ok=True, n_events=len(events), n_seals=len(seals))
    seq, problem = min(problems, key=lambda item: item[0])
    return VerifyReport(
        ok=False, n_events=len(events), n_seals=len(seals), first_bad_seq=seq, problem=problem
    )
