"""Signed instructions: the coordinator's Ed25519 signature over every message it sends.

Guarantee
---------
A site that pins the coordinator's audit-signing public key accepts an
instruction only if the holder of the matching private key signed exactly
this instruction, for this node, at a sequence number above every one the
site accepted before for the same run. Against whom: anyone between the
coordinator's signing code and the site who does not hold the key (the
SuperLink or its operator, a relay, a compromised transport, another
coordinator): they cannot

* forge an instruction or send one unsigned (the site refuses it);
* alter any byte of what a signed one carries: message type, round, the
  config record (run settings, run id, code hash, audit head, cohort size),
  the model arrays, the secure-aggregation payloads and config bundle (the
  cohort), or anything else in its records;
* redirect an instruction signed for one node to another, or move it to
  another run;
* replay an instruction the site has seen, or deliver an older one after a
  newer one (its sequence number is not above the last accepted).

What a signature does *not* stop: the key holder itself (a dishonest
coordinator signs whatever it likes; the site's own policy checks are the
defence there), withholding instructions (a liveness matter), and
instructions to a site that pins no key.

Signed message (version 1)
--------------------------
All integers big-endian; ``str16(s)`` is a 2-byte length then the UTF-8
bytes of ``s``::

    message = b"fedseal/instruction/v1\\0"      # domain separation, versioned
            || str16(message_type)              # Flower type, e.g. "train.secagg_masked"
            || str16(run_id)                    # fedseal run id (config record "run-id")
            || str16(group_id)                  # Flower group id: the round, in decimal
            || u64(dst_node_id)                 # the node it is addressed to
            || u64(seq)                         # per-run sequence number
            || key_id                           # 32 bytes: SHA-256 of the raw public key
            || content_digest                   # 32 bytes: SHA-256 over every record carried
    signature = Ed25519(private_key, message)   # RFC 8032 pure Ed25519, 64 bytes

``content_digest`` is defined with the Flower records in
:mod:`common.record_digest`. The domain label keeps these signatures from
being accepted as any other fedseal signature (audit heads sign under
``fedseal/audit-head/v1``), and a future layout gets a new label.

Sequence numbers
----------------
One counter per run (not per node): every instruction of the run takes the
next value, so each node sees a strictly increasing subsequence, and the
destination node id in the signed message keeps one node's instruction from
being accepted by another. The counter must also grow across coordinator
restarts (a resumed run keeps its run id), without the coordinator storing
it: :func:`next_sequence` takes ``max(previous + 1, epoch * 2**32)`` with
``epoch`` the seq of the coordinator's latest audit seal; a resumed run
appends an event and seals before it sends anything, so its epoch is above
every one the crashed process used (and a process sends far fewer than
``2**32`` instructions per seal).

Pure: no Flower, no I/O.

References
----------
RFC 8032 (Edwards-Curve Digital Signature Algorithm), Section 5.1.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.errors import DataError

__all__ = [
    "DIGEST_BYTES",
    "INSTRUCTION_DOMAIN",
    "INSTRUCTION_VERSION",
    "KEY_ID_BYTES",
    "MAX_SEQ",
    "SIGNATURE_BYTES",
    "InstructionHeader",
    "InstructionSignature",
    "InstructionSigner",
    "key_fingerprint",
    "next_sequence",
    "verify_instruction",
]

INSTRUCTION_VERSION = 1
INSTRUCTION_DOMAIN = b"fedseal/instruction/v1\x00"
KEY_ID_BYTES = 32
DIGEST_BYTES = 32
SIGNATURE_BYTES = 64
PUBLIC_KEY_BYTES = 32
MAX_SEQ = (1 << 63) - 1  # fits every integer type Flower's records carry
EPOCH_SHIFT = 32
MAX_TEXT_BYTES = {"message_type": 128, "run_id": 256, "group_id": 64}

# the signature record's fields (a Flower ConfigRecord, see common.record_digest)
FIELD_VERSION = "v"
FIELD_SEQ = "seq"
FIELD_KEY_ID = "key-id"
FIELD_SIGNATURE = "signature"
FIELDS = frozenset({FIELD_VERSION, FIELD_SEQ, FIELD_KEY_ID, FIELD_SIGNATURE})


def key_fingerprint(public_key: bytes) -> bytes:
    """SHA-256 of a raw 32-byte Ed25519 public key: how an instruction names its signer."""
    if not isinstance(public_key, bytes) or len(public_key) != PUBLIC_KEY_BYTES:
        raise DataError("an Ed25519 public key is 32 raw bytes")
    return hashlib.sha256(public_key).digest()


def _seq_ok(seq: object) -> bool:
    return isinstance(seq, int) and not isinstance(seq, bool) and 1 <= seq <= MAX_SEQ


def next_sequence(previous: int, epoch: int) -> int:
    """The next sequence number of a run: ``max(previous + 1, epoch * 2**32)``.

    ``previous`` is the last one this process used (0 before the first),
    ``epoch`` the seq of the coordinator's latest audit seal (0 when it has
    none). Strictly increasing within a process; above every number an
    earlier process of the same run used, see the module docstring.

    Raises
    ------
    DataError
        The sequence would leave the signed range (``1 .. 2**63 - 1``).
    """
    if isinstance(previous, bool) or not isinstance(previous, int) or previous < 0:
        raise DataError("previous sequence number must be an int >= 0")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise DataError("sequence epoch must be an int >= 0")
    seq = max(previous + 1, epoch << EPOCH_SHIFT)
    if seq > MAX_SEQ:
        raise DataError("instruction sequence number exhausted")
    return seq


def _str16(name: str, value: object) -> bytes:
    if not isinstance(value, str):
        raise DataError(f"instruction {name} must be a string")
    raw = value.encode("utf-8")
    if not raw or len(raw) > MAX_TEXT_BYTES[name]:
        raise DataError(f"instruction {name} must be 1 to {MAX_TEXT_BYTES[name]} UTF-8 bytes")
    return struct.pack(">H", len(raw)) + raw


@dataclass(frozen=True, slots=True)
class InstructionHeader:
    """What an instruction's signature binds besides its records (see the module docstring)."""

    message_type: str
    run_id: str
    group_id: str
    dst_node_id: int
    seq: int
    key_id: bytes

    def __post_init__(self) -> None:
        for name in ("message_type", "run_id", "group_id"):
            _str16(name, getattr(self, name))
        node = self.dst_node_id
        if isinstance(node, bool) or not isinstance(node, int) or not 0 <= node < 1 << 64:
            raise DataError("instruction dst_node_id must be an unsigned 64-bit int")
        if not _seq_ok(self.seq):
            raise DataError("instruction seq must be an int in 1 .. 2**63 - 1")
        if not isinstance(self.key_id, bytes) or len(self.key_id) != KEY_ID_BYTES:
            raise DataError("instruction key id must be 32 bytes")

    def message(self, content_digest: bytes) -> bytes:
        """The exact bytes that are signed, for records whose digest is ``content_digest``."""
        if not isinstance(content_digest, bytes) or len(content_digest) != DIGEST_BYTES:
            raise DataError("instruction content digest must be 32 bytes")
        return b"".join(
            (
                INSTRUCTION_DOMAIN,
                _str16("message_type", self.message_type),
                _str16("run_id", self.run_id),
                _str16("group_id", self.group_id),
                struct.pack(">QQ", self.dst_node_id, self.seq),
                self.key_id,
                content_digest,
            )
        )

    @classmethod
    def parse_message(cls, message: bytes) -> tuple[InstructionHeader, bytes]:
        """Split signed bytes back into (header, content digest), checking every length.

        Raises
        ------
        DataError
            Not an instruction message of this version, or any field malformed.
        """
        if not isinstance(message, bytes) or not message.startswith(INSTRUCTION_DOMAIN):
            raise DataError("not a fedseal/instruction/v1 message")
        pos = len(INSTRUCTION_DOMAIN)
        texts: list[str] = []
        for name in ("message_type", "run_id", "group_id"):
            if len(message) < pos + 2:
                raise DataError("instruction message is truncated")
            (length,) = struct.unpack_from(">H", message, pos)
            pos += 2
            if not 1 <= length <= MAX_TEXT_BYTES[name] or len(message) < pos + length:
                raise DataError(f"instruction {name} has a bad length")
            try:
                texts.append(message[pos : pos + length].decode("utf-8"))
            except UnicodeDecodeError:
                raise DataError(f"instruction {name} is not UTF-8") from None
            pos += length
        if len(message) != pos + 16 + KEY_ID_BYTES + DIGEST_BYTES:
            raise DataError("instruction message has a bad length")
        dst, seq = struct.unpack_from(">QQ", message, pos)
        pos += 16
        key_id = message[pos : pos + KEY_ID_BYTES]
        digest = message[pos + KEY_ID_BYTES :]
        return cls(texts[0], texts[1], texts[2], dst, seq, key_id), digest


