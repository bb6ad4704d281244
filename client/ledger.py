"""The site privacy ledger: every DP-SGD application to a dataset, on the site's disk.

A small SQLite database (SQLModel) holds one row per mechanism application
(dataset, run, round, noise multiplier, sample rate, steps, delta,
accountant, state). The record-level epsilon of a dataset is always
recomputed from its full history (all runs, all rounds, reserved rows
included) by :func:`common.dp.accounting.epsilon_for`, never kept as a
running number.

Reserve, then confirm: :meth:`SiteLedger.reserve` writes the round's row as
``reserved`` *before* training, in one ``BEGIN IMMEDIATE`` transaction that
first computes the epsilon the round would bring the total to and refuses
(:class:`~common.errors.PrivacyBudgetExceeded`, nothing written) if it would
exceed the budget. ``BEGIN IMMEDIATE`` takes SQLite's write lock before the
history is read, so several processes sharing the file cannot both pass the
check on the same history. A reserved row counts as spent, so a crash
between reserve and confirm can only over-count. Reserving the same
(dataset, run, round) again returns the existing row and is not counted
twice. :meth:`SiteLedger.would_spend` is the same check without the write
(a dry run, e.g. to decide whether to take part before any data is
touched). :meth:`SiteLedger.confirm` checks that the training took exactly
the steps reserved (an :class:`~common.errors.IntegrityError` otherwise:
the ledger would account another mechanism than the one applied, so the
update must not leave). The ledger stores no data and no secrets.

Client-level participation (table ``client_participation``, same file):
one row per round the site contributed an update to under client-level DP
(DP-FedAvg at the coordinator), with the run's client-level event, so the
site sees its own client-level exposure (:meth:`SiteLedger.client_exposure`)
without trusting the coordinator's record. Record-level and client-level
figures are kept apart and never added.

The public size (table ``public_size``, same file): a dataset's size is
private (add/remove adjacency), so a DP plan is made from a noisy size
``n~ = n + N(0, sigma^2)`` released once per dataset, a Gaussian mechanism
of sensitivity 1 charged as the record-level event ``(sigma, 1.0, 1)``
(row ``run_id = "public-size"``, round 0) in the same transaction that
stores ``n~`` (:meth:`SiteLedger.public_size`); every later plan reuses it
(post-processing, nothing more to charge).

The release log (table ``site_release``, same file): one row per
(dataset, run, round) a site has answered a train request for, so that a
site releases at most one data-dependent reply per round whatever the
coordinator asks (:mod:`client.release` decides; this module only stores).
:meth:`SiteLedger.claim_release` writes the row as ``reserved`` *before*
the data is touched, in one ``BEGIN IMMEDIATE`` transaction that first
looks for an earlier row (a second request for the round gets that row
back, nothing written); :meth:`SiteLedger.store_release` marks it
``released`` *before* the reply leaves the site, with the reply sealed
(plain rounds: an AEAD ciphertext made by :mod:`client.release`, never the
plaintext) and the id of the privacy-ledger entry that charged the round
(None without DP). Which release answered which request: each row keeps
the digest of the request it answered (:func:`common.record_digest.request_digest`)
and counts the later requests it answered with the same bytes (``resent``)
or refused (``refused``); the coordinator's audit log holds every refusal's
reason. A reserved row whose attempt failed in this process (an error, a
refusal) is removed (:meth:`SiteLedger.abandon_release`): nothing left the
site. One left by a crash stays: the site cannot tell a crashed attempt
from one still running in another process, so it never trains that round
again.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, UniqueConstraint
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import registry
from sqlmodel import Field, Session, SQLModel, select

from client.state import create_private_file, private_dir, read_private_file
from common.dp.accounting import (
    DEFAULT_ACCOUNTANT,
    epsilon_for,
    validate_accountant,
    validate_delta,
)
from common.dp.events import PrivacyEvent, PrivacyLevel
from common.errors import (
    ConfigurationError,
    IntegrityError,
    PrivacyBudgetExceeded,
    RecordError,
)
from common.sqlite import sqlite_engine

__all__ = [
    "PUBLIC_SIZE_RUN",
    "ClientExposure",
    "DatasetTotal",
    "LedgerEntry",
    "ParticipationEntry",
    "PublicSize",
    "ReleaseClaim",
    "ReleaseEntry",
    "SiteLedger",
    "Spend",
]

RESERVED = "reserved"
CONFIRMED = "confirmed"
RELEASED = "released"
RELEASE_KINDS = ("plain", "secure")
_BUSY_TIMEOUT_S = 30.0


class _LedgerModel(SQLModel, registry=registry()):
    """Base with its own metadata, so the ledger file holds only ledger tables."""


class _RoundMechanism(_LedgerModel):
    """The columns both mechanism tables share: the round, its Gaussian mechanism, its delta."""

    id: int | None = Field(default=None, primary_key=True)
    dataset_id: str = Field(index=True)
    run_id: str
    round: int
    noise_multiplier: float
    sample_rate: float
    delta: float
    accountant: str
    created_at: datetime


class LedgerRow(_RoundMechanism, table=True):
    """One record-level mechanism application (SQL row)."""

    __tablename__ = "privacy_ledger"
    __table_args__ = (
        UniqueConstraint("dataset_id", "run_id", "round", name="uq_dataset_run_round"),
    )

    steps: int
    state: str
    confirmed_at: datetime | None = None


class ParticipationRow(_RoundMechanism, table=True):
    """One round the site contributed to under client-level DP (SQL row), with its event."""

    __tablename__ = "client_participation"
    __table_args__ = (
        UniqueConstraint("dataset_id", "run_id", "round", name="uq_participation_run_round"),
    )


class PublicSizeRow(_LedgerModel, table=True):
    """A dataset's released noisy size (SQL row): drawn once, charged once, reused."""

    __tablename__ = "public_size"

    id: int | None = Field(default=None, primary_key=True)
    dataset_id: str = Field(unique=True)
    noisy_size: int
    noise_std: float
    entry_id: int
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))


