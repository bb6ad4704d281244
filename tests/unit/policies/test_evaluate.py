"""Every policy rule allows one case and denies another; checks fail closed."""

from __future__ import annotations

import dataclasses
import math

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.audit.instruction import InstructionHeader, key_fingerprint
from common.errors import ConfigurationError, PolicyViolation
from policies import (
    Decision,
    RoundRequest,
    RunPlan,
    ServerPolicy,
    SitePolicy,
    check_admission,
    check_energy,
    check_release,
    check_round_budget,
    check_round_request,
    check_run_plan,
    check_site_budget,
    raise_if_denied,
)
from policies.models import (
    AdmissionRules,
    CentralDpRules,
    DatasetBudget,
    EnergyRules,
    PrivacyRules,
    ReleaseRules,
    SecureAggregationRules,
    ServerRoundRules,
    SiteRoundRules,
    TrustRules,
)

GOOD_PLAN = RunPlan(
    rounds=10,
    fraction_train=0.5,
    min_sites=3,
    secure_aggregation=True,
    secagg_threshold=3,
    central_dp=True,
    central_noise_multiplier=1.0,
    central_clip_norm=1.0,
    central_delta=1e-5,
)
GOOD_REQUEST = RoundRequest(
    server_round=1,
    cohort_size=5,
    secure_aggregation=True,
    secagg_threshold=3,
    site_dp=True,
    noise_multiplier=1.0,
    max_grad_norm=1.0,
    local_epochs=1,
)
APP = "ab" * 32


def _by_rule(decisions: list[Decision], rule: str) -> Decision:
    found = [d for d in decisions if d.rule == rule]
    assert len(found) == 1, f"expected one decision for {rule}, got {decisions}"
    return found[0]


def _ssh_key() -> str:
    key = ec.generate_private_key(ec.SECP384R1()).public_key()
    line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return line.decode()


# ---------------------------------------------------------------- run plan

SERVER = ServerPolicy(
    rounds=ServerRoundRules(min_sites=3, min_fraction=0.2, max_fraction=0.8, max_rounds=10),
    secure_aggregation=SecureAggregationRules(required=True, min_threshold=3),
    central_dp=CentralDpRules(
        required=True,
        min_noise_multiplier=0.8,
        max_clip_norm=2.0,
        max_client_epsilon=5.0,
        delta=1e-5,
    ),
)

PLAN_CASES = {
    "rounds.min_sites": {"min_sites": 2},
    "rounds.min_fraction": {"fraction_train": 0.1},
    "rounds.max_fraction": {"fraction_train": 0.9},
    "rounds.max_rounds": {"rounds": 11},
    "secure_aggregation.required": {"secure_aggregation": False, "secagg_threshold": None},
    "secure_aggregation.min_threshold": {"secagg_threshold": 2},
    "central_dp.min_noise_multiplier": {"central_noise_multiplier": 0.5},
    "central_dp.max_clip_norm": {"central_clip_norm": 2.5},
    "central_dp.delta": {"central_delta": 1e-3},
}
CENTRAL_OFF = {
    "central_dp": False,
    "central_noise_multiplier": None,
    "central_clip_norm": None,
    "central_delta": None,
}


@pytest.mark.parametrize("rule", sorted(PLAN_CASES) + ["central_dp.required"])
def test_check_run_plan_compliant_plan_allowed(rule: str) -> None:
    decisions = check_run_plan(SERVER, GOOD_PLAN)
    assert _by_rule(decisions, rule).allowed
    assert all(d.allowed for d in decisions)


@pytest.mark.parametrize("rule", sorted(PLAN_CASES))
def test_check_run_plan_violating_field_denied_by_that_rule_only(rule: str) -> None:
    plan = dataclasses.replace(GOOD_PLAN, **PLAN_CASES[rule])  # type: ignore[arg-type]
    decisions = check_run_plan(SERVER, plan)
    assert not _by_rule(decisions, rule).allowed
    assert [d.rule for d in decisions if not d.allowed] == [rule]


