"""Canonical digests of Flower records, and the signature record of a signed instruction.

An instruction's signature (:mod:`common.audit.instruction`) covers its
metadata and ``content_digest``: one SHA-256 over *every* record the
message carries but the signature record itself, so that nothing a site
reads from an instruction (config, model arrays, secure-aggregation
payloads and config bundle, anything added later) is outside it. A record
of a kind this module does not know makes the digest fail (fail closed).

Encoding (version 1; integers big-endian, ``u32``/``u64`` unsigned;
``bytes32(x)`` is ``u32(len(x)) || x``; names and keys sorted by their
UTF-8 bytes, so the transport's ordering does not matter)::

    content_digest = SHA-256(b"fedseal/instruction-content/v1\\0"
                             || u32(number of records)
                             || for each record name, sorted:
                                  kind || bytes32(utf8(name)) || record_digest)
    kind: b"A" ArrayRecord, b"C" ConfigRecord, b"M" MetricRecord
    record_digest(ConfigRecord or MetricRecord) =
        SHA-256(kind || u32(n) || for each key, sorted: bytes32(utf8(key)) || value(v))
    value(bool)  = b"?" || 0x00 or 0x01
    value(int)   = b"i" || 16-byte two's complement          (Flower: sint64 or uint64)
    value(float) = b"f" || 8-byte IEEE-754 binary64
    value(str)   = b"s" || bytes32(utf8(s))
    value(bytes) = b"y" || bytes32(b)
    value(list)  = b"l" || u32(n) || value(e) for each element (no nested lists)
    record_digest(ArrayRecord) =
        SHA-256(b"A" || u32(n) || for each array name, sorted:
                bytes32(utf8(name)) || bytes32(utf8(dtype)) || u32(ndim) || u64(dim)...
                || bytes32(utf8(stype)) || u64(len(data)) || data)

The array bytes are hashed from the record's own buffer (no copy), and a
caller signing many messages that share one record object (the model sent
to every site of a round) passes a ``cache`` so that it is hashed once.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import MutableMapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common.audit.instruction import InstructionSignature
from common.errors import DataError
from common.records import KEY_AUDIT_HEAD, KEY_CONFIG, KEY_INSTRUCTION_SIGNATURE

CONTENT_DOMAIN = b"fedseal/instruction-content/v1\x00"
REQUEST_DOMAIN = b"fedseal/release-request/v1\x00"
REQUEST_VOLATILE_CONFIG = (KEY_AUDIT_HEAD,)
"""Config-record keys an honest resend of the same request may change (see :func:`request_digest`)."""
_INT_BYTES = 16

# id(record) -> (record, kind + digest); holding the record keeps its id from being reused
DigestCache = MutableMapping[int, tuple[object, bytes]]


def _u32(n: int) -> bytes:
    return struct.pack(">I", n)


def _bytes32(data: bytes) -> bytes:
    if len(data) >= 1 << 32:
        raise DataError("record field too large to digest")
    return _u32(len(data)) + data


def _text(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise DataError(f"{what} must be a string")
    return _bytes32(value.encode("utf-8"))


def _scalar(value: object) -> bytes:
    if isinstance(value, bool):
        return b"?" + (b"\x01" if value else b"\x00")
    if isinstance(value, int):
        try:
            return b"i" + value.to_bytes(_INT_BYTES, "big", signed=True)
        except OverflowError:
            raise DataError("record integer out of range") from None
    if isinstance(value, float):
        return b"f" + struct.pack(">d", value)
    if isinstance(value, str):
        return b"s" + _bytes32(value.encode("utf-8"))
    if isinstance(value, bytes):
        return b"y" + _bytes32(value)
    raise DataError(f"record value of type {type(value).__name__} cannot be digested")


def _value(value: object) -> bytes:
    if isinstance(value, list):
        return b"l" + _u32(len(value)) + b"".join(_scalar(v) for v in value)
    return _scalar(value)


def _mapping_digest(kind: bytes, record: ConfigRecord | MetricRecord) -> bytes:
    h = hashlib.sha256(kind)
    items = sorted(record.items(), key=lambda kv: str(kv[0]).encode("utf-8"))
    h.update(_u32(len(items)))
    for key, value in items:
        h.update(_text(key, "record key"))
        h.update(_value(value))
    return h.digest()


def _array_digest(record: ArrayRecord) -> bytes:
    h = hashlib.sha256(b"A")
    names = sorted(record.keys(), key=lambda k: str(k).encode("utf-8"))
    h.update(_u32(len(names)))
    for name in names:
        arr = record[name]
        h.update(_text(name, "array name"))
        h.update(_text(arr.dtype, "array dtype"))
        shape = tuple(arr.shape)
        if not all(isinstance(d, int) and 0 <= d < 1 << 64 for d in shape):
            raise DataError("array shape must be unsigned integers")
        h.update(_u32(len(shape)) + b"".join(struct.pack(">Q", d) for d in shape))
        h.update(_text(arr.stype, "array stype"))
        data = arr.data
        if not isinstance(data, bytes | bytearray | memoryview):
            raise DataError("array data must be bytes")
        view = memoryview(data)
        h.update(struct.pack(">Q", view.nbytes))
        h.update(view)  # hashed in place: no copy of the model
    return h.digest()


class ReceivedDigests(dict[int, tuple[object, bytes]]):
    """A site's cache of the digests of the records it received (the model: megabytes).

    A site hashes one instruction's records up to three times (the signature
    check in the instruction mod, again when the handler reads it, and the
    release log's request digest); this keeps the last few. Sound because an
    entry holds the record object itself (its id cannot be reused while
    cached) and a site never modifies a record it received.
    """

    LIMIT = 16

    def __setitem__(self, key: int, value: tuple[object, bytes]) -> None:
        if len(self) >= self.LIMIT:
            self.clear()
        super().__setitem__(key, value)


RECEIVED = ReceivedDigests()
"""The process's :class:`ReceivedDigests` (site side only)."""


