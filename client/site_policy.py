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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import ConfigRecord

from policies import Decision, SitePolicies, SitePolicy, load_site_policy, policy_hash
from policies.evaluate import check_round_request, check_site_budget
from policies.plans import RoundRequest

if TYPE_CHECKING:
    from client.agent import SiteContext


@dataclass(frozen=True, slots=True)
class SiteSetup:
    """What a ClientApp knows beyond Flower's context: where simulated sites keep
    state, and the simulated sites' policies (deployments use node config)."""

    root: Path | None = None
    policies: SitePolicies | None = None


@functools.lru_cache(maxsize=8)
def _load(path: str, mtime_ns: int) -> SitePolicy:
    return load_site_policy(path)


def site_policy(site: SiteContext) -> SitePolicy | None:
    """This site's policy, or None when it has none."""
    node = site.context.node_config
    path = node.get("policy-path")
    if isinstance(path, str) and path:
        return _load(path, Path(path).stat().st_mtime_ns)
    if site.setup.policies is not None and "partition-id" in node:
        return site.setup.policies.for_site(f"site-{node['partition-id']}")
    return None


def check_round(
    site: SiteContext,
    policy: SitePolicy,
    *,
    cohort_size: int,
    secagg_threshold: int | None,
    noise_multiplier: float | None,
) -> list[Decision]:
    """The site policy's decisions on this round's instruction."""
    cfg = site.cfg
    head = site.head
    request = RoundRequest(
        server_round=site.server_round,
        cohort_size=cohort_size,
        secure_aggregation=cfg.secagg,
        site_dp=cfg.dp,
        local_epochs=cfg.local_epochs,
        secagg_threshold=secagg_threshold if cfg.secagg else None,
        noise_multiplier=noise_multiplier if cfg.dp else None,
        max_grad_norm=cfg.max_grad_norm if cfg.dp else None,
        app_hash=site.app_hash,
        signature=head.signature if head is not None else None,
        signed_payload=head.message() if head is not None else None,
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
