"""Policies as code: TOML policy files, typed models, and pure checks returning decisions.

Imports only :mod:`common`. The public surface:

- models: :class:`ServerPolicy`, :class:`SitePolicy` (:mod:`policies.models`);
- loading: :func:`load_server_policy`, :func:`load_site_policy`,
  :func:`load_site_policies`, :func:`policy_hash`, :class:`PolicyFileError`;
- decisions: :class:`Decision`, :class:`Violation`, :func:`raise_if_denied`;
- checks: :func:`check_admission`, :func:`check_run_plan`,
  :func:`check_round_budget`, :func:`check_energy`, :func:`check_release`,
  :func:`check_round_request`, :func:`check_site_budget` over
  :class:`RunPlan` / :class:`RoundRequest`;
- the ``policy`` CLI group: :data:`policies.cli.policy_app` (import it
  from there; it pulls in typer).
"""

from policies.decisions import Decision, Violation, all_allowed, denials, raise_if_denied
from policies.evaluate import (
    check_admission,
    check_energy,
    check_release,
    check_round_budget,
    check_round_request,
    check_run_plan,
    check_site_budget,
)
from policies.loading import (
    PolicyFileError,
    SitePolicies,
    canonical_dump,
    default_server_policy_path,
    default_site_policy_path,
    load_policy,
    load_server_policy,
    load_site_policies,
    load_site_policy,
    parse_policy,
    policy_hash,
)
from policies.models import Policy, ServerPolicy, SitePolicy
from policies.plans import RoundRequest, RunPlan

__all__ = [
    "Decision",
    "Policy",
    "PolicyFileError",
    "RoundRequest",
    "RunPlan",
    "ServerPolicy",
    "SitePolicies",
    "SitePolicy",
    "Violation",
    "all_allowed",
    "canonical_dump",
    "check_admission",
    "check_energy",
    "check_release",
    "check_round_budget",
    "check_round_request",
    "check_run_plan",
    "check_site_budget",
    "default_server_policy_path",
    "default_site_policy_path",
    "denials",
    "load_policy",
    "load_server_policy",
    "load_site_policies",
    "load_site_policy",
    "parse_policy",
    "policy_hash",
    "raise_if_denied",
]