def test_check_run_plan_central_dp_off_when_required_denied() -> None:
    plan = dataclasses.replace(GOOD_PLAN, **CENTRAL_OFF)  # type: ignore[arg-type]
    decisions = check_run_plan(SERVER, plan)
    denied = {d.rule for d in decisions if not d.allowed}
    # Off: required fails, and the client-epsilon cap cannot hold (epsilon unbounded).
    assert denied == {"central_dp.required", "central_dp.max_client_epsilon"}


def test_check_run_plan_central_dp_off_not_required_no_cap_allowed() -> None:
    plan = dataclasses.replace(GOOD_PLAN, **CENTRAL_OFF)  # type: ignore[arg-type]
    decisions = check_run_plan(ServerPolicy(), plan)
    assert all(d.allowed for d in decisions)


def test_check_run_plan_one_decision_per_rule_always() -> None:
    rules = [d.rule for d in check_run_plan(ServerPolicy(), GOOD_PLAN)]
    assert len(rules) == len(set(rules)) == 11


def test_raise_if_denied_denials_carried_in_error() -> None:
    plan = dataclasses.replace(GOOD_PLAN, rounds=50, min_sites=1)
    with pytest.raises(PolicyViolation) as info:
        raise_if_denied(check_run_plan(SERVER, plan))
    assert {d.rule for d in info.value.violations} == {"rounds.max_rounds", "rounds.min_sites"}
    raise_if_denied(check_run_plan(SERVER, GOOD_PLAN))  # no denial: no error


# ---------------------------------------------------------------- admission


def test_check_admission_open_any_node_allowed() -> None:
    assert check_admission(ServerPolicy(), 123, None).allowed


def test_check_admission_listed_node_id_allowed() -> None:
    policy = ServerPolicy(admission=AdmissionRules(mode="allowlist", node_ids=(7,)))
    assert check_admission(policy, 7, None).allowed


def test_check_admission_unlisted_node_id_denied() -> None:
    policy = ServerPolicy(admission=AdmissionRules(mode="allowlist", node_ids=(7,)))
    decision = check_admission(policy, 8, None)
    assert not decision.allowed
    assert "8" in decision.reason


def test_check_admission_listed_key_with_comment_allowed() -> None:
    key = _ssh_key()
    policy = ServerPolicy(admission=AdmissionRules(mode="allowlist", public_keys=(key,)))
    assert check_admission(policy, 1, key + " site-a@host").allowed


def test_check_admission_listed_key_as_pem_allowed() -> None:
    priv = ec.generate_private_key(ec.SECP384R1())
    ssh = priv.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    pem = priv.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    policy = ServerPolicy(admission=AdmissionRules(mode="allowlist", public_keys=(ssh.decode(),)))
    assert check_admission(policy, 1, pem).allowed


def test_check_admission_unlisted_key_denied() -> None:
    policy = ServerPolicy(admission=AdmissionRules(mode="allowlist", public_keys=(_ssh_key(),)))
    decision = check_admission(policy, 1, _ssh_key())
    assert not decision.allowed
    assert decision.rule == "admission.public_keys"


def test_check_admission_garbage_key_denied() -> None:
    policy = ServerPolicy(admission=AdmissionRules(mode="allowlist", public_keys=(_ssh_key(),)))
    assert not check_admission(policy, 1, "ssh-ed25519 not-base64!").allowed


# ---------------------------------------------------------------- client-level budget

CAPPED = ServerPolicy(central_dp=CentralDpRules(max_client_epsilon=4.0))


def test_check_round_budget_within_cap_allowed() -> None:
    assert check_round_budget(CAPPED, 4.0).allowed


def test_check_round_budget_over_cap_denied() -> None:
    decision = check_round_budget(CAPPED, 4.01)
    assert not decision.allowed
    assert decision.rule == "central_dp.max_client_epsilon"


@pytest.mark.parametrize("eps", [None, math.nan, math.inf, -1.0])
def test_check_round_budget_unbounded_or_invalid_denied(eps: float | None) -> None:
    assert not check_round_budget(CAPPED, eps).allowed


