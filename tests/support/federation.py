"""In-memory federations for FakeGrid tests: identities and a signed roster in one call.

``federated_grid(root, n)`` gives a :class:`~fake_grid.FakeGrid` of ``n`` sites whose
ClientApp knows the federation (:func:`simulations.federation.prepare_federation`: each
site's identity key in its state directory ``root/site-<i>``, a roster signed by a fresh
authority, the authority pinned through the :class:`~client.site_policy.SiteSetup`), and
the :class:`~simulations.federation.Federation` itself (its ``authority_key`` lets a test
sign other rosters; ``identity(i)`` is site ``i``'s key).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fake_grid import FIRST_NODE_ID, FakeGrid

from client.agent import Trainer, compute_update
from client.app import make_client_app
from client.site_policy import SiteSetup
from common.roster import Roster
from policies import SitePolicies
from simulations.federation import Federation, prepare_federation

__all__ = ["FIRST_NODE_ID", "federated_grid", "federated_setup", "federation"]


def federation(root: Path, num_sites: int, *, coordinator_key: bytes | None = None) -> Federation:
    """Identities for sites ``0 .. num_sites-1`` under ``root`` and a roster naming them."""
    return prepare_federation(root, num_sites, coordinator_key=coordinator_key)


def federated_grid(
    root: Path,
    num_sites: int,
    *,
    policies: SitePolicies | None = None,
    coordinator_key: bytes | None = None,
    trainer: Trainer = compute_update,
    edit_roster: Callable[[Federation], Roster] | None = None,
    **grid: Any,
) -> tuple[FakeGrid, Federation]:
    """A FakeGrid whose sites run the real ClientApp inside a federation.

    ``edit_roster(federation)`` gives the roster the sites are handed instead
    of the authority's (e.g. one a hostile coordinator edited); they still pin
    the federation's authority. ``grid`` goes to :class:`~fake_grid.FakeGrid`.
    """
    fed = federation(root, num_sites, coordinator_key=coordinator_key)
    setup: SiteSetup = fed.site_setup(policies)
    if edit_roster is not None:
        setup = dataclasses.replace(setup, roster=edit_roster(fed))
    return FakeGrid(make_client_app(setup, trainer=trainer), num_sites, **grid), fed


def federated_setup(root: Path, num_sites: int, policies: SitePolicies | None = None) -> SiteSetup:
    """The :class:`SiteSetup` of ``num_sites`` federated sites under ``root`` (for ``make_client_app``)."""
    return federation(root, num_sites).site_setup(policies)
