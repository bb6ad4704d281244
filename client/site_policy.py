"""The site's own policy, enforced before it trains: what it allows, decided as values.

A deployed site's policy is put in force by ``fedseal-client start``
(:func:`install_site_policy`): the file given with ``--policy``, or the
shipped default site policy when none is given, is validated, copied into
the site's state directory and named in the SuperNode's node config
(``policy-path``, with its hash as ``policy-hash``). In simulations it comes
from the policy set handed to the ClientApp (one file for all sites, or
``site-<i>.toml`` per site). Every decision, allow and deny, goes back to
the server with the policy's hash so the coordinator's audit log records it;
any denial makes the site refuse the round before its data is touched.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord

from client.state import POLICY_FILE, replace_file
from common.config import RunConfig
from common.errors import ConfigurationError
from common.roster import Roster
from policies import (
    Decision,
    SitePolicies,
    SitePolicy,
    default_site_policy_path,
    load_site_policy,
    policy_hash,
)
from policies.evaluate import check_round_request, check_site_budget
from policies.plans import RoundRequest

if TYPE_CHECKING:
    from client.instructions import InstructionCheck


@dataclass(frozen=True, slots=True)
class SiteSetup:
    """What a ClientApp knows beyond Flower's context: where simulated sites keep
    state, the simulated sites' policies, and their federation's roster with the
    roster authority they pin where their policy pins none (deployments use node
    config: ``policy-path``, ``roster-path``; :mod:`client.site_roster`)."""

    root: Path | None = None
    policies: SitePolicies | None = None
    roster: Roster | None = None
    roster_authority: bytes | None = None


@functools.lru_cache(maxsize=8)
def _load(path: str, mtime_ns: int) -> SitePolicy:
    return load_site_policy(path)


def site_policy(node_config: Mapping[str, Any], policies: SitePolicies | None) -> SitePolicy | None:
    """This site's policy, or None when it has none.

    Parameters
    ----------
    node_config : mapping
        The SuperNode's node config: ``policy-path`` (a deployed site's file,
        with the ``policy-hash`` it must still have) or ``partition-id`` (a
        simulated site, looked up in ``policies``).
    policies : SitePolicies or None
        The simulated sites' policies handed to the ClientApp.

    Raises
    ------
    ConfigurationError
        The deployed site's policy file is gone or no longer has the hash
        ``fedseal-client start`` put in force: the site fails its rounds
        rather than train under a policy nobody checked.
    """
    path = node_config.get("policy-path")
    if isinstance(path, str) and path:
        try:
            policy = _load(path, Path(path).stat().st_mtime_ns)
        except OSError as exc:
            raise ConfigurationError(
                f"site policy {path} cannot be read: {exc.strerror or exc}"
            ) from None
        pinned = node_config.get("policy-hash")
        if isinstance(pinned, str) and pinned and policy_hash(policy) != pinned:
            raise ConfigurationError(
                f"site policy {path} changed since `fedseal-client start` put it in force "
                f"(sha256 {policy_hash(policy)}, expected {pinned}); restart the site agent"
            )
        return policy
    if policies is not None and "partition-id" in node_config:
        return policies.for_site(f"site-{node_config['partition-id']}")
    return None


@dataclass(frozen=True, slots=True)
class InstalledPolicy:
    """The site policy ``fedseal-client start`` put in force.

    Attributes
    ----------
    source : Path
        The file the site named (``--policy``), or the shipped default.
    path : Path
        The copy in the site's state directory that the ClientApp enforces.
    hash : str
        The policy's hash (:func:`policies.policy_hash`), pinned in the node config.
    default : bool
        Whether ``source`` is the shipped default site policy (no ``--policy``).
    """

    source: Path
    path: Path
    hash: str
    default: bool

    def summary(self) -> str:
        """One line naming the policy in force, for the site's operator."""
        which = (
            " (the shipped default; give --policy FILE for this site's own)" if self.default else ""
        )
        return f"site policy in force: {self.source}{which}, sha256 {self.hash}"


def install_site_policy(source: Path | None, state_dir: Path) -> InstalledPolicy:
    """Validate the site's policy and put it in force for the SuperNode about to start.

    Stops the attack where the site's ``--policy`` never reaches the deployed
    ClientApp, so that ``require_dp``, the epsilon budget,
    ``require_secure_aggregation``, ``min_cohort_size`` and the server-key pin
    are never checked and the coordinator's run settings decide alone: the
    policy (the shipped default when ``source`` is None: a site never runs
    without one) is validated, copied into ``state_dir`` as
    :data:`~client.state.POLICY_FILE` and its hash returned for the node
    config. The copy freezes what was checked: editing or removing the
    original later changes nothing until the agent is restarted (and prints
    the new policy), and :func:`site_policy` refuses a copy whose hash moved.

    Raises
    ------
    PolicyFileError
        The file is missing or invalid (every problem listed, as ``policy check``).
    ConfigurationError
        The file changed while it was being copied.
    """
    chosen = (source or default_site_policy_path()).resolve()
    policy = load_site_policy(chosen)
    digest = policy_hash(policy)
    state_dir.mkdir(parents=True, exist_ok=True)
    target = state_dir / POLICY_FILE
    replace_file(target, chosen.read_bytes(), mode=0o444)
    if policy_hash(load_site_policy(target)) != digest:
        raise ConfigurationError(f"site policy {chosen} changed while it was being put in force")
    return InstalledPolicy(chosen, target, digest, source is None)


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
