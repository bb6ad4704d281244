"""The site's own policy, enforced before it trains: what it allows, decided as values.

A site's policy comes from the SuperNode's node config (``policy-path``,
``fedseal-client start --policy FILE``) or, in simulations, from the policy
set handed to the ClientApp (one file for all sites, or ``site-<i>.toml``
per site). Every decision, allow and deny, goes back to the server with the
policy's hash so the coordinator's audit log records it; any denial makes
the site refuse the round before its data is touched.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord

from common.config import RunConfig
from policies import Decision, SitePolicies, SitePolicy, load_site_policy, policy_hash
from policies.evaluate import check_round_request, check_site_budget
from policies.plans import RoundRequest

if TYPE_CHECKING:
    from client.instructions import InstructionCheck


@dataclass(frozen=True, slots=True)
class SiteSetup:
    """What a ClientApp knows beyond Flower's context: where simulated sites keep
    state, and the simulated sites' policies (deployments use node config)."""

    root: Path | None = None
    policies: SitePolicies | None = None


@functools.lru_cache(maxsize=8)
def _load(path: str, mtime_ns: int) -> SitePolicy:
    return load_site_policy(path)


def site_policy(node_config: Mapping[str, Any], policies: SitePolicies | None) -> SitePolicy | None:
    """This site's policy, or None when it has none.

    Parameters
    ----------
    node_config : mapping
        The SuperNode's node config: ``policy-path`` (a deployed site's file)
        or ``partition-id`` (a simulated site, looked up in ``policies``).
    policies : SitePolicies or None
        The simulated sites' policies handed to the ClientApp.
    """
    path = node_config.get("policy-path")
    if isinstance(path, str) and path:
        return _load(path, Path(path).stat().st_mtime_ns)
    if policies is not None and "partition-id" in node_config:
        return policies.for_site(f"site-{node_config['partition-id']}")
    return None


def check_round(
    policy: SitePolicy,
    cfg: RunConfig,
    server_round: int,
    *,
    cohort_size: int,
    secagg_threshold: int | None,
    secagg_neighbours: int | None = None,
    noise_multiplier: float | None,
    app_hash: str | None,
    instruction: InstructionCheck | None,
) -> list[Decision]:
    """The site policy's decisions on this round's instruction.

    Parameters
    ----------
    policy : SitePolicy
        The site's policy.
    cfg : RunConfig
        The run's configuration, as the instruction carries it.
    server_round : int
        The round the instruction is for.
    cohort_size : int
        Sites taking part in the round (as the server states it).
    secagg_threshold : int or None
        The secure-aggregation threshold (ignored when secure aggregation is off).
    secagg_neighbours : int or None
        The secure-aggregation neighbour degree ``k``, when the instruction states it.
    noise_multiplier : float or None
        The site's DP-SGD noise multiplier this round (ignored when DP is off).
    app_hash : str or None
        The coordinator's code hash, as its audit log records it.
    instruction : InstructionCheck or None
        What the site established about the instruction's signature
        (:func:`client.instructions.check_instruction`): the policy's
        ``trust.server_key`` rule verifies it again, and says so.
    """
    signature = instruction.signature if instruction is not None else None
    request = RoundRequest(
        server_round=server_round,
        cohort_size=cohort_size,
        secure_aggregation=cfg.secagg,
        site_dp=cfg.dp,
        local_epochs=cfg.local_epochs,
        secagg_threshold=secagg_threshold if cfg.secagg else None,
        secagg_neighbours=secagg_neighbours if cfg.secagg else None,
        noise_multiplier=noise_multiplier if cfg.dp else None,
        max_grad_norm=cfg.max_grad_norm if cfg.dp else None,
        app_hash=app_hash,
        signature=signature.signature if signature is not None else None,
        signed_payload=instruction.signed_message if instruction is not None else None,
        signer_key_id=signature.key_id if signature is not None else None,
        sequence=signature.seq if signature is not None else None,
        last_sequence=instruction.previous_seq if instruction is not None else None,
        server_key=instruction.trusted_key if instruction is not None else None,
    )
    return check_round_request(policy, request)


def budget_decision(policy: SitePolicy, dataset_id: str, spent: float, would_be: float) -> Decision:
    return check_site_budget(policy, spent, would_be, dataset=dataset_id)


def decisions_record(policy: SitePolicy, decisions: list[Decision]) -> ConfigRecord:
    """The reply record carrying the site's decisions to the coordinator's audit log."""
    return ConfigRecord(
        {
            "policy-hash": policy_hash(policy),
            "decisions": json.dumps([d.to_payload() for d in decisions], sort_keys=True),
        }
    )
