"""One release per (dataset, run, round): a site answers each training round once.

Every data-dependent reply that leaves a site for a training round is a
*release*: a plain round's update and metrics, or a secure round's masked
input. What is private, against whom: a coordinator that repeats a round
(three identical train instructions, a resumed run, a redo with another
model, configuration, cohort or secure-aggregation setup) gets nothing
beyond the one release, so that

* record-level DP holds as charged: the ledger charges a round once
  (:meth:`client.ledger.SiteLedger.reserve`), and the site never trains it
  twice with fresh noise (two noisy answers to one question would average
  the noise away);
* under secure aggregation, a redo of a round under another setup (another
  survivor set) cannot difference one site's update out of two sums.

The rule, decided by :func:`release_once` for both paths (plain rounds in
:mod:`client.mods.release`, the masked stage in :mod:`client.secure`):

* first request for the round: the release is reserved in the site's
  release log (:meth:`~client.ledger.SiteLedger.claim_release`) before the
  data is touched, then the train path runs, then the release is stored
  (:meth:`~client.ledger.SiteLedger.store_release`) before the reply leaves:
  a plain reply sealed with AEAD (:mod:`common.crypto.aead`) under a key
  derived from the site's state key (:func:`client.state.state_key`), bound
  to the dataset, run, round and request digest; a masked input as a row
  (dataset, run, round, secure-aggregation config digest), never cached:
  its durable claim is its record (a later masked request is refused
  whether or not the first one's input left);
* a later *plain* request with the same request digest
  (:func:`common.record_digest.request_digest`: everything but the
  signature, sequence number and audit head) gets the very same bytes
  back: the cache opened, the reply rebuilt; no training, no new charge;
* any other later request is refused with its reason (the coordinator
  records ``site_refused``): another request digest, a masked request for
  a round already released (under the same setup or another), a plain
  request for a round released under secure aggregation (or the reverse), a
  cache that fails authentication (tampered on disk or another state key),
  and a round whose earlier attempt was cut off by a crash before its
  release was stored.

Not covered: the release log is as trustworthy as the site's state
directory (:mod:`client.state`); a site that loses it can be asked again.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from google.protobuf.message import DecodeError

from client.agent import SiteContext
from client.ledger import RELEASED, ReleaseEntry, SiteLedger
from client.site import site_dataset_id
from client.state import LEDGER_FILE, state_key
from client.steps import is_refusal, refusal
from common.crypto import aead
from common.crypto.kdf import LABEL_RELEASE_CACHE, derive_site_key
from common.errors import IntegrityError
from common.record_digest import RECEIVED, request_digest

PLAIN = "plain"
SECURE = "secure"
CACHE_AD_DOMAIN = b"fedseal/release-cache/v1\x00"


def release_once(
    site: SiteContext,
    msg: Message,
    produce: Callable[[], Message],
    setup: bytes | None = None,
) -> Message:
    """The site's one release for ``msg``'s round: made by ``produce``, answered again, or refused.

    Parameters
    ----------
    site : SiteContext
        The round's instruction as this site reads it (verified).
    msg : Message
        The train instruction (plain ``train`` or the secure masked stage).
    produce : callable
        The train path (train, clip): called at most once per (dataset, run,
        round) over the site's lifetime, only when nothing was released yet.
    setup : bytes or None
        The secure round's configuration digest (:meth:`common.secagg.SecAggConfig.digest`)
        for a masked input; None for a plain round.

    Returns
    -------
    Message
        ``produce``'s reply (stored first), the stored reply again, or a
        refusal (:func:`client.steps.refusal`) saying why.

    Raises
    ------
    RecordError
        If the release log cannot be read or written.
    """
    dataset_id = site_dataset_id(site.cfg, site.context.node_config)
    request = request_digest(msg.metadata.message_type, msg.content, RECEIVED)
    kind = PLAIN if setup is None else SECURE
    setup_hex = setup.hex() if setup is not None else None
    with SiteLedger(site.directory / LEDGER_FILE) as ledger:
        claim = ledger.claim_release(
            dataset_id, site.run_id, site.server_round, kind, request.hex(), setup_hex
        )
        if not claim.fresh:
            content, reason = _again(site, ledger, claim.entry, kind, request, setup_hex)
            ledger.count_answer(claim.entry.id, resent=content is not None)
            if content is None:
                return refusal(msg, reason)
            return Message(content=content, reply_to=msg)
        try:
            reply = produce()
        except BaseException:
            ledger.abandon_release(claim.entry.id)  # nothing left the site
            raise
        if reply.has_error() or is_refusal(reply):
            ledger.abandon_release(claim.entry.id)
            return reply
        if kind == PLAIN:
            ledger.store_release(claim.entry.id, _seal(site, claim.entry, request, reply.content))
        # A masked input is never sent again, so its durable claim is its whole record: a
        # later request finds it and is refused (``_again``), whether or not the input left.
    return reply


def _again(
    site: SiteContext,
    ledger: SiteLedger,
    earlier: ReleaseEntry,
    kind: str,
    request: bytes,
    setup_hex: str | None,
) -> tuple[RecordDict | None, str]:
    """A later request for a released round: (the stored reply to send again, "") or (None, why not)."""
    where = f"round {earlier.round} of run {earlier.run_id!r}"
    if earlier.kind == SECURE and kind == SECURE:
        if earlier.setup_digest != setup_hex:
            return None, f"{where} already released under another secure-aggregation setup"
        return None, f"{where}: its masked input was already released"
    if earlier.state != RELEASED and earlier.kind == PLAIN:
        return None, (
            f"{where}: an earlier request was cut off before its release was stored; "
            "the site never trains a round twice"
        )
    if earlier.kind != kind:
        how = "under secure aggregation" if earlier.kind == SECURE else "in a plain round"
        return None, f"{where} already released {how}"
    if earlier.request_digest != request.hex():
        return None, (
            f"{where} already released for another request (model, configuration or cohort "
            "differ); a site releases a round once"
        )
    try:
        return _open(site, ledger.sealed_reply(earlier), earlier, request), ""
    except IntegrityError:
        return None, (
            f"{where}: the stored release fails authentication (tampered with or another "
            "state key); the site refuses rather than train the round again"
        )


def _cache_key(site: SiteContext) -> bytes:
    return derive_site_key(state_key(site.directory), LABEL_RELEASE_CACHE)


def _associated(entry: ReleaseEntry, request: bytes) -> bytes:
    """What a sealed reply is bound to: dataset, run, round and the request it answered."""
    parts = [entry.dataset_id.encode("utf-8"), entry.run_id.encode("utf-8")]
    framed = b"".join(struct.pack(">I", len(p)) + p for p in parts)
    return CACHE_AD_DOMAIN + framed + struct.pack(">Q", entry.round) + request


def _seal(site: SiteContext, entry: ReleaseEntry, request: bytes, content: RecordDict) -> bytes:
    plaintext = encode_reply(content)
    return aead.encrypt(_cache_key(site), plaintext, _associated(entry, request))


def _open(
    site: SiteContext, sealed: bytes | None, entry: ReleaseEntry, request: bytes
) -> RecordDict:
    """The stored reply of ``entry``; IntegrityError if it is gone or does not authenticate."""
    if sealed is None:
        raise IntegrityError("authenticated decryption failed")
    plaintext = aead.decrypt(_cache_key(site), sealed, _associated(entry, request))
    try:
        return decode_reply(plaintext)
    except (ValueError, struct.error, DecodeError):
        raise IntegrityError("the stored release is malformed") from None


_U32 = struct.Struct(">I")


def encode_reply(content: RecordDict) -> bytes:
    """A reply's records as bytes: Flower's protobuf form of everything but the array
    payloads (``skeleton``), then each array's payload, each length-prefixed.

    The payloads (the update: megabytes) are never copied into a protobuf
    message: that took about 10 ms per 4 MB on every plain round of every site.
    """
    payloads: list[bytes] = []
    skeleton = RecordDict()
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            hollow = ArrayRecord()
            for key, array in record.items():
                payloads.append(array.data)
                hollow[key] = Array(array.dtype, tuple(array.shape), array.stype, b"")
            skeleton[name] = hollow
        else:
            skeleton[name] = record
    head = recorddict_to_proto(skeleton).SerializeToString()
    parts = [_U32.pack(len(head)), head, _U32.pack(len(payloads))]
    for data in payloads:
        parts += [_U32.pack(len(data)), data]
    return b"".join(parts)


def decode_reply(data: bytes) -> RecordDict:
    """The inverse of :func:`encode_reply` (ValueError on a malformed buffer)."""
    view = memoryview(data)
    (head_size,) = _U32.unpack_from(view, 0)
    offset = _U32.size + head_size
    proto = ProtoRecordDict()
    proto.ParseFromString(bytes(view[_U32.size : offset]))
    skeleton = recorddict_from_proto(proto)
    (count,) = _U32.unpack_from(view, offset)
    offset += _U32.size
    payloads = []
    for _ in range(count):
        (size,) = _U32.unpack_from(view, offset)
        offset += _U32.size
        if offset + size > len(view):
            raise ValueError("truncated payload")
        payloads.append(bytes(view[offset : offset + size]))
        offset += size
    if offset != len(view):
        raise ValueError("trailing bytes")
    filled = iter(payloads)
    content = RecordDict()
    for name, record in skeleton.items():
        if isinstance(record, ArrayRecord):
            full = ArrayRecord()
            for key, array in record.items():
                full[key] = Array(array.dtype, tuple(array.shape), array.stype, next(filled))
            content[name] = full
        else:
            content[name] = record
    if next(filled, None) is not None:
        raise ValueError("more payloads than arrays")
    return content
