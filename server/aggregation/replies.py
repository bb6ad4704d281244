"""Reading sites' replies: what is usable, what a site refused or decided, and why not.

Every reply is checked on its own before any protocol sees it. A Flower
error, a missing or malformed record, a non-positive example count or a
non-finite metric makes that one site's contribution unusable (with the
reason kept); it never ends the round by itself. The facts a round learns
about its sites (rejections, refusals, policy decisions) live in one
:class:`SiteFacts` per round.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Message

from common.errors import DataError, ProtocolError
from common.records import (
    KEY_ARRAYS,
    KEY_METRICS,
    KEY_REFUSAL,
    KEY_SITE_DECISIONS,
    record_to_vector,
)
from server.results import SiteOutcome

MAX_DECISIONS_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class SiteUpdate:
    """One site's usable plain-round update.

    ``num_examples`` is None when the site does not state it (under DP a
    site's dataset size is private, README "Privacy, precisely").
    """

    node_id: int
    update: np.ndarray
    num_examples: int | None
    metrics: dict[str, Any]


@dataclass(slots=True)
class SiteFacts:
    """What one round learned about its sites besides their payloads.

    ``rejected``: node -> why its reply was unusable. ``refused``: node -> the
    site's own reason for declining. ``decisions``: node -> the site-policy
    decisions its reply carried (policy hash + decisions).
    """

    rejected: dict[int, str] = field(default_factory=dict)
    refused: dict[int, str] = field(default_factory=dict)
    decisions: dict[int, dict[str, Any]] = field(default_factory=dict)

    def copy(self, *, with_decisions: bool = True) -> SiteFacts:
        return SiteFacts(
            dict(self.rejected), dict(self.refused), dict(self.decisions) if with_decisions else {}
        )

    def usable(
        self,
        replies: Mapping[int, Message],
        node_id: int,
        stage: str,
        *,
        may_refuse: bool,
    ) -> Message | None:
        """``node_id``'s reply if its payload should be decoded; else record why not, None.

        ``may_refuse``: the stage at which a site states its policy decisions
        and may decline the round.
        """
        reply = replies.get(node_id)
        if reply is None:
            self.rejected[node_id] = f"no reply at stage {stage}"
            return None
        if may_refuse:
            if (found := site_decisions(reply)) is not None:
                self.decisions[node_id] = found
            if (reason := refusal_reason(reply)) is not None:
                self.refused[node_id] = reason
                return None
        if reply.has_error():
            self.rejected[node_id] = f"stage {stage}: site error: {reply.error.reason}"
            return None
        return reply


def site_decisions(reply: Message) -> dict[str, Any] | None:
    """A site's policy decisions carried in its reply (policy hash + decisions), if any.

    Bounded and parsed defensively: a malformed record is reported as such,
    never trusted and never a crash.
    """
    if reply.has_error():
        return None
    record = reply.content.config_records.get(KEY_SITE_DECISIONS)
    if record is None:
        return None
    policy_hash, raw = record.get("policy-hash"), record.get("decisions")
    if (
        not isinstance(policy_hash, str)
        or not isinstance(raw, str)
        or len(raw) > MAX_DECISIONS_BYTES
    ):
        return {"malformed": True}
    try:
        decisions = json.loads(raw)
    except ValueError:
        return {"malformed": True}
    if not isinstance(decisions, list):
        return {"malformed": True}
    return {"policy_hash": policy_hash[:128], "decisions": decisions}


def refusal_reason(reply: Message) -> str | None:
    """The site's reason if ``reply`` declines the round (metrics ``refused`` = 1), else None."""
    if reply.has_error():
        return None
    metrics = reply.content.metric_records.get(KEY_METRICS)
    if metrics is None or metrics.get("refused") != 1:
        return None
    record = reply.content.config_records.get(KEY_REFUSAL)
    reason = record.get("reason") if record is not None else None
    return reason[:500] if isinstance(reason, str) and reason else "refused (no reason given)"


def parse_train_reply(reply: Message, size: int) -> SiteUpdate:
    """Validate one site's plain train reply; DataError says why it is unusable.

    The update is required; the metrics record and every metric in it are
    optional (under DP a site sends none of its counts), but a metric that
    is there must be valid: a positive integer example count, finite numbers.
    """
    if reply.has_error():
        raise DataError(f"site error: {reply.error.reason}")
    content = reply.content
    if KEY_ARRAYS not in content.array_records:
        raise DataError("reply lacks the update")
    record = content.metric_records.get(KEY_METRICS)
    metrics = dict(record.items()) if record is not None else {}
    n = metrics.get("num-examples")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise DataError(f"num-examples must be a positive integer, got {n!r}")
    _check_finite(metrics, DataError)
    update = record_to_vector(content.array_records[KEY_ARRAYS], size, what="update")
    return SiteUpdate(reply.metadata.src_node_id, update, n, metrics)


def masked_metrics(reply: Message) -> dict[str, Any]:
    """The metrics of a masked-stage reply (none required: the masked sum is what counts).

    Under secure aggregation a site states no example count or update norm;
    whatever metrics it does send must be finite.
    """
    record = reply.content.metric_records.get(KEY_METRICS)
    out = dict(record.items()) if record is not None else {}
    _check_finite(out, ProtocolError)
    return out


def _check_finite(metrics: Mapping[str, Any], error: type[Exception]) -> None:
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise error(f"metric {key!r} is not finite")


def site_outcome(node_id: int, metrics: Mapping[str, Any]) -> SiteOutcome:
    """An accepted site's line in the round result, with what it states about its privacy.

    Every figure is optional: under DP a site states only its record-level
    plan, epsilon and delta (no count, train time or energy).
    """

    def num(key: str) -> float | None:
        value = metrics.get(key)
        return float(value) if is_finite_number(value) else None

    def count(key: str) -> int | None:
        value = metrics.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    scaling = count("private-scaling")
    return SiteOutcome(
        node_id,
        True,
        "",
        count("num-examples"),
        num("train-seconds"),
        record_level_epsilon=num("record-level-epsilon"),
        record_level_delta=num("record-level-delta"),
        noise_multiplier=num("noise-multiplier"),
        sample_rate=num("sample-rate"),
        steps=count("dp-steps"),
        energy_kwh=num("energy-kwh"),
        co2eq_g=num("co2eq-g"),
        energy_estimated=None
        if "energy-estimated" not in metrics
        else bool(metrics["energy-estimated"]),
        private_scaling=None if scaling is None else bool(scaling),
    )


def is_finite_number(value: object) -> bool:
    """A real int or float (not bool) with a finite value."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