def record_digest(record: object, cache: DigestCache | None = None) -> tuple[bytes, bytes]:
    """``(kind, digest)`` of one Flower record (see the module docstring).

    Raises
    ------
    DataError
        A record kind or value type that has no canonical encoding.
    """
    if cache is not None and (hit := cache.get(id(record))) is not None and hit[0] is record:
        return hit[1][:1], hit[1][1:]
    if isinstance(record, ArrayRecord):
        kind, digest = b"A", _array_digest(record)
    elif isinstance(record, ConfigRecord):
        kind, digest = b"C", _mapping_digest(b"C", record)
    elif isinstance(record, MetricRecord):
        kind, digest = b"M", _mapping_digest(b"M", record)
    else:
        raise DataError(f"record of type {type(record).__name__} cannot be digested")
    if cache is not None:
        cache[id(record)] = (record, kind + digest)
    return kind, digest


def content_digest(content: RecordDict, cache: DigestCache | None = None) -> bytes:
    """SHA-256 over every record of ``content`` except the instruction signature record.

    Stops alteration of any record an instruction carries: config values,
    model arrays, secure-aggregation payloads and config bundle (the
    cohort), or a record added, removed or renamed.
    """
    entries: list[tuple[bytes, bytes, bytes]] = []
    for name, record in content.items():
        if name == KEY_INSTRUCTION_SIGNATURE:
            continue
        if not isinstance(name, str):
            raise DataError("record name must be a string")
        kind, digest = record_digest(record, cache)
        entries.append((name.encode("utf-8"), kind, digest))
    entries.sort(key=lambda e: e[0])
    h = hashlib.sha256(CONTENT_DOMAIN)
    h.update(_u32(len(entries)))
    for raw_name, kind, digest in entries:
        h.update(kind + _bytes32(raw_name) + digest)
    return h.digest()


def request_digest(
    message_type: str, content: RecordDict, cache: DigestCache | None = None
) -> bytes:
    """SHA-256 naming what a train instruction asks of a site, whoever signed it and when.

    A site releases at most one reply per (dataset, run, round)
    (:mod:`client.release`); this digest tells an honest resend of the same
    request (answered with the same sealed bytes) from a different request
    for the same round (refused). Encoding (version 1)::

        request_digest = SHA-256(b"fedseal/release-request/v1\\0"
                                 || bytes32(utf8(message_type))
                                 || content_digest(content without the volatile fields))

    **In the digest** (what changes the data-dependent answer, or who it is
    for): the message type (plain ``train`` or a secure stage); every record
    of the instruction, as :func:`content_digest` covers them: the whole
    config record (every run setting: model, training and DP settings, the
    round, the run id, the cohort size, the coordinator's code hash), the
    global model arrays, and secure-aggregation payloads (a masked request
    carries the setup's encrypted shares, so another setup or cohort gives
    another digest).

    **Left out** (they legitimately change when the same request is sent
    again, e.g. by a coordinator resumed after a crash): the instruction
    signature record (signature, per-run sequence number, key id; a resend
    is signed anew at a higher seq), and the audit head in the config record
    (:data:`~common.records.KEY_AUDIT_HEAD`, the coordinator's latest seal,
    which moves with every event it records). Neither changes what the site
    computes. The destination node is the site itself; the round's group id
    repeats the config's round.

    Raises
    ------
    DataError
        A record the content digest cannot encode.
    """
    if not isinstance(message_type, str):
        raise DataError("message type must be a string")
    stable = RecordDict(dict(content.items()))
    config = content.get(KEY_CONFIG)
    if isinstance(config, ConfigRecord):
        stable[KEY_CONFIG] = ConfigRecord(
            {k: v for k, v in config.items() if k not in REQUEST_VOLATILE_CONFIG}
        )
    h = hashlib.sha256(REQUEST_DOMAIN)
    h.update(_bytes32(message_type.encode("utf-8")))
    h.update(content_digest(stable, cache))
    return h.digest()


def signature_record(signature: InstructionSignature) -> ConfigRecord:
    """The signature record (:data:`~common.records.KEY_INSTRUCTION_SIGNATURE`) to carry."""
    return ConfigRecord(dict(signature.to_fields()))


def read_signature(content: RecordDict) -> InstructionSignature | None:
    """The instruction's signature record, validated; ``None`` when it carries none.

    Raises
    ------
    DataError
        The record is not a ConfigRecord or any field has the wrong type or
        size (checked before the signature is used).
    """
    if KEY_INSTRUCTION_SIGNATURE not in content:
        return None
    record: Any = content[KEY_INSTRUCTION_SIGNATURE]
    if not isinstance(record, ConfigRecord):
        raise DataError("instruction signature must be a ConfigRecord")
    return InstructionSignature.from_fields(dict(record.items()))


def signed_copy(content: RecordDict, signature: InstructionSignature) -> RecordDict:
    """A new RecordDict with ``content``'s records (shared, not copied) and the signature."""
    out = RecordDict(dict(content.items()))
    out[KEY_INSTRUCTION_SIGNATURE] = signature_record(signature)
    return out