def test_check_round_budget_no_cap_allowed() -> None:
    assert check_round_budget(ServerPolicy(), None).allowed


# ---------------------------------------------------------------- energy

BUDGETED = ServerPolicy(energy=EnergyRules(max_kwh_per_run=1.0))


def test_check_energy_within_budget_allowed() -> None:
    assert check_energy(BUDGETED, 0.5, 0.5).allowed


def test_check_energy_next_round_exceeds_denied() -> None:
    decision = check_energy(BUDGETED, 0.7, 0.4)
    assert not decision.allowed
    assert "1.1" in decision.reason


@pytest.mark.parametrize(("so_far", "nxt"), [(math.nan, 0.0), (0.0, -0.1), (math.inf, 0.0)])
def test_check_energy_invalid_values_denied(so_far: float, nxt: float) -> None:
    assert not check_energy(ServerPolicy(), so_far, nxt).allowed


# ---------------------------------------------------------------- release gate

GATE = ServerPolicy(
    release=ReleaseRules(
        max_client_epsilon=5.0, max_record_epsilon=8.0, min_metrics=(("accuracy", 0.8),)
    )
)
GOOD_EPS = {"client_level": 3.0, "record_level": 6.0}


def test_check_release_within_gate_allowed() -> None:
    decisions = check_release(GATE, GOOD_EPS, {"accuracy": 0.9})
    assert [d.allowed for d in decisions] == [True, True, True]


@pytest.mark.parametrize(
    ("eps", "metrics", "rule"),
    [
        (
            {"client_level": 5.5, "record_level": 6.0},
            {"accuracy": 0.9},
            "release.max_client_epsilon",
        ),
        (
            {"client_level": 3.0, "record_level": 9.0},
            {"accuracy": 0.9},
            "release.max_record_epsilon",
        ),
        (
            {"client_level": None, "record_level": 6.0},
            {"accuracy": 0.9},
            "release.max_client_epsilon",
        ),
        ({"record_level": 6.0}, {"accuracy": 0.9}, "release.max_client_epsilon"),
        (GOOD_EPS, {"accuracy": 0.7}, "release.min_metrics.accuracy"),
        (GOOD_EPS, {}, "release.min_metrics.accuracy"),
        (GOOD_EPS, {"accuracy": math.nan}, "release.min_metrics.accuracy"),
    ],
)
def test_check_release_violation_denied(
    eps: dict[str, float | None], metrics: dict[str, float], rule: str
) -> None:
    decisions = check_release(GATE, eps, metrics)
    assert [d.rule for d in decisions if not d.allowed] == [rule]


def test_check_release_unknown_level_raises() -> None:
    with pytest.raises(ConfigurationError):
        check_release(GATE, {"user_level": 1.0}, {})


# ---------------------------------------------------------------- site: round request

SITE = SitePolicy(
    privacy=PrivacyRules(require_dp=True, min_noise_multiplier=0.8, max_grad_norm=2.0),
    rounds=SiteRoundRules(require_secure_aggregation=True, min_cohort_size=5, max_local_epochs=2),
    trust=TrustRules(allowed_app_hashes=(APP,)),
)
REQUEST_CASES = {
    "privacy.require_dp": {"site_dp": False, "noise_multiplier": None, "max_grad_norm": None},
    "privacy.min_noise_multiplier": {"noise_multiplier": 0.5},
    "privacy.max_grad_norm": {"max_grad_norm": 3.0},
    "rounds.require_secure_aggregation": {"secure_aggregation": False, "secagg_threshold": None},
    "rounds.min_cohort_size": {"cohort_size": 4},
    "rounds.max_local_epochs": {"local_epochs": 3},
    "trust.allowed_app_hashes": {"app_hash": "cd" * 32},
}


@pytest.mark.parametrize("rule", sorted(REQUEST_CASES) + ["trust.server_key"])
def test_check_round_request_compliant_request_allowed(rule: str) -> None:
    request = dataclasses.replace(GOOD_REQUEST, app_hash=APP.upper())
    decisions = check_round_request(SITE, request)
    assert _by_rule(decisions, rule).allowed
    assert all(d.allowed for d in decisions)


