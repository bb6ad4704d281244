"""Policy checks: pure functions from (policy, facts) to :class:`Decision` values.

Nothing here performs I/O, keeps state or reads a clock; the caller gathers
the facts (a run plan, a round request, ε from an accountant, kWh from a
meter), writes every returned decision to the audit log with the policy's
hash, and acts on denials. Each rule yields exactly one decision, allowed or
denied, named after the policy field that decided (``rule``), so that the
audit log shows what was checked and not only what failed.

Checks fail closed: a value that is not a finite non-negative number (NaN ε,
negative kWh) is denied, never allowed.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

from common.audit.instruction import InstructionHeader, key_fingerprint, verify_instruction
from common.errors import ConfigurationError, DataError
from policies.decisions import Decision
from policies.keys import canonical_node_key
from policies.models import EPSILON_LEVELS, ServerPolicy, SitePolicy, canonical_app_hash
from policies.plans import RoundRequest, RunPlan

__all__ = [
    "RoundRequest",
    "RunPlan",
    "check_admission",
    "check_energy",
    "check_release",
    "check_round_budget",
    "check_round_request",
    "check_run_plan",
    "check_site_budget",
]


def _allow(rule: str, reason: str) -> Decision:
    return Decision(True, rule, reason)


def _deny(rule: str, reason: str) -> Decision:
    return Decision(False, rule, reason)


def _invalid(value: object) -> str | None:
    """Why ``value`` is not a finite number >= 0 (``None`` when it is)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"{value!r} is not a number"
    if not math.isfinite(value):
        return f"{value!r} is not a finite number"
    if value < 0:
        return f"{value!r} is negative"
    return None


def _fingerprint(canonical_key: str) -> str:
    return "SHA256:" + hashlib.sha256(canonical_key.encode("ascii")).hexdigest()[:16]


# ====================================================================== server


def check_admission(policy: ServerPolicy, node_id: int, public_key: str | bytes | None) -> Decision:
    """May this node join? (``admission.*``)

    Parameters
    ----------
    policy : ServerPolicy
        The coordinator's policy.
    node_id : int
        Flower's node id.
    public_key : str, bytes or None
        The node's authentication public key (OpenSSH, PEM or DER), if the
        deployment authenticates nodes.
    """
    rules = policy.admission
    if rules.mode == "open":
        return _allow("admission.mode", f"admission is open; node {node_id} admitted")
    if isinstance(node_id, int) and not isinstance(node_id, bool) and node_id in rules.node_ids:
        return _allow("admission.node_ids", f"node {node_id} is on the allow-list")
    if public_key is not None:
        try:
            key = canonical_node_key(public_key)
        except ConfigurationError as exc:
            return _deny("admission.public_keys", f"node {node_id}: unreadable public key ({exc})")
        if key in rules.public_keys:
            return _allow(
                "admission.public_keys",
                f"node {node_id} key {_fingerprint(key)} is on the allow-list",
            )
        return _deny(
            "admission.public_keys",
            f"node {node_id} key {_fingerprint(key)} is not on the allow-list",
        )
    return _deny(
        "admission.node_ids", f"node {node_id} is not on the allow-list and presented no key"
    )


