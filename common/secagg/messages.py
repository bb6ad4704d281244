"""Wire messages of a SecAgg+ round: one frozen type per stage and direction.

Guarantee: :meth:`decode` of every type accepts exactly the bytes that
:meth:`encode` produces for a message valid under the given configuration,
and checks, in this order and before parsing any variable field, the input
type, the header (magic, version, message kind = stage, run, round, node in
the cohort), the element counts (at most ``k``) and the *exact* total size;
then every field: node ids in the cohort, strictly increasing (hence no
duplicates) and never the message's own node; public keys, ciphertexts and
share values of their fixed sizes. Any violation raises
:class:`~common.errors.ProtocolError`. Constructors check field types too
(``bool`` is rejected where an ``int`` is expected). Nothing here touches a
secret: authenticity of shares is the AEAD's job (:mod:`common.crypto.aead`).

Layout (big-endian integers; the masked vector little-endian)::

    header  = "fsam" | u8 version | u8 kind | u64 run | u64 round | u64 node
    kind 1  AdvertiseKeysRequest   header
    kind 2  AdvertiseKeysReply     header | 32 enc_pk | 32 mask_pk | 32 seed_commitment
    kind 3  ShareKeysRequest       header | u32 c | c x (u64 node | 32 enc_pk | 32 mask_pk)
    kind 4  ShareKeysReply         header | u32 c | c x (u64 receiver | 160 ciphertext)
    kind 5  CollectMaskedRequest   header | u32 c | c x (u64 sender | 160 ciphertext)
    kind 6  CollectMaskedReply     header | d x (u32 or u64) masked vector
    kind 7  UnmaskRequest          header | u32 s | u32 r | s x u64 survivor | r x u64 dropped
    kind 8  UnmaskReply            header | u32 s | u32 r | s x (u64 owner | 66 seed share)
                                          | r x (u64 owner | 66 key share)

``node`` is the client a request is for or a reply is from. Version 2 (the
header's version byte, :data:`~common.secagg.params.PROTOCOL_VERSION`) added
``seed_commitment`` to kind 2; a version-1 message is rejected by its header.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeAlias

import numpy as np

from common.crypto.aead import OVERHEAD
from common.crypto.commitment import COMMITMENT_SIZE
from common.crypto.keys import KEY_SIZE
from common.crypto.prg import RingArray
from common.crypto.shamir import PRIME, VALUE_SIZE
from common.errors import ProtocolError
from common.secagg.params import PROTOCOL_VERSION, SecAggConfig
from common.secagg.stages import Stage

MAGIC = b"fsam"
HEADER = struct.Struct(">4sBBQQQ")
SHARE_PLAINTEXT_SIZE = 2 * VALUE_SIZE
"""A share message carries the mask-key share and the self-mask-seed share."""
CIPHERTEXT_SIZE = SHARE_PLAINTEXT_SIZE + OVERHEAD
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_COUNTS = struct.Struct(">II")
_U64_MAX = 2**64 - 1


def _is_u64(value: object) -> bool:
    return type(value) is int and 0 <= value <= _U64_MAX


def _check_header_fields(run_id: object, round_: object, node_id: object) -> None:
    for name, value in (("run_id", run_id), ("round", round_), ("node_id", node_id)):
        if not _is_u64(value):
            raise ProtocolError(f"{name} must be an int in [0, 2^64), got {value!r}")


def _check_ids(ids: object, own: int, what: str) -> None:
    if type(ids) is not tuple:
        raise ProtocolError(f"{what} must be a tuple")
    previous = -1
    for node in ids:
        if not _is_u64(node) or node == 0:
            raise ProtocolError(f"{what}: invalid node id {node!r}")
        if node <= previous:
            raise ProtocolError(f"{what}: node ids must be strictly increasing (no duplicates)")
        if node == own:
            raise ProtocolError(f"{what}: names the message's own node {own}")
        previous = node


def _check_bytes(value: object, size: int, what: str) -> None:
    if type(value) is not bytes or len(value) != size:
        raise ProtocolError(f"{what} must be exactly {size} bytes")


def _header(kind: int, run_id: int, round_: int, node_id: int) -> bytes:
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, kind, run_id, round_, node_id)


def _read_header(data: object, config: SecAggConfig, kind: int, name: str) -> tuple[bytes, int]:
    if type(data) is not bytes:
        raise ProtocolError(f"{name}: expected bytes, got {type(data).__name__}")
    if len(data) < HEADER.size:
        raise ProtocolError(f"{name}: {len(data)} bytes is shorter than a header")
    magic, version, got_kind, run_id, round_, node_id = HEADER.unpack_from(data)
    if magic != MAGIC or version != config.version:
        raise ProtocolError(f"{name}: unknown message format or protocol version")
    if got_kind != kind:
        got = KIND_NAMES.get(got_kind, f"kind {got_kind}")
        raise ProtocolError(f"wrong stage: expected {name}, got {got}")
    if run_id != config.run_id or round_ != config.round:
        raise ProtocolError(
            f"{name}: message for run {run_id} round {round_}, "
            f"expected run {config.run_id} round {config.round}"
        )
    if not config.contains(node_id):
        raise ProtocolError(f"{name}: node {node_id} is not in the cohort")
    return data, node_id


def peek_round(data: object) -> int:
    """The round named in a message's header, before it is decoded against that round's config.

    Only locates the configuration to decode with; :meth:`decode` then checks
    every field (a wrong round there is still rejected).
    """
    if type(data) is not bytes or len(data) < HEADER.size:
        raise ProtocolError("a secure-aggregation message is shorter than its header")
    magic, _, _, _, round_, _ = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ProtocolError("unknown message format or protocol version")
    return int(round_)


def _read_count(data: bytes, offset: int, limit: int, name: str) -> int:
    if len(data) < offset + _U32.size:
        raise ProtocolError(f"{name}: truncated before its count")
    (count,) = _U32.unpack_from(data, offset)
    if count > limit:
        raise ProtocolError(f"{name}: {count} entries exceed the neighbour degree {limit}")
    return int(count)


def _expect_size(data: bytes, size: int, name: str) -> None:
    if len(data) != size:
        raise ProtocolError(f"{name}: {len(data)} bytes, expected exactly {size}")


def _in_cohort(ids: Sequence[int], config: SecAggConfig, name: str) -> None:
    for node in ids:
        if not config.contains(node):
            raise ProtocolError(f"{name}: node {node} is not in the cohort")


@dataclass(frozen=True, slots=True)
class PeerKeys:
    """A neighbour's two advertised X25519 public keys."""

    node_id: int
    encryption_key: bytes
    mask_key: bytes

    def __post_init__(self) -> None:
        if not _is_u64(self.node_id):
            raise ProtocolError(f"invalid node id {self.node_id!r}")
        _check_bytes(self.encryption_key, KEY_SIZE, "an encryption public key")
        _check_bytes(self.mask_key, KEY_SIZE, "a mask public key")


