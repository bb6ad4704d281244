"""The site's check of every instruction: signed by the pinned coordinator key, for it, fresh.

A site pins its coordinator's audit-signing public key in its policy
(``trust.server_key``) or its node config (``server-key``, which
``fedseal-client start --server-key`` writes), or takes the coordinator key
its verified roster names (:mod:`client.site_roster`); when several name a
key they must agree. A roster that is configured but fails its checks
refuses every instruction. With a pinned key, :func:`check_instruction` accepts a message
only if

1. it carries a well-formed signature record naming the pinned key
   (stops unsigned instructions and instructions signed by another key);
2. it is addressed to this node (stops one node's instruction being
   delivered to another);
3. the Ed25519 signature verifies over its type, run id, round (group id),
   destination, sequence number and the digest of every record it carries
   (:mod:`common.audit.instruction`, :mod:`common.record_digest`; stops any
   alteration of the config, the model arrays, the secure-aggregation
   payloads and cohort, the type or the round);
4. its sequence number is above the last one this site accepted for the same
   (coordinator key, run) (stops replays and out-of-order delivery).

Only then is the sequence number stored (before the instruction is used),
in ``instruction-seq.json`` in the site's state directory, replaced
crash-safely under the site's lock: the Deployment Engine runs every message
in a fresh process, so nothing of this lives in memory across messages. A
crash after the store refuses a redelivery of the same message, which is
the safe side. An unreadable store refuses every pinned instruction until
the operator repairs it (fail closed).

Each message is checked once per process: the ClientApp's mods and handlers
ask again for the same :class:`~flwr.app.Message` object and get the first
verdict (a second look must not see its own sequence number as a replay).

Without a pinned key nothing is verified and nothing is stored (simulations
and sites without a policy work as before); the check's result still goes
into the site's policy decisions (``trust.server_key``), so the
coordinator's audit log shows that the instruction was not authenticated.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message

from client.site_policy import SiteSetup, site_policy
from client.site_roster import configured_roster
from client.state import SEQUENCE_FILE, replace_file, site_dir, site_lock
from common.audit.instruction import (
    InstructionHeader,
    InstructionSignature,
    key_fingerprint,
    verify_instruction,
)
from common.errors import ConfigurationError, DataError, IntegrityError, ProtocolError
from common.record_digest import RECEIVED, content_digest, read_signature
from common.records import KEY_CONFIG, KEY_RUN_ID
from common.roster import Roster
from policies import SitePolicy
from policies.models import canonical_server_key

NODE_CONFIG_SERVER_KEY = "server-key"
RULE = "trust.server_key"
SEQUENCE_VERSION = 1


class InstructionRefused(ProtocolError):
    """The site refuses an instruction before using it.

    ``rule`` names the policy rule the refusal reports (``trust.server_key``)
    or is ``None`` for a check that is no policy rule (an audit head).
    """

    def __init__(self, reason: str, rule: str | None = RULE) -> None:
        self.reason = reason
        self.rule = rule
        super().__init__(f"{rule}: denied: {reason}" if rule else reason)


@dataclass(frozen=True, slots=True)
class InstructionCheck:
    """What the site established about one instruction.

    Attributes
    ----------
    trusted_key : bytes or None
        The pinned coordinator key (raw 32 bytes) the instruction was
        verified with; ``None``: no key pinned, nothing verified.
    signature : InstructionSignature or None
        The signature record it carries (``None``: unsigned, or unreadable
        without a pin, see ``problem``).
    signed_message : bytes or None
        With a pin: the exact bytes the signature covers, as this site
        recomputed them from what it received.
    previous_seq : int or None
        With a pin: the last sequence number accepted before this one for
        the same (key, run); ``None`` for the run's first.
    problem : str or None
        Without a pin: why the carried signature record could not be read.
    """

    trusted_key: bytes | None
    signature: InstructionSignature | None
    signed_message: bytes | None = None
    previous_seq: int | None = None
    problem: str | None = None


_checked: weakref.WeakKeyDictionary[Message, InstructionCheck | InstructionRefused] = (
    weakref.WeakKeyDictionary()
)
_checked_lock = threading.Lock()


def pinned_server_key(
    node_config: Mapping[str, Any], policy: SitePolicy | None, roster: Roster | None = None
) -> bytes | None:
    """The coordinator key this site pins (raw 32 bytes), or ``None``.

    The policy's ``trust.server_key``, else the node config's ``server-key``,
    else the coordinator key named by the site's verified ``roster``
    (:mod:`client.site_roster`); every one of them that is set must agree.

    Raises
    ------
    ConfigurationError
        The node config's ``server-key`` is not a key, or two of the three
        name different keys.
    """
    from_policy = policy.trust.server_key_bytes if policy is not None else None
    raw = node_config.get(NODE_CONFIG_SERVER_KEY)
    from_node = None
    if raw not in (None, ""):
        if not isinstance(raw, str):
            raise ConfigurationError("node config server-key must be a string")
        from_node = bytes.fromhex(canonical_server_key(raw))
    if from_policy is not None and from_node is not None and from_policy != from_node:
        raise ConfigurationError(
            "the site policy's trust.server_key and the node config's server-key differ"
        )
    pinned = from_policy if from_policy is not None else from_node
    from_roster = roster.coordinator_key if roster is not None else None
    if pinned is not None and from_roster is not None and pinned != from_roster:
        raise ConfigurationError(
            "the roster's coordinator key is not the server key the site pins "
            "(trust.server_key / server-key)"
        )
    return pinned if pinned is not None else from_roster


def check_instruction(msg: Message, context: Context, setup: SiteSetup) -> InstructionCheck:
    """This site's verdict on ``msg``, established once per message object.

    Raises
    ------
    InstructionRefused
        With a pinned key: unsigned, signed by another key, addressed to
        another node, altered, replayed or out of order (see the module
        docstring); or the pin itself is misconfigured.
    """
    with _checked_lock:
        found = _checked.get(msg)
    if found is None:
        try:
            found = _check(msg, context, setup)
        except InstructionRefused as exc:
            found = exc
        with _checked_lock:
            _checked[msg] = found
    if isinstance(found, InstructionRefused):
        raise InstructionRefused(found.reason, found.rule)
    return found


def _check(msg: Message, context: Context, setup: SiteSetup) -> InstructionCheck:
    directory = site_dir(context.node_config, context.node_id, setup.root)
    try:
        policy = site_policy(context.node_config, setup.policies)
    except ConfigurationError as exc:
        raise InstructionRefused(f"the pinned server key is misconfigured ({exc})") from None
    try:
        roster = configured_roster(context.node_config, setup, policy, directory)
    except (ConfigurationError, IntegrityError) as exc:
        raise InstructionRefused(f"the site's roster is refused ({exc})") from None
    try:
        trusted = pinned_server_key(context.node_config, policy, roster)
    except ConfigurationError as exc:
        raise InstructionRefused(f"the pinned server key is misconfigured ({exc})") from None
    try:
        signature = read_signature(msg.content)
    except DataError as exc:
        if trusted is None:
            return InstructionCheck(None, None, problem=str(exc))
        raise InstructionRefused(f"malformed instruction signature ({exc})") from None
    if trusted is None:
        return InstructionCheck(None, signature)
    short = trusted.hex()[:16]
    if signature is None:
        raise InstructionRefused(f"instruction is not signed; trusted server key {short}...")
    if signature.key_id != key_fingerprint(trusted):
        raise InstructionRefused(
            f"instruction is signed by key SHA256:{signature.key_id.hex()[:16]}..., "
            f"not by the trusted server key {short}..."
        )
    md = msg.metadata
    if md.dst_node_id != context.node_id:
        raise InstructionRefused(
            f"instruction is addressed to node {md.dst_node_id}, "
            f"not to this node ({context.node_id})"
        )
    run_id = _run_id(msg)
    try:
        header = InstructionHeader(
            md.message_type, run_id, md.group_id, md.dst_node_id, signature.seq, signature.key_id
        )
        message = header.message(content_digest(msg.content, RECEIVED))
    except DataError as exc:
        raise InstructionRefused(f"instruction cannot be verified ({exc})") from None
    if not verify_instruction(trusted, message, signature.signature):
        raise InstructionRefused(
            f"instruction signature does not verify with the trusted server key {short}... "
            "(altered after signing, or not signed by that key)"
        )
    previous = advance_sequence(directory, signature.key_id, run_id, signature.seq)
    return InstructionCheck(trusted, signature, message, previous)


def _run_id(msg: Message) -> str:
    record = msg.content.config_records.get(KEY_CONFIG)
    run_id = record.get(KEY_RUN_ID) if isinstance(record, ConfigRecord) else None
    if not isinstance(run_id, str) or not run_id:
        raise InstructionRefused("instruction lacks the run id")
    return run_id


def advance_sequence(directory: Path, key_id: bytes, run_id: str, seq: int) -> int | None:
    """Accept ``seq`` for (key, run) if above the last accepted; store it; the previous one.

    Raises
    ------
    InstructionRefused
        ``seq`` is not above the last accepted (a replay, or an older
        instruction delivered after a newer one), or the store is unreadable.
    """
    path = directory / SEQUENCE_FILE
    name = f"{key_id.hex()}/{run_id}"
    with site_lock(directory):
        last_by_run = _read_sequences(path)
        last = last_by_run.get(name)
        if last is not None and seq <= last:
            raise InstructionRefused(
                f"instruction sequence {seq} is not above {last}, the last accepted for run "
                f"{run_id} (replayed or out of order)"
            )
        last_by_run[name] = seq
        doc = {"v": SEQUENCE_VERSION, "last": last_by_run}
        # Unsynced (written whole, renamed): every message writes it, and a power cut that
        # brings back an older seq lets through only instructions the durable release log
        # and the sealed round state refuse anyway (nothing is released twice).
        replace_file(path, json.dumps(doc, sort_keys=True).encode("utf-8"), sync=False)
    return last


def _read_sequences(path: Path) -> dict[str, int]:
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_bytes())
        last = doc["last"] if doc.get("v") == SEQUENCE_VERSION else None
        if not isinstance(last, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
            for k, v in last.items()
        ):
            raise ValueError("bad layout")
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        raise InstructionRefused(
            f"the site's sequence store {path.name} is unreadable ({exc})"
        ) from None
    return dict(last)