def check_run_plan(policy: ServerPolicy, plan: RunPlan) -> list[Decision]:
    """Does the run's configuration respect the coordinator's own policy?

    One decision per rule: ``rounds.min_sites``, ``rounds.min_fraction``,
    ``rounds.max_fraction``, ``rounds.max_rounds``,
    ``secure_aggregation.required``, ``secure_aggregation.min_threshold``,
    ``central_dp.required``, ``central_dp.min_noise_multiplier``,
    ``central_dp.max_clip_norm``, ``central_dp.delta`` and
    ``central_dp.max_client_epsilon``. The server refuses to start a run
    with any denial.
    """
    r, sa = policy.rounds, policy.secure_aggregation
    out: list[Decision] = []

    if plan.min_sites >= r.min_sites:
        out.append(_allow("rounds.min_sites", f"{plan.min_sites} sites per round >= {r.min_sites}"))
    else:
        out.append(_deny("rounds.min_sites", f"{plan.min_sites} sites per round < {r.min_sites}"))

    f = plan.fraction_train
    if f >= r.min_fraction:
        out.append(_allow("rounds.min_fraction", f"sampling fraction {f:g} >= {r.min_fraction:g}"))
    else:
        out.append(_deny("rounds.min_fraction", f"sampling fraction {f:g} < {r.min_fraction:g}"))
    if f <= r.max_fraction:
        out.append(_allow("rounds.max_fraction", f"sampling fraction {f:g} <= {r.max_fraction:g}"))
    else:
        out.append(_deny("rounds.max_fraction", f"sampling fraction {f:g} > {r.max_fraction:g}"))

    if r.max_rounds is None:
        out.append(_allow("rounds.max_rounds", "no limit on rounds"))
    elif plan.rounds <= r.max_rounds:
        out.append(_allow("rounds.max_rounds", f"{plan.rounds} rounds <= {r.max_rounds}"))
    else:
        out.append(_deny("rounds.max_rounds", f"{plan.rounds} rounds > {r.max_rounds}"))

    if plan.secure_aggregation or not sa.required:
        state = "on" if plan.secure_aggregation else "off and not required"
        out.append(_allow("secure_aggregation.required", f"secure aggregation {state}"))
    else:
        out.append(_deny("secure_aggregation.required", "secure aggregation is required but off"))
    if plan.secagg_threshold is None:
        out.append(
            _allow("secure_aggregation.min_threshold", "secure aggregation off; no threshold")
        )
    else:
        out.append(check_secagg_threshold(policy, plan.secagg_threshold))

    out.extend(_central_dp_decisions(policy, plan))
    return out


def check_secagg_threshold(policy: ServerPolicy, threshold: int) -> Decision:
    """``secure_aggregation.min_threshold`` on a resolved reconstruction threshold ``t``."""
    least = policy.secure_aggregation.min_threshold
    if threshold >= least:
        return _allow("secure_aggregation.min_threshold", f"threshold {threshold} >= {least}")
    return _deny("secure_aggregation.min_threshold", f"threshold {threshold} < {least}")


def _central_dp_decisions(policy: ServerPolicy, plan: RunPlan) -> list[Decision]:
    dp = policy.central_dp
    out: list[Decision] = []
    if plan.central_dp or not dp.required:
        state = "on" if plan.central_dp else "off and not required"
        out.append(_allow("central_dp.required", f"central DP {state}"))
    else:
        out.append(_deny("central_dp.required", "central DP is required but off"))

    z, c, delta = plan.central_noise_multiplier, plan.central_clip_norm, plan.central_delta
    if z is None:
        out.append(_allow("central_dp.min_noise_multiplier", "central DP off; not applicable"))
    elif z >= dp.min_noise_multiplier:
        out.append(
            _allow(
                "central_dp.min_noise_multiplier",
                f"noise multiplier {z:g} >= {dp.min_noise_multiplier:g}",
            )
        )
    else:
        out.append(
            _deny(
                "central_dp.min_noise_multiplier",
                f"noise multiplier {z:g} < {dp.min_noise_multiplier:g}",
            )
        )

    if c is None:
        out.append(_allow("central_dp.max_clip_norm", "central DP off; not applicable"))
    elif dp.max_clip_norm is None:
        out.append(_allow("central_dp.max_clip_norm", "no limit on the clip norm"))
    elif c <= dp.max_clip_norm:
        out.append(_allow("central_dp.max_clip_norm", f"clip norm {c:g} <= {dp.max_clip_norm:g}"))
    else:
        out.append(_deny("central_dp.max_clip_norm", f"clip norm {c:g} > {dp.max_clip_norm:g}"))

    if delta is None:
        out.append(_allow("central_dp.delta", "central DP off; not applicable"))
    elif delta <= dp.delta:
        out.append(_allow("central_dp.delta", f"delta {delta:g} <= {dp.delta:g}"))
    else:
        out.append(_deny("central_dp.delta", f"delta {delta:g} > {dp.delta:g}"))

    if dp.max_client_epsilon is None:
        out.append(_allow("central_dp.max_client_epsilon", "no cap on client-level epsilon"))
    elif plan.central_dp:
        out.append(
            _allow(
                "central_dp.max_client_epsilon",
                f"client-level epsilon is capped at {dp.max_client_epsilon:g}; checked every round",
            )
        )
    else:
        out.append(
            _deny(
                "central_dp.max_client_epsilon",
                f"client-level epsilon is capped at {dp.max_client_epsilon:g} "
                "but central DP is off (epsilon unbounded)",
            )
        )
    return out


