"""One audited run: canaries planted, one real simulation, a bound from its final model.

What is audited
---------------
Record level: DP-SGD at a site (:mod:`client.privacy`), as fedseal runs it:
the run goes through the simulation engine (:func:`simulations.engine.run_simulation`:
Flower's Simulation Engine, the real ServerApp and ClientApp, secure
aggregation as configured), every site trains with its own Opacus DP-SGD and
cipher noise, and the canary site's ledger accounts what it spent. The
claimed epsilon is that ledger's lifetime total for the canary site's
dataset (:meth:`client.ledger.SiteLedger.spent`), at the run's ``site_delta``.

The audit only supplies the data. The run is a ``custom``-dataset run
(:mod:`~simulations.privacy_audit.canaries` says why): each site's rows are
its share of the digits training pool, padded with one neutral feature per
canary, and written to a file the site is given the way a deployed site is
(node config ``data-path``, with a declared ``dataset-id`` and the public
``feature-bounds``); :class:`AuditSitesApp` adds those keys to each
simulated site's node config, from outside the ClientApp. Site 0 is the
canary site: its file also holds the included canaries, each on a row its
own train/test split trains on (:func:`plant_canary_site`, checked by
loading the file as the site does).

After the run the final global model is read from the run's record, every
canary is scored (:func:`canary_scores`), the ``k+`` highest are guessed in
and the ``k-`` lowest out, and :func:`~simulations.privacy_audit.bound.epsilon_lower_bound`
turns the correct guesses into the empirical lower bound. What the bound
covers: the canary site's records, against whoever sees the final model.

Client level: DP-FedAvg (``central_dp``), the canaries whole sites
(:func:`write_client_level_files`). The run has ``D`` data sites and ``m``
canary sites, all planned (``N = D + m``, so the fixed denominator and the
sensitivity do not depend on the draw); canary site ``j`` holds the one
record of canary ``j`` when included, and otherwise holds no canary and
refuses every round through its own site policy (a site that takes no part
contributes nothing to the sum: add/remove of a site, the adjacency the
client-level accountant assumes). The claim is the run's client-level
epsilon (the last round's ``client_level_epsilon``); the bound covers a
site's whole contribution, against whoever sees the final model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from common.config import RunConfig
from common.data import Dataset, FeatureBounds, Standardizer, load_builtin, split_holdout_stratified
from common.errors import ConfigurationError, FedsealError
from common.partition import iid_partition
from common.rng import RandomSource, seeded_generator
from server.results import RoundObserver
from simulations.privacy_audit.bound import epsilon_lower_bound, p_value
from simulations.privacy_audit.canaries import (
    HIGH,
    LOW,
    CanaryDesign,
    count_correct,
    draw_inclusion,
    guess,
    pad_rows,
    plant_rows,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "LEVELS",
    "CANARY_PARTITION",
    "AuditResult",
    "AuditSitesApp",
    "audit_run_config",
    "canary_scores",
    "plant_canary_site",
    "run_audit",
]

BASE_DATASET = "digits"
CANARY_PARTITION = 0
DATA_DIR = "audit-data"
AUDIT_FILE = "audit.json"
REFERENCE = (
    "Steinke, Nasr & Jagielski, Privacy Auditing with One (1) Training Run, NeurIPS 2023 "
    "(arXiv:2305.08846): main theorem, (epsilon, delta) case, computed as in its Appendix D"
)
LEVELS = ("record", "client")
EXCLUDED_SITE_POLICY = """# fedseal privacy audit: an excluded canary site takes part in no round.
kind = "site"
schema = 1
name = "audit: excluded canary site (refuses every round)"

