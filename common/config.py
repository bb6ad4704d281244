"""The run configuration: one validated value shared by server, sites and simulations.

A :class:`RunConfig` is built from command-line options (``fedseal-sim``), or
from Flower's ``context.run_config`` (``flwr run``, the Deployment Engine),
whose keys are the kebab-case field names (``local-epochs``). Every value is
checked at construction; a bad value raises :class:`ConfigurationError`
naming the field.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from common.data import SYNTHETIC_DEFAULT_ROWS, check_synthetic_rows
from common.errors import ConfigurationError

DATASETS = ("digits", "breast_cancer", "synthetic", "custom")
MODELS = ("auto", "mlp", "cnn", "linear", "vector")
# "train": sites train on their data. "echo": sites skip training and return a fixed
# update (protocol benchmarks measure aggregation cost alone).
WORKLOADS = ("train", "echo")
# Bound on the rounds one secure-aggregation setup prepares (and so on a bundle's length).
MAX_SECAGG_SETUP_ROUNDS = 32
PARTITIONS = ("iid", "dirichlet")
SAMPLINGS = ("fixed", "poisson")
ACCOUNTANTS = ("pld", "prv", "rdp")  # common.dp.accounting: pld exact, rdp looser
DEVICES = ("auto", "cpu", "cuda")
# Fields earlier versions stored that are gone (fault injection moved to simulations.faults).
RETIRED_FIELDS = ("drop_rate", "drop_stage")
# run_config keys with this prefix configure the coordinator only (paths, keys).
SERVER_ONLY_PREFIX = "server-"
# The largest expected DP-SGD batch dp_batch_size=0 means: full-batch DP-GD up to this
# many training examples, Poisson batches of about this size above it.
FULL_BATCH_DP_CAP = 4096


@dataclass(frozen=True, slots=True)
class RunConfig:
    """Everything a fedseal run needs to agree on between server and sites.

    Units are in the names; fractions lie in (0, 1].
    """

    # data and model
    dataset: str = "digits"
    model: str = "auto"
    num_features: int = 0  # only for dataset="custom": features per example
    num_classes: int = 0  # only for dataset="custom"
    partition: str = "iid"
    alpha: float = 0.5
    test_fraction: float = 0.2
    # rows of the generated "synthetic" dataset (common.data.make_synthetic); other datasets
    # ignore it. The default gives each of 1,000 sites 100+ training records.
    synthetic_rows: int = SYNTHETIC_DEFAULT_ROWS
    # federation
    num_sites: int = 10  # simulation only: virtual sites
    rounds: int = 5
    fraction_train: float = 1.0
    min_sites: int = 2
    sampling: str = "fixed"
    round_timeout_s: float = 600.0
    # before round 1, wait up to wait_timeout_s for this many sites (0: start at min_sites)
    wait_sites: int = 0
    wait_timeout_s: float = 600.0
    # a failed round ends the round, not the run: the run aborts after this many in a row
    max_failed_rounds: int = 3
    # local training
    local_epochs: int = 2
    batch_size: int = 16
    learning_rate: float = 0.1
    device: str = "auto"
    seed: int = 0
    workload: str = "train"
    # record-level DP at each site (Opacus DP-SGD); off unless asked for (or a
    # site policy requires it): see README "Privacy, precisely" for why
    dp: bool = False
    site_epsilon: float = (
        8.0  # target over the planned rounds; also the ledger budget without a site policy
    )
    site_delta: float = 1e-5
    max_grad_norm: float = 1.0
    site_noise_multiplier: float = 0.0  # 0: derived from site_epsilon
    # DP-SGD's own training settings (small sites learn best with full-batch DP-GD)
    # expected Poisson batch; 0: the site's whole training split (sampling rate 1) up to
    # FULL_BATCH_DP_CAP examples, above it batches of about FULL_BATCH_DP_CAP
    # (sampling rate 1 / ceil(n / FULL_BATCH_DP_CAP)), so a step's cost does not grow with n
    dp_batch_size: int = 0
    dp_local_epochs: int = 1
    dp_learning_rate: float = 4.0
    accountant: str = "pld"
    # client-level DP at the server (DP-FedAvg)
    central_dp: bool = False
    noise_multiplier: float = 1.0
    delta: float = 1e-5
    # target client-level epsilon over the planned rounds; > 0: the commands calibrate
    # noise_multiplier to it (server.privacy.calibrate_client_noise); 0: noise_multiplier as given
    client_epsilon: float = 0.0
    # distributed DP (common.dp.skellam): client-level DP whose noise each site adds before
    # masking (needs secagg; implies central_dp, the client-level switch); the server adds none
    distributed_dp: bool = False
    # update clipping (client's job): L2 bound C on each site's update whenever
    # central DP or secure aggregation is on
    clip_norm: float = 5.0
    # secure aggregation (SecAgg+)
    secagg: bool = True
    secagg_threshold: float = 0.6  # <= 1: fraction of neighbours; > 1: a count
    secagg_bits: int = 32
    # rounds whose keys one setup (keys + shares exchanges) prepares, when every round's
    # cohort is the same (full participation, fixed sampling); 1 = a setup every round
    secagg_setup_rounds: int = 8

    def __post_init__(self) -> None:
        _choice("dataset", self.dataset, DATASETS)
        _choice("model", self.model, MODELS)
        _choice("partition", self.partition, PARTITIONS)
        _choice("sampling", self.sampling, SAMPLINGS)
        _choice("device", self.device, DEVICES)
        _choice("workload", self.workload, WORKLOADS)
        _choice("accountant", self.accountant, ACCOUNTANTS)
        _positive_float("site_epsilon", self.site_epsilon)
        _positive_float("max_grad_norm", self.max_grad_norm)
        _non_negative_int("dp_batch_size", self.dp_batch_size)
        _positive_int("dp_local_epochs", self.dp_local_epochs)
        _positive_float("dp_learning_rate", self.dp_learning_rate)
        _positive_float("noise_multiplier", self.noise_multiplier)
        for name in ("site_delta", "delta"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not (0.0 < value < 1.0)
            ):
                raise ConfigurationError(f"{name} must lie in (0, 1), got {value!r}")
        _optional_float(
            "site_noise_multiplier", self.site_noise_multiplier, "derive from site_epsilon"
        )
        _positive_float("clip_norm", self.clip_norm)
        _optional_float("client_epsilon", self.client_epsilon, "use noise_multiplier")
        if self.distributed_dp:
            if not self.secagg:
                raise ConfigurationError(
                    "distributed_dp adds the noise at the sites before secure aggregation's "
                    "masking: it needs secagg (use central_dp for plain aggregation)"
                )
            if not 16 <= self.secagg_bits <= 32:
                raise ConfigurationError(
                    f"distributed_dp needs secagg_bits in [16, 32], got {self.secagg_bits!r}"
                )
            object.__setattr__(self, "central_dp", True)  # client-level DP, noise at the sites
        if self.client_epsilon > 0 and not self.central_dp:
            raise ConfigurationError("client_epsilon targets client-level DP: it needs central_dp")
        t = self.secagg_threshold
        if not (0.5 < t <= 1.0 or (t > 1.0 and float(t).is_integer())):
            raise ConfigurationError(
                f"secagg_threshold must be a fraction in (0.5, 1] or a whole count >= 2, got {t!r}"
            )
        if isinstance(self.secagg_bits, bool) or not (8 <= self.secagg_bits <= 53):
            raise ConfigurationError(f"secagg_bits must lie in [8, 53], got {self.secagg_bits!r}")
        if isinstance(self.secagg_setup_rounds, bool) or not (
            isinstance(self.secagg_setup_rounds, int)
            and 1 <= self.secagg_setup_rounds <= MAX_SECAGG_SETUP_ROUNDS
        ):
            raise ConfigurationError(
                f"secagg_setup_rounds must be an integer in [1, {MAX_SECAGG_SETUP_ROUNDS}], "
                f"got {self.secagg_setup_rounds!r}"
            )
        if (self.model == "vector") != (self.workload == "echo"):
            raise ConfigurationError(
                "model 'vector' and workload 'echo' go together (benchmarks only)"
            )
        _positive_int("rounds", self.rounds)
        _positive_int("num_sites", self.num_sites)
        _positive_int("min_sites", self.min_sites)
        _positive_int("max_failed_rounds", self.max_failed_rounds)
        _positive_int("local_epochs", self.local_epochs)
        _positive_int("batch_size", self.batch_size)
        _non_negative_int("seed", self.seed)
        _non_negative_int("num_features", self.num_features)
        _non_negative_int("num_classes", self.num_classes)
        _fraction("fraction_train", self.fraction_train)
        _positive_float("alpha", self.alpha)
        check_synthetic_rows(self.synthetic_rows)
        _positive_float("learning_rate", self.learning_rate)
        _positive_float("round_timeout_s", self.round_timeout_s)
        _non_negative_int("wait_sites", self.wait_sites)
        _positive_float("wait_timeout_s", self.wait_timeout_s)
        if not (0.0 < self.test_fraction < 1.0):
            raise ConfigurationError(
                f"test_fraction must lie in (0, 1), got {self.test_fraction!r}"
            )
        if self.dataset == "custom" and (self.num_features < 1 or self.num_classes < 2):
            raise ConfigurationError(
                "dataset='custom' needs num_features >= 1 and num_classes >= 2 "
                "(the server builds the model before any site data is seen)"
            )

    # ------------------------------------------------------------------ Flower
    def to_flower(self) -> dict[str, bool | int | float | str]:
        """Flat kebab-case mapping, as Flower's ``run_config`` holds it."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Build from Flower's ``context.run_config``; unknown keys are an error.

        Flower's own TOML types arrive as bool/int/float/str; ints given where a
        float is expected are accepted, and nothing else is coerced.
        """
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in run_config.items():
            if key.startswith(SERVER_ONLY_PREFIX):
                continue  # the coordinator's own settings, never sent to sites
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigurationError(f"unknown run-config key {key!r}")
            values[name] = _coerce(name, known[name].type, value)
        return cls(**values)

    @classmethod
    def from_record(cls, values: Mapping[str, Any]) -> RunConfig:
        """Rebuild a configuration the central record stored (``dataclasses.asdict``).

        Fields fedseal no longer has (:data:`RETIRED_FIELDS`) are ignored, so a
        record written by an earlier version still resumes; any other unknown
        field is an error.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known - set(RETIRED_FIELDS))
        if unknown:
            raise ConfigurationError(f"unknown configuration field(s): {', '.join(unknown)}")
        return cls(**{k: v for k, v in values.items() if k in known})

    @property
    def secagg_threshold_value(self) -> float | int:
        """The threshold as :func:`common.secagg.make_config` takes it (fraction or count)."""
        t = self.secagg_threshold
        return t if t <= 1.0 else int(t)

    @property
    def client_sampling(self) -> str:
        """How the client-level accountant treats site sampling (what the server really does)."""
        return "poisson" if self.sampling == "poisson" else "fixed_cohort"

    @property
    def client_sample_rate(self) -> float:
        """``q`` for the client-level accountant: the Poisson rate, or 1 (no amplification)."""
        return self.fraction_train if self.sampling == "poisson" else 1.0

    @property
    def clips_updates(self) -> bool:
        """Whether sites clip their update to ``clip_norm`` before sending it."""
        return self.secagg or self.central_dp

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)


def _coerce(name: str, annotation: object, value: Any) -> Any:
    kind = str(annotation)
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigurationError(f"{name} must be a boolean, got {value!r}")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigurationError(f"{name} must be an integer, got {value!r}")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigurationError(f"{name} must be a number, got {value!r}")
        return float(value)
    if kind == "str":
        if not isinstance(value, str):
            raise ConfigurationError(f"{name} must be a string, got {value!r}")
        return value
    return value


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigurationError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{name} must be a positive integer, got {value!r}")


def _non_negative_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigurationError(f"{name} must be a non-negative integer, got {value!r}")


def _positive_float(name: str, value: object) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigurationError(f"{name} must be a positive finite number, got {value!r}")


def _optional_float(name: str, value: object, zero_means: str) -> None:
    """A finite number ``>= 0`` whose 0 means ``zero_means``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ConfigurationError(f"{name} must be >= 0 (0 = {zero_means}), got {value!r}")


def _fraction(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (0.0 < value <= 1.0):
        raise ConfigurationError(f"{name} must lie in (0, 1], got {value!r}")