PUBLIC_SIZE_RUN = "public-size"
"""The ``run_id`` of the ledger row that charges a dataset's noisy-size release (round 0)."""


@dataclass(frozen=True, slots=True)
class PublicSize:
    """A dataset's noisy size as released: ``n~``, the noise std and the charging entry."""

    dataset_id: str
    noisy_size: int
    noise_std: float
    entry_id: int

    @property
    def event(self) -> PrivacyEvent:
        """The release's record-level event: the Gaussian mechanism, sensitivity 1."""
        return PrivacyEvent(self.noise_std, 1.0, 1, PrivacyLevel.RECORD)


_ENGINES: dict[tuple[int, str, str], Engine] = {}


def _engine(path: Path, synchronous: str = "FULL") -> Engine:
    """This process's engine for the ledger at ``path``, its tables made on first use.

    One per file, sync level and process: a simulated site's ClientApp runs
    many messages in one process, and an engine with its schema check cost
    about 7 ms per message. Write-ahead log; ``synchronous=FULL`` (every
    write that privacy depends on: reserving a round's spend, claiming a
    release): a commit is durable once it returns, with one sync of the log
    (a rollback journal needs two or three). ``NORMAL`` (WAL keeps it safe
    from corruption; the last commits may be lost to a power cut, never to
    a process crash) only for the writes whose loss makes the site refuse
    rather than release again: marking a claimed release stored, counting
    answers.
    """
    key = (os.getpid(), str(path.resolve()), synchronous)
    engine = _ENGINES.get(key)
    if engine is not None and path.exists():
        return engine
    engine = sqlite_engine(
        f"sqlite:///{path}",
        timeout_s=_BUSY_TIMEOUT_S,
        journal_mode="WAL",
        synchronous=synchronous,
    )
    try:
        _LedgerModel.metadata.create_all(engine)
    except SQLAlchemyError as exc:
        engine.dispose()
        raise RecordError(f"cannot open the privacy ledger {path}: {exc}") from exc
    if len(_ENGINES) >= 256:
        for old in _ENGINES.values():
            old.dispose()
        _ENGINES.clear()
    _ENGINES[key] = engine
    return engine


RELEASES_DIR = "releases"
"""Beside the ledger: one sealed file per plain release (``<release id>.sealed``)."""


class ReleaseRow(_LedgerModel, table=True):
    """The one release of a (dataset, run, round) (SQL row); see the module docstring."""

    __tablename__ = "site_release"
    __table_args__ = (
        UniqueConstraint("dataset_id", "run_id", "round", name="uq_release_dataset_run_round"),
    )

    id: int | None = Field(default=None, primary_key=True)
    dataset_id: str = Field(index=True)
    run_id: str
    round: int
    kind: str  # "plain" (cached reply) or "secure" (a masked input: nothing cached)
    state: str  # "reserved" (claimed, nothing left yet) or "released"
    request_digest: str  # hex SHA-256 of the request it answered
    setup_digest: str | None = None  # secure: hex SHA-256 of the SecAgg configuration
    ledger_entry_id: int | None = Field(default=None, foreign_key="privacy_ledger.id")
    sealed_sha256: str | None = None  # plain: hex SHA-256 of the sealed reply's file
    resent: int = 0  # later identical requests answered with the same bytes
    refused: int = 0  # later requests refused
    created_at: datetime
    released_at: datetime | None = None


_Row = TypeVar("_Row", LedgerRow, ReleaseRow, ParticipationRow)
_Value = TypeVar("_Value")


@dataclass(frozen=True, slots=True)
class ReleaseEntry:
    """A release-log row as a value (a plain round's sealed reply is a file: :meth:`SiteLedger.sealed_reply`)."""

    id: int
    dataset_id: str
    run_id: str
    round: int
    kind: str
    state: str
    request_digest: str
    setup_digest: str | None
    ledger_entry_id: int | None
    sealed_sha256: str | None
    resent: int
    refused: int
    created_at: datetime
    released_at: datetime | None

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (ISO 8601 times; the sealed reply only as its digest)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["created_at"] = self.created_at.isoformat()
        out["released_at"] = self.released_at.isoformat() if self.released_at else None
        return out