@pytest.mark.parametrize("rule", sorted(REQUEST_CASES))
def test_check_round_request_violating_field_denied_by_that_rule_only(rule: str) -> None:
    changes: dict[str, object] = {"app_hash": APP, **REQUEST_CASES[rule]}
    request = dataclasses.replace(GOOD_REQUEST, **changes)  # type: ignore[arg-type]
    decisions = check_round_request(SITE, request)
    assert [d.rule for d in decisions if not d.allowed] == [rule]


def test_check_round_request_missing_app_hash_with_allow_list_denied() -> None:
    decision = _by_rule(check_round_request(SITE, GOOD_REQUEST), "trust.allowed_app_hashes")
    assert not decision.allowed


def _pinned() -> tuple[Ed25519PrivateKey, SitePolicy]:
    key = Ed25519PrivateKey.generate()
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return key, SitePolicy(trust=TrustRules(server_key=raw.hex()))


def _raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _instruction(key: Ed25519PrivateKey, seq: int = 7, group: str = "1") -> bytes:
    """The signed bytes of a round-1 instruction (its records' digest stands in as 32 bytes)."""
    header = InstructionHeader("train", "run-1", group, 1000, seq, key_fingerprint(_raw(key)))
    return header.message(bytes(range(32)))


def test_check_round_request_signed_by_trusted_key_allowed() -> None:
    key, policy = _pinned()
    payload = _instruction(key)
    request = dataclasses.replace(
        GOOD_REQUEST, signed_payload=payload, signature=key.sign(payload), last_sequence=6
    )
    decision = _by_rule(check_round_request(policy, request), "trust.server_key")
    assert (
        decision.allowed and "sequence 7" in decision.reason and "every record" in decision.reason
    )


@pytest.mark.parametrize(
    "tamper",
    ["unsigned", "other_key", "payload_edited", "claims_other_key", "replayed", "other_round",
     "not_an_instruction", "node_config_pins_other_key"],
)  # fmt: skip
def test_check_round_request_not_signed_by_trusted_key_denied(tamper: str) -> None:
    key, policy = _pinned()
    other = Ed25519PrivateKey.generate()
    payload = _instruction(other if tamper == "claims_other_key" else key)
    signed = payload
    if tamper == "other_round":
        payload = signed = _instruction(key, group="2")
    if tamper == "not_an_instruction":
        payload = signed = b"round 1 instruction"
    signer = other if tamper in ("other_key", "claims_other_key") else key
    request = dataclasses.replace(
        GOOD_REQUEST,
        signed_payload=payload[:-1] + b"!" if tamper == "payload_edited" else payload,
        signature=None if tamper == "unsigned" else signer.sign(signed),
        last_sequence=7 if tamper == "replayed" else 6,
        server_key=_raw(other) if tamper == "node_config_pins_other_key" else None,
    )
    assert not _by_rule(check_round_request(policy, request), "trust.server_key").allowed


def test_check_round_request_without_pinned_key_allowed_and_says_not_authenticated() -> None:
    key = Ed25519PrivateKey.generate()
    unsigned = _by_rule(check_round_request(SitePolicy(), GOOD_REQUEST), "trust.server_key")
    assert unsigned.allowed and "unsigned" in unsigned.reason
    request = dataclasses.replace(
        GOOD_REQUEST, signature=key.sign(b"x"), signer_key_id=key_fingerprint(_raw(key)), sequence=9
    )
    noted = _by_rule(check_round_request(SitePolicy(), request), "trust.server_key")
    assert noted.allowed and "not verified" in noted.reason and "sequence 9" in noted.reason


def test_check_round_request_node_config_key_is_the_trusted_key_without_a_policy_key() -> None:
    key = Ed25519PrivateKey.generate()
    payload = _instruction(key)
    request = dataclasses.replace(
        GOOD_REQUEST, signed_payload=payload, signature=key.sign(payload), server_key=_raw(key)
    )
    assert _by_rule(check_round_request(SitePolicy(), request), "trust.server_key").allowed


