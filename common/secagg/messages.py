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
    ad      = 32 enc_pk | 32 mask_pk | 32 seed_commitment | 32 identity_pk | 64 signature
    kind 1  AdvertiseKeysRequest   header
    kind 2  AdvertiseKeysReply     header | ad
    kind 3  ShareKeysRequest       header | u32 a | a x (u64 node | ad)
    kind 4  ShareKeysReply         header | u32 c | c x (u64 receiver | 160 ciphertext)
    kind 5  CollectMaskedRequest   header | u32 c | c x (u64 sender | 160 ciphertext)
    kind 6  CollectMaskedReply     header | d x (u32 or u64) masked vector
    kind 9  ConsistencyRequest     header | u32 s | s x u64 survivor
    kind 10 ConsistencyReply       header | 64 signature
    kind 7  UnmaskRequest          header | u32 s | u32 m | s x u64 survivor
                                          | m x (u64 signer | 64 signature)
    kind 8  UnmaskReply            header | u32 s | u32 r | s x (u64 owner | 66 seed share)
                                          | r x (u64 owner | 66 key share)

``node`` is the client a request is for or a reply is from. Version 3 (the
header's version byte, :data:`~common.secagg.params.PROTOCOL_VERSION`) signs
advertisements with the site's identity key, hands every site all verified
advertisements (kind 3, its own included, ``a <= n``), adds the consistency
round (kinds 9, 10) and replaces the unmask request's per-node lists by the
signed survivor set ``U3`` and the consistency signatures (``s, m <= n``);
see :mod:`common.secagg.signing`. Version 2 added ``seed_commitment``; a
message of another version is rejected by its header.
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
from common.secagg.signing import IDENTITY_KEY_SIZE, SIGNATURE_SIZE
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
        raise ProtocolError(f"{name}: {count} entries exceed the limit {limit}")
    return int(count)


def _check_member_ids(ids: object, own: int, what: str) -> None:
    """Strictly increasing valid node ids that include ``own`` (a set of cohort members)."""
    if type(ids) is not tuple:
        raise ProtocolError(f"{what} must be a tuple")
    previous = -1
    for node in ids:
        if not _is_u64(node) or node == 0:
            raise ProtocolError(f"{what}: invalid node id {node!r}")
        if node <= previous:
            raise ProtocolError(f"{what}: node ids must be strictly increasing (no duplicates)")
        previous = node
    if own not in ids:
        raise ProtocolError(f"{what}: does not include the message's own node {own}")


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
class Advertisement:
    """One site's signed key advertisement, as the coordinator relays it (protocol v3)."""

    node_id: int
    encryption_key: bytes
    mask_key: bytes
    commitment: bytes
    identity_key: bytes
    signature: bytes

    def __post_init__(self) -> None:
        if not _is_u64(self.node_id):
            raise ProtocolError(f"invalid node id {self.node_id!r}")
        _check_bytes(self.encryption_key, KEY_SIZE, "an encryption public key")
        _check_bytes(self.mask_key, KEY_SIZE, "a mask public key")
        _check_bytes(self.commitment, COMMITMENT_SIZE, "a seed commitment")
        _check_bytes(self.identity_key, IDENTITY_KEY_SIZE, "an identity public key")
        _check_bytes(self.signature, SIGNATURE_SIZE, "an advertisement signature")

    def encode(self) -> bytes:
        """The entry's wire bytes (also what the graph seed hashes)."""
        return _AD.pack(
            self.node_id,
            self.encryption_key,
            self.mask_key,
            self.commitment,
            self.identity_key,
            self.signature,
        )

    def fields(self) -> tuple[bytes, bytes, bytes, bytes, bytes]:
        """(encryption key, mask key, commitment, identity key, signature)."""
        return (
            self.encryption_key,
            self.mask_key,
            self.commitment,
            self.identity_key,
            self.signature,
        )


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
    opens it. ``signature`` is the site's identity signature over
    :func:`~common.secagg.signing.advertisement_message` (verified by every
    site that receives it, not here).
    """

    STAGE: ClassVar[Stage] = Stage.ADVERTISE_KEYS
    KIND: ClassVar[int] = 2
    SIZE: ClassVar[int] = HEADER.size + 2 * KEY_SIZE + COMMITMENT_SIZE + 96
    run_id: int
    round: int
    node_id: int
    encryption_key: bytes
    mask_key: bytes
    commitment: bytes
    identity_key: bytes
    signature: bytes

    def __post_init__(self) -> None:
        _check_header_fields(self.run_id, self.round, self.node_id)
        self.advertisement()  # checks every field's size

    def advertisement(self) -> Advertisement:
        """This reply as the entry the coordinator relays to every site."""
        return Advertisement(
            self.node_id,
            self.encryption_key,
            self.mask_key,
            self.commitment,
            self.identity_key,
            self.signature,
        )

    def encode(self) -> bytes:
        """Wire bytes (see the module docstring)."""
        head = _header(self.KIND, self.run_id, self.round, self.node_id)
        return head + self.advertisement().encode()[_U64.size :]

    @classmethod
    def decode(cls, data: bytes, config: SecAggConfig) -> AdvertiseKeysReply:
        """Validate and parse; raises ProtocolError on any deviation."""
        data, node = _read_header(data, config, cls.KIND, cls.__name__)
        _expect_size(data, cls.SIZE, cls.__name__)
        _, enc, mask, commitment, identity, signature = _AD.unpack(
            _U64.pack(node) + data[HEADER.size :]
        )
        return cls(config.run_id, config.round, node, enc, mask, commitment, identity, signature)


_AD = struct.Struct(
    f">Q{KEY_SIZE}s{KEY_SIZE}s{COMMITMENT_SIZE}s{IDENTITY_KEY_SIZE}s{SIGNATURE_SIZE}s"
)
_SIGNED = struct.Struct(f">Q{SIGNATURE_SIZE}s")
_CIPHER = struct.Struct(f">Q{CIPHERTEXT_SIZE}s")
_SHARE = struct.Struct(f">Q{VALUE_SIZE}s")


@dataclass(frozen=True, slots=True)
class ShareKeysRequest:
    """Server -> client: every advertisement the server accepted, its own included (SHARE_KEYS).

    The client verifies them all (:func:`~common.secagg.signing.verify_advertisements`),
    derives the graph seed from them and shares with its neighbours among them.
    """

    STAGE: ClassVar[Stage] = Stage.SHARE_KEYS
    KIND: ClassVar[int] = 3
    run_id: int
    round: int
    node_id: int
    advertisements: tuple[Advertisement, ...]

    def __post_init__(self) -> None:
        _check_header_fields(self.run_id, self.round, self.node_id)
        if type(self.advertisements) is not tuple or not all(
            type(a) is Advertisement for a in self.advertisements
        ):
            raise ProtocolError("advertisements must be a tuple of Advertisement")
        _check_member_ids(
            tuple(a.node_id for a in self.advertisements), self.node_id, "advertisements"
        )

    def encode(self) -> bytes:
        """Wire bytes (see the module docstring)."""
        parts = [_header(self.KIND, self.run_id, self.round, self.node_id)]
        parts.append(_U32.pack(len(self.advertisements)))
        parts += [a.encode() for a in self.advertisements]
        return b"".join(parts)

    @classmethod
    def decode(cls, data: bytes, config: SecAggConfig) -> ShareKeysRequest:
        """Validate and parse; raises ProtocolError on any deviation."""
        data, node = _read_header(data, config, cls.KIND, cls.__name__)
        count = _read_count(data, HEADER.size, config.size, cls.__name__)
        start = HEADER.size + _U32.size
        _expect_size(data, start + count * _AD.size, cls.__name__)
        ads = tuple(
            Advertisement(*_AD.unpack_from(data, start + i * _AD.size)) for i in range(count)
        )
        _in_cohort([a.node_id for a in ads], config, cls.__name__)
        return cls(config.run_id, config.round, node, ads)


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
class ConsistencyRequest:
    """Server -> client: the survivor set ``U3`` to sign (stage CONSISTENCY, protocol v3)."""

    STAGE: ClassVar[Stage] = Stage.CONSISTENCY
    KIND: ClassVar[int] = 9
    run_id: int
    round: int
    node_id: int
    survivors: tuple[int, ...]

    def __post_init__(self) -> None:
        _check_header_fields(self.run_id, self.round, self.node_id)
        _check_member_ids(self.survivors, self.node_id, "survivors")

    def encode(self) -> bytes:
        """Wire bytes (see the module docstring)."""
        head = _header(self.KIND, self.run_id, self.round, self.node_id)
        ids = self.survivors
        return head + _U32.pack(len(ids)) + struct.pack(f">{len(ids)}Q", *ids)

    @classmethod
    def decode(cls, data: bytes, config: SecAggConfig) -> ConsistencyRequest:
        """Validate and parse; raises ProtocolError on any deviation."""
        data, node = _read_header(data, config, cls.KIND, cls.__name__)
        count = _read_count(data, HEADER.size, config.size, cls.__name__)
        start = HEADER.size + _U32.size
        _expect_size(data, start + 8 * count, cls.__name__)
        ids = struct.unpack_from(f">{count}Q", data, start)
        _in_cohort(ids, config, cls.__name__)
        return cls(config.run_id, config.round, node, tuple(ids))


@dataclass(frozen=True, slots=True)
class ConsistencyReply:
    """Client -> server: its identity signature over the survivor set (stage CONSISTENCY)."""

    STAGE: ClassVar[Stage] = Stage.CONSISTENCY
    KIND: ClassVar[int] = 10
    SIZE: ClassVar[int] = HEADER.size + SIGNATURE_SIZE
    run_id: int
    round: int
    node_id: int
    signature: bytes

    def __post_init__(self) -> None:
        _check_header_fields(self.run_id, self.round, self.node_id)
        _check_bytes(self.signature, SIGNATURE_SIZE, "a consistency signature")

    def encode(self) -> bytes:
        """Wire bytes (see the module docstring)."""
        return _header(self.KIND, self.run_id, self.round, self.node_id) + self.signature

    @classmethod
    def decode(cls, data: bytes, config: SecAggConfig) -> ConsistencyReply:
        """Validate and parse; raises ProtocolError on any deviation."""
        data, node = _read_header(data, config, cls.KIND, cls.__name__)
        _expect_size(data, cls.SIZE, cls.__name__)
        return cls(config.run_id, config.round, node, data[HEADER.size :])


@dataclass(frozen=True, slots=True)
class Signed:
    """A survivor's consistency signature, as the server relays it."""

    node_id: int
    signature: bytes

    def __post_init__(self) -> None:
        if not _is_u64(self.node_id) or self.node_id == 0:
            raise ProtocolError(f"invalid node id {self.node_id!r}")
        _check_bytes(self.signature, SIGNATURE_SIZE, "a consistency signature")


@dataclass(frozen=True, slots=True)
class UnmaskRequest:
    """Server -> client: the signed survivor set and the signatures over it (stage UNMASK).

    Which of its neighbours survived or dropped the client derives from
    ``survivors`` itself; it reveals only if ``signatures`` hold a quorum
    over the very set it signed (:mod:`common.secagg.signing`).
    """

    STAGE: ClassVar[Stage] = Stage.UNMASK
    KIND: ClassVar[int] = 7
    run_id: int
    round: int
    node_id: int
    survivors: tuple[int, ...]
    signatures: tuple[Signed, ...]

    def __post_init__(self) -> None:
        _check_header_fields(self.run_id, self.round, self.node_id)
        _check_member_ids(self.survivors, self.node_id, "survivors")
        if type(self.signatures) is not tuple or not all(
            type(s) is Signed for s in self.signatures
        ):
            raise ProtocolError("signatures must be a tuple of Signed")
        signers = tuple(s.node_id for s in self.signatures)
        if list(signers) != sorted(set(signers)):
            raise ProtocolError("signers: node ids must be strictly increasing (no duplicates)")

    def encode(self) -> bytes:
        """Wire bytes (see the module docstring)."""
        head = _header(self.KIND, self.run_id, self.round, self.node_id)
        counts = _COUNTS.pack(len(self.survivors), len(self.signatures))
        ids = struct.pack(f">{len(self.survivors)}Q", *self.survivors)
        return b"".join(
            [head, counts, ids, *(_SIGNED.pack(s.node_id, s.signature) for s in self.signatures)]
        )

    @classmethod
    def decode(cls, data: bytes, config: SecAggConfig) -> UnmaskRequest:
        """Validate and parse; raises ProtocolError on any deviation."""
        data, node = _read_header(data, config, cls.KIND, cls.__name__)
        if len(data) < HEADER.size + _COUNTS.size:
            raise ProtocolError(f"{cls.__name__}: truncated before its counts")
        survivors_n, signed_n = _COUNTS.unpack_from(data, HEADER.size)
        if survivors_n > config.size or signed_n > config.size:
            raise ProtocolError(f"{cls.__name__}: more entries than the cohort has members")
        start = HEADER.size + _COUNTS.size
        _expect_size(data, start + 8 * survivors_n + signed_n * _SIGNED.size, cls.__name__)
        ids = struct.unpack_from(f">{survivors_n}Q", data, start)
        offset = start + 8 * survivors_n
        signed = tuple(
            Signed(*_SIGNED.unpack_from(data, offset + i * _SIGNED.size)) for i in range(signed_n)
        )
        _in_cohort([*ids, *(s.node_id for s in signed)], config, cls.__name__)
        return cls(config.run_id, config.round, node, tuple(ids), signed)


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
    | ConsistencyRequest
    | ConsistencyReply
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
    ConsistencyRequest,
    ConsistencyReply,
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
