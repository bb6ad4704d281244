"""Policy outcomes as values.

A :class:`Decision` is what every policy check returns: whether the action is
allowed, the rule (the dotted policy field) that decided, and a reason a person
can read. Callers write every decision, allowed or denied, to the audit log
(:meth:`Decision.to_payload`) and raise :class:`common.errors.PolicyViolation`
with the denials (:func:`raise_if_denied`).

A :class:`Violation` is a problem found while validating a policy *file*: the
file, the dotted field and what is wrong with it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from common.errors import PolicyViolation


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one policy rule.

    Attributes
    ----------
    allowed : bool
        ``True`` when the rule permits the action.
    rule : str
        The policy field that decided, dotted (``"rounds.min_cohort_size"``).
    reason : str
        One human-readable sentence saying why.
    """

    allowed: bool
    rule: str
    reason: str

    def __str__(self) -> str:
        verdict = "allowed" if self.allowed else "denied"
        return f"{self.rule}: {verdict}: {self.reason}"

    def to_payload(self) -> dict[str, object]:
        """The decision as a JSON-ready mapping for the audit log."""
        return {"allowed": self.allowed, "rule": self.rule, "reason": self.reason}


@dataclass(frozen=True, slots=True)
class Violation:
    """One problem in a policy file.

    Attributes
    ----------
    file : str
        The file as the user named it (``"<memory>"`` for text not from a file).
    field : str
        The dotted field (``"central_dp.min_noise_multiplier"``,
        ``"admission.node_ids[2]"``), or ``"<file>"``/``"<syntax>"`` for
        problems with the file as a whole.
    problem : str
        What is wrong, e.g. ``"unknown key"`` or ``"must be >= 0, got -1.0"``.
    """

    file: str
    field: str
    problem: str

    def __str__(self) -> str:
        return f"{self.file}: {self.field}: {self.problem}"


def denials(decisions: Iterable[Decision]) -> list[Decision]:
    """The decisions that deny, in order."""
    return [d for d in decisions if not d.allowed]


def all_allowed(decisions: Iterable[Decision]) -> bool:
    """``True`` when no decision denies (vacuously true for none)."""
    return all(d.allowed for d in decisions)


def raise_if_denied(decisions: Sequence[Decision]) -> None:
    """Raise :class:`PolicyViolation` carrying every denial, if there is one.

    Raises
    ------
    PolicyViolation
        At least one decision denies; ``violations`` holds the denials.
    """
    denied = denials(decisions)
    if denied:
        raise PolicyViolation(denied)
