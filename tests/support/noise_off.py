"""Test-only: DP noise draws replaced by zeros, in this process and in Ray's workers.

The switches the privacy audit's slow tests need to show the audit can
fail: with the noise off, everything else stays as it is (Poisson
sampling, clipping, scaling, the accountants, the ledgers and hence the
claimed epsilon); only the draw returns zeros:

* record level: :func:`client.dp_noise.gaussian_like`, where every DP-SGD
  step's noise is drawn, at the sites (:func:`switch_off_noise`, and
  :class:`NoiseOffClientApp` for the Ray workers);
* client level: :func:`common.dp.central.add_gaussian_noise`, where
  DP-FedAvg's noise is drawn, at the coordinator
  (:func:`without_central_noise`; the ServerApp runs in a thread of the
  test's own process, so a ``monkeypatch`` reaches it).

Why it reaches the sites: ``fedseal-sim`` runs each site's ClientApp in a
Ray actor, another process, which a pytest ``monkeypatch`` of this process
never touches. :class:`NoiseOffClientApp` wraps the sites' ClientApp; Ray
pickles it into each actor by reference to this module (the actors' Python
path is this process', tests/support included), and each call switches the
noise off in the actor before the site's code runs.

Why production cannot reach it: this module lives under ``tests/``, which is
not part of the installed packages; nothing in fedseal imports it, no flag,
node config, run config or coordinator message names it, and the only way
in is a Python caller passing :class:`NoiseOffClientApp` to
:func:`simulations.privacy_audit.audit.run_audit` (``wrap_client_app``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp


def zero_noise(source: object, std: float, references: list[torch.Tensor]) -> list[torch.Tensor]:
    """What :func:`client.dp_noise.gaussian_like` returns with the noise off: zeros, drawn from nothing."""
    return [torch.zeros_like(r) for r in references]


def without_central_noise(
    vector: Sequence[npt.NDArray[np.generic]], std: float, rng: object
) -> list[npt.NDArray[np.float64]]:
    """What :func:`common.dp.central.add_gaussian_noise` returns with the noise off: copies, in float64."""
    return [np.array(v, dtype=np.float64) for v in vector]


def switch_off_noise() -> None:
    """Replace this process' DP-SGD noise draw by :func:`zero_noise` (for the process' lifetime)."""
    import client.dp_noise

    client.dp_noise.gaussian_like = zero_noise


class NoiseOffClientApp(ClientApp):
    """A ClientApp that switches the noise off in whatever process runs it, then runs ``inner``."""

    def __init__(self, inner: ClientApp) -> None:
        super().__init__()
        self.inner = inner

    def __call__(self, message: Message, context: Context) -> Message:
        switch_off_noise()
        return self.inner(message, context)