# ---------------------------------------------------------------- site: budget


def test_check_site_budget_within_budget_allowed() -> None:
    assert check_site_budget(SitePolicy(), 6.0, 8.0).allowed


def test_check_site_budget_round_would_exceed_denied() -> None:
    decision = check_site_budget(SitePolicy(), 6.0, 8.5)
    assert not decision.allowed
    assert decision.rule == "privacy.epsilon_budget"
    assert "8.5" in decision.reason


def test_check_site_budget_dataset_override_applies() -> None:
    policy = SitePolicy(
        privacy=PrivacyRules(datasets=(("small", DatasetBudget(epsilon_budget=2.0)),))
    )
    denied = check_site_budget(policy, 1.0, 3.0, dataset="small")
    assert not denied.allowed
    assert denied.rule == "privacy.datasets.small.epsilon_budget"
    assert check_site_budget(policy, 1.0, 3.0, dataset="other").allowed


@pytest.mark.parametrize(("spent", "would_be"), [(math.nan, 1.0), (0.0, math.nan), (-1.0, 1.0)])
def test_check_site_budget_invalid_epsilon_denied(spent: float, would_be: float) -> None:
    assert not check_site_budget(SitePolicy(), spent, would_be).allowed


def test_check_site_budget_ledger_delta_larger_than_policy_denied() -> None:
    assert check_site_budget(SitePolicy(), 1.0, 2.0, delta=1e-5).allowed
    assert not check_site_budget(SitePolicy(), 1.0, 2.0, delta=1e-3).allowed


# ---------------------------------------------------------------- values


def test_run_plan_inconsistent_fields_raise() -> None:
    with pytest.raises(ConfigurationError):
        RunPlan(rounds=1, fraction_train=1.0, min_sites=1, secure_aggregation=True)
    with pytest.raises(ConfigurationError):
        RunPlan(rounds=True, fraction_train=1.0, min_sites=1, secure_aggregation=False)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        RunPlan(rounds=1, fraction_train=1.5, min_sites=1, secure_aggregation=False)


def test_round_request_dp_settings_without_dp_raise() -> None:
    with pytest.raises(ConfigurationError):
        dataclasses.replace(GOOD_REQUEST, site_dp=False)


def test_decision_payload_round_trips() -> None:
    decision = Decision(False, "rounds.min_cohort_size", "cohort of 2 < 3")
    assert Decision(**decision.to_payload()) == decision  # type: ignore[arg-type]
    assert str(decision) == "rounds.min_cohort_size: denied: cohort of 2 < 3"


@pytest.mark.parametrize(
    ("threshold", "neighbours", "denied"),
    [
        (3, 4, set()),
        (1, 4, {"rounds.min_secagg_threshold", "rounds.min_secagg_threshold_fraction"}),
        (2, 1, {"rounds.min_secagg_neighbours"}),
        (3, None, set()),  # no degree stated: only the count is judged
    ],
)
def test_check_round_request_secagg_floors_judge_the_round_t_and_k(
    threshold: int, neighbours: int | None, denied: set[str]
) -> None:
    request = dataclasses.replace(
        GOOD_REQUEST, secagg_threshold=threshold, secagg_neighbours=neighbours
    )
    decisions = check_round_request(SITE, request)
    floors = {d.rule: d for d in decisions if d.rule.startswith("rounds.min_secagg")}
    assert len(floors) == 3
    assert {rule for rule, d in floors.items() if not d.allowed} == denied


def test_check_round_request_secagg_floors_not_applicable_without_secure_aggregation() -> None:
    request = dataclasses.replace(GOOD_REQUEST, secure_aggregation=False, secagg_threshold=None)
    floors = [
        d for d in check_round_request(SITE, request) if d.rule.startswith("rounds.min_secagg")
    ]
    assert len(floors) == 3 and all(d.allowed for d in floors)