@dataclass(frozen=True, slots=True)
class ReleaseClaim:
    """What :meth:`SiteLedger.claim_release` found: a new reservation, or the earlier row."""

    entry: ReleaseEntry
    fresh: bool  # True: reserved now for this request; False: the round had a row already


def _release(row: ReleaseRow) -> ReleaseEntry:
    if row.id is None:
        raise RecordError("release row without an id")
    return ReleaseEntry(**row.model_dump())


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """A ledger row as a value."""

    id: int
    dataset_id: str
    run_id: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    accountant: str
    state: str
    created_at: datetime
    confirmed_at: datetime | None

    @property
    def event(self) -> PrivacyEvent:
        """The record-level privacy event this row records."""
        return PrivacyEvent(
            self.noise_multiplier, self.sample_rate, self.steps, PrivacyLevel.RECORD
        )

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (ISO 8601 times)."""
        return {
            "id": self.id,
            "dataset_id": self.dataset_id,
            "run_id": self.run_id,
            "round": self.round,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
            "delta": self.delta,
            "accountant": self.accountant,
            "state": self.state,
            "created_at": self.created_at.isoformat(),
            "confirmed_at": self.confirmed_at.isoformat() if self.confirmed_at else None,
        }


@dataclass(frozen=True, slots=True)
class DatasetTotal:
    """Record-level spend of one dataset, recomputed from its full history."""

    dataset_id: str
    entries: int
    reserved: int
    confirmed: int
    steps: int
    delta: float
    accountant: str
    record_level_epsilon: float

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict; an infinite epsilon (noise 0) is written as the string ``"inf"``."""
        eps: float | str = (
            self.record_level_epsilon if math.isfinite(self.record_level_epsilon) else "inf"
        )
        return {
            "dataset_id": self.dataset_id,
            "entries": self.entries,
            "reserved": self.reserved,
            "confirmed": self.confirmed,
            "steps": self.steps,
            "delta": self.delta,
            "accountant": self.accountant,
            "record_level_epsilon": eps,
        }


@dataclass(frozen=True, slots=True)
class ParticipationEntry:
    """A client-level participation row as a value: the site contributed to (run, round)."""

    id: int
    run_id: str
    round: int
    event: PrivacyEvent  # the run's client-level event for this round (one step)
    delta: float
    accountant: str
    dataset_id: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class ClientExposure:
    """A site's client-level exposure in one run (:meth:`SiteLedger.client_exposure`)."""

    dataset_id: str
    run_id: str
    rounds: int
    noise_multiplier: float
    sample_rate: float
    delta: float
    accountant: str
    client_level_epsilon: float

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict; an infinite epsilon is written as the string ``"inf"``."""
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        if not math.isfinite(self.client_level_epsilon):
            out["client_level_epsilon"] = "inf"
        return out


def _mechanism(
    dataset_id: str, run_id: str, round: int, event: PrivacyEvent, delta: float, accountant: str
) -> dict[str, Any]:
    """The columns a new mechanism row shares (:class:`_RoundMechanism`), from its event."""
    key = {"dataset_id": dataset_id, "run_id": run_id, "round": round}
    mechanism = {"noise_multiplier": event.noise_multiplier, "sample_rate": event.sample_rate}
    return (
        key
        | mechanism
        | {"delta": delta, "accountant": accountant, "created_at": datetime.now(UTC)}
    )


def _participation(row: ParticipationRow) -> ParticipationEntry:
    if row.id is None:
        raise RecordError("participation row without an id")
    try:
        event = PrivacyEvent(row.noise_multiplier, row.sample_rate, 1, PrivacyLevel.CLIENT)
    except ConfigurationError as exc:
        raise RecordError(f"the ledger holds an invalid participation row: {exc}") from exc
    return ParticipationEntry(
        row.id, row.run_id, row.round, event, row.delta, row.accountant, row.dataset_id,
        row.created_at,
    )  # fmt: skip


def _entry(row: LedgerRow) -> LedgerEntry:
    if row.id is None:
        raise RecordError("ledger row without an id")
    return LedgerEntry(
        id=row.id,
        dataset_id=row.dataset_id,
        run_id=row.run_id,
        round=row.round,
        noise_multiplier=row.noise_multiplier,
        sample_rate=row.sample_rate,
        steps=row.steps,
        delta=row.delta,
        accountant=row.accountant,
        state=row.state,
        created_at=row.created_at,
        confirmed_at=row.confirmed_at,
    )


def _check_text(name: str, value: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigurationError(f"{name} must be a non-empty string, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class Spend:
    """What reserving one round would do to its dataset's record-level epsilon.

    ``recorded``: the (dataset, run, round) is in the ledger already, so the
    round costs nothing new (``would_be == spent``).
    """

    spent: float
    would_be: float
    budget: float
    recorded: bool

    @property
    def exceeds(self) -> bool:
        """Whether the round would take the dataset over its budget."""
        return self.would_be > self.budget

    def error(self) -> PrivacyBudgetExceeded:
        """The refusal to give (or raise) when :attr:`exceeds`."""
        return PrivacyBudgetExceeded(self.spent, self.budget, self.would_be)


def _check_budget(budget: float) -> float:
    if isinstance(budget, bool) or not isinstance(budget, int | float):
        raise ConfigurationError(f"budget must be a real number, got {budget!r}")
    if not (math.isfinite(budget) and budget > 0):
        raise ConfigurationError(f"budget must be finite and > 0, got {budget!r}")
    return float(budget)


def _check_round_key(dataset_id: str, run_id: str, round: int) -> None:
    """Validate the (dataset, run, round) that keys a ledger or release-log row."""
    _check_text("dataset_id", dataset_id)
    _check_text("run_id", run_id)
    if isinstance(round, bool) or not isinstance(round, int) or round < 0:
        raise ConfigurationError(f"round must be an int >= 0, got {round!r}")


def _check_reserve_args(
    dataset_id: str,
    run_id: str,
    round: int,
    event: PrivacyEvent,
    delta: float,
    accountant: str,
    budget: float,
) -> tuple[float, str, float]:
    """Validate :meth:`SiteLedger.reserve`'s arguments; return (delta, accountant, budget)."""
    _check_round_key(dataset_id, run_id, round)
    if not isinstance(event, PrivacyEvent) or event.level is not PrivacyLevel.RECORD:
        raise ConfigurationError("the site ledger records record-level PrivacyEvents only")
    return validate_delta(delta), validate_accountant(accountant), _check_budget(budget)


