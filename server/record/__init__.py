"""The central record: one SQLModel schema, the ``SqlRecord`` repository, model artifacts, audit keys."""

from server.record.artifacts import ArtifactStore, sha256_hex
from server.record.keys import KeyPaths, create_keypair, load_private_key, load_public_key
from server.record.schema import SCHEMA_VERSION
from server.record.store import (
    EnergyEntry,
    ModelVersion,
    NodeEntry,
    PrivacyEntry,
    RoundInfo,
    RunInfo,
    SqlRecord,
)

__all__ = [
    "SCHEMA_VERSION",
    "ArtifactStore",
    "EnergyEntry",
    "KeyPaths",
    "ModelVersion",
    "NodeEntry",
    "PrivacyEntry",
    "RoundInfo",
    "RunInfo",
    "SqlRecord",
    "create_keypair",
    "load_private_key",
    "load_public_key",
    "sha256_hex",
]
