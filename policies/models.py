"""Typed, frozen policy models: what a coordinator and a site allow.

Two kinds of policy, each one TOML file (see ``policies/defaults/`` for a
documented example of every key):

- :class:`ServerPolicy` — the coordinator's rules: who may join
  (``admission``), round rules (``rounds``), secure aggregation
  (``secure_aggregation``), central (client-level) DP bounds
  (``central_dp``), the energy budget of a run (``energy``) and the gate a
  model must pass to leave the registry (``release``).
- :class:`SitePolicy` — a data holder's rules: its lifetime record-level
  privacy budget per dataset and DP-SGD bounds (``privacy``), what a round
  must look like (``rounds``) and whom it trusts (``trust``).

A key left out of a file takes the value this module gives it, which is the
value written in the shipped default file. Optional limits (``max_*`` that
may be absent) mean "no limit" when absent. Every model validates itself on
construction (:class:`~common.errors.ConfigurationError` naming each bad
field); files are read by :mod:`policies.loading`, which reports every
problem with the file and the dotted field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from common.errors import ConfigurationError
from policies.keys import canonical_node_key, parse_ed25519_public_key
from policies.schema import (
    Problem,
    boolean,
    integer,
    integer_list,
    number,
    number_table,
    raise_problems,
    section,
    section_table,
    string,
    string_list,
)

SCHEMA_VERSION = 1
ADMISSION_MODES = ("open", "allowlist")
EPSILON_LEVELS = ("client_level", "record_level")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def canonical_app_hash(value: str) -> str:
    """A Flower app (FAB) hash as 64 lowercase hex digits (SHA-256).

    Raises
    ------
    ConfigurationError
        ``value`` is not 64 hexadecimal digits (an optional ``sha256:``
        prefix is accepted).
    """
    try:
        return canonical_sha256(value)
    except ConfigurationError:
        raise ConfigurationError("an app hash is 64 hexadecimal digits (SHA-256)") from None


def canonical_server_key(value: str) -> str:
    """An Ed25519 public key as 64 lowercase hex digits (see :mod:`policies.keys`)."""
    return parse_ed25519_public_key(value).hex()


def canonical_sha256(value: str) -> str:
    """A SHA-256 digest as 64 lowercase hex digits (an optional ``sha256:`` prefix is accepted).

    Raises
    ------
    ConfigurationError
        ``value`` is not 64 hexadecimal digits.
    """
    text = value.strip().lower().removeprefix("sha256:")
    if not _SHA256_HEX.fullmatch(text):
        raise ConfigurationError("a SHA-256 digest is 64 hexadecimal digits")
    return text


# ====================================================================== server


@dataclass(frozen=True, slots=True)
class AdmissionRules:
    """Who may join a run.

    ``mode = "open"`` admits every node Flower lets in; ``"allowlist"``
    admits a node whose id is in ``node_ids`` or whose public key (Flower node
    authentication, OpenSSH/PEM) is in ``public_keys``.
    """

    mode: str = string("open", choices=ADMISSION_MODES)
    node_ids: tuple[int, ...] = integer_list(ge=0)
    public_keys: tuple[str, ...] = string_list(normalize=canonical_node_key)

    def __post_init__(self) -> None:
        raise_problems(self)

    def _cross_problems(self) -> list[Problem]:
        listed = bool(self.node_ids or self.public_keys)
        if self.mode == "allowlist" and not listed:
            return [("mode", "'allowlist' with no node_ids or public_keys admits nobody")]
        if self.mode == "open" and listed:
            return [
                (
                    "mode",
                    "node_ids/public_keys are listed but mode is 'open' (which ignores them); "
                    'set mode = "allowlist" or remove the lists',
                )
            ]
        return []


@dataclass(frozen=True, slots=True)
class ServerRoundRules:
    """Round rules: sites per round, sampling fraction and number of rounds."""

    min_sites: int = integer(2, ge=1)
    min_fraction: float = number(0.0, ge=0.0, le=1.0)
    max_fraction: float = number(1.0, gt=0.0, le=1.0)
    max_rounds: int | None = integer(100, ge=1, optional=True)

    def __post_init__(self) -> None:
        raise_problems(self)

    def _cross_problems(self) -> list[Problem]:
        if self.min_fraction > self.max_fraction:
            return [("min_fraction", f"must be <= max_fraction ({self.max_fraction:g})")]
        return []


@dataclass(frozen=True, slots=True)
class SecureAggregationRules:
    """Whether secure aggregation is required, and its least reconstruction threshold."""

    required: bool = boolean(True)
    min_threshold: int = integer(2, ge=1)

    def __post_init__(self) -> None:
        raise_problems(self)


@dataclass(frozen=True, slots=True)
class CentralDpRules:
    """Bounds on central (client-level) DP-FedAvg.

    ``min_noise_multiplier`` and ``max_clip_norm`` bound the mechanism when
    central DP is on. ``max_client_epsilon`` caps the run's client-level ε at
    ``delta``; a run without central DP has unbounded client-level ε, so a
    cap denies it.
    """

    required: bool = boolean(False)
    min_noise_multiplier: float = number(0.5, ge=0.0)
    max_clip_norm: float | None = number(10.0, gt=0.0, optional=True)
    max_client_epsilon: float | None = number(None, gt=0.0, optional=True)
    delta: float = number(1e-5, gt=0.0, lt=1.0)

    def __post_init__(self) -> None:
        raise_problems(self)


@dataclass(frozen=True, slots=True)
class EnergyRules:
    """The energy budget of one run, in kWh (absent: no limit)."""

    max_kwh_per_run: float | None = number(None, gt=0.0, optional=True)

    def __post_init__(self) -> None:
        raise_problems(self)


@dataclass(frozen=True, slots=True)
class ReleaseRules:
    """The gate a model version must pass to be exported.

    ``max_client_epsilon``/``max_record_epsilon`` cap the version's ε at each
    level (a level with no ε, i.e. without DP, fails a cap); ``min_metrics``
    maps a metric name to its least value (a missing metric fails).
    """

    max_client_epsilon: float | None = number(None, gt=0.0, optional=True)
    max_record_epsilon: float | None = number(None, gt=0.0, optional=True)
    min_metrics: tuple[tuple[str, float], ...] = number_table()

    def __post_init__(self) -> None:
        raise_problems(self)


@dataclass(frozen=True, slots=True)
class ServerPolicy:
    """The coordinator's policy."""

    kind: str = string("server", choices=("server",))
    schema: int = integer(SCHEMA_VERSION, ge=1, le=SCHEMA_VERSION)
    name: str = string("default server policy")
    admission: AdmissionRules = section(AdmissionRules)
    rounds: ServerRoundRules = section(ServerRoundRules)
    secure_aggregation: SecureAggregationRules = section(SecureAggregationRules)
    central_dp: CentralDpRules = section(CentralDpRules)
    energy: EnergyRules = section(EnergyRules)
    release: ReleaseRules = section(ReleaseRules)

    def __post_init__(self) -> None:
        raise_problems(self)


