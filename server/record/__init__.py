"""The central record: one SQLModel schema, the ``SqlRecord`` front over its parts, artifacts, keys.

:class:`Record` is the protocol the rest of fedseal relies on; :class:`SqlRecord`
implements it over one SQL database, composed of :mod:`~server.record.db`
(engine, schema, transactions), :mod:`~server.record.audit_log`,
:mod:`~server.record.runs`, :mod:`~server.record.spend` and
:mod:`~server.record.registry`, with the values of :mod:`~server.record.values`.
"""

from server.record.artifacts import ArtifactStore, sha256_hex
from server.record.keys import KeyPaths, create_keypair, load_private_key, load_public_key
from server.record.protocol import Record
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
    "RunInfo",
    "SqlRecord",
    "create_keypair",
    "load_private_key",
    "load_public_key",
    "sha256_hex",
]
