"""The fedseal error hierarchy.

Every error fedseal raises on purpose derives from :class:`FedsealError`.
Command-line front ends map these to exit codes; library code never calls
``sys.exit``.
"""

from __future__ import annotations

from collections.abc import Sequence


class FedsealError(Exception):
    """Base class of every error fedseal raises deliberately."""


class ConfigurationError(FedsealError, ValueError):
    """A configuration value is invalid; raised at construction time."""


class DataError(FedsealError, ValueError):
    """Input data (a site's file, a model update, an array) is unusable."""


class ProtocolError(FedsealError):
    """A protocol message is malformed, out of order, or for another round."""


class ProtocolAbort(ProtocolError):
    """A protocol round cannot complete (e.g. fewer survivors than the threshold)."""


class IntegrityError(FedsealError):
    """Authentication, decryption or hash-chain verification failed.

    Deliberately opaque: callers learn *that* a check failed, not which
    byte, so that the error itself is no oracle.
    """


class PrivacyBudgetExceeded(FedsealError):
    """Applying a mechanism would take the privacy spend over its budget."""

    def __init__(self, spent: float, budget: float, would_be: float | None = None) -> None:
        self.spent = spent
        self.budget = budget
        self.would_be = would_be
        msg = f"privacy budget exhausted: spent {spent:.4g} of {budget:.4g}"
        if would_be is not None:
            msg += f" (this round would bring it to {would_be:.4g})"
        super().__init__(msg)


class PolicyViolation(FedsealError):
    """A policy forbids an action; carries every violated rule."""

    def __init__(self, violations: Sequence[object]) -> None:
        self.violations = list(violations)
        super().__init__("; ".join(str(v) for v in self.violations) or "policy violation")


class RecordError(FedsealError):
    """The central record or a site store cannot be read or written."""


class NotSupportedError(FedsealError):
    """A requested feature is not implemented in this version of fedseal."""
