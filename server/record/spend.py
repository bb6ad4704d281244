"""What a run spends: privacy (epsilon per level) and energy (kWh, CO2eq per site and round).

Every spend is checked before any transaction (finite, non-negative, valid
level and node id), stored against an existing run, and appended to the
audit log (``privacy_spent``, ``energy_reported``) in the same transaction.
Record-level (DP-SGD at a site) and client-level (central DP-FedAvg) epsilons
are kept apart and never summed. A second energy report for the same (run,
round, node) is refused by a unique constraint, so a resumed run never counts
a round's energy twice.
"""

from __future__ import annotations

from sqlalchemy import func
from sqlmodel import Session, col, select

from common.errors import DataError
from server.record.audit_log import AuditLog
from server.record.db import Database
from server.record.runs import require_run
from server.record.schema import EnergyRow, PrivacySpendRow
from server.record.values import (
    PRIVACY_LEVELS,
    EnergyEntry,
    PrivacyEntry,
    check_finite,
    check_node_id,
    check_round,
    energy_from_row,
    privacy_from_row,
    utc_now,
)

__all__ = ["Spend"]


class Spend:
    """The privacy-spend and energy tables of one record database.

    Parameters
    ----------
    db
        The open record database.
    audit
        The audit log of the same database, which every spend appends to.
    """

    def __init__(self, db: Database, audit: AuditLog) -> None:
        self._db = db
        self._audit = audit

    # -- privacy -------------------------------------------------------------

    def record_privacy(
        self,
        run_id: str,
        round: int,
        *,
        level: str,
        epsilon: float,
        delta: float,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        accountant: str = "rdp",
        node_id: int | None = None,
        actor: str = "server",
    ) -> PrivacyEntry:
        """Store one privacy spend and append ``privacy_spent``.

        ``level`` is ``"record"`` (DP-SGD at a site, ``node_id`` given) or
        ``"client"`` (central DP-FedAvg); ``epsilon`` is the cumulative epsilon
        at that level after this round. The two levels are never summed.
        """
        if level not in PRIVACY_LEVELS:
            raise DataError(f"privacy level must be one of {PRIVACY_LEVELS}, got {level!r}")
        rnd = check_round(round)
        eps = check_finite("epsilon", epsilon)
        dlt = check_finite("delta", delta)
        sigma = check_finite("noise_multiplier", noise_multiplier)
        q = check_finite("sample_rate", sample_rate)
        if not 0.0 < q <= 1.0 or not 0.0 <= dlt < 1.0:
            raise DataError("sample_rate must be in (0, 1] and delta in [0, 1)")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise DataError(f"steps must be a non-negative int, got {steps!r}")
        nid = check_node_id(node_id) if node_id is not None else None
        when = utc_now()
        entry = PrivacyEntry(
            run_id, rnd, level, node_id, sigma, q, steps, dlt, eps, accountant, when
        )

        def work(session: Session) -> PrivacyEntry:
            require_run(session, run_id)
            session.add(
                PrivacySpendRow(
                    run_id=run_id,
                    round=rnd,
                    level=level,
                    node_id=nid,
                    noise_multiplier=entry.noise_multiplier,
                    sample_rate=q,
                    steps=steps,
                    delta=dlt,
                    epsilon=entry.epsilon,
                    accountant=accountant,
                    time=when,
                )
            )
            payload = {
                "round": rnd,
                "level": level,
                "node_id": nid,
                "epsilon": entry.epsilon,
                "delta": dlt,
                "noise_multiplier": entry.noise_multiplier,
                "sample_rate": q,
                "steps": steps,
                "accountant": accountant,
            }
            self._audit.append(session, run_id, "privacy_spent", actor, payload)
            return entry

        return self._db.write(work)

    def privacy(self, run_id: str) -> list[PrivacyEntry]:
        """A run's privacy spends in the order recorded."""
        rows = self._db.read(
            lambda s: list(
                s.exec(
                    select(PrivacySpendRow)
                    .where(PrivacySpendRow.run_id == run_id)
                    .order_by(col(PrivacySpendRow.id))
                ).all()
            )
        )
        return [privacy_from_row(r) for r in rows]

    # -- energy --------------------------------------------------------------

    def record_energy(
        self,
        run_id: str,
        round: int,
        node_id: int,
        energy_kwh: float,
        co2eq_g: float,
        estimated: bool,
        *,
        actor: str = "server",
    ) -> EnergyEntry:
        """Store one site's energy for one round and append ``energy_reported``.

        A second report for the same (run, round, node) is refused, so a
        resumed run never counts a round's energy twice.
        """
        rnd = check_round(round)
        nid = check_node_id(node_id)
        kwh = check_finite("energy_kwh", energy_kwh)
        co2 = check_finite("co2eq_g", co2eq_g)
        if not isinstance(estimated, bool):
            raise DataError("estimated must be a bool")
        when = utc_now()
        entry = EnergyEntry(run_id, rnd, node_id, kwh, co2, estimated, when)

        def work(session: Session) -> EnergyEntry:
            require_run(session, run_id)
            session.add(
                EnergyRow(
                    run_id=run_id,
                    round=rnd,
                    node_id=nid,
                    energy_kwh=entry.energy_kwh,
                    co2eq_g=entry.co2eq_g,
                    estimated=estimated,
                    time=when,
                )
            )
            session.flush()
            payload = {
                "round": rnd,
                "node_id": nid,
                "energy_kwh": entry.energy_kwh,
                "co2eq_g": entry.co2eq_g,
                "estimated": estimated,
            }
            self._audit.append(session, run_id, "energy_reported", actor, payload)
            return entry

        return self._db.write(work)

    def energy(self, run_id: str) -> list[EnergyEntry]:
        """A run's energy reports ordered by round then node."""
        rows = self._db.read(
            lambda s: list(
                s.exec(
                    select(EnergyRow)
                    .where(EnergyRow.run_id == run_id)
                    .order_by(col(EnergyRow.round), col(EnergyRow.id))
                ).all()
            )
        )
        return [energy_from_row(r) for r in rows]

    def energy_total_kwh(self, run_id: str, up_to_round: int | None = None) -> float:
        """Sum of a run's reported kWh (up to and including ``up_to_round`` if given)."""

        def work(session: Session) -> float:
            query = select(func.coalesce(func.sum(EnergyRow.energy_kwh), 0.0)).where(
                EnergyRow.run_id == run_id
            )
            if up_to_round is not None:
                query = query.where(EnergyRow.round <= up_to_round)
            return float(session.exec(query).one())

        return self._db.read(work)