# ====================================================================== site


@dataclass(frozen=True, slots=True)
class DatasetBudget:
    """A per-dataset override of the site's record-level budget (absent: the site's)."""

    epsilon_budget: float | None = number(None, gt=0.0, optional=True)
    delta: float | None = number(None, gt=0.0, lt=1.0, optional=True)

    def __post_init__(self) -> None:
        raise_problems(self)


@dataclass(frozen=True, slots=True)
class PrivacyRules:
    """Record-level DP-SGD at the site.

    ``epsilon_budget`` is the lifetime record-level ε allowed per dataset at
    ``delta``; ``datasets`` overrides it for named datasets. With
    ``require_dp`` a round without DP-SGD is refused; ``min_noise_multiplier``
    and ``max_grad_norm`` bound the DP-SGD parameters a round may ask for.
    ``allow_private_scaling`` lets DP-SGD standardise features on the site's
    own records when they have no public bounds: a release about them outside
    the accountant, which the run's privacy block then names (off: such a
    site cannot train under DP until it declares public bounds).
    """

    require_dp: bool = boolean(True)
    epsilon_budget: float = number(8.0, gt=0.0)
    delta: float = number(1e-5, gt=0.0, lt=1.0)
    min_noise_multiplier: float = number(0.5, ge=0.0)
    max_grad_norm: float = number(10.0, gt=0.0)
    allow_private_scaling: bool = boolean(False)
    datasets: tuple[tuple[str, DatasetBudget], ...] = section_table(DatasetBudget)

    def __post_init__(self) -> None:
        raise_problems(self)

    def budget_for(self, dataset: str | None) -> tuple[float, float]:
        """The (ε budget, δ) for ``dataset`` (the site-wide values unless overridden)."""
        for name, override in self.datasets:
            if name == dataset:
                eps = (
                    self.epsilon_budget
                    if override.epsilon_budget is None
                    else override.epsilon_budget
                )
                delta = self.delta if override.delta is None else override.delta
                return eps, delta
        return self.epsilon_budget, self.delta