@dataclass(frozen=True, slots=True)
class Ciphertext:
    """An encrypted share message and the other endpoint (receiver or sender)."""

    node_id: int
    data: bytes

    def __post_init__(self) -> None:
        if not _is_u64(self.node_id):
            raise ProtocolError(f"invalid node id {self.node_id!r}")
        _check_bytes(self.data, CIPHERTEXT_SIZE, "a share ciphertext")


@dataclass(frozen=True, slots=True)
class RevealedShare:
    """A Shamir share value revealed for ``owner`` at the unmask stage."""

    owner: int
    value: int

    def __post_init__(self) -> None:
        if not _is_u64(self.owner):
            raise ProtocolError(f"invalid node id {self.owner!r}")
        if type(self.value) is not int or not 0 <= self.value < PRIME:
            raise ProtocolError("a revealed share must be a field element")


def _check_entries(entries: object, kind: type, key: str, own: int, what: str) -> None:
    if type(entries) is not tuple or not all(type(entry) is kind for entry in entries):
        raise ProtocolError(f"{what} must be a tuple of {kind.__name__}")
    _check_ids(tuple(getattr(entry, key) for entry in entries), own, what)


@dataclass(frozen=True, slots=True)
class AdvertiseKeysRequest:
    """Server -> client: start the round (stage ADVERTISE_KEYS)."""

    STAGE: ClassVar[Stage] = Stage.ADVERTISE_KEYS
    KIND: ClassVar[int] = 1
    run_id: int
    round: int
    node_id: int

    def __post_init__(self) -> None:
        _check_header_fields(self.run_id, self.round, self.node_id)

    def encode(self) -> bytes:
        """Wire bytes (see the module docstring)."""
        return _header(self.KIND, self.run_id, self.round, self.node_id)

    @classmethod
    def decode(cls, data: bytes, config: SecAggConfig) -> AdvertiseKeysRequest:
        """Validate and parse; raises ProtocolError on any deviation."""
        data, node = _read_header(data, config, cls.KIND, cls.__name__)
        _expect_size(data, HEADER.size, cls.__name__)
        return cls(config.run_id, config.round, node)


