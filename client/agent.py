"""The site agent's work in one round: what it knows about the round, and its training.

Order of operations on the site (DESIGN.md): decide whether to take part
(:mod:`client.steps`) -> train (Opacus DP-SGD when record-level DP is on)
-> update = new - global -> clip the update's L2 norm to C (when central DP
or secure aggregation is on, :mod:`client.mods.clipping`) -> [secure
aggregation masks it, :mod:`client.mods.secagg`].

:func:`compute_update` is the default :class:`Trainer`; the ClientApp takes
another one (``make_client_app(trainer=...)``), e.g. a test's fake.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Context, Message

from client.identity import load_site_identity
from client.instructions import InstructionCheck, InstructionRefused, check_instruction
from client.site import SiteData, load_site_data
from client.site_policy import SiteSetup, site_policy
from client.site_roster import site_roster
from client.state import LEDGER_FILE, WITNESS_FILE, site_dir
from client.witness import HeadRefused, witness_head
from common.audit.seal import SignedHead
from common.config import RunConfig
from common.dp.events import PrivacyEvent
from common.energy import EnergyConfig, make_meter
from common.errors import (
    ConfigurationError,
    FedsealError,
    IntegrityError,
    PrivacyBudgetExceeded,
)
from common.records import (
    KEY_APP_HASH,
    KEY_AUDIT_HEAD,
    KEY_COHORT_SIZE,
    KEY_CONFIG,
    KEY_RUN_ID,
    ModelSpec,
    record_to_config,
    record_to_vector,
    state_dict_to_vector,
    vector_to_state_dict,
)
from common.roster import Roster
from common.task import TaskSpec, task_for
from policies import SitePolicy

if TYPE_CHECKING:
    # torch, Opacus and SQLAlchemy load only where a site trains (or plans DP-SGD): every
    # message is a fresh process in the Deployment Engine, and the stages that only do
    # crypto must not pay for them.
    import torch

    from client.ledger import SiteLedger, Spend
    from client.privacy import SiteDpPlan
    from client.training import TrainStats

ECHO_UPDATE_VALUE = 1e-3


@dataclass(frozen=True, slots=True)
class LocalUpdate:
    """What a site's training produced for one round (before clipping and masking).

    The metrics are everything the site knows about its training; what of
    them leaves the site is :mod:`client.disclosure`'s decision (under DP:
    only the record-level plan, epsilon and delta).
    """

    update: np.ndarray
    num_examples: int
    metrics: dict[str, float | int] = field(default_factory=dict)


@dataclass(slots=True)
class SiteContext:
    """Everything the agent needs about the site running this ClientApp."""

    cfg: RunConfig
    server_round: int
    task: TaskSpec
    context: Context
    directory: Path
    run_id: str
    setup: SiteSetup
    head: SignedHead | None
    cohort_size: object = None  # plain rounds: how many sites the server invited
    app_hash: str | None = None  # the coordinator's code hash, as its audit log records it
    instruction: InstructionCheck | None = None  # the signature check (client.instructions)

    @classmethod
    def of(cls, msg: Message, context: Context, setup: SiteSetup | Path | None) -> SiteContext:
        """Verify an instruction, then parse it; keep the server's signed audit head it carries.

        The signature check (:func:`client.instructions.check_instruction`)
        comes before anything reads the instruction; the head is checked
        before it is stored (:func:`client.witness.witness_head`).

        Raises
        ------
        InstructionRefused
            The instruction fails the signature check under the site's pinned
            key, or its audit head fails the witness checks.
        """
        if not isinstance(setup, SiteSetup):
            setup = SiteSetup(root=setup)
        check = check_instruction(msg, context, setup)
        cfg, server_round, extra = record_to_config(msg.content[KEY_CONFIG])
        directory = site_dir(context.node_config, context.node_id, setup.root)
        run_id = extra.get(KEY_RUN_ID)
        if not isinstance(run_id, str) or not run_id:
            raise ConfigurationError("instruction lacks the run id")
        head = None
        if KEY_AUDIT_HEAD in extra:
            try:
                head = witness_head(
                    directory / WITNESS_FILE,
                    extra[KEY_AUDIT_HEAD],
                    run_id=run_id,
                    trusted_key=check.trusted_key,
                )
            except HeadRefused as exc:
                raise InstructionRefused(f"audit head not witnessed: {exc}", rule=None) from None
        site = cls(cfg, server_round, task_for(cfg), context, directory, run_id, setup, head)
        site.cohort_size = extra.get(KEY_COHORT_SIZE)
        app_hash = extra.get(KEY_APP_HASH)
        site.app_hash = app_hash if isinstance(app_hash, str) else None
        site.instruction = check
        return site

    def data(self) -> SiteData:
        """This site's data; a data file is parsed once into its state directory's cache.

        Scaled as :mod:`client.site` says, with the site policy's
        ``privacy.allow_private_scaling`` consent where it has one.
        """
        policy = self.policy()
        return load_site_data(
            self.cfg,
            self.task,
            self.context.node_config,
            self.directory,
            allow_private_scaling=policy is not None and policy.privacy.allow_private_scaling,
        )

    def policy(self) -> SitePolicy | None:
        """This site's policy, or None when it has none."""
        return site_policy(self.context.node_config, self.setup.policies)

    def identity(self) -> Ed25519PrivateKey:
        """This site's Ed25519 identity key, from its private state directory (:mod:`client.identity`).

        Raises
        ------
        ConfigurationError
            The site has none (``fedseal-client identity init``) or the key
            file is refused (not private, wrong size).
        """
        return load_site_identity(self.directory)

    def roster(self) -> Roster:
        """The federation roster in force at this site, verified under the site's own pin.

        Deployed sites: the copy ``fedseal-client start --roster`` installed
        (its digest pinned in the node config); simulated sites: the
        :class:`~client.site_policy.SiteSetup`'s. Verified under the policy's
        ``trust.roster_authority``/``trust.roster_digest`` (simulations: the
        setup's authority when the policy pins none), and never older than
        the newest this site accepted (:mod:`client.site_roster`).

        Raises
        ------
        ConfigurationError
            With a one-line reason: no roster in force, nothing pins it, it
            is unreadable, or it fails verification (signature, digest, version).
        """
        try:
            return site_roster(self.context.node_config, self.setup, self.policy(), self.directory)
        except IntegrityError as exc:
            raise ConfigurationError(f"the site's roster is refused: {exc}") from None


