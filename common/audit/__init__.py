"""The tamper-evident audit log: hash chain, signed heads, witness checks, export format.

Layering: :mod:`~common.audit.chain` (events and their hash chain) imports
nothing else of the package; :mod:`~common.audit.seal` (signed heads and the
verification of a sealed history) builds on it; :mod:`~common.audit.export`
and :mod:`~common.audit.witness` build on both. :mod:`~common.audit.instruction`
(the coordinator's signature on every instruction it sends, under the same key)
stands alone.

Pure: no database, no network, no Flower. The server's record
(``server.record``) stores events and seals; sites keep signed heads and use
:func:`check_witness` on an exported history; :func:`verify_with_witnesses`
joins both verdicts. Signing keys change only by sealed ``key_rotated``
events, followed from the verifier's trusted key (:func:`key_schedule`).
"""

from common.audit.chain import (
    GENESIS_HASH,
    AuditEvent,
    canonical_json,
    event_hash,
    find_chain_break,
    make_event,
)
from common.audit.export import AuditExport, encode_export, parse_export
from common.audit.seal import (
    KEY_ROTATED,
    KeySchedule,
    SignedHead,
    VerifyReport,
    key_schedule,
    load_public_key_pem,
    rotation_payload,
    sign_head,
    verify_chain,
)
from common.audit.witness import (
    HeadCheck,
    WitnessReport,
    check_witness,
    parse_witness_lines,
    verify_with_witnesses,
)

__all__ = [
    "GENESIS_HASH",
    "KEY_ROTATED",
    "AuditEvent",
    "AuditExport",
    "HeadCheck",
    "KeySchedule",
    "SignedHead",
    "VerifyReport",
    "WitnessReport",
    "canonical_json",
    "check_witness",
    "encode_export",
    "event_hash",
    "find_chain_break",
    "key_schedule",
    "load_public_key_pem",
    "make_event",
    "parse_export",
    "parse_witness_lines",
    "rotation_payload",
    "sign_head",
    "verify_chain",
    "verify_with_witnesses",
]