@dataclass(frozen=True, slots=True)
class AdvertiseKeysReply:
    """Client -> server: two public keys and a seed commitment (stage ADVERTISE_KEYS).

    ``commitment`` is :func:`~common.crypto.commitment.commit_seed` of the
    client's self-mask seed; the server accepts a reconstructed seed only if it
    opens it.
    """

    STAGE: ClassVar[Stage] = Stage.ADVERTISE_KEYS
    KIND: ClassVar[int] = 2
    SIZE: ClassVar[int] = HEADER.size + 2 * KEY_SIZE + COMMITMENT_SIZE
    run_id: int
    round: int
    node_id: int
    encryption_key: bytes
    mask_key: bytes
    commitment: bytes

    def __post_init__(self) -> None:
        _check_header_fields(self.run_id, self.round, self.node_id)
        _check_bytes(self.encryption_key, KEY_SIZE, "an encryption public key")
        _check_bytes(self.mask_key, KEY_SIZE, "a mask public key")
        _check_bytes(self.commitment, COMMITMENT_SIZE, "a seed commitment")

    def encode(self) -> bytes:
        """Wire bytes (see the module docstring)."""
        head = _header(self.KIND, self.run_id, self.round, self.node_id)
        return head + self.encryption_key + self.mask_key + self.commitment

    @classmethod
    def decode(cls, data: bytes, config: SecAggConfig) -> AdvertiseKeysReply:
        """Validate and parse; raises ProtocolError on any deviation."""
        data, node = _read_header(data, config, cls.KIND, cls.__name__)
        _expect_size(data, cls.SIZE, cls.__name__)
        offset = HEADER.size
        return cls(
            config.run_id,
            config.round,
            node,
            data[offset : offset + KEY_SIZE],
            data[offset + KEY_SIZE : offset + 2 * KEY_SIZE],
            data[offset + 2 * KEY_SIZE : offset + 2 * KEY_SIZE + COMMITMENT_SIZE],
        )


_PEER = struct.Struct(f">Q{KEY_SIZE}s{KEY_SIZE}s")
_CIPHER = struct.Struct(f">Q{CIPHERTEXT_SIZE}s")
_SHARE = struct.Struct(f">Q{VALUE_SIZE}s")


@dataclass(frozen=True, slots=True)
class ShareKeysRequest:
    """Server -> client: the public keys of its live neighbours (stage SHARE_KEYS)."""

    STAGE: ClassVar[Stage] = Stage.SHARE_KEYS
    KIND: ClassVar[int] = 3
    run_id: int
    round: int
    node_id: int
    peers: tuple[PeerKeys, ...]

    def __post_init__(self) -> None:
        _check_header_fields(self.run_id, self.round, self.node_id)
        _check_entries(self.peers, PeerKeys, "node_id", self.node_id, "peer keys")

    def encode(self) -> bytes:
        """Wire bytes (see the module docstring)."""
        parts = [_header(self.KIND, self.run_id, self.round, self.node_id)]
        parts.append(_U32.pack(len(self.peers)))
        parts += [_PEER.pack(p.node_id, p.encryption_key, p.mask_key) for p in self.peers]
        return b"".join(parts)

    @classmethod
    def decode(cls, data: bytes, config: SecAggConfig) -> ShareKeysRequest:
        """Validate and parse; raises ProtocolError on any deviation."""
        data, node = _read_header(data, config, cls.KIND, cls.__name__)
        count = _read_count(data, HEADER.size, config.neighbours, cls.__name__)
        start = HEADER.size + _U32.size
        _expect_size(data, start + count * _PEER.size, cls.__name__)
        peers = tuple(
            PeerKeys(*_PEER.unpack_from(data, start + i * _PEER.size)) for i in range(count)
        )
        _in_cohort([p.node_id for p in peers], config, cls.__name__)
        return cls(config.run_id, config.round, node, peers)