[privacy]
require_dp = true  # the client-level audit run trains without DP-SGD: every round is refused
"""
SCORE = (
    "black-box on the final global model: logit of the canary's label at the canary minus "
    "at the all-middle input, less the same for the initial model"
)


def dataset_id(partition: int) -> str:
    """The dataset id site ``partition`` of an audited run declares (its ledger's key)."""
    return f"audit-site{partition}"


def audit_run_config(
    canaries: int,
    *,
    level: str = "record",
    sites: int = 3,
    rounds: int = 3,
    site_epsilon: float = 1.0,
    site_delta: float = 1e-5,
    dp_local_epochs: int = 5,
    dp_learning_rate: float = 4.0,
    max_grad_norm: float = 1.0,
    accountant: str = "pld",
    secagg: bool = True,
    seed: int = 0,
) -> RunConfig:
    """The run an audit trains: digits rows with ``canaries`` canary features, a linear model.

    ``level="record"``: record-level DP-SGD at each of ``sites`` sites,
    full-batch Poisson DP-SGD (sampling rate 1, the default
    ``dp_batch_size = 0``), ``site_epsilon`` the target each site calibrates
    its noise to over the planned rounds, at ``site_delta``.

    ``level="client"``: DP-FedAvg at the server (``central_dp``, no
    record-level DP), ``sites`` data sites plus one site per canary, every
    site in every round (a fixed cohort: no amplification), the noise
    multiplier calibrated to ``site_epsilon`` as the client-level target at
    ``site_delta`` (:func:`server.privacy.calibrate_client_noise`).

    Everything else is :class:`~common.config.RunConfig`'s default.

    Raises
    ------
    ConfigurationError
        An unknown level, or values :class:`~common.config.RunConfig` refuses.
    """
    from server.privacy import calibrate_client_noise

    if level not in LEVELS:
        raise ConfigurationError(f"level must be one of {', '.join(LEVELS)}; got {level!r}")
    design = CanaryDesign(canaries, *_base_shape())
    common: dict[str, Any] = {
        "dataset": "custom",
        "num_features": design.num_features,
        "num_classes": design.num_classes,
        "model": "linear",
        "rounds": rounds,
        "accountant": accountant,
        "secagg": secagg,
        "seed": seed,
    }
    if level == "client":
        total = sites + canaries
        cfg = RunConfig(
            **common,
            num_sites=total,
            min_sites=min(2, total),
            central_dp=True,
            client_epsilon=site_epsilon,
            delta=site_delta,
        )
        return calibrate_client_noise(cfg)
    return RunConfig(
        **common,
        num_sites=sites,
        min_sites=min(2, sites),
        dp=True,
        site_epsilon=site_epsilon,
        site_delta=site_delta,
        dp_local_epochs=dp_local_epochs,
        dp_learning_rate=dp_learning_rate,
        max_grad_norm=max_grad_norm,
    )


def _base_shape() -> tuple[int, int]:
    from common.task import BUILTIN_SHAPES

    features, classes, _ = BUILTIN_SHAPES[BASE_DATASET]
    return features, classes


def level_of(cfg: RunConfig) -> str:
    """``"client"`` under DP-FedAvg (``central_dp``), ``"record"`` under site DP-SGD alone.

    Raises
    ------
    ConfigurationError
        Neither level of DP is on, or both are (one audit tests one guarantee).
    """
    if cfg.central_dp and cfg.dp:
        raise ConfigurationError("audit one level at a time: record (dp) or client (central_dp)")
    if cfg.central_dp:
        return "client"
    if not cfg.dp:
        raise ConfigurationError("an audit needs record-level (dp) or client-level (central_dp) DP")
    return "record"


def design_for(cfg: RunConfig) -> CanaryDesign:
    """The canary design an audit run's configuration implies.

    Raises
    ------
    ConfigurationError
        No DP to audit, a dataset other than the digits rows plus at least
        one canary feature, or (client level) no data site beside the
        canary sites.
    """
    level = level_of(cfg)
    base, classes = _base_shape()
    if cfg.dataset != "custom" or cfg.num_classes != classes or cfg.num_features <= base:
        raise ConfigurationError(
            "an audit run is a custom dataset of the digits rows and one feature per canary "
            "(audit_run_config)"
        )
    design = CanaryDesign(cfg.num_features - base, base, classes)
    if level == "client" and cfg.num_sites <= design.count:
        raise ConfigurationError("a client-level audit needs data sites beside its canary sites")
    return design


def _pool_and_holdout(cfg: RunConfig) -> tuple[Dataset, Dataset]:
    return split_holdout_stratified(load_builtin(BASE_DATASET), cfg.test_fraction, cfg.seed)


def _bounds() -> FeatureBounds:
    return FeatureBounds.uniform(float(LOW), float(HIGH))


def site_node_config(path: Path, partition: int) -> dict[str, str]:
    """What an audited site's node config adds: its file, its declared id, the public bounds."""
    return {
        "data-path": str(path),
        "dataset-id": dataset_id(partition),
        "feature-bounds": _bounds().text(),
    }


def _site_split(cfg: RunConfig, path: Path, partition: int) -> Any:
    """Site ``partition``'s data as its ClientApp loads it (:func:`client.site.load_site_data`)."""
    from client.site import load_site_data
    from common.task import task_for

    node = {"partition-id": partition, **site_node_config(path, partition)}
    return load_site_data(cfg, task_for(cfg), node)


def plant_canary_site(
    cfg: RunConfig,
    directory: Path,
    real_x: np.ndarray,
    real_y: np.ndarray,
    design: CanaryDesign,
    included: np.ndarray,
) -> Path:
    """Write the canary site's file: its real rows, and the included canaries on train rows.

    The site splits a file by position, with a split keyed by its dataset id
    and row count; the split of a file of this size is read by loading a
    probe file of the same size as the site would, the canaries are put on
    its train rows (:func:`~simulations.privacy_audit.canaries.plant_rows`),
    and the written file is loaded again to check that its training split
    holds every included canary and nothing else of the canaries.

    Raises
    ------
    ConfigurationError
        The split does not hold the canaries as planned.
    """
    inc = np.asarray(included, dtype=bool)
    canary_x, canary_y = design.rows()[inc], design.labels[inc]
    padded = pad_rows(real_x, design)
    n = len(padded) + len(canary_x)
    probe = directory / f"probe-site-{CANARY_PARTITION}.npz"
    np.savez(probe, x=np.full((n, design.num_features), LOW, np.uint8), y=np.zeros(n, np.int64))
    train_positions = _site_split(cfg, probe, CANARY_PARTITION).train.index
    probe.unlink()
    x, y = plant_rows(padded, real_y, canary_x, canary_y, train_positions)
    path = directory / f"site-{CANARY_PARTITION}.npz"
    np.savez(path, x=x, y=y)
    loaded = _site_split(cfg, path, CANARY_PARTITION)
    canary_cols = slice(design.base_features, design.num_features)
    in_train = (loaded.train.data.x[loaded.train.index][:, canary_cols] == HIGH).any(axis=1)
    in_test = (loaded.test.data.x[loaded.test.index][:, canary_cols] == HIGH).any(axis=1)
    if int(in_train.sum()) != len(canary_x) or in_test.any():
        raise ConfigurationError("the canary site's split does not train on every included canary")
    return path


def _data_shares(cfg: RunConfig, sites: int) -> list[Dataset]:
    """The digits training pool cut iid into ``sites`` shares (seeded by the run's seed)."""
    pool, _ = _pool_and_holdout(cfg)
    parts = iid_partition(len(pool), sites, seeded_generator(cfg.seed))
    return [pool.subset(part) for part in parts]


def write_site_files(
    cfg: RunConfig, directory: Path, design: CanaryDesign, included: np.ndarray
) -> dict[int, Path]:
    """Every site's file: its iid share of the digits training pool, padded; site 0 with canaries."""
    directory.mkdir(parents=True, exist_ok=True)
    files: dict[int, Path] = {}
    for i, share in enumerate(_data_shares(cfg, cfg.num_sites)):
        if i == CANARY_PARTITION:
            files[i] = plant_canary_site(cfg, directory, share.x, share.y, design, included)
        else:
            files[i] = directory / f"site-{i}.npz"
            np.savez(files[i], x=pad_rows(share.x, design), y=share.y)
    return files


def write_client_level_files(
    cfg: RunConfig, directory: Path, design: CanaryDesign, included: np.ndarray
) -> dict[int, dict[str, str]]:
    """The client-level audit's sites: their node configs, with files and (excluded) a policy.

    Sites ``0 .. D-1`` hold iid shares of the digits pool (padded); site
    ``D + j`` is canary site ``j``: its file is canary ``j``'s one record
    when it is included; when it is not, its file holds only the neutral
    row (no canary anywhere) and its node config names a site policy that
    refuses every round (:data:`EXCLUDED_SITE_POLICY`), so it contributes
    nothing while the planned ``N`` stays ``D + m``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    data_sites = cfg.num_sites - design.count
    configs: dict[int, dict[str, str]] = {}
    for i, share in enumerate(_data_shares(cfg, data_sites)):
        path = directory / f"site-{i}.npz"
        np.savez(path, x=pad_rows(share.x, design), y=share.y)
        configs[i] = site_node_config(path, i)
    refusing = directory / "excluded-canary-site.toml"
    refusing.write_text(EXCLUDED_SITE_POLICY, encoding="utf-8")
    rows, labels = design.rows(), design.labels
    for j, inc in enumerate(np.asarray(included, dtype=bool)):
        i = data_sites + j
        path = directory / f"site-{i}.npz"
        if inc:
            np.savez(path, x=rows[j : j + 1], y=labels[j : j + 1])
            configs[i] = site_node_config(path, i)
        else:
            np.savez(path, x=design.neutral_row(), y=np.zeros(1, np.int64))
            configs[i] = {**site_node_config(path, i), "policy-path": str(refusing)}
    return configs


class AuditSitesApp(ClientApp):
    """The sites' ClientApp, each simulated site given its audit data file through its node config.

    A deployed site names its file in its node config; a simulated site's
    node config holds only its partition. This wrapper adds, for the site
    of each partition, the keys of :func:`site_node_config` and then runs
    the ClientApp unchanged: the site loads, splits, scales and trains on
    the file as any deployed site would.
    """

    def __init__(self, inner: ClientApp, node_configs: Mapping[int, Mapping[str, str]]) -> None:
        super().__init__()
        self.inner = inner
        self.node_configs = {int(k): dict(v) for k, v in node_configs.items()}

    def __call__(self, message: Message, context: Context) -> Message:
        partition = int(context.node_config["partition-id"])
        extra = self.node_configs.get(partition)
        if extra is None:
            raise ConfigurationError(f"the audit has no data file for partition {partition}")
        context.node_config = {**context.node_config, **extra}
        return self.inner(message, context)


def _model(cfg: RunConfig, vector: np.ndarray | None = None) -> torch.nn.Module:
    from common.records import ModelSpec, vector_to_state_dict
    from common.task import task_for

    model = task_for(cfg).build(seed=cfg.seed)
    if vector is not None:
        model.load_state_dict(vector_to_state_dict(vector, ModelSpec.of(model.state_dict())))
    return model.eval()


def _final_vector(out_dir: Path, run_id: str) -> np.ndarray:
    from server.record import SqlRecord

    with SqlRecord(f"sqlite:///{(out_dir / 'record.db').resolve()}", create=False) as record:
        version = record.latest_version(run_id)
        if version is None:
            raise FedsealError("the audited run produced no model version to score")
        return np.frombuffer(record.load_version_bytes(version.version), np.float32).copy()


def canary_scores(
    final: torch.nn.Module, initial: torch.nn.Module, design: CanaryDesign
) -> np.ndarray:
    """Each canary's score: how much the run raised its label's logit at it (black-box).

    ``[f(c)_y - f(0)_y]_final - [f(c)_y - f(0)_y]_initial`` with ``c`` the
    canary's (scaled) input, ``0`` the all-middle input and ``y`` its label;
    for a linear model, the change of the canary label's weight on its own
    feature. Evaluated on the CPU.
    """
    import torch

    scaler = Standardizer.from_bounds(_bounds(), design.num_features)
    inputs = scaler.transform(np.concatenate([design.rows(), design.neutral_row()]))
    labels = torch.from_numpy(design.labels)
    rows = torch.arange(design.count)

    def lift(model: torch.nn.Module) -> np.ndarray:
        with torch.no_grad():
            logits = model.to("cpu")(torch.from_numpy(inputs))
        at_canary = logits[rows, labels]
        at_neutral = logits[-1, labels]
        lifted: np.ndarray = (at_canary - at_neutral).double().numpy()
        return lifted

    scores: np.ndarray = lift(final) - lift(initial)
    return scores


def held_out_accuracy(cfg: RunConfig, model: torch.nn.Module, design: CanaryDesign) -> float:
    """The model's accuracy on the digits rows no site holds (padded), to show it learned."""
    import torch

    _, holdout = _pool_and_holdout(cfg)
    scaler = Standardizer.from_bounds(_bounds(), design.num_features)
    x = torch.from_numpy(scaler.transform(pad_rows(holdout.x, design)))
    with torch.no_grad():
        predicted = model.to("cpu")(x).argmax(1).numpy()
    return float(np.mean(predicted == holdout.y))


@dataclass(frozen=True, slots=True)
class AuditResult:
    """An audit's outcome: the claimed epsilon, the empirical lower bound, and how it was found."""

    level: str
    claimed_epsilon: float
    delta: float
    accountant: str
    epsilon_lower_bound: float
    confidence: float
    p_value_at_claimed: float
    canaries: int
    included: int
    guesses_in: int
    guesses_out: int
    correct_in: int
    correct_out: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    held_out_accuracy: float
    run_id: str
    run_directory: str
    canary_site: str
    dataset_id: str

    @property
    def guesses(self) -> int:
        return self.guesses_in + self.guesses_out

    @property
    def correct(self) -> int:
        return self.correct_in + self.correct_out

    @property
    def consistent(self) -> bool:
        """Whether the bound stays at or below the claim (the audit found no violation)."""
        return self.epsilon_lower_bound <= self.claimed_epsilon

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc.update(
            guesses=self.guesses,
            correct=self.correct,
            consistent=self.consistent,
            score=SCORE,
            reference=REFERENCE,
        )
        return doc


def run_audit(
    cfg: RunConfig,
    *,
    out_dir: Path,
    inclusion_rng: RandomSource,
    guesses_in: int,
    guesses_out: int,
    confidence: float = 0.95,
    observer: RoundObserver | None = None,
    cpus_per_site: float = 1.0,
    verbose: bool = False,
    wrap_client_app: Callable[[ClientApp], ClientApp] | None = None,
) -> AuditResult:
    """Plant the canaries, run ``cfg`` once through the simulation engine, bound its epsilon.

    Parameters
    ----------
    cfg : RunConfig
        An audit run (:func:`audit_run_config`).
    out_dir : Path
        A fresh (missing or empty) run directory: its sites' ledgers then
        hold no history, and the claim is this run's alone.
    inclusion_rng : RandomSource
        Where the canaries' fair coins come from (the command: the OS-keyed
        ChaCha20 stream).
    guesses_in, guesses_out : int
        ``k+`` and ``k-``, fixed before the run.
    confidence : float
        Of the lower bound, in (0, 1).
    wrap_client_app : callable, optional
        Wraps the audit's ClientApp from outside (tests only; no command sets it).

    Raises
    ------
    ConfigurationError
        Not an audit configuration, guesses that do not fit, or a run
        directory that is not empty.
    FedsealError
        The run failed or produced no model.
    """
    from simulations.engine import run_simulation

    design = design_for(cfg)
    level = level_of(cfg)
    delta = cfg.site_delta if level == "record" else cfg.delta
    guess(np.zeros(design.count), guesses_in, guesses_out)  # the counts fit, before any work
    epsilon_lower_bound(design.count, 0, 0, delta, confidence)  # confidence checked
    if out_dir.exists() and any(out_dir.iterdir()):
        # An earlier run's ledgers would add their spending to the claim, its record its model.
        raise ConfigurationError(f"{out_dir} is not empty: an audit needs a fresh run directory")
    included = draw_inclusion(design.count, inclusion_rng)
    if level == "record":
        files = write_site_files(cfg, out_dir / DATA_DIR, design, included)
        node_configs = {i: site_node_config(path, i) for i, path in files.items()}
    else:
        node_configs = write_client_level_files(cfg, out_dir / DATA_DIR, design, included)

    def wrap(app: ClientApp) -> ClientApp:
        audited: ClientApp = AuditSitesApp(app, node_configs)
        return wrap_client_app(audited) if wrap_client_app is not None else audited

    run_id, results = run_simulation(
        cfg,
        out_dir=out_dir,
        observer=observer,
        cpus_per_site=cpus_per_site,
        verbose=verbose,
        wrap_client_app=wrap,
    )
    failed = [r.round for r in results if r.failed]
    if failed or len(results) != cfg.rounds:
        raise FedsealError(f"the audited run did not complete every round (failed: {failed})")
    final = _model(cfg, _final_vector(out_dir, run_id))
    scores = canary_scores(final, _model(cfg), design)
    correct_in, correct_out = count_correct(guess(scores, guesses_in, guesses_out), included)
    r, v = guesses_in + guesses_out, correct_in + correct_out
    claim = (
        _record_level_claim(cfg, out_dir, run_id)
        if level == "record"
        else _client_level_claim(cfg, design, results[-1].client_level_epsilon)
    )
    return AuditResult(
        level=level,
        claimed_epsilon=claim.epsilon,
        delta=delta,
        accountant=cfg.accountant,
        epsilon_lower_bound=epsilon_lower_bound(design.count, r, v, delta, confidence),
        confidence=confidence,
        p_value_at_claimed=p_value(design.count, r, v, claim.epsilon, delta),
        canaries=design.count,
        included=int(included.sum()),
        guesses_in=guesses_in,
        guesses_out=guesses_out,
        correct_in=correct_in,
        correct_out=correct_out,
        noise_multiplier=claim.noise_multiplier,
        sample_rate=claim.sample_rate,
        steps=claim.steps,
        held_out_accuracy=held_out_accuracy(cfg, final, design),
        run_id=run_id,
        run_directory=str(out_dir),
        canary_site=claim.canary_site,
        dataset_id=claim.dataset_id,
    )


@dataclass(frozen=True, slots=True)
class _Claim:
    """What the audited run says it spent, and where that figure comes from."""

    epsilon: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    canary_site: str
    dataset_id: str


def _record_level_claim(cfg: RunConfig, out_dir: Path, run_id: str) -> _Claim:
    """The canary site's ledger: its lifetime epsilon for its dataset, and this run's DP-SGD."""
    from client.ledger import SiteLedger
    from client.state import LEDGER_FILE

    site = f"site-{CANARY_PARTITION}"
    did = dataset_id(CANARY_PARTITION)
    with SiteLedger(out_dir / "sites" / site / LEDGER_FILE) as ledger:
        claimed = ledger.spent(did, cfg.site_delta, cfg.accountant)
        rows = [e for e in ledger.history(did) if e.run_id == run_id]
    if not rows or not math.isfinite(claimed):
        raise FedsealError("the canary site's ledger records no DP-SGD for the audited run")
    steps = sum(e.steps for e in rows)
    return _Claim(claimed, rows[0].noise_multiplier, rows[0].sample_rate, steps, site, did)


def _client_level_claim(cfg: RunConfig, design: CanaryDesign, epsilon: float | None) -> _Claim:
    """The run's client-level epsilon after its last round, and the DP-FedAvg plan."""
    if epsilon is None or not math.isfinite(epsilon):
        raise FedsealError("the audited run released no client-level epsilon")
    first = cfg.num_sites - design.count
    sites = f"sites {first}..{cfg.num_sites - 1}"
    return _Claim(epsilon, cfg.noise_multiplier, cfg.client_sample_rate, cfg.rounds, sites, "-")
