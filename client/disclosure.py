"""What a site's replies may carry in clear: the one allow-list (README, "Privacy, precisely").

The coordinator is not trusted. Every data-dependent value that leaves a
site must be inside a DP accountant or not be sent at all, so each reply is
cut down to what this module declares public before it leaves
(:func:`client.mods.disclosure.disclosure_mod`, the outermost mod after the
instruction check). Whatever the train path, a trainer or a future change
adds to a reply, only these records and metric keys reach the coordinator.

Adjacency. A site's dataset size ``n`` is **private** (add/remove-one
adjacency, what Opacus' Poisson-subsampled Gaussian accountant assumes):
no example count, physical step count, train time or energy leaves a site
under DP. The DP-SGD plan (noise multiplier, sampling rate, noised steps)
and the site's record-level ε and δ are declared public: they are
functions of the run's settings, the site's policy, its ledger history and
``k = ceil(n / b)`` only (``b`` the expected batch); a split of at most
``b`` examples (4096 by default) trains full-batch, ``k = 1``, and they say
nothing about ``n``; a larger site's ε reveals ``k`` however it is
reported (THREAT-MODEL.md, limits).

Per reply, by the run's settings (``dp``: record-level DP-SGD; ``central_dp``:
client-level DP-FedAvg; either one is "under DP"):

=====================  ===============  ======================  ====================
metric                  plain, no DP     secure, no DP           under DP
=====================  ===============  ======================  ====================
train loss/accuracy     sent             not sent                not sent
example count           sent (FedAvg)    not sent                not sent
train seconds, steps    sent             not sent                not sent
update norm             (never made)     not sent                not sent
energy                  sent             sent (workload, no DP)  not sent
local-test loss/acc     sent             sent (unweighted)       not sent (refused)
local-test count        sent             not sent                not sent
DP-SGD plan, ε, δ       —                —                       sent (``dp``)
=====================  ===============  ======================  ====================

Always allowed: the update (plain) or the masked input (secure), the
refusal and its reason, the site-policy decisions record.
"""

from __future__ import annotations

from flwr.app import MetricRecord, RecordDict

from common.config import RunConfig
from common.records import KEY_ARRAYS, KEY_METRICS, KEY_REFUSAL, KEY_SECAGG_MSG, KEY_SITE_DECISIONS

__all__ = [
    "RECORD_LEVEL_PUBLIC",
    "REPLY_RECORDS",
    "disclose",
    "evaluate_metrics",
    "train_metrics",
    "under_dp",
]

REFUSAL = frozenset({"refused"})
RECORD_LEVEL_PUBLIC = frozenset(
    {
        "record-level-epsilon",  # the dataset's lifetime total, from the site's ledger
        "record-level-delta",  # the site's own delta (its policy): what the epsilon is at
        "noise-multiplier",  # the round's DP-SGD plan ...
        "sample-rate",
        "dp-steps",  # ... noised steps (the plan's, checked at confirm)
        "private-scaling",  # 1: features standardised on the site's records (policy consent)
    }
)
ENERGY = frozenset({"energy-kwh", "co2eq-g", "energy-estimated"})
LOCAL_TEST = frozenset({"loss", "accuracy"})
REPLY_RECORDS = frozenset(
    {KEY_ARRAYS, KEY_SECAGG_MSG, KEY_METRICS, KEY_REFUSAL, KEY_SITE_DECISIONS}
)
"""The records a reply may hold at all; any other record is withheld."""


def under_dp(cfg: RunConfig) -> bool:
    """Whether the run claims DP at either level (record-level DP-SGD or client-level DP-FedAvg)."""
    return cfg.dp or cfg.central_dp


def train_metrics(cfg: RunConfig, *, secure: bool) -> frozenset[str] | None:
    """The metric keys a train reply may carry (None: every one, a plain round without DP).

    ``secure``: the reply is (or the run asks for) a secure round's masked
    input, of which the coordinator should learn only the sum.
    """
    if under_dp(cfg):
        return REFUSAL | (RECORD_LEVEL_PUBLIC if cfg.dp else frozenset())
    if secure:
        return REFUSAL | ENERGY
    return None


def evaluate_metrics(cfg: RunConfig) -> frozenset[str] | None:
    """The metric keys a local-test (evaluate) reply may carry (None: every one)."""
    if under_dp(cfg):
        return REFUSAL
    if cfg.secagg:
        return REFUSAL | LOCAL_TEST
    return None


def disclose(content: RecordDict, allowed: frozenset[str] | None) -> RecordDict:
    """``content`` cut down to the declared records, its metrics to ``allowed`` (None: all).

    Pure: returns a new :class:`RecordDict` (the records themselves are
    shared, the metric record rebuilt), never changes ``content``.
    """
    out = RecordDict()
    for name, record in content.items():
        if name not in REPLY_RECORDS:
            continue
        if name == KEY_METRICS and allowed is not None and isinstance(record, MetricRecord):
            record = MetricRecord({k: v for k, v in record.items() if k in allowed})
        out[name] = record
    return out
