"""The run's bookkeeping in the central record: what the round driver reports, sealed.

:class:`RunBook` is the only place the ServerApp writes the record: run start
(configuration, policy hash, code hash), nodes seen, rounds, refusals,
rejected updates, secure-aggregation outcomes, privacy spends, energy,
model versions, and the end of the run. After every round (and at the end)
it seals the audit head with the server's Ed25519 key; the signed head goes
out with the next round's instructions so the sites keep a witness copy.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.audit.seal import SignedHead
from server.record import KeyPaths, ModelVersion, SqlRecord, create_keypair, load_private_key

CODE_PACKAGES = ("common", "client", "server", "policies")


@functools.lru_cache(maxsize=1)
def code_hash() -> str:
    """SHA-256 over fedseal's installed Python sources (path and content, sorted)."""
    h = hashlib.sha256()
    for package in CODE_PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        root = Path(next(iter(spec.submodule_search_locations)))
        for path in sorted(root.rglob("*.py")):
            h.update(f"{package}/{path.relative_to(root).as_posix()}\0".encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def load_or_create_key(key_dir: Path) -> Ed25519PrivateKey:
    """The server's audit signing key from ``key_dir`` (created, 0600, on first use)."""
    paths = KeyPaths.in_dir(key_dir)
    if not paths.private_key.exists():
        create_keypair(key_dir)
    return load_private_key(paths.private_key)


def default_db_url() -> str:
    """Where a ServerApp started without a record URL keeps it (``$FLWR_HOME/fedseal``)."""
    home = Path(os.environ.get("FLWR_HOME") or Path.home() / ".fedseal")
    (home / "fedseal").mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'fedseal' / 'record.db'}"


class RunBook:
    """Writes one run into the central record and seals it."""

    def __init__(self, record: SqlRecord, signing_key: Ed25519PrivateKey, run_id: str) -> None:
        self.record = record
        self.key = signing_key
        self.run_id = run_id
        self._nodes: set[int] = set()
        self.head: SignedHead | None = record.latest_seal()

    # ------------------------------------------------------------------ run
    def start(self, config: Mapping[str, Any], policy_hash: str | None) -> None:
        self.record.create_run(
            config, run_id=self.run_id, policy_hash=policy_hash, app_hash=code_hash()
        )
        self.seal()

    def resume(self) -> ModelVersion | None:
        version = self.record.resume_run(self.run_id)
        self.seal()
        return version

    def finish(self, status: str = "finished", reason: str | None = None) -> None:
        self.record.finish_run(self.run_id, status=status, reason=reason)
        self.seal()

    def seal(self) -> SignedHead:
        self.head = self.record.seal(self.key)
        return self.head

    # ---------------------------------------------------------------- rounds
    def nodes_seen(self, node_ids: Sequence[int]) -> None:
        for n in node_ids:
            if n not in self._nodes:
                self.record.record_node(self.run_id, n, True, "connected")
                self._nodes.add(n)

    def round_started(self, server_round: int, cohort: Sequence[int]) -> None:
        self.record.start_round(self.run_id, server_round, cohort)

    def event(self, kind: str, payload: Mapping[str, Any]) -> None:
        self.record.append_event(self.run_id, kind, "server", dict(payload))

    def round_finished(self, server_round: int, metrics: Mapping[str, Any]) -> None:
        self.record.finish_round(self.run_id, server_round, metrics)

    def model_version(
        self,
        server_round: int,
        vector_bytes: bytes,
        metrics: Mapping[str, Any],
        participants: Sequence[int],
        record_level_epsilon: float | None,
        client_level_epsilon: float | None,
        energy_kwh: float | None,
    ) -> ModelVersion:
        parent = self.record.latest_version(self.run_id)
        return self.record.add_model_version(
            self.run_id,
            server_round,
            parent.version if parent else None,
            vector_bytes,
            metrics,
            record_level_epsilon,
            client_level_epsilon,
            energy_kwh,
            participants,
        )