@dataclass(frozen=True, slots=True)
class ShareKeysReply:
    """Client -> server: one encrypted share message per live neighbour (stage SHARE_KEYS)."""

    STAGE: ClassVar[Stage] = Stage.SHARE_KEYS
    KIND: ClassVar[int] = 4
    run_id: int
    round: int
    node_id: int
    ciphertexts: tuple[Ciphertext, ...]
    """``Ciphertext.node_id`` is the receiver."""

    def __post_init__(self) -> None:
        _check_header_fields(self.run_id, self.round, self.node_id)
        _check_entries(self.ciphertexts, Ciphertext, "node_id", self.node_id, "ciphertexts")

    def encode(self) -> bytes:
        """Wire bytes (see the module docstring)."""
        parts = [_header(self.KIND, self.run_id, self.round, self.node_id)]
        parts.append(_U32.pack(len(self.ciphertexts)))
        parts += [_CIPHER.pack(c.node_id, c.data) for c in self.ciphertexts]
        return b"".join(parts)

    @classmethod
    def decode(cls, data: bytes, config: SecAggConfig) -> ShareKeysReply:
        """Validate and parse; raises ProtocolError on any deviation."""
        return cls(*_decode_ciphertexts(cls.KIND, cls.__name__, data, config))


@dataclass(frozen=True, slots=True)
class CollectMaskedRequest:
    """Server -> client: share messages addressed to it (stage COLLECT_MASKED)."""

    STAGE: ClassVar[Stage] = Stage.COLLECT_MASKED
    KIND: ClassVar[int] = 5
    run_id: int
    round: int
    node_id: int
    ciphertexts: tuple[Ciphertext, ...]
    """``Ciphertext.node_id`` is the sender."""

    def __post_init__(self) -> None:
        _check_header_fields(self.run_id, self.round, self.node_id)
        _check_entries(self.ciphertexts, Ciphertext, "node_id", self.node_id, "ciphertexts")

    def encode(self) -> bytes:
        """Wire bytes (see the module docstring)."""
        parts = [_header(self.KIND, self.run_id, self.round, self.node_id)]
        parts.append(_U32.pack(len(self.ciphertexts)))
        parts += [_CIPHER.pack(c.node_id, c.data) for c in self.ciphertexts]
        return b"".join(parts)

    @classmethod
    def decode(cls, data: bytes, config: SecAggConfig) -> CollectMaskedRequest:
        """Validate and parse; raises ProtocolError on any deviation."""
        return cls(*_decode_ciphertexts(cls.KIND, cls.__name__, data, config))


def _decode_ciphertexts(
    kind: int, name: str, data: bytes, config: SecAggConfig
) -> tuple[int, int, int, tuple[Ciphertext, ...]]:
    data, node = _read_header(data, config, kind, name)
    count = _read_count(data, HEADER.size, config.neighbours, name)
    start = HEADER.size + _U32.size
    _expect_size(data, start + count * _CIPHER.size, name)
    entries = tuple(
        Ciphertext(*_CIPHER.unpack_from(data, start + i * _CIPHER.size)) for i in range(count)
    )
    _in_cohort([c.node_id for c in entries], config, name)
    return config.run_id, config.round, node, entries