class Trainer(Protocol):
    """A site's training for one round: the global model in, its update out.

    Parameters
    ----------
    site : SiteContext
        The round's instruction as this site reads it.
    arrays : object
        The received global model record (validated by the trainer).

    Returns
    -------
    LocalUpdate
        The update (new - global, unclipped), example count and metrics.

    Raises
    ------
    PrivacyBudgetExceeded
        If the site's ledger refuses the round's privacy cost; the ClientApp
        answers with a refusal.
    """

    def __call__(self, site: SiteContext, arrays: object) -> LocalUpdate: ...


def load_global(site: SiteContext, arrays: object) -> tuple[torch.nn.Module, ModelSpec, np.ndarray]:
    """Build the run's model and load the received global weights (validated)."""
    model = site.task.build(seed=site.cfg.seed)
    spec = ModelSpec.of(model.state_dict())
    global_vec = record_to_vector(arrays, spec.size, what="global model")
    model.load_state_dict(vector_to_state_dict(global_vec, spec))
    return model, spec, global_vec


UNDECLARED_DATASET_ID = (
    "the site declares no dataset id, so its lifetime privacy budget would restart with every "
    "edit of its file: declare one (`fedseal-client start --dataset-id NAME`, node config "
    "'dataset-id') to train under DP"
)
DELTA_NOT_BELOW_ONE_OVER_N = (
    "the site's delta is not below 1/n for its training split (a delta that large permits "
    "releasing a record outright); lower privacy.delta in the site policy"
)


class RoundRefused(FedsealError):
    """The site declines a round for a reason of its own, before its data is trained on.

    The message is the reason the coordinator receives: it names the rule,
    never a data-dependent value (the dataset size among them).
    """

    def __init__(self, reason: str, rule: str | None = None) -> None:
        super().__init__(reason)
        self.rule = rule


