"""Which connected sites can take part in this run: asked once per site, before any cohort.

A cohort drawn over sites that will certainly decline (data that does not
fit the run's task, no identity in the federation's roster) wastes a round,
and under secure aggregation it can sink the honest sites with it: the
protocol's threshold is fixed from the cohort, so enough certain refusals at
the keys stage leave too few sites to finish. So before a round's cohort is
drawn, every connected site not asked before in this run gets the admission
query (``query.secagg_identity``, once per site and run, in plain runs too):

* the site checks, on its own side, that its data loads and fits the run's
  task (feature count, label range), and refuses with a categorical reason
  if not (:func:`client.secure.handle_identity`);
* under secure aggregation it also proves which roster identity speaks for
  its node id: its identity key and an Ed25519 signature over (run, node id)
  (:func:`common.secagg.signing.identity_message`). A key outside the
  roster, a bad signature, or a key another node already proved leaves the
  site out for the run. The configuration of every secure round then binds
  these identities, and every site checks that binding itself: this step
  keeps one faulty site from making every honest one refuse the round; it
  is not what the sites' safety rests on.

A refusal or a failed proof excludes the site for the rest of the run (its
file or its identity do not change while its SuperNode runs; a fixed site
rejoins under a new node id). A site that does not answer is asked again
before the next round. Each outcome is one audit event (``site_refused``
with ``stage`` ``admission``, or ``site_rejected``).

What the answer reveals: under secure aggregation, nothing secret (the
identity key is public, in the roster). The refusal says only that the
site's data does not fit the task, in one of two fixed categories (its
feature count, known from the file's header, differs from the task's; or
its labels fall outside the task's classes); the site's log has the
details, which never leave it. That one bit about the site's file is the
same one a site's failing round would reveal, and it is a property of the
file the operator chose rather than a statistic of the training records;
THREAT-MODEL.md states it as outside the accountant.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from flwr.app import MessageType

from common.errors import FedsealError, ProtocolError
from common.records import KEY_SECAGG_MSG, record_to_bytes
from common.roster import Roster
from common.secagg.signing import IDENTITY_CLAIM_SIZE, identity_message, verifies
from common.secagg.stages import IDENTITY_ACTION
from server.aggregation.base import RoundEvent
from server.aggregation.exchange import Exchange
from server.aggregation.replies import SiteFacts

ADMISSION_MESSAGE = f"{MessageType.QUERY}.{IDENTITY_ACTION}"


@dataclass(slots=True)
class SiteAdmission:
    """One run's admission answers: who may be sampled, with which identity.

    ``prove_identity``: secure runs, where every admitted site must prove a
    roster identity (``roster`` the run is held to; None checks signatures
    only, e.g. in tests without a federation).
    """

    run_number: int
    prove_identity: bool
    roster: Roster | None = None
    identities: dict[int, bytes] = field(default_factory=dict)  # node -> proved identity
    admitted: set[int] = field(default_factory=set)
    excluded: dict[int, str] = field(default_factory=dict)  # node -> why, for the whole run

    def admit(
        self, nodes: Sequence[int], server_round: int, exchange: Exchange
    ) -> tuple[list[int], list[RoundEvent]]:
        """The admitted nodes among ``nodes`` (asking those not asked yet) and the new events.

        Raises nothing for a site's fault: an unusable answer is that site's
        exclusion, a missing one is asked again next time.
        """
        unknown = [n for n in nodes if n not in self.admitted and n not in self.excluded]
        events: list[RoundEvent] = []
        if unknown:
            facts = SiteFacts()
            self._ask(unknown, server_round, exchange, facts)
            for node_id, reason in facts.refused.items():
                self.excluded[node_id] = reason
                events.append(
                    RoundEvent(
                        "site_refused",
                        {
                            "round": server_round,
                            "node_id": str(node_id),
                            "stage": "admission",
                            "reason": reason,
                        },
                    )
                )
            for node_id, reason in facts.rejected.items():
                if reason.startswith("no reply"):
                    continue  # asked again before the next round
                self.excluded[node_id] = reason
                events.append(
                    RoundEvent(
                        "site_rejected",
                        {
                            "round": server_round,
                            "node_id": str(node_id),
                            "stage": "admission",
                            "reason": reason,
                        },
                    )
                )
        return [n for n in nodes if n in self.admitted], events

    def _ask(
        self, nodes: list[int], server_round: int, exchange: Exchange, facts: SiteFacts
    ) -> None:
        content = exchange.instruction(server_round)
        replies = exchange.send({n: (content, ADMISSION_MESSAGE) for n in nodes}, server_round)
        members = self.roster.identity_keys() if self.roster is not None else None
        owners = {key: n for n, key in self.identities.items()}
        for node_id in nodes:
            reply = facts.usable(replies, node_id, "admission", may_refuse=True)
            if reply is None:
                continue
            if not self.prove_identity:
                self.admitted.add(node_id)
                continue
            try:
                claim = record_to_bytes(
                    reply.content.array_records.get(KEY_SECAGG_MSG), IDENTITY_CLAIM_SIZE
                )
                if len(claim) != IDENTITY_CLAIM_SIZE:
                    raise ProtocolError("an identity claim has the wrong size")
                key, signature = claim[:32], claim[32:]
                if members is not None and key not in members:
                    raise ProtocolError("its identity key is not in the roster")
                if not verifies(key, identity_message(self.run_number, node_id), signature):
                    raise ProtocolError("its identity signature does not verify")
                if key in owners:
                    raise ProtocolError(f"its identity is node {owners[key]}'s")
            except FedsealError as exc:
                facts.rejected[node_id] = f"stage admission: {exc}"
                continue
            self.identities[node_id] = key
            owners[key] = node_id
            self.admitted.add(node_id)