@dataclass(frozen=True, slots=True, eq=False)
class CollectMaskedReply:
    """Client -> server: the masked, quantised input (stage COLLECT_MASKED).

    ``masked`` holds ``vector_length`` ring elements in ``config.dtype``.
    """

    STAGE: ClassVar[Stage] = Stage.COLLECT_MASKED
    KIND: ClassVar[int] = 6
    run_id: int
    round: int
    node_id: int
    masked: RingArray

    def __post_init__(self) -> None:
        _check_header_fields(self.run_id, self.round, self.node_id)
        if (
            not isinstance(self.masked, np.ndarray)
            or self.masked.ndim != 1
            or self.masked.dtype not in (np.dtype("<u4"), np.dtype("<u8"))
        ):
            raise ProtocolError("a masked vector must be a 1-D little-endian uint32/uint64 array")

    def encode(self) -> bytes:
        """Wire bytes (see the module docstring)."""
        return b"".join(self.encode_parts())

    def encode_parts(self) -> tuple[bytes, memoryview]:
        """The wire bytes as (header, a view of the vector): joined by the caller in one copy."""
        if not self.masked.flags.c_contiguous:
            raise ProtocolError("a masked vector must be contiguous")
        header = _header(self.KIND, self.run_id, self.round, self.node_id)
        return header, memoryview(self.masked.data).cast("B")

    @classmethod
    def decode(cls, data: bytes | memoryview, config: SecAggConfig) -> CollectMaskedReply:
        """Validate and parse (zero-copy, read-only view); raises ProtocolError on any deviation.

        ``data`` may be a byte memoryview (:func:`common.records.record_to_bytes`
        with ``copy=False``), so the server never copies a masked vector.
        """
        if isinstance(data, memoryview):  # a zero-copy window on received bytes
            if data.format != "B" or data.ndim != 1:
                raise ProtocolError(f"{cls.__name__}: expected a byte buffer")
            _, node = _read_header(bytes(data[: HEADER.size]), config, cls.KIND, cls.__name__)
            if data.nbytes != HEADER.size + config.masked_size:
                raise ProtocolError(
                    f"{cls.__name__}: {data.nbytes} bytes, expected exactly "
                    f"{HEADER.size + config.masked_size}"
                )
        else:
            data, node = _read_header(data, config, cls.KIND, cls.__name__)
            _expect_size(data, HEADER.size + config.masked_size, cls.__name__)
        masked: RingArray = np.frombuffer(data, dtype=config.dtype, offset=HEADER.size)
        if config.bits not in (32, 64) and bool(np.any(masked >> config.dtype.type(config.bits))):
            raise ProtocolError(f"{cls.__name__}: values outside Z_2^{config.bits}")
        return cls(config.run_id, config.round, node, masked)


@dataclass(frozen=True, slots=True)
class UnmaskRequest:
    """Server -> client: which neighbours survived and which dropped (stage UNMASK)."""

    STAGE: ClassVar[Stage] = Stage.UNMASK
    KIND: ClassVar[int] = 7
    run_id: int
    round: int
    node_id: int
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]

    def __post_init__(self) -> None:
        _check_header_fields(self.run_id, self.round, self.node_id)
        _check_ids(self.survivors, self.node_id, "survivors")
        _check_ids(self.dropped, self.node_id, "dropped")

    def encode(self) -> bytes:
        """Wire bytes (see the module docstring)."""
        head = _header(self.KIND, self.run_id, self.round, self.node_id)
        counts = _COUNTS.pack(len(self.survivors), len(self.dropped))
        ids = self.survivors + self.dropped
        return head + counts + struct.pack(f">{len(ids)}Q", *ids)

    @classmethod
    def decode(cls, data: bytes, config: SecAggConfig) -> UnmaskRequest:
        """Validate and parse; raises ProtocolError on any deviation."""
        data, node = _read_header(data, config, cls.KIND, cls.__name__)
        survivors_n, dropped_n = _read_counts(data, config, cls.__name__)
        start = HEADER.size + _COUNTS.size
        _expect_size(data, start + 8 * (survivors_n + dropped_n), cls.__name__)
        ids = struct.unpack_from(f">{survivors_n + dropped_n}Q", data, start)
        _in_cohort(ids, config, cls.__name__)
        return cls(config.run_id, config.round, node, ids[:survivors_n], ids[survivors_n:])