@dataclass(frozen=True, slots=True)
class RoundPlan:
    """A DP round's mechanism as the site plans it, with the budget it answers to.

    ``budget`` and ``delta`` are the site's own (its policy, else the run's
    ``site_epsilon``/``site_delta``); ``plan`` is calibrated against the
    dataset's ledger history before this run (:func:`round_plan`). The
    participation decision's dry run (:meth:`would_spend`) and the
    training's reservation (:meth:`reserve`) charge exactly this.
    """

    dataset_id: str
    run_id: str
    server_round: int
    plan: SiteDpPlan
    budget: float
    delta: float

    def would_spend(self, ledger: SiteLedger) -> Spend:
        """The ledger's dry run of this round (:meth:`~client.ledger.SiteLedger.would_spend`)."""
        return ledger.would_spend(*self._charge())

    def reserve(self, ledger: SiteLedger) -> int:
        """Reserve this round in the ledger (:meth:`~client.ledger.SiteLedger.reserve`)."""
        return ledger.reserve(*self._charge())

    def _charge(self) -> tuple[str, str, int, PrivacyEvent, float, str, float]:
        plan = self.plan
        return (
            self.dataset_id,
            self.run_id,
            self.server_round,
            plan.round_event(),
            self.delta,
            plan.accountant,
            self.budget,
        )


def dp_batch_size(cfg: RunConfig, dataset_size: int) -> int:
    """DP-SGD's expected batch size (:func:`client.privacy.dp_expected_batch_size`)."""
    from client.privacy import dp_expected_batch_size

    return dp_expected_batch_size(cfg.dp_batch_size, dataset_size)


def round_plan(site: SiteContext, data: SiteData, ledger: SiteLedger) -> RoundPlan:
    """This round's DP-SGD plan, from the site's own budget, delta, noisy size and history.

    The one place a DP round's mechanism is worked out: the participation
    decision's dry run and the training's reservation both use it, so both
    see the same event. Checks, in order, each refusing before the data is
    trained on:

    1. the dataset id is declared (:func:`client.site.declares_dataset_id`):
       a content-hash id would hand an edited file a fresh budget;
    2. the dataset's noisy size ``n~`` is released, once per dataset
       (:meth:`~client.ledger.SiteLedger.public_size`, charged to the
       ledger; refused if the budget cannot pay for it);
    3. ``delta < 1/n~`` (the refusal, like the plan, is a function of the
       released ``n~`` only, never of ``n``);
    4. the dataset's history before this run leaves room in the budget.

    The plan (sampling rate, steps, normaliser) is made from ``n~``
    (:mod:`client.privacy`, "Adjacency"), so nothing it puts in a reply
    depends on ``n`` except through the charged release.

    The noise multiplier is the larger of two calibrations (Opacus' search,
    :func:`client.privacy.plan_site_dp`): the run's own target
    (``cfg.site_epsilon`` over ``cfg.rounds`` rounds, from zero) and the
    site's lifetime budget given the dataset's history in other runs (what
    is left, not the full budget from zero). This run's own rows are left
    out of the history, so every round of the run gets the same plan.

    Parameters
    ----------
    site : SiteContext
        The round's instruction.
    data : SiteData
        The site's data (its size and dataset id).
    ledger : SiteLedger
        The site's privacy ledger (the dataset's history and noisy size).

    Raises
    ------
    RoundRefused
        Undeclared dataset id, or delta not below 1/n.
    PrivacyBudgetExceeded
        The history leaves no room for another run in the budget.
    """
    from client.privacy import noisy_size
    from common.dp.accounting import epsilon_for

    if not data.declared_id:
        raise RoundRefused(UNDECLARED_DATASET_ID)
    budget, delta = site_budget(site, data.dataset_id)
    cfg = site.cfg
    true_size, noise_std = len(data.y_train), size_noise_std(site)
    released = ledger.public_size(
        data.dataset_id,
        noise_std=noise_std,
        draw=lambda: noisy_size(true_size, noise_std),
        delta=delta,
        accountant=cfg.accountant,
        budget=budget,
    )
    n = released.noisy_size
    if not delta < 1.0 / n:
        raise RoundRefused(DELTA_NOT_BELOW_ONE_OVER_N, rule="privacy.delta")
    history = ledger.history(data.dataset_id)
    prior = tuple(e.event for e in history if e.run_id != site.run_id)
    try:
        plan = _cached_plan(
            cfg.site_epsilon,
            budget,
            delta,
            n,
            dp_batch_size(cfg, n),
            cfg.dp_local_epochs,
            cfg.rounds,
            cfg.accountant,
            cfg.site_noise_multiplier or None,
            prior,
        )
    except ConfigurationError:
        spent = epsilon_for(prior, delta, cfg.accountant)
        if spent < budget:
            raise
        raise PrivacyBudgetExceeded(spent, budget) from None
    return RoundPlan(data.dataset_id, site.run_id, site.server_round, plan, budget, delta)