class SiteLedger:
    """The site privacy ledger in the SQLite file at ``path`` (created if missing).

    Parameters
    ----------
    path : str or Path
        Database file; its parent folder must exist.

    Raises
    ------
    RecordError
        If the database cannot be opened or created.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise RecordError(f"ledger folder {self.path.parent} does not exist")
        self._engine: Engine = _engine(self.path)
        self._lazy: Engine | None = None  # synchronous=NORMAL, made when first needed

    def close(self) -> None:
        """Nothing to release: the process keeps one engine per ledger file (:func:`_engine`)."""

    def __enter__(self) -> SiteLedger:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @contextmanager
    def _session(self, *, durable: bool = True) -> Iterator[Session]:
        """One ``BEGIN IMMEDIATE`` transaction: commit on success, roll back on error.

        ``durable=False`` commits without syncing (see :func:`_engine`): only
        for writes whose loss leaves the site refusing, never releasing twice.
        """
        engine = self._engine
        if not durable:
            if self._lazy is None:
                self._lazy = _engine(self.path, "NORMAL")
            engine = self._lazy
        with Session(engine) as session, session.begin():
            yield session

    @staticmethod
    def _events(session: Session, dataset_id: str) -> list[PrivacyEvent]:
        rows = session.exec(
            select(LedgerRow).where(LedgerRow.dataset_id == dataset_id).order_by(LedgerRow.id)  # type: ignore[arg-type]
        ).all()
        try:
            return [_entry(r).event for r in rows]
        except ConfigurationError as exc:
            raise RecordError(f"the ledger holds an invalid row for {dataset_id!r}: {exc}") from exc

    def spent(self, dataset_id: str, delta: float, accountant: str = DEFAULT_ACCOUNTANT) -> float:
        """Record-level epsilon of the full history of ``dataset_id`` at ``delta``.

        Reserved and confirmed rows of every run count.
        """
        _check_text("dataset_id", dataset_id)
        d = validate_delta(delta)
        name = validate_accountant(accountant)
        try:
            with self._session() as session:
                events = self._events(session, dataset_id)
        except SQLAlchemyError as exc:
            raise RecordError(f"cannot read the privacy ledger {self.path}: {exc}") from exc
        return epsilon_for(events, d, name)

    def would_spend(
        self,
        dataset_id: str,
        run_id: str,
        round: int,
        event: PrivacyEvent,
        delta: float,
        accountant: str,
        budget: float,
    ) -> Spend:
        """Dry run of :meth:`reserve`: the same check on the same history, nothing written.

        Parameters
        ----------
        dataset_id, run_id, round, event, delta, accountant, budget
            As for :meth:`reserve`.

        Returns
        -------
        Spend
            The dataset's epsilon now and after the round. A round already in
            the ledger costs nothing new (its mechanism is not compared here;
            :meth:`reserve` does that).

        Raises
        ------
        RecordError
            If the database fails or holds an invalid row.
        ConfigurationError
            For invalid arguments.
        """
        d, name, limit = _check_reserve_args(
            dataset_id, run_id, round, event, delta, accountant, budget
        )
        try:
            with self._session() as session:
                existing = self._row(session, dataset_id, run_id, round)
                return self._spend(session, dataset_id, event, d, name, limit, existing is not None)
        except SQLAlchemyError as exc:
            raise RecordError(f"cannot read the privacy ledger {self.path}: {exc}") from exc

    def reserve(
        self,
        dataset_id: str,
        run_id: str,
        round: int,
        event: PrivacyEvent,
        delta: float,
        accountant: str,
        budget: float,
    ) -> int:
        """Reserve ``event`` for (dataset, run, round) if it stays within ``budget``.

        Check, then commit, in one transaction: the check is
        :meth:`would_spend`'s, the write follows only if it passes.

        Parameters
        ----------
        dataset_id, run_id : str
            Non-empty identifiers.
        round : int
            Round number, ``>= 0``.
        event : PrivacyEvent
            Record-level event the round will apply (planned steps).
        delta : float
            Delta at which the budget is checked, in (0, 1).
        accountant : {"pld", "prv", "rdp"}
            Accountant of the check.
        budget : float
            Lifetime record-level epsilon budget of the dataset, ``> 0``.

        Returns
        -------
        int
            The entry id (the existing one if this round was reserved before).

        Raises
        ------
        PrivacyBudgetExceeded
            If the full history plus ``event`` exceeds ``budget``; nothing is written.
        RecordError
            If the round was reserved before with a different mechanism, or
            the database fails.
        ConfigurationError
            For invalid arguments.
        """
        d, name, limit = _check_reserve_args(
            dataset_id, run_id, round, event, delta, accountant, budget
        )
        try:
            with self._session() as session:
                existing = self._row(session, dataset_id, run_id, round)
                if existing is not None:
                    if (existing.noise_multiplier, existing.sample_rate, existing.steps) != (
                        event.noise_multiplier,
                        event.sample_rate,
                        event.steps,
                    ):
                        raise RecordError(
                            f"round {round} of run {run_id!r} on {dataset_id!r} is already "
                            "reserved with a different mechanism"
                        )
                    return _entry(existing).id
                spend = self._spend(session, dataset_id, event, d, name, limit, recorded=False)
                if spend.exceeds:
                    raise spend.error()
                row = LedgerRow(
                    **_mechanism(dataset_id, run_id, round, event, d, name),
                    steps=event.steps,
                    state=RESERVED,
                )
                session.add(row)
                session.flush()
                entry_id = _entry(row).id
        except SQLAlchemyError as exc:
            raise RecordError(f"cannot write the privacy ledger {self.path}: {exc}") from exc
        return entry_id

    @staticmethod
    def _row(session: Session, dataset_id: str, run_id: str, round: int) -> LedgerRow | None:
        """The ledger's row for (dataset, run, round), if the round was reserved before."""
        return session.exec(
            select(LedgerRow).where(
                LedgerRow.dataset_id == dataset_id,
                LedgerRow.run_id == run_id,
                LedgerRow.round == round,
            )
        ).first()

    def _spend(
        self,
        session: Session,
        dataset_id: str,
        event: PrivacyEvent,
        delta: float,
        accountant: str,
        budget: float,
        recorded: bool,
    ) -> Spend:
        """The budget check shared by :meth:`would_spend` and :meth:`reserve`.

        Computed from the full history read inside the caller's transaction; a
        round already recorded adds nothing to it.
        """
        history = self._events(session, dataset_id)
        spent = epsilon_for(history, delta, accountant)
        would_be = spent if recorded else epsilon_for([*history, event], delta, accountant)
        return Spend(spent, would_be, budget, recorded)

    def confirm(self, entry_id: int, *, steps_taken: int) -> None:
        """Mark a reserved entry confirmed (training is done, the update may leave); idempotent.

        The mechanism must be the one reserved: ``steps_taken`` (the noised
        steps the training really took, :attr:`client.privacy.DpSgdHandle.steps`)
        must equal the entry's reserved steps. Otherwise the ledger would
        account another mechanism than the one applied; the entry stays
        reserved (counted as spent) and the caller must not release the
        update.

        Raises
        ------
        IntegrityError
            If ``steps_taken`` differs from the reserved steps (nothing written).
        RecordError
            If no entry has this id.
        """
        if isinstance(entry_id, bool) or not isinstance(entry_id, int):
            raise ConfigurationError(f"entry_id must be an int, got {entry_id!r}")
        if isinstance(steps_taken, bool) or not isinstance(steps_taken, int):
            raise ConfigurationError(f"steps_taken must be an int, got {steps_taken!r}")
        try:
            with self._session() as session:
                row = session.get(LedgerRow, entry_id)
                if row is None:
                    raise RecordError(f"no ledger entry {entry_id}")
                if steps_taken != row.steps:
                    raise IntegrityError(
                        f"ledger entry {entry_id}: {steps_taken} DP-SGD steps taken, "
                        f"{row.steps} reserved; the round's update must not leave the site"
                    )
                if row.state != CONFIRMED:
                    row.state = CONFIRMED
                    row.confirmed_at = datetime.now(UTC)
                    session.add(row)
        except SQLAlchemyError as exc:
            raise RecordError(f"cannot write the privacy ledger {self.path}: {exc}") from exc

    # ------------------------------------------------------------ the public size
    def public_size(
        self,
        dataset_id: str,
        *,
        noise_std: float,
        draw: Callable[[], int],
        delta: float,
        accountant: str,
        budget: float,
    ) -> PublicSize:
        """The dataset's released noisy size: the stored one, else drawn, charged and stored.

        In one ``BEGIN IMMEDIATE`` transaction: an earlier release is returned
        as it is (whatever ``noise_std`` now says: the value is public
        already, reusing it costs nothing); otherwise the budget check of
        :meth:`reserve` for the event ``(noise_std, 1.0, 1)``, then
        ``draw()`` (which returns ``n + noise``, see
        :func:`client.privacy.noisy_size`), then the charging row
        (``run_id`` :data:`PUBLIC_SIZE_RUN`, confirmed) and the size row,
        committed together. The value exists outside this process only
        once both rows are durable: a crash before the commit leaves
        neither, and nothing was released.

        Raises
        ------
        PrivacyBudgetExceeded
            The history plus the release would exceed ``budget``: nothing drawn or written.
        RecordError
            The database fails, or holds a size row without its charge.
        ConfigurationError
            For invalid arguments.
        """
        if isinstance(noise_std, bool) or not (
            isinstance(noise_std, int | float) and math.isfinite(noise_std) and noise_std > 0
        ):
            raise ConfigurationError(f"noise_std must be finite and > 0, got {noise_std!r}")
        event = PrivacyEvent(float(noise_std), 1.0, 1, PrivacyLevel.RECORD)
        d, name, limit = _check_reserve_args(
            dataset_id, PUBLIC_SIZE_RUN, 0, event, delta, accountant, budget
        )
        try:
            with self._session() as session:
                row = session.exec(
                    select(PublicSizeRow).where(PublicSizeRow.dataset_id == dataset_id)
                ).first()
                if row is None:
                    if self._row(session, dataset_id, PUBLIC_SIZE_RUN, 0) is not None:
                        raise RecordError(
                            f"the ledger charges a size release of {dataset_id!r} it does "
                            "not hold: the ledger was edited"
                        )
                    spend = self._spend(session, dataset_id, event, d, name, limit, recorded=False)
                    if spend.exceeds:
                        raise spend.error()
                    size = draw()
                    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                        raise ConfigurationError(f"a noisy size must be an int >= 1, got {size!r}")
                    now = datetime.now(UTC)
                    charge = LedgerRow(
                        **_mechanism(dataset_id, PUBLIC_SIZE_RUN, 0, event, d, name),
                        steps=1,
                        state=CONFIRMED,
                        confirmed_at=now,
                    )
                    session.add(charge)
                    session.flush()
                    row = PublicSizeRow(
                        dataset_id=dataset_id,
                        noisy_size=size,
                        noise_std=event.noise_multiplier,
                        entry_id=_entry(charge).id,
                    )
                    session.add(row)
                    session.flush()
                elif session.get(LedgerRow, row.entry_id) is None:
                    raise RecordError(
                        f"the size release of {dataset_id!r} has lost its ledger charge: "
                        "the ledger was edited"
                    )
                return PublicSize(dataset_id, row.noisy_size, row.noise_std, row.entry_id)
        except SQLAlchemyError as exc:
            raise RecordError(f"cannot write the privacy ledger {self.path}: {exc}") from exc

    # ------------------------------------------------------------ client-level participation
    def record_participation(
        self, event: PrivacyEvent, dataset_id: str, run_id: str, round: int, *, delta: float,
        accountant: str,
    ) -> ParticipationEntry:  # fmt: skip
        """Record that the site contributes to (run, round) under client-level DP; idempotent.

        ``event`` is the run's client-level event for one round (the
        coordinator's noise multiplier and client sampling rate, one step).
        A second call for the same (dataset, run, round) returns the first
        row; one with another mechanism is an error.

        Raises
        ------
        ConfigurationError
            For invalid arguments or a record-level event.
        RecordError
            If the round was recorded with another mechanism, or the database fails.
        """
        _check_round_key(dataset_id, run_id, round)
        if not isinstance(event, PrivacyEvent) or event.level is not PrivacyLevel.CLIENT:
            raise ConfigurationError("client-level participation takes a client-level event")
        if event.steps != 1:
            raise ConfigurationError("a client-level round is one application of the mechanism")
        d, name = validate_delta(delta), validate_accountant(accountant)
        try:
            with self._session() as session:
                existing = session.exec(
                    select(ParticipationRow).where(
                        ParticipationRow.dataset_id == dataset_id,
                        ParticipationRow.run_id == run_id,
                        ParticipationRow.round == round,
                    )
                ).first()
                if existing is not None:
                    if _participation(existing).event != event:
                        raise RecordError(
                            f"client-level round {round} of run {run_id!r} is already "
                            "recorded with another mechanism"
                        )
                    return _participation(existing)
                row = ParticipationRow(**_mechanism(dataset_id, run_id, round, event, d, name))
                session.add(row)
                session.flush()  # the row's id, for the value returned once the commit is done
                return _participation(row)
        except SQLAlchemyError as exc:
            raise RecordError(f"cannot write the privacy ledger {self.path}: {exc}") from exc

    def participation(self, dataset_id: str | None = None) -> list[ParticipationEntry]:
        """Every client-level participation row (of one dataset, or all), in insertion order."""
        return self._listed(ParticipationRow, dataset_id, _participation, "privacy ledger")

    def client_exposure(self, dataset_id: str | None = None) -> list[ClientExposure]:
        """The site's client-level exposure per (dataset, run), from its participation rows.

        ``client_level_epsilon`` composes the run's Gaussian mechanism over
        the rounds the site contributed to *without* sampling amplification
        (rate 1): a bound that holds even against whoever knows which rounds
        the site was in (the coordinator's own figure, over all rounds at
        the sampling rate, holds only against model recipients who do not).
        Client-level and record-level epsilons are never added.
        """
        by_run: dict[tuple[str, str], list[ParticipationEntry]] = {}
        for entry in self.participation(dataset_id):
            by_run.setdefault((entry.dataset_id, entry.run_id), []).append(entry)
        out = []
        for (dataset, run), rows in by_run.items():
            last = rows[-1]
            events = [replace(r.event, sample_rate=1.0) for r in rows]
            out.append(
                ClientExposure(
                    dataset_id=dataset,
                    run_id=run,
                    rounds=len(rows),
                    noise_multiplier=last.event.noise_multiplier,
                    sample_rate=last.event.sample_rate,
                    delta=last.delta,
                    accountant=last.accountant,
                    client_level_epsilon=epsilon_for(events, last.delta, last.accountant),
                )
            )
        return out

    # ------------------------------------------------------------ release log
    def claim_release(
        self,
        dataset_id: str,
        run_id: str,
        round: int,
        kind: str,
        request_digest: str,
        setup_digest: str | None = None,
    ) -> ReleaseClaim:
        """Reserve the one release of (dataset, run, round), or return the row it already has.

        One ``BEGIN IMMEDIATE`` transaction: two processes asked for the same
        round cannot both get a fresh reservation. Call it before the data is
        touched.

        Parameters
        ----------
        dataset_id, run_id : str
            Non-empty identifiers.
        round : int
            Round number, ``>= 0``.
        kind : {"plain", "secure"}
            A plain reply (cached when stored) or a secure round's masked input.
        request_digest : str
            Hex digest of the request (:func:`common.record_digest.request_digest`).
        setup_digest : str or None
            Secure rounds: hex digest of the secure-aggregation configuration.

        Returns
        -------
        ReleaseClaim
            ``fresh`` with the new reserved row, or not fresh with the earlier
            row (nothing written).

        Raises
        ------
        RecordError
            If the database fails.
        ConfigurationError
            For invalid arguments.
        """
        _check_round_key(dataset_id, run_id, round)
        _check_text("request_digest", request_digest)
        if kind not in RELEASE_KINDS:
            raise ConfigurationError(f"release kind must be one of {RELEASE_KINDS}, got {kind!r}")
        try:
            with self._session() as session:
                existing = self._release_row(session, dataset_id, run_id, round)
                if existing is not None:
                    return ReleaseClaim(_release(existing), fresh=False)
                row = ReleaseRow(
                    dataset_id=dataset_id,
                    run_id=run_id,
                    round=round,
                    kind=kind,
                    state=RESERVED,
                    request_digest=request_digest,
                    setup_digest=setup_digest,
                    created_at=datetime.now(UTC),
                )
                session.add(row)
                session.flush()
                claim = ReleaseClaim(_release(row), fresh=True)
        except SQLAlchemyError as exc:
            raise RecordError(f"cannot write the release log {self.path}: {exc}") from exc
        return claim

    def store_release(self, release_id: int, sealed_reply: bytes | None) -> ReleaseEntry:
        """Mark a reserved release ``released``, before its reply leaves the site.

        Links the privacy-ledger entry that charged the same (dataset, run,
        round), if any (None for a run without DP).

        Parameters
        ----------
        release_id : int
            The id :meth:`claim_release` returned.
        sealed_reply : bytes or None
            Plain rounds: the reply as an AEAD ciphertext, written (0600)
            to its own file in ``releases/`` beside the ledger before
            the row is marked released, the row keeping its SHA-256; None for
            a masked input. (A file, not a column: a multi-megabyte blob in
            SQLite's rollback journal cost about twice the time on every
            plain round of every site.)

        Raises
        ------
        RecordError
            If the row does not exist or is not reserved, or the database fails.
        """
        try:
            with self._session(durable=False) as session:
                row = self._reserved(session, release_id)
                ledger_row = self._row(session, row.dataset_id, row.run_id, row.round)
                if sealed_reply is not None:
                    self._write_sealed(release_id, sealed_reply)
                    row.sealed_sha256 = hashlib.sha256(sealed_reply).hexdigest()
                row.state, row.released_at = RELEASED, datetime.now(UTC)
                row.ledger_entry_id = ledger_row.id if ledger_row is not None else None
                session.add(row)
                session.flush()
                entry = _release(row)
        except SQLAlchemyError as exc:
            raise RecordError(f"cannot write the release log {self.path}: {exc}") from exc
        return entry

    def _sealed_path(self, release_id: int) -> Path:
        return self.path.parent / RELEASES_DIR / f"{release_id}.sealed"

    def _write_sealed(self, release_id: int, data: bytes) -> None:
        """``data`` to the release's file (private, written whole, then renamed into place).

        Not synced: only the row's commit is. A crash that loses the file
        after the row committed leaves a release whose bytes are gone, which
        :meth:`sealed_reply` reports as None and the site refuses to answer
        again (it never trains the round twice); nothing else depends on it.
        """
        try:
            private_dir(self.path.parent / RELEASES_DIR)
            path = self._sealed_path(release_id)
            partial = path.with_suffix(".partial")
            partial.unlink(missing_ok=True)  # left by an attempt a crash cut off
            create_private_file(partial, data, sync=False)
            os.replace(partial, path)
        except (OSError, ConfigurationError) as exc:
            raise RecordError(f"cannot store the release in {self.path.parent}: {exc}") from exc

    def sealed_reply(self, entry: ReleaseEntry) -> bytes | None:
        """A plain release's sealed reply, or None when its file is gone or not the one stored.

        The file must be this user's private regular file and have the
        SHA-256 its row recorded (the AEAD of :mod:`client.release` then
        authenticates the content against the round it answered).
        """
        if entry.sealed_sha256 is None:
            return None
        path = self._sealed_path(entry.id)
        try:
            data = read_private_file(path, "stored release", path.stat().st_size + 1)
        except (OSError, ConfigurationError):
            return None
        if hashlib.sha256(data).hexdigest() != entry.sealed_sha256:
            return None
        return data

    def abandon_release(self, release_id: int) -> None:
        """Remove a reserved release whose attempt ended in this process with nothing sent.

        Raises
        ------
        RecordError
            If the row does not exist or is already released, or the database fails.
        """
        try:
            with self._session() as session:
                session.delete(self._reserved(session, release_id))
        except SQLAlchemyError as exc:
            raise RecordError(f"cannot write the release log {self.path}: {exc}") from exc

    def count_answer(self, release_id: int, *, resent: bool) -> None:
        """Count one later request a release answered: resent its bytes, or refused."""
        try:
            with self._session(durable=False) as session:
                row = session.get(ReleaseRow, release_id)
                if row is None:
                    raise RecordError(f"no release {release_id}")
                if resent:
                    row.resent += 1
                else:
                    row.refused += 1
                session.add(row)
        except SQLAlchemyError as exc:
            raise RecordError(f"cannot write the release log {self.path}: {exc}") from exc

    def releases(self, dataset_id: str | None = None) -> list[ReleaseEntry]:
        """Every release-log row (of one dataset, or all), in insertion order."""
        return self._listed(ReleaseRow, dataset_id, _release, "release log")

    def _listed(
        self,
        table: type[_Row],
        dataset_id: str | None,
        value: Callable[[_Row], _Value],
        what: str,
    ) -> list[_Value]:
        """Every row of ``table`` (of one dataset, or all) as values, in insertion order."""
        query = select(table).order_by(table.id)  # type: ignore[arg-type]
        if dataset_id is not None:
            query = query.where(table.dataset_id == dataset_id)
        try:
            with self._session() as session:
                entries = [value(r) for r in session.exec(query).all()]
        except SQLAlchemyError as exc:
            raise RecordError(f"cannot read the {what} {self.path}: {exc}") from exc
        return entries

    @staticmethod
    def _release_row(
        session: Session, dataset_id: str, run_id: str, round: int
    ) -> ReleaseRow | None:
        return session.exec(
            select(ReleaseRow).where(
                ReleaseRow.dataset_id == dataset_id,
                ReleaseRow.run_id == run_id,
                ReleaseRow.round == round,
            )
        ).first()

    @staticmethod
    def _reserved(session: Session, release_id: int) -> ReleaseRow:
        if isinstance(release_id, bool) or not isinstance(release_id, int):
            raise ConfigurationError(f"release_id must be an int, got {release_id!r}")
        row = session.get(ReleaseRow, release_id)
        if row is None:
            raise RecordError(f"no release {release_id}")
        if row.state != RESERVED:
            raise RecordError(f"release {release_id} is {row.state}, not reserved")
        return row

    def history(self, dataset_id: str | None = None) -> list[LedgerEntry]:
        """Every entry (of one dataset, or all), in insertion order."""
        return self._listed(LedgerRow, dataset_id, _entry, "privacy ledger")

    def summary(
        self, delta: float | None = None, accountant: str | None = None
    ) -> list[DatasetTotal]:
        """Per-dataset totals, epsilon recomputed from each full history.

        ``delta`` and ``accountant`` default, per dataset, to those of its
        latest entry.
        """
        entries = self.history()
        by_dataset: dict[str, list[LedgerEntry]] = {}
        for entry in entries:
            by_dataset.setdefault(entry.dataset_id, []).append(entry)
        totals: list[DatasetTotal] = []
        for dataset_id, rows in sorted(by_dataset.items()):
            d = validate_delta(delta if delta is not None else rows[-1].delta)
            name = validate_accountant(
                accountant if accountant is not None else rows[-1].accountant
            )
            try:
                events = [r.event for r in rows]
            except ConfigurationError as exc:
                raise RecordError(
                    f"the ledger holds an invalid row for {dataset_id!r}: {exc}"
                ) from exc
            totals.append(
                DatasetTotal(
                    dataset_id=dataset_id,
                    entries=len(rows),
                    reserved=sum(r.state == RESERVED for r in rows),
                    confirmed=sum(r.state == CONFIRMED for r in rows),
                    steps=sum(r.steps for r in rows),
                    delta=d,
                    accountant=name,
                    record_level_epsilon=epsilon_for(events, d, name),
                )
            )
        return totals
