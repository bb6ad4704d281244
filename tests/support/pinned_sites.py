"""Site policies that pin a coordinator key, for tests that play a hostile key holder.

A permissive policy (no DP or secure aggregation required, any cohort) whose
only teeth are ``trust.server_key``: the sites verify every instruction's
signature, so what a test shows is what a coordinator holding the key can do.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.config import RunConfig
from policies import SitePolicies, load_site_policies

PINNED_SITE_POLICY = """kind = "site"
[privacy]
require_dp = false
[rounds]
require_secure_aggregation = false
min_cohort_size = 1
[trust]
server_key = "{key}"
"""


def pinned_policies(folder: Path, key: Ed25519PrivateKey) -> SitePolicies:
    """Every site's policy (``folder/default.toml``, written here) pinning ``key``'s public half."""
    folder.mkdir(parents=True, exist_ok=True)
    raw = key.public_key().public_bytes_raw()
    (folder / "default.toml").write_text(PINNED_SITE_POLICY.format(key=raw.hex()))
    return load_site_policies(folder)


def echo_cfg(num_sites: int = 2, *, num_features: int = 16, **changes: object) -> RunConfig:
    """A plain echo run over the ``vector`` model (``num_features`` coordinates), CPU only."""
    base: dict[str, object] = dict(
        dataset="custom", model="vector", workload="echo", num_features=num_features,
        num_classes=2, num_sites=num_sites, rounds=1, min_sites=2, device="cpu", secagg=False,
        clip_norm=1.0,
    )  # fmt: skip
    base.update(changes)
    return RunConfig(**base)  # type: ignore[arg-type]