@functools.lru_cache(maxsize=32)
def _cached_plan(
    run_epsilon: float,
    budget: float,
    delta: float,
    size: int,
    batch: int,
    epochs: int,
    rounds: int,
    accountant: str,
    z: float | None,
    prior: tuple[PrivacyEvent, ...],
) -> SiteDpPlan:
    """Calibration is a search over accountant evaluations (seconds with PRV): once per process.

    With no history the two targets collapse into one calibration, at the
    smaller of the run's target and the budget.
    """
    from client.privacy import plan_site_dp

    if not prior:
        return plan_site_dp(
            min(run_epsilon, budget), delta, size, batch, epochs, rounds, accountant, z
        )
    life = plan_site_dp(
        budget, delta, size, batch, epochs, rounds, accountant, z, prior_events=prior
    )
    run = plan_site_dp(run_epsilon, delta, size, batch, epochs, rounds, accountant, z)
    if run.noise_multiplier <= life.noise_multiplier:
        return life
    return plan_site_dp(
        budget,
        delta,
        size,
        batch,
        epochs,
        rounds,
        accountant,
        run.noise_multiplier,
        prior_events=prior,
    )


SIZE_NOISE_KEY = "dp-size-noise"


def size_noise_std(site: SiteContext) -> float:
    """Std of the noise on the site's released dataset size: its node config, else the default.

    The site's own setting (node config ``dp-size-noise``), never the
    coordinator's: the release is charged to the site's budget either way,
    but a coordinator could otherwise ask for a noise that spends it.

    Raises
    ------
    ConfigurationError
        The value is not a finite number > 0.
    """
    import math

    from client.privacy import PUBLIC_SIZE_NOISE_STD

    raw = site.context.node_config.get(SIZE_NOISE_KEY, PUBLIC_SIZE_NOISE_STD)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ConfigurationError(
            f"node config '{SIZE_NOISE_KEY}' must be a number > 0, got {raw!r}"
        )
    return value


def site_budget(site: SiteContext, dataset_id: str) -> tuple[float, float]:
    """The site's lifetime record-level (epsilon budget, delta) for this dataset.

    From the site's policy when it has one (the site's word, whatever the
    server asks); otherwise the run's ``site_epsilon``/``site_delta``.
    """
    policy = site.policy()
    if policy is not None:
        return policy.privacy.budget_for(dataset_id)
    return site.cfg.site_epsilon, site.cfg.site_delta


def compute_update(site: SiteContext, arrays: object) -> LocalUpdate:
    """Train locally from the global model in ``arrays``; return the update.

    With record-level DP on, the round's mechanism is reserved in the site's
    ledger *before* the data is touched (PrivacyBudgetExceeded if it would
    exceed the budget) and confirmed once the update exists; a crash in
    between leaves it reserved, which counts as spent.
    """
    from client.training import select_device

    cfg = site.cfg
    model, spec, global_vec = load_global(site, arrays)
    if cfg.workload == "echo":
        return LocalUpdate(
            np.full(spec.size, ECHO_UPDATE_VALUE, dtype=np.float32), 1, {"train-seconds": 0.0}
        )
    data = site.data()
    device = select_device(cfg.device)
    meter = make_meter(energy_config(site, device))
    meter.start()
    try:
        local = _train(site, data, model, spec, global_vec, device)
    finally:
        reading = meter.stop()
        close = getattr(meter, "close", None)
        if callable(close):
            close()
    local.metrics.update(
        {
            "energy-kwh": reading.kwh,
            "co2eq-g": reading.co2eq_g,
            "energy-estimated": int(reading.estimated),
        }
    )
    return local