def check_round_budget(policy: ServerPolicy, client_epsilon_after_round: float | None) -> Decision:
    """May the next round run, given the client-level ε it would bring the run to?

    Parameters
    ----------
    client_epsilon_after_round : float or None
        The run's client-level ε (at ``central_dp.delta``) after the next
        round, from a dry run of the accountant; ``None`` without central DP
        (unbounded).
    """
    rule = "central_dp.max_client_epsilon"
    cap = policy.central_dp.max_client_epsilon
    if cap is None:
        return _allow(rule, "no cap on client-level epsilon")
    if client_epsilon_after_round is None:
        return _deny(rule, f"client-level epsilon is unbounded without central DP (cap {cap:g})")
    bad = _invalid(client_epsilon_after_round)
    if bad is not None:
        return _deny(rule, f"client-level epsilon {bad}")
    eps = client_epsilon_after_round
    if eps <= cap:
        return _allow(rule, f"client-level epsilon after this round {eps:.4g} <= {cap:g}")
    return _deny(rule, f"this round would bring client-level epsilon to {eps:.4g} > {cap:g}")


def check_energy(
    policy: ServerPolicy, kwh_so_far: float, kwh_next_round_estimate: float
) -> Decision:
    """May the next round run within the run's energy budget?

    Parameters
    ----------
    kwh_so_far : float
        Energy the run has used (kWh).
    kwh_next_round_estimate : float
        Expected energy of the next round (kWh), e.g. the last round's.
    """
    rule = "energy.max_kwh_per_run"
    for what, value in (
        ("energy so far", kwh_so_far),
        ("next-round estimate", kwh_next_round_estimate),
    ):
        bad = _invalid(value)
        if bad is not None:
            return _deny(rule, f"{what} {bad}")
    cap = policy.energy.max_kwh_per_run
    total = kwh_so_far + kwh_next_round_estimate
    if cap is None:
        return _allow(rule, f"no energy budget ({kwh_so_far:.4g} kWh used)")
    if total <= cap:
        return _allow(rule, f"{kwh_so_far:.4g} + {kwh_next_round_estimate:.4g} kWh <= {cap:g} kWh")
    return _deny(
        rule,
        f"next round would bring energy to {total:.4g} kWh > budget {cap:g} kWh "
        f"({kwh_so_far:.4g} kWh used)",
    )