def _read_counts(data: bytes, config: SecAggConfig, name: str) -> tuple[int, int]:
    if len(data) < HEADER.size + _COUNTS.size:
        raise ProtocolError(f"{name}: truncated before its counts")
    first, second = _COUNTS.unpack_from(data, HEADER.size)
    if first + second > config.neighbours:
        raise ProtocolError(f"{name}: {first + second} entries exceed the neighbour degree")
    return int(first), int(second)


@dataclass(frozen=True, slots=True)
class UnmaskReply:
    """Client -> server: seed shares of survivors and key shares of dropped nodes (UNMASK)."""

    STAGE: ClassVar[Stage] = Stage.UNMASK
    KIND: ClassVar[int] = 8
    run_id: int
    round: int
    node_id: int
    seed_shares: tuple[RevealedShare, ...]
    key_shares: tuple[RevealedShare, ...]

    def __post_init__(self) -> None:
        _check_header_fields(self.run_id, self.round, self.node_id)
        _check_entries(self.seed_shares, RevealedShare, "owner", self.node_id, "seed shares")
        _check_entries(self.key_shares, RevealedShare, "owner", self.node_id, "key shares")
        seed_owners = {share.owner for share in self.seed_shares}
        if seed_owners & {share.owner for share in self.key_shares}:
            raise ProtocolError("a node's seed share and key share are never revealed together")

    def encode(self) -> bytes:
        """Wire bytes (see the module docstring)."""
        parts = [_header(self.KIND, self.run_id, self.round, self.node_id)]
        parts.append(_COUNTS.pack(len(self.seed_shares), len(self.key_shares)))
        parts += [
            _SHARE.pack(s.owner, s.value.to_bytes(VALUE_SIZE, "big"))
            for s in self.seed_shares + self.key_shares
        ]
        return b"".join(parts)

    @classmethod
    def decode(cls, data: bytes, config: SecAggConfig) -> UnmaskReply:
        """Validate and parse; raises ProtocolError on any deviation."""
        data, node = _read_header(data, config, cls.KIND, cls.__name__)
        seeds_n, keys_n = _read_counts(data, config, cls.__name__)
        start = HEADER.size + _COUNTS.size
        _expect_size(data, start + (seeds_n + keys_n) * _SHARE.size, cls.__name__)
        shares = []
        for i in range(seeds_n + keys_n):
            owner, raw = _SHARE.unpack_from(data, start + i * _SHARE.size)
            shares.append(RevealedShare(owner, int.from_bytes(raw, "big")))
        _in_cohort([s.owner for s in shares], config, cls.__name__)
        return cls(
            config.run_id, config.round, node, tuple(shares[:seeds_n]), tuple(shares[seeds_n:])
        )


Message: TypeAlias = (
    AdvertiseKeysRequest
    | AdvertiseKeysReply
    | ShareKeysRequest
    | ShareKeysReply
    | CollectMaskedRequest
    | CollectMaskedReply
    | UnmaskRequest
    | UnmaskReply
)
MESSAGE_TYPES: tuple[type[Any], ...] = (
    AdvertiseKeysRequest,
    AdvertiseKeysReply,
    ShareKeysRequest,
    ShareKeysReply,
    CollectMaskedRequest,
    CollectMaskedReply,
    UnmaskRequest,
    UnmaskReply,
)
KIND_NAMES: dict[int, str] = {cls.KIND: cls.__name__ for cls in MESSAGE_TYPES}


def decode_message(data: bytes, config: SecAggConfig) -> Message:
    """Decode any message by its header kind (validating exactly as the type's ``decode``)."""
    if type(data) is not bytes or len(data) < HEADER.size:
        raise ProtocolError("not a secure-aggregation message")
    kind = data[5]
    for cls in MESSAGE_TYPES:
        if cls.KIND == kind:
            message: Message = cls.decode(data, config)
            return message
    raise ProtocolError(f"unknown message kind {kind}")
