"""Site policies that pin a coordinator key, for tests that play a hostile key holder.

A permissive policy (no DP or secure aggregation required, any cohort) whose
only teeth are ``trust.server_key``: the sites verify every instruction's
signature, so what a test shows is what a coordinator holding the key can do.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

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