def check_release(
    policy: ServerPolicy,
    version_epsilons: Mapping[str, float | None],
    metrics: Mapping[str, float],
) -> list[Decision]:
    """May this model version leave the registry? (``release.*``)

    Parameters
    ----------
    version_epsilons : mapping
        ε of the version per level, keys ``"client_level"`` and
        ``"record_level"``; a missing key or ``None`` means no DP at that
        level (unbounded ε), which fails a cap.
    metrics : mapping of str to float
        The version's evaluation metrics; a metric the gate needs but which is
        missing fails.

    Raises
    ------
    ConfigurationError
        ``version_epsilons`` has a key other than the two levels.
    """
    unknown = sorted(set(version_epsilons) - set(EPSILON_LEVELS))
    if unknown:
        raise ConfigurationError(f"unknown privacy level(s) {unknown}; use {list(EPSILON_LEVELS)}")
    rel = policy.release
    out: list[Decision] = []
    for level, cap in (
        ("client_level", rel.max_client_epsilon),
        ("record_level", rel.max_record_epsilon),
    ):
        rule = f"release.max_{level.split('_')[0]}_epsilon"
        eps = version_epsilons.get(level)
        label = level.replace("_", "-")
        if cap is None:
            out.append(_allow(rule, f"no cap on {label} epsilon"))
        elif eps is None:
            out.append(_deny(rule, f"{label} epsilon is unbounded (no DP) but capped at {cap:g}"))
        elif (bad := _invalid(eps)) is not None:
            out.append(_deny(rule, f"{label} epsilon {bad}"))
        elif eps <= cap:
            out.append(_allow(rule, f"{label} epsilon {eps:.4g} <= {cap:g}"))
        else:
            out.append(_deny(rule, f"{label} epsilon {eps:.4g} > {cap:g}"))
    for name, floor in rel.min_metrics:
        rule = f"release.min_metrics.{name}"
        value = metrics.get(name)
        if value is None:
            out.append(_deny(rule, f"metric {name!r} is missing (needs >= {floor:g})"))
        elif isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            out.append(_deny(rule, f"metric {name!r} is not a number: {value!r}"))
        elif value >= floor:
            out.append(_allow(rule, f"{name} {value:.4g} >= {floor:g}"))
        else:
            out.append(_deny(rule, f"{name} {value:.4g} < {floor:g}"))
    return out


# ====================================================================== site


def check_round_request(policy: SitePolicy, request: RoundRequest) -> list[Decision]:
    """Will the site take part in this round as instructed?

    One decision per rule: ``privacy.require_dp``,
    ``privacy.min_noise_multiplier``, ``privacy.max_grad_norm``,
    ``rounds.require_secure_aggregation``, ``rounds.min_cohort_size``,
    ``rounds.max_local_epochs``, the secure-aggregation floors
    ``rounds.min_secagg_threshold``, ``rounds.min_secagg_threshold_fraction``
    and ``rounds.min_secagg_neighbours``, ``trust.allowed_app_hashes`` and
    ``trust.server_key``: the instruction's own Ed25519 signature
    (:mod:`common.audit.instruction`) over ``request.signed_payload`` (its
    type, run, round, destination, sequence number and the digest of every
    record it carries) is verified here with the trusted key, and its
    sequence number must be above ``request.last_sequence``. The privacy
    budget is checked separately by :func:`check_site_budget`.
    """
    p, r = policy.privacy, policy.rounds
    rq = request
    out: list[Decision] = []

    if rq.site_dp or not p.require_dp:
        state = "on" if rq.site_dp else "off and not required"
        out.append(_allow("privacy.require_dp", f"site DP-SGD {state}"))
    else:
        out.append(_deny("privacy.require_dp", "DP-SGD is required but the round asks for none"))
    z = rq.noise_multiplier
    if z is None:
        out.append(_allow("privacy.min_noise_multiplier", "site DP off; not applicable"))
    elif z >= p.min_noise_multiplier:
        out.append(
            _allow(
                "privacy.min_noise_multiplier",
                f"noise multiplier {z:g} >= {p.min_noise_multiplier:g}",
            )
        )
    else:
        out.append(
            _deny(
                "privacy.min_noise_multiplier",
                f"noise multiplier {z:g} < {p.min_noise_multiplier:g}",
            )
        )
    c = rq.max_grad_norm
    if c is None:
        out.append(_allow("privacy.max_grad_norm", "site DP off; not applicable"))
    elif c <= p.max_grad_norm:
        out.append(_allow("privacy.max_grad_norm", f"max grad norm {c:g} <= {p.max_grad_norm:g}"))
    else:
        out.append(_deny("privacy.max_grad_norm", f"max grad norm {c:g} > {p.max_grad_norm:g}"))

    if rq.secure_aggregation or not r.require_secure_aggregation:
        state = "on" if rq.secure_aggregation else "off and not required"
        out.append(_allow("rounds.require_secure_aggregation", f"secure aggregation {state}"))
    else:
        out.append(
            _deny("rounds.require_secure_aggregation", "secure aggregation is required but off")
        )
    if rq.cohort_size >= r.min_cohort_size:
        out.append(
            _allow("rounds.min_cohort_size", f"cohort of {rq.cohort_size} >= {r.min_cohort_size}")
        )
    else:
        out.append(
            _deny("rounds.min_cohort_size", f"cohort of {rq.cohort_size} < {r.min_cohort_size}")
        )
    if rq.local_epochs <= r.max_local_epochs:
        out.append(
            _allow(
                "rounds.max_local_epochs", f"{rq.local_epochs} local epochs <= {r.max_local_epochs}"
            )
        )
    else:
        out.append(
            _deny(
                "rounds.max_local_epochs", f"{rq.local_epochs} local epochs > {r.max_local_epochs}"
            )
        )

    out.extend(_secagg_floor_decisions(policy, rq))
    out.append(_app_decision(policy, rq))
    out.append(_signature_decision(policy, rq))
    return out


