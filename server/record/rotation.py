"""The audit-signing key in force: loading it for a record, and rotating it (audited).

:func:`signing_key_for` is how every writer gets its key: loaded, never
created, and only if it is the key the record has in force.

:func:`rotate_signing_key` is the only way fedseal changes the key that seals
a record. In order:

1. the next key pair is written beside the current one as ``audit.key.next``
   / ``audit.pub.next`` (private key 0600 from the first byte);
2. the record appends a ``key_rotated`` event naming the new public key and
   seals it with the **retiring** key, in one transaction
   (:meth:`~server.record.audit_log.AuditLog.rotate_key`);
3. the retiring pair is archived as ``audit.key.<n>`` / ``audit.pub.<n>``
   and the staged pair becomes ``audit.key`` / ``audit.pub``;
4. the new key seals the head, its first seal.

Verifiers keep the key they already trust (the original ``audit.pub``, now
``audit.pub.1``): :func:`common.audit.seal.key_schedule` follows the rotation
from it, and refuses seals by any key that no sealed rotation introduced.

Interrupted rotations are finished, never forked: run the command again. A
staged key the record already names is promoted (steps 3-4); a staged key
the record never named is discarded and the rotation starts over. Nothing in
``directory`` is written or removed unless its key is the record's key in
force (or its staged key is): another record's key directory, perhaps with
its own interrupted rotation staged, is refused as found.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.audit.seal import public_key_hex
from common.errors import ConfigurationError, RecordError
from server.record.keys import (
    PRIVATE_KEY_FILE,
    KeyPaths,
    load_private_key,
    load_signing_key,
    write_keypair,
)
from server.record.protocol import Record

__all__ = ["Rotation", "rotate_signing_key", "signing_key_for"]

_ARCHIVED = re.compile(re.escape(PRIVATE_KEY_FILE) + r"\.(\d+)")


@dataclass(frozen=True, slots=True)
class Rotation:
    """What a rotation did: the event's seq, the new key, where the retired pair went."""

    seq: int
    new_key_hex: str
    archived: KeyPaths | None  # None when an interrupted rotation had already archived it
    completed_earlier_attempt: bool = False


def signing_key_for(record: Record, key_dir: Path) -> Ed25519PrivateKey:
    """The audit-signing key in ``key_dir``, checked against the key the record has in force.

    Defends against **sealing with the wrong key**: a key that is missing is
    an error (:func:`server.record.load_signing_key`, never re-created), and a
    key other than the one the record's history puts in force (the first
    seal's key, followed through its ``key_rotated`` events) is refused
    before anything is written: its seals would be refused by every
    verifier. A changed key must be introduced with ``fedseal-server audit
    rotate-key``.

    Raises
    ------
    ConfigurationError
        One line: the missing or refused key and what to do.
    """
    key = load_signing_key(key_dir)
    schedule = record.stored_key_schedule()
    if schedule is None:
        return key
    if schedule.problem is not None:
        seq, problem = schedule.problem
        raise ConfigurationError(
            f"the record's key history is broken at seq {seq} ({problem}); "
            "run `fedseal-server audit verify` before writing to it"
        )
    mine = public_key_hex(key.public_key())
    if mine != schedule.current.key_hex:
        raise ConfigurationError(
            f"the signing key in {key_dir} ({mine[:16]}...) is not the record's key in force "
            f"({schedule.current.key_hex[:16]}...); a new key must be introduced with "
            "`fedseal-server audit rotate-key`, and an interrupted rotation finished by running it again"
        )
    return key


def _next_archive(directory: Path) -> KeyPaths:
    numbers = [int(m.group(1)) for p in directory.iterdir() if (m := _ARCHIVED.fullmatch(p.name))]
    return KeyPaths.archived(directory, max(numbers, default=0) + 1)


def _promote(directory: Path) -> KeyPaths | None:
    """Archive the current pair (if still there) and move the staged pair into its place."""
    current, staged = KeyPaths.in_dir(directory), KeyPaths.staged(directory)
    archived = None
    try:
        if current.private_key.exists():
            archived = _next_archive(directory)
            os.rename(current.private_key, archived.private_key)
            if current.public_key.exists():
                os.rename(current.public_key, archived.public_key)
        os.rename(staged.private_key, current.private_key)
        os.rename(staged.public_key, current.public_key)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot install the new key in {directory}: {exc.strerror}; "
            "run the rotation again to finish it"
        ) from None
    return archived


def rotate_signing_key(record: Record, directory: Path) -> Rotation:
    """Rotate the record's audit-signing key kept in ``directory`` (see the module docs).

    Defends the seals against a **silent key swap**: the new key is valid
    only because the old one signed its introduction into the audited
    history, so nobody who lacks the old key can introduce one.

    Raises
    ------
    ConfigurationError
        If ``directory`` has no signing key, or a key file cannot be written.
    RecordError
        If the record has no seal, its key history is broken, or the key in
        ``directory`` is not the key the record has in force.
    """
    directory = Path(directory)
    staged = KeyPaths.staged(directory)
    schedule = record.stored_key_schedule()
    if schedule is None:
        raise RecordError("the record has no seal yet: there is no key in force to rotate from")
    if staged.private_key.exists():
        pending = load_private_key(staged.private_key)
        if public_key_hex(pending.public_key()) == schedule.current.key_hex:
            # The record already names the staged key: finish installing it.
            archived = _promote(directory)
            head = record.seal(pending)
            return Rotation(head.seq, schedule.current.key_hex, archived, True)
    # Only a directory holding this record's key in force is touched: another record's
    # keys (and its staged key, perhaps of its own interrupted rotation) are left as found.
    retiring = load_signing_key(directory)
    if schedule.problem is not None:
        seq, problem = schedule.problem
        raise RecordError(f"the record's key history is broken at seq {seq}: {problem}")
    mine = public_key_hex(retiring.public_key())
    if mine != schedule.current.key_hex:
        raise RecordError(
            f"the key in {directory} ({mine[:16]}...) is not the record's key in force "
            f"({schedule.current.key_hex[:16]}...); nothing was rotated or written"
        )
    if staged.private_key.exists():
        # Never reached the record (an attempt stopped before step 2): discard it.
        staged.private_key.unlink()
        staged.public_key.unlink(missing_ok=True)
    new_key = Ed25519PrivateKey.generate()
    write_keypair(staged, new_key)
    # If this fails, the staged pair stays: whether or not the record committed the
    # rotation, running the command again resolves it (promote or discard, above).
    event, _ = record.rotate_key(retiring, new_key.public_key())
    archived = _promote(directory)
    record.seal(new_key)
    return Rotation(event.seq, public_key_hex(new_key.public_key()), archived)