@dataclass(frozen=True, slots=True)
class InstructionSignature:
    """What travels with a signed instruction: its sequence number, signer and signature."""

    seq: int
    key_id: bytes
    signature: bytes

    def __post_init__(self) -> None:
        if not _seq_ok(self.seq):
            raise DataError("instruction signature: seq must be an int in 1 .. 2**63 - 1")
        if not isinstance(self.key_id, bytes) or len(self.key_id) != KEY_ID_BYTES:
            raise DataError("instruction signature: key id must be 32 bytes")
        if not isinstance(self.signature, bytes) or len(self.signature) != SIGNATURE_BYTES:
            raise DataError("instruction signature: signature must be 64 bytes")

    def to_fields(self) -> dict[str, int | bytes]:
        """The record fields: ``v`` (1), ``seq``, ``key-id`` (32 bytes), ``signature`` (64)."""
        return {
            FIELD_VERSION: INSTRUCTION_VERSION,
            FIELD_SEQ: self.seq,
            FIELD_KEY_ID: self.key_id,
            FIELD_SIGNATURE: self.signature,
        }

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> InstructionSignature:
        """Validate received fields: exactly the four, each of its type and size.

        Raises
        ------
        DataError
            Missing or extra fields, another version, or a field of the wrong
            type or size (checked before anything is used).
        """
        if set(fields) != FIELDS:
            raise DataError(f"instruction signature: fields must be exactly {sorted(FIELDS)}")
        version = fields[FIELD_VERSION]
        if isinstance(version, bool) or version != INSTRUCTION_VERSION:
            raise DataError(f"instruction signature: unsupported version {version!r}")
        seq, key_id, signature = fields[FIELD_SEQ], fields[FIELD_KEY_ID], fields[FIELD_SIGNATURE]
        if isinstance(seq, bool) or not isinstance(seq, int):
            raise DataError("instruction signature: seq must be an int in 1 .. 2**63 - 1")
        if not isinstance(key_id, bytes) or not isinstance(signature, bytes):
            raise DataError("instruction signature: key id and signature must be bytes")
        return cls(seq, key_id, signature)


class InstructionSigner:
    """The coordinator's side: signs instruction messages with its Ed25519 audit key."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.public_key = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.key_id = key_fingerprint(self.public_key)

    def sign(self, header: InstructionHeader, content_digest: bytes) -> bytes:
        """The 64-byte signature over ``header.message(content_digest)``.

        Raises
        ------
        DataError
            ``header`` names another key than this signer's.
        """
        if header.key_id != self.key_id:
            raise DataError("instruction header names another signing key")
        return self._key.sign(header.message(content_digest))


def verify_instruction(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is the Ed25519 signature of ``message`` under ``public_key``.

    Stops forged, altered, redirected and re-signed-by-another-key
    instructions (whatever the message binds, see the module docstring).
    ``False`` for a wrong signature, a malformed key or a signature of the
    wrong size; never raises for bad input.
    """
    if not isinstance(public_key, bytes) or len(public_key) != PUBLIC_KEY_BYTES:
        return False
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
        return False
    if not isinstance(message, bytes):
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True
