"""The central record: one SQLModel schema, the ``SqlRecord`` front over its parts, artifacts, keys.

:class:`Record` is the protocol the rest of fedseal relies on; :class:`SqlRecord`
implements it over one SQL database, composed of :mod:`~server.record.db`
(engine, schema, transactions), :mod:`~server.record.audit_log`,
:mod:`~server.record.runs`, :mod:`~server.record.spend` and
:mod:`~server.record.registry`, with the values of :mod:`~server.record.values`. The audit-signing key is
loaded, never created on demand (:mod:`~server.record.keys`), and changes
only by an audited rotation (:mod:`~server.record.rotation`).
"""

from server.record.artifacts import ArtifactStore, sha256_hex
from server.record.keys import (
    KeyPaths,
    create_keypair,
    load_private_key,
    load_public_key,
    load_signing_key,
)
from server.record.protocol import Record
from server.record.rotation import Rotation, rotate_signing_key, signing_key_for
from server.record.schema import SCHEMA_VERSION
from server.record.store import SqlRecord
from server.record.values import (
    EnergyEntry,
    ModelVersion,
    NodeEntry,
    PrivacyEntry,
    RoundInfo,
    RunInfo,
)

__all__ = [
    "SCHEMA_VERSION",
    "ArtifactStore",
    "EnergyEntry",
    "KeyPaths",
    "ModelVersion",
    "NodeEntry",
    "PrivacyEntry",
    "Record",
    "RoundInfo",
    "Rotation",
    "RunInfo",
    "SqlRecord",
    "create_keypair",
    "load_private_key",
    "load_public_key",
    "load_signing_key",
    "rotate_signing_key",
    "sha256_hex",
    "signing_key_for",
]
