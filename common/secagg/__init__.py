"""SecAgg+ secure aggregation (protocol v3, authenticated): pure protocol state machines.

The server learns only the sum (in Z_{2^b}) of the quantised inputs of the
clients that survive to the masked-input stage, against a *malicious* server
colluding with up to ``t - 1`` clients (identities bound in the configuration,
signed advertisements, a signed consistency round with a quorum:
:mod:`.signing`), while clients may drop out at any stage as long as every
survivor keeps ``t`` live neighbours and a quorum of the cohort survives to
the consistency round (Bell, Bonawitz, Gascón, Lepoint, Raykova, "Secure
Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020;
Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine
Learning", CCS 2017, §4 and its actively secure variant).

Modules: :mod:`.stages` (stage enum, transition table), :mod:`.params`
(validated round configuration), :mod:`.signing` (identity signatures, graph
seed, quorum), :mod:`.graph` (public k-regular neighbour graph), :mod:`.quantize` (stochastic rounding into the ring),
:mod:`.messages` (one wire type per stage and direction), :mod:`.client`,
:mod:`.server` (state machines) and :mod:`.simulate` (in-memory driver).
No Flower, network or database code lives here.
"""

from common.secagg.client import SecAggClient
from common.secagg.params import SecAggConfig, make_config
from common.secagg.server import AggregateResult, SecAggServer
from common.secagg.simulate import run_round
from common.secagg.stages import TRANSITIONS, Stage, check_transition

__all__ = [
    "TRANSITIONS",
    "AggregateResult",
    "SecAggClient",
    "SecAggConfig",
    "SecAggServer",
    "Stage",
    "check_transition",
    "make_config",
    "run_round",
]