def _secagg_floor_decisions(policy: SitePolicy, rq: RoundRequest) -> list[Decision]:
    """The site's floors on the coordinator-chosen ``t`` and ``k`` (one decision each).

    Stops a coordinator that lowers the threshold (so that fewer colluding
    sites suffice to unmask one site) or shrinks the neighbour graph around a
    victim. Judged on the values of the round's own configuration, before
    any key of that round is made.
    """
    r = policy.rounds
    rules = (
        "rounds.min_secagg_threshold",
        "rounds.min_secagg_threshold_fraction",
        "rounds.min_secagg_neighbours",
    )
    t, k = rq.secagg_threshold, rq.secagg_neighbours
    if not rq.secure_aggregation or t is None:
        return [_allow(rule, "secure aggregation off; not applicable") for rule in rules]
    out = [
        _allow(rules[0], f"threshold {t} >= {r.min_secagg_threshold}")
        if t >= r.min_secagg_threshold
        else _deny(rules[0], f"threshold {t} < {r.min_secagg_threshold}")
    ]
    if k is None:
        out.append(_allow(rules[1], "the instruction states no neighbour degree"))
        out.append(_allow(rules[2], "the instruction states no neighbour degree"))
        return out
    fraction = r.min_secagg_threshold_fraction
    out.append(
        _allow(rules[1], f"threshold {t} of {k} neighbours >= {fraction:g} of them")
        if t >= fraction * k
        else _deny(rules[1], f"threshold {t} of {k} neighbours < {fraction:g} of them")
    )
    out.append(
        _allow(rules[2], f"{k} neighbours >= {r.min_secagg_neighbours}")
        if k >= r.min_secagg_neighbours
        else _deny(rules[2], f"{k} neighbours < {r.min_secagg_neighbours}")
    )
    return out


def _app_decision(policy: SitePolicy, rq: RoundRequest) -> Decision:
    rule = "trust.allowed_app_hashes"
    allowed = policy.trust.allowed_app_hashes
    if not allowed:
        return _allow(rule, "any app allowed")
    if rq.app_hash is None:
        return _deny(rule, "the instruction names no app hash; only listed apps are allowed")
    try:
        app = canonical_app_hash(rq.app_hash)
    except ConfigurationError as exc:
        return _deny(rule, f"app hash {rq.app_hash!r} is malformed ({exc})")
    if app in allowed:
        return _allow(rule, f"app {app[:16]}... is allowed")
    return _deny(rule, f"app {app[:16]}... is not in the allowed list")