def energy_config(site: SiteContext, device: torch.device) -> EnergyConfig:
    """The site's energy settings: grid intensity and PUE from its node config, else defaults.

    Node-config keys: ``grid-intensity-g-per-kwh`` and ``pue`` (no network
    look-ups: a site with no internet states its own figures).
    """
    node = site.context.node_config
    fields: dict[str, Any] = {"gpu_count": 0 if device.type == "cpu" else None}
    for key, name in (("grid-intensity-g-per-kwh", "grid_intensity_g_per_kwh"), ("pue", "pue")):
        if key in node:
            fields[name] = float(node[key])
    return EnergyConfig(**fields)


def _train(
    site: SiteContext,
    data: SiteData,
    model: torch.nn.Module,
    spec: ModelSpec,
    global_vec: np.ndarray,
    device: torch.device,
) -> LocalUpdate:
    import torch

    from client.ledger import SiteLedger
    from client.privacy import make_private, validate_model
    from client.training import make_loader, train_local

    cfg = site.cfg
    if not cfg.dp:
        model.to(device)
        loader = make_loader(
            data.train,
            cfg.batch_size,
            shuffle=True,
            seed=cfg.seed * 100_003 + site.server_round,
        )
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.learning_rate, momentum=0.9)
        stats = train_local(
            model, loader, epochs=cfg.local_epochs, optimizer=optimizer, device=device
        )
        update = state_dict_to_vector(model.state_dict()) - global_vec
        return LocalUpdate(update, len(data.y_train), _train_metrics(stats))

    ledger = SiteLedger(site.directory / LEDGER_FILE)
    try:
        planned = round_plan(site, data, ledger)
        plan = planned.plan
        entry = planned.reserve(ledger)
        base = validate_model(model).to(device)
        if ModelSpec.of(base.state_dict()) != spec:
            raise ConfigurationError(
                "Opacus' model fixes changed the parameter layout; use a zoo model"
            )
        # Plain SGD: momentum (or Adam) carries each step's noise into the next ones.
        optimizer = torch.optim.SGD(base.parameters(), lr=cfg.dp_learning_rate)
        batch = dp_batch_size(cfg, plan.public_size)
        loader = make_loader(data.train, batch, shuffle=False, seed=None)
        # No noise_generator: the step noise comes from a fresh ChaCha20 stream (common.rng).
        # The sampling rate and normaliser are the plan's (from the released size, not n).
        private_model, private_opt, private_loader, handle = make_private(
            base,
            optimizer,
            loader,
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=cfg.max_grad_norm,
            poisson_sampling=True,
            sample_rate=plan.sample_rate,
            expected_batch_size=plan.expected_batch,
        )
        stats = train_local(
            private_model,
            private_loader,
            epochs=cfg.dp_local_epochs,
            optimizer=private_opt,
            device=device,
            private=True,
        )
        update = state_dict_to_vector(base.state_dict()) - global_vec
        ledger.confirm(entry, steps_taken=handle.steps)  # IntegrityError: the update stays here
        spent = ledger.spent(data.dataset_id, planned.delta, cfg.accountant)
    finally:
        ledger.close()
    metrics = _train_metrics(stats)
    metrics.update(
        {
            "record-level-epsilon": spent,
            "record-level-delta": planned.delta,
            "noise-multiplier": plan.noise_multiplier,
            "sample-rate": plan.sample_rate,
            "dp-steps": handle.steps,
            "private-scaling": int(data.private_scaling),
        }
    )
    return LocalUpdate(update, len(data.y_train), metrics)


def _train_metrics(stats: TrainStats) -> dict[str, float | int]:
    return {
        "train-loss": stats.loss,
        "train-accuracy": stats.accuracy,
        "train-seconds": stats.seconds,
        "steps": stats.steps,
    }
