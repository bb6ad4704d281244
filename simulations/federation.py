"""A simulated federation: one identity per simulated site, a roster authority, a signed roster.

:func:`prepare_federation` plays the parts a real federation's people play
by hand (``fedseal-client identity init`` at each site, ``fedseal-server
roster init/add/sign`` at the roster authority): each simulated site's
identity key is made in the state directory its ClientApp will use
(:func:`client.state.site_dir`, so the ClientApp finds it), the authority
signs a roster naming every site (``site-<i>``) and, optionally, the
coordinator's audit key. The :class:`~client.site_policy.SiteSetup` it
hands the ClientApp carries the roster and the authority each simulated
site pins (unless its own policy pins one).

With a ``directory``, the authority key (``authority.key``, 0600) and the
roster (``roster.json``) are kept there and reused by a later call (a
resumed simulation runs under the roster it started with); a call that
needs another roster (more sites, another coordinator key) signs the next
version with the same authority.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client.identity import create_site_identity, identity_public_bytes, load_site_identity
from client.site_policy import SiteSetup
from client.state import create_private_file, private_dir, read_private_file, site_dir
from common.errors import ConfigurationError
from common.roster import Roster, RosterMember, load_roster, sign_roster
from policies import SitePolicies

AUTHORITY_FILE = "authority.key"
ROSTER_FILE = "roster.json"
FEDERATION = "simulation"
SEED_BYTES = 32


@dataclass(frozen=True, slots=True)
class Federation:
    """The simulated federation.

    Attributes
    ----------
    roster : Roster
        The signed roster (members ``site-0`` ... ``site-<n-1>``).
    authority_key : Ed25519PrivateKey
        The roster authority's private key (a real coordinator never has it).
    site_root : Path
        Where the simulated sites keep their state (``site-<i>/``).
    path : Path or None
        The roster file, when the federation was written to a directory.
    """

    roster: Roster
    authority_key: Ed25519PrivateKey
    site_root: Path
    path: Path | None = None

    @property
    def authority_public(self) -> bytes:
        """The authority's 32 raw public bytes (what sites pin)."""
        return identity_public_bytes(self.authority_key)

    def site_setup(self, policies: SitePolicies | None = None) -> SiteSetup:
        """What the ClientApp of this federation's sites gets (roster and pinned authority)."""
        return SiteSetup(self.site_root, policies, self.roster, self.authority_public)

    def site_directory(self, partition: int) -> Path:
        """Simulated site ``partition``'s state directory (as its ClientApp finds it)."""
        return site_dir({"partition-id": partition}, partition, self.site_root)

    def identity(self, partition: int) -> Ed25519PrivateKey:
        """Simulated site ``partition``'s identity key."""
        return load_site_identity(self.site_directory(partition))


def _site_identity(directory: Path) -> bytes:
    try:
        return identity_public_bytes(load_site_identity(directory))
    except ConfigurationError:
        if (directory / "identity.key").exists():
            raise  # present but refused: never replaced
        return create_site_identity(directory)


def _authority(directory: Path | None) -> Ed25519PrivateKey:
    if directory is None:
        return Ed25519PrivateKey.generate()
    path = private_dir(directory) / AUTHORITY_FILE
    create_private_file(path, Ed25519PrivateKey.generate().private_bytes_raw())  # no-op if present
    seed = read_private_file(path, "roster authority key", SEED_BYTES + 1)
    if len(seed) != SEED_BYTES:
        raise ConfigurationError(f"roster authority key {path} is corrupt")
    return Ed25519PrivateKey.from_private_bytes(seed)


def prepare_federation(
    site_root: Path,
    partitions: int,
    *,
    coordinator_key: bytes | None,
    directory: Path | None = None,
    federation: str = FEDERATION,
) -> Federation:
    """Make (or reuse) identities for ``partitions`` simulated sites and a roster naming them.

    Parameters
    ----------
    site_root : Path
        The simulated sites' state root (``<out>/sites``).
    partitions : int
        How many sites (partition ids ``0 .. partitions-1``).
    coordinator_key : bytes or None
        The coordinator's raw 32-byte audit public key, for the roster to name
        (the sites then pin it for instructions).
    directory : Path or None
        Where to keep the authority key and ``roster.json`` (reused on a later
        call); None keeps the authority in memory only.
    federation : str
        The federation's name.

    Raises
    ------
    ConfigurationError
        A site's state directory or identity key is refused, or a kept
        roster is unreadable or not signed by the kept authority.
    """
    if partitions < 1:
        raise ConfigurationError("a federation needs at least one site")
    members = [
        RosterMember(f"site-{i}", _site_identity(site_dir({"partition-id": i}, i, site_root)))
        for i in range(partitions)
    ]
    authority = _authority(directory)
    path = directory / ROSTER_FILE if directory is not None else None
    version = 1
    if path is not None and path.exists():
        kept = load_roster(path, authority_key=identity_public_bytes(authority))
        if (
            kept.federation == federation
            and kept.coordinator_key == coordinator_key
            and kept.members == tuple(sorted(members, key=lambda m: m.name))
        ):
            return Federation(kept, authority, site_root, path)
        version = kept.version + 1
    roster = sign_roster(
        federation=federation,
        version=version,
        coordinator_key=coordinator_key,
        members=members,
        authority=authority,
    )
    if path is not None:
        path.write_text(roster.to_json(), encoding="utf-8")
    return Federation(roster, authority, site_root, path)
