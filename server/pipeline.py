"""Which aggregator a run configuration asks for: plain or secure, with or without central DP.

Written once, here: secure aggregation (sites clip, the server sees only the
sum) when ``secagg`` is on, else plain FedAvg (re-clipped by the server
under central DP); :class:`server.privacy.CentralDP` around either when
``central_dp`` is on; :class:`server.distributed.DistributedDP` around the
secure aggregator when ``distributed_dp`` is on (the sites add the noise).
"""

from __future__ import annotations

from common.config import RunConfig
from common.roster import Roster
from server.aggregation.admission import SiteAdmission
from server.aggregation.base import Aggregator
from server.aggregation.plain import PlainAggregator
from server.aggregation.secure import Judge, SecAggAggregator
from server.privacy import CentralDP


def aggregator_for(
    cfg: RunConfig,
    run_id: str,
    vector_length: int,
    judge: Judge | None = None,
    *,
    roster: Roster | None = None,
    admission: SiteAdmission | None = None,
) -> Aggregator:
    """The aggregator of a run (``run_id`` hex, as the protocol's run number).

    ``roster`` is the federation roster the run is held to (the secure
    aggregator checks the sites' signed key advertisements against it);
    ``admission`` the run's admission answers, whose proved identities the
    secure aggregator binds (:mod:`server.aggregation.admission`).
    """
    inner: Aggregator
    if cfg.distributed_dp:  # the sites noise before masking; the rotation pads to 2^k
        from common.dp.skellam import padded_length
        from server.distributed import DistributedDP

        secure = SecAggAggregator(
            cfg,
            int(run_id, 16),
            padded_length(vector_length),
            judge,
            roster=roster,
            admission=admission,
        )
        return DistributedDP(secure, cfg, vector_length=vector_length)
    if cfg.secagg:
        inner = SecAggAggregator(
            cfg, int(run_id, 16), vector_length, judge, roster=roster, admission=admission
        )
    else:
        inner = PlainAggregator(vector_length, cfg.clip_norm if cfg.central_dp else None)
    return CentralDP(inner, cfg, vector_length=vector_length) if cfg.central_dp else inner