def _signature_decision(policy: SitePolicy, rq: RoundRequest) -> Decision:
    """``trust.server_key``: was this very instruction signed by the trusted coordinator key?

    Stops instructions that are unsigned, signed by another key, altered
    after signing (any signed field or record: ``signed_payload`` is what the
    site recomputed from what it received), or replayed / out of order.
    """
    rule = "trust.server_key"
    own = policy.trust.server_key_bytes
    if own is not None and rq.server_key is not None and own != rq.server_key:
        return _deny(rule, "the policy and the node config pin different server keys")
    trusted = own if own is not None else rq.server_key
    if trusted is None:
        if rq.signature is None:
            return _allow(
                rule, "no server key pinned; the instruction is unsigned (not authenticated)"
            )
        signer = rq.signer_key_id.hex()[:16] if rq.signer_key_id is not None else "?"
        return _allow(
            rule,
            f"no server key pinned; the instruction's signature (key SHA256:{signer}..., "
            f"sequence {rq.sequence}) was not verified",
        )
    short = trusted.hex()[:16]
    if rq.signature is None or rq.signed_payload is None:
        return _deny(rule, f"instruction is not signed; trusted server key {short}...")
    try:
        header, _ = InstructionHeader.parse_message(rq.signed_payload)
    except DataError as exc:
        return _deny(rule, f"the signed instruction is malformed ({exc})")
    if header.key_id != key_fingerprint(trusted):
        return _deny(
            rule,
            f"instruction signed by key SHA256:{header.key_id.hex()[:16]}..., "
            f"trusted key is {short}...",
        )
    if not verify_instruction(trusted, rq.signed_payload, rq.signature):
        return _deny(
            rule, f"instruction signature does not verify with the trusted server key {short}..."
        )
    if header.group_id != str(rq.server_round):
        return _deny(
            rule,
            f"signed round {header.group_id!r} is not the instruction's round {rq.server_round}",
        )
    if rq.last_sequence is not None and header.seq <= rq.last_sequence:
        return _deny(
            rule,
            f"instruction sequence {header.seq} is not above {rq.last_sequence}, the last "
            "accepted (replayed or out of order)",
        )
    order = "the run's first" if rq.last_sequence is None else f"above {rq.last_sequence}"
    return _allow(
        rule,
        f"instruction {header.message_type} (round {header.group_id}, node {header.dst_node_id}, "
        f"sequence {header.seq}, {order}) signed by the trusted server key {short}...: "
        "Ed25519 over its type, run, round, node, sequence and every record it carries",
    )


def check_site_budget(
    policy: SitePolicy,
    spent_epsilon: float,
    would_be_epsilon: float,
    *,
    dataset: str | None = None,
    delta: float | None = None,
) -> Decision:
    """May the site spend this round's record-level privacy on ``dataset``?

    Parameters
    ----------
    spent_epsilon : float
        Record-level ε spent on the dataset so far (from the site ledger).
    would_be_epsilon : float
        The ε the ledger's dry run says the round would bring it to.
    dataset : str or None
        The dataset's name, for per-dataset budgets (``privacy.datasets``).
    delta : float or None
        The δ the ledger reports ε at; denied if larger than the policy's.
    """
    budget, policy_delta = policy.privacy.budget_for(dataset)
    overridden = any(name == dataset for name, _ in policy.privacy.datasets)
    rule = f"privacy.datasets.{dataset}.epsilon_budget" if overridden else "privacy.epsilon_budget"
    for what, value in (("spent epsilon", spent_epsilon), ("would-be epsilon", would_be_epsilon)):
        bad = _invalid(value)
        if bad is not None:
            return _deny(rule, f"{what} {bad}")
    if delta is not None:
        bad = _invalid(delta)
        if bad is not None or delta > policy_delta:
            return _deny(
                rule, f"ledger delta {delta!r} is not <= the policy's delta {policy_delta:g}"
            )
    if would_be_epsilon <= budget:
        return _allow(
            rule,
            f"record-level epsilon {spent_epsilon:.4g} -> {would_be_epsilon:.4g} <= budget {budget:g}",
        )
    return _deny(
        rule,
        f"this round would bring record-level epsilon to {would_be_epsilon:.4g} > budget "
        f"{budget:g} (spent {spent_epsilon:.4g})",
    )
