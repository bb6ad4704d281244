"""The run options of ``fedseal-sim run`` and ``fedseal-server start``, declared once.

Each :class:`RunOption` names one :class:`~common.config.RunConfig` field with its
flag(s) and help text; its type and default come from ``RunConfig`` itself, its
choices from the tuples in :mod:`common.config`. :func:`with_run_options` mounts a
set of them on a typer command and hands the command the ``RunConfig`` they build,
so a field added here reaches both commands the same way.

Option sets
-----------
``SHARED_OPTIONS``
    Everything both commands configure: rounds, sampling, local training,
    record-level DP-SGD, client-level DP and secure aggregation.
``SIMULATION_OPTIONS``
    ``fedseal-sim run``: the shared options, the embedded datasets only, and how
    they are split across the virtual sites (``--partition``, ``--alpha``).
``COORDINATOR_OPTIONS``
    ``fedseal-server start``: the shared options and the shape of a ``custom``
    dataset the sites bring as files (``--num-features``, ``--num-classes``).

The number of sites (``--clients`` in a simulation) and the simulation's fault
injection stay with the command that has them.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import click
import typer

from common.config import (
    ACCOUNTANTS,
    DATASETS,
    FULL_BATCH_DP_CAP,
    MODELS,
    PARTITIONS,
    SAMPLINGS,
    RunConfig,
)
from common.data import BUILTIN_DATASETS
from policies.cli_errors import one_line_errors

__all__ = [
    "COORDINATOR_OPTIONS",
    "RUN_CONFIG_PARAMETER",
    "RUN_PANEL",
    "SHARED_OPTIONS",
    "SIMULATION_OPTIONS",
    "RunOption",
    "SecaggSetupRounds",
    "build_run_config",
    "with_run_options",
]

R = TypeVar("R")

#: The parameter through which a decorated command receives its ``RunConfig``.
RUN_CONFIG_PARAMETER = "run_config"
#: The ``--help`` panel that lists the run options.
RUN_PANEL = "Run configuration"

_DEFAULTS = RunConfig()
_FIELD_TYPES: dict[str, type] = typing.get_type_hints(RunConfig)
_FIELD_ORDER = {f.name: i for i, f in enumerate(dataclasses.fields(RunConfig))}
# "vector" goes only with the benchmarks' "echo" workload, which no command line sets.
_CLI_MODELS = tuple(m for m in MODELS if m != "vector")

_SECAGG_SETUP_ROUNDS_HELP = (
    "Rounds whose fresh per-round keys one SecAgg+ setup exchange prepares "
    "(full participation only; 1 = keys and shares exchanged every round)."
)
SecaggSetupRounds = Annotated[int, typer.Option(min=1, help=_SECAGG_SETUP_ROUNDS_HELP)]
"""``--setup-rounds``-style option type for commands that name the parameter themselves."""


@dataclass(frozen=True, slots=True)
class RunOption:
    """One command-line option for one ``RunConfig`` field.

    Parameters
    ----------
    field
        The ``RunConfig`` field the option sets (also the command parameter's name).
    flags
        Flag declarations as typer takes them: ``("--rounds", "-r")``, or one
        ``"--on/--off"`` pair for a boolean.
    help
        The ``--help`` text.
    choices
        The accepted values of a text field; empty for free values.
    min
        Smallest accepted value of an integer, checked while parsing; None to leave
        every check to ``RunConfig``.

    Raises
    ------
    ValueError
        When ``field`` is not a ``RunConfig`` field, or ``choices`` is given and
        does not hold the field's default.
    """

    field: str
    flags: tuple[str, ...]
    help: str
    choices: tuple[str, ...] = ()
    min: int | None = None

    def __post_init__(self) -> None:
        if self.field not in _FIELD_TYPES:
            raise ValueError(f"{self.field!r} is not a RunConfig field")
        if not self.flags:
            raise ValueError(f"option for {self.field!r} declares no flag")
        if self.choices and self.default not in self.choices:
            raise ValueError(f"default {self.default!r} of {self.field!r} is not a choice")

    @property
    def default(self) -> Any:
        """The field's default, taken from ``RunConfig()``."""
        return getattr(_DEFAULTS, self.field)

    @property
    def value_type(self) -> type:
        """The field's type (``bool``, ``int``, ``float`` or ``str``)."""
        return _FIELD_TYPES[self.field]

    def narrowed(self, choices: Sequence[str]) -> RunOption:
        """A copy that accepts only ``choices``, a subset of this option's choices.

        Raises
        ------
        ValueError
            When ``choices`` holds a value this option does not accept.
        """
        extra = set(choices) - set(self.choices)
        if extra:
            raise ValueError(f"{sorted(extra)} are not choices of {self.field!r}")
        return dataclasses.replace(self, choices=tuple(choices))

    def parameter(self) -> inspect.Parameter:
        """The keyword-only command parameter typer turns into this option."""
        option = typer.Option(
            *self.flags,
            help=self.help,
            min=self.min,
            click_type=click.Choice(self.choices) if self.choices else None,
            rich_help_panel=RUN_PANEL,
        )
        return inspect.Parameter(
            self.field,
            inspect.Parameter.KEYWORD_ONLY,
            default=self.default,
            annotation=Annotated[self.value_type, option],
        )


def _option(field: str, *flags: str, help: str, **kw: Any) -> RunOption:
    return RunOption(field, flags, help, **kw)


SHARED_OPTIONS: tuple[RunOption, ...] = (
    _option("dataset", "--dataset", help="Dataset the sites train on.", choices=DATASETS),
    _option(
        "model",
        "--model",
        help="Model from the zoo; auto picks the MLP (the linear model under --dp).",
        choices=_CLI_MODELS,
    ),
    _option("rounds", "--rounds", "-r", help="Federated rounds."),
    _option("fraction_train", "--fraction", help="Fraction of the sites sampled per round."),
    _option(
        "min_sites",
        "--min-sites",
        help="Fewest sites (usable updates) a round accepts; under --central-dp, fewest "
        "connected sites (every cohort is released, whatever its size).",
    ),
    _option(
        "sampling",
        "--sampling",
        help="Site sampling: a fixed-size cohort, or Poisson with rate --fraction.",
        choices=SAMPLINGS,
    ),
    _option("round_timeout_s", "--round-timeout", help="Seconds to wait for sites per round."),
    _option(
        "wait_sites",
        "--wait-sites",
        help="Before round 1, wait for this many connected sites (0: every member of "
        "`start --roster`, else start once --min-sites are connected); after --wait-timeout "
        "the run starts with those connected.",
    ),
    _option(
        "wait_timeout_s",
        "--wait-timeout",
        help="Seconds to wait for --wait-sites before round 1.",
    ),
    _option(
        "max_failed_rounds",
        "--max-failed-rounds",
        help="Consecutive failed rounds (model kept, failure recorded) after which the run aborts.",
        min=1,
    ),
    _option("local_epochs", "--local-epochs", help="Local epochs per round."),
    _option("batch_size", "--batch-size", help="Local batch size."),
    _option("learning_rate", "--lr", help="Local SGD learning rate."),
    _option("seed", "--seed", help="Seed for partitions, initial weights and sampling."),
    _option("dp", "--dp/--no-dp", help="Record-level DP-SGD (Opacus) at every site."),
    _option(
        "site_epsilon",
        "--site-epsilon",
        help="Each site's record-level epsilon target over the run (and its ledger budget).",
    ),
    _option("site_delta", "--site-delta", help="Record-level delta."),
    _option("max_grad_norm", "--max-grad-norm", help="DP-SGD per-example gradient clip."),
    _option(
        "site_noise_multiplier",
        "--site-noise-multiplier",
        help="DP-SGD noise multiplier; 0 derives it from --site-epsilon.",
    ),
    _option(
        "dp_batch_size",
        "--dp-batch-size",
        help=(
            "DP-SGD expected (Poisson) batch size; 0 = the site's whole training split "
            f"(DP-GD, sampling rate 1) up to {FULL_BATCH_DP_CAP} examples, "
            f"Poisson batches of about {FULL_BATCH_DP_CAP} above."
        ),
    ),
    _option("dp_local_epochs", "--dp-local-epochs", help="Local epochs per round under DP-SGD."),
    _option("dp_learning_rate", "--dp-learning-rate", help="Learning rate under DP-SGD."),
    _option(
        "accountant", "--accountant", help="Privacy accountant (both levels).", choices=ACCOUNTANTS
    ),
    _option(
        "central_dp",
        "--central-dp/--no-central-dp",
        help="Client-level DP-FedAvg noise at the server.",
    ),
    _option(
        "distributed_dp",
        "--distributed-dp/--no-distributed-dp",
        help="Client-level DP with the noise added by the sites (distributed Skellam "
        "mechanism) before secure aggregation's masking: the coordinator never sees an "
        "un-noised sum and adds no noise. Needs --secagg and 16 to 32 --secagg-bits; turns "
        "client-level DP on by itself. --central-dp alone keeps the server's Gaussian noise "
        "(after unmasking with --secagg; the only choice with --no-secagg).",
    ),
    _option(
        "noise_multiplier", "--noise-multiplier", help="DP-FedAvg noise multiplier z (std z*C)."
    ),
    _option("delta", "--delta", help="Client-level delta."),
    _option(
        "client_epsilon",
        "--client-epsilon",
        help="Target client-level epsilon over --rounds (with --central-dp): sets the noise "
        "multiplier z that meets it at --delta, overriding --noise-multiplier; 0 = use "
        "--noise-multiplier.",
    ),
    _option(
        "clip_norm",
        "--clip-norm",
        help="L2 bound C on each site's update (with secure aggregation or central DP).",
    ),
    _option("secagg", "--secagg/--no-secagg", help="Secure aggregation (SecAgg+)."),
    _option(
        "secagg_threshold",
        "--secagg-threshold",
        help="SecAgg+ threshold: fraction of neighbours in (0.5, 1], or a count > 1.",
    ),
    _option(
        "secagg_bits",
        "--secagg-bits",
        help="Ring bits per coordinate of secure aggregation (8 to 53; 16 to 32 with "
        "--distributed-dp, where 20 is plenty: the wrap-around bound is checked).",
    ),
    _option("secagg_setup_rounds", "--secagg-setup-rounds", help=_SECAGG_SETUP_ROUNDS_HELP, min=1),
)

# Virtual sites split one embedded dataset; sites in a deployment bring their own files.
SIMULATED_DATA_OPTIONS: tuple[RunOption, ...] = (
    _option(
        "partition",
        "--partition",
        help="How the data is split across sites.",
        choices=PARTITIONS,
    ),
    _option("alpha", "--alpha", help="Dirichlet concentration (dirichlet partition)."),
    _option(
        "synthetic_rows",
        "--synthetic-rows",
        help="Rows of the generated dataset (--dataset synthetic); the default gives "
        "1,000 sites 100+ training records each.",
        min=1,
    ),
)
SITE_FILE_OPTIONS: tuple[RunOption, ...] = (
    _option(
        "num_features",
        "--num-features",
        help="Features per example, for --dataset custom (the sites' own files).",
    ),
    _option("num_classes", "--num-classes", help="Classes, for --dataset custom."),
)

SIMULATION_OPTIONS: tuple[RunOption, ...] = (
    *(o.narrowed(BUILTIN_DATASETS) if o.field == "dataset" else o for o in SHARED_OPTIONS),
    *SIMULATED_DATA_OPTIONS,
)
COORDINATOR_OPTIONS: tuple[RunOption, ...] = (*SHARED_OPTIONS, *SITE_FILE_OPTIONS)


@one_line_errors
def build_run_config(values: Mapping[str, Any]) -> RunConfig:
    """The ``RunConfig`` of parsed option values; a bad value is one line and exit 2.

    Parameters
    ----------
    values
        Field name to value, as :func:`with_run_options` collects them.

    Returns
    -------
    RunConfig
        The validated configuration (fields not in ``values`` keep their default),
        its noise multiplier calibrated to ``client_epsilon`` when one is set
        (:func:`server.privacy.calibrate_client_noise`).

    Raises
    ------
    typer.Exit
        With code 2 after printing ``error: <field problem>`` when a value is
        invalid or the epsilon target cannot be met.
    """
    from server.privacy import calibrate_client_noise

    cfg = RunConfig(**values)
    if cfg.distributed_dp:  # the Skellam accountant, at the model's size
        from common.dp.distributed import calibrate_run_noise
        from common.task import task_for

        return calibrate_run_noise(cfg, task_for(cfg).parameter_count())
    return calibrate_client_noise(cfg)


def with_run_options(
    options: Sequence[RunOption],
) -> Callable[[Callable[..., R]], Callable[..., R]]:
    """Decorator: mount ``options`` on a typer command and pass it their ``RunConfig``.

    The command declares a ``run_config: RunConfig`` parameter; in the command's
    signature, as typer reads it, that parameter is replaced by one option per
    entry of ``options`` (in ``RunConfig`` field order). When the command runs,
    the parsed values become one validated ``RunConfig`` (see
    :func:`build_run_config`), passed as ``run_config``. Options left out of a
    direct call keep their defaults.

    Parameters
    ----------
    options
        The run options to mount, at most one per field.

    Returns
    -------
    Callable
        A decorator for the command function.

    Raises
    ------
    TypeError
        At decoration time, when the command has no ``run_config`` parameter, a
        parameter named like a mounted field, or two options share a field or flag.
    """
    ordered = sorted(options, key=lambda o: _FIELD_ORDER[o.field])
    _check_distinct(ordered)

    def mount(command: Callable[..., R]) -> Callable[..., R]:
        signature = inspect.signature(command, eval_str=True)
        names = list(signature.parameters)
        if RUN_CONFIG_PARAMETER not in names:
            raise TypeError(f"{command.__name__} has no {RUN_CONFIG_PARAMETER!r} parameter")
        clash = {o.field for o in ordered} & set(names)
        if clash:
            raise TypeError(f"{command.__name__} already has parameters {sorted(clash)}")
        own = [
            p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in signature.parameters.values()
        ]
        at = names.index(RUN_CONFIG_PARAMETER)
        parameters = [*own[:at], *(o.parameter() for o in ordered), *own[at + 1 :]]

        @functools.wraps(command)
        def command_with_run_options(*args: Any, **kwargs: Any) -> R:
            values = {o.field: kwargs.pop(o.field, o.default) for o in ordered}
            kwargs[RUN_CONFIG_PARAMETER] = build_run_config(values)
            return command(*args, **kwargs)

        mounted = signature.replace(parameters=parameters)
        command_with_run_options.__signature__ = mounted  # type: ignore[attr-defined]
        annotations = {p.name: p.annotation for p in parameters if p.annotation is not p.empty}
        if mounted.return_annotation is not mounted.empty:
            annotations["return"] = mounted.return_annotation
        command_with_run_options.__annotations__ = annotations
        return command_with_run_options

    return mount


def _check_distinct(options: Sequence[RunOption]) -> None:
    seen_fields: set[str] = set()
    seen_flags: set[str] = set()
    for o in options:
        flags = {name for decl in o.flags for name in decl.split("/")}
        if o.field in seen_fields or flags & seen_flags:
            raise TypeError(f"two run options for {o.field!r} or its flags {sorted(flags)}")
        seen_fields.add(o.field)
        seen_flags |= flags