@dataclass(frozen=True, slots=True)
class SiteRoundRules:
    """What a round must look like for the site to take part.

    The ``min_secagg_*`` floors bound the secure-aggregation parameters the
    coordinator chooses (it picks the cohort, the threshold ``t`` and the
    neighbour degree ``k``): a coordinator colluding with ``c`` sites learns
    nothing beyond the sum while ``c < t``, and each site's mask hides among
    its ``k`` neighbours, so a site refuses a round whose ``t``, ``t/k`` or
    ``k`` fall below its own floors before any secret of that round exists.
    ``min_distributed_noise_multiplier`` is the floor on the noise a
    distributed-DP round asks the site to add (:mod:`common.dp.skellam`).
    """

    require_secure_aggregation: bool = boolean(True)
    min_cohort_size: int = integer(3, ge=1)
    max_local_epochs: int = integer(5, ge=1)
    min_secagg_threshold: int = integer(2, ge=1)
    min_secagg_threshold_fraction: float = number(0.5, ge=0.5, le=1.0)
    min_secagg_neighbours: int = integer(2, ge=1)
    # Distributed DP (the site adds the noise before masking): the smallest noise multiplier
    # z (the target noise of t survivors has variance (z Delta_2)^2) this site adds its share of.
    min_distributed_noise_multiplier: float = number(0.5, ge=0.0)

    def __post_init__(self) -> None:
        raise_problems(self)


@dataclass(frozen=True, slots=True)
class TrustRules:
    """Whom the site trusts.

    ``server_key``: the coordinator's Ed25519 (audit) public key; when set,
    an instruction is refused unless it carries that key's signature over
    its type, run, round, destination, sequence number and every record
    (:mod:`common.audit.instruction`), unaltered, fresh and in order, and
    audit heads not signed by it are not witnessed. Without ``server_key``, the
    coordinator key named by the site's verified roster is the pin.
    ``allowed_app_hashes``: the SHA-256 hashes of the Flower apps (FABs) the
    site runs; empty allows any.

    ``roster_authority``: the Ed25519 public key of the roster authority
    (:mod:`common.roster`); the site uses a roster only if that key signed
    it. ``roster_digest``: the SHA-256 of the one roster the site accepts
    (its signed bytes); when both are set, both must hold.
    """

    server_key: str | None = string(None, normalize=canonical_server_key, optional=True)
    allowed_app_hashes: tuple[str, ...] = string_list(normalize=canonical_app_hash)
    roster_authority: str | None = string(None, normalize=canonical_server_key, optional=True)
    roster_digest: str | None = string(None, normalize=canonical_sha256, optional=True)

    def __post_init__(self) -> None:
        raise_problems(self)

    @property
    def server_key_bytes(self) -> bytes | None:
        """The trusted server key as raw 32 bytes, or ``None``."""
        return None if self.server_key is None else bytes.fromhex(self.server_key)

    @property
    def roster_authority_bytes(self) -> bytes | None:
        """The pinned roster authority as raw 32 bytes, or ``None``."""
        return None if self.roster_authority is None else bytes.fromhex(self.roster_authority)

    @property
    def roster_digest_bytes(self) -> bytes | None:
        """The pinned roster digest as raw 32 bytes, or ``None``."""
        return None if self.roster_digest is None else bytes.fromhex(self.roster_digest)


@dataclass(frozen=True, slots=True)
class SitePolicy:
    """A data-holding site's policy."""

    kind: str = string("site", choices=("site",))
    schema: int = integer(SCHEMA_VERSION, ge=1, le=SCHEMA_VERSION)
    name: str = string("default site policy")
    privacy: PrivacyRules = section(PrivacyRules)
    rounds: SiteRoundRules = section(SiteRoundRules)
    trust: TrustRules = section(TrustRules)

    def __post_init__(self) -> None:
        raise_problems(self)


Policy = ServerPolicy | SitePolicy
