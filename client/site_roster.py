"""The roster in force at a site: verified under the site's own pin, never older than before.

A deployed site's roster is put in force by ``fedseal-client start --roster
FILE`` (:func:`install_site_roster`): verified under the roster authority
(or digest) the site policy pins (``trust.roster_authority``,
``trust.roster_digest``), copied into the site's state directory and named
in the SuperNode's node config (``roster-path``, with its digest as
``roster-hash``), like the site policy (:mod:`client.site_policy`). A
simulated site gets its roster from the :class:`~client.site_policy.SiteSetup`
the simulation builds (with the authority the simulated site pins, unless its
policy pins one).

Checks, each against an attack by the coordinator (who hands the roster
around but cannot sign one):

- the signature must verify under the **site's** pin, never under the key the
  file names (stops a roster the coordinator signed itself, with sybil
  members or swapped identity keys);
- the installed copy must still have the digest pinned at start (stops an
  edited copy);
- the roster's version must not be below the newest this site ever
  accepted for the federation, and one version names one roster (stops the
  replay of an older, validly signed roster, e.g. one that still lists a
  removed member); the newest accepted version is kept in
  ``roster-version.json`` in the state directory, replaced crash-safely
  under the site's lock.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from client.state import (
    ROSTER_FILE,
    ROSTER_VERSION_FILE,
    read_private_file,
    replace_file,
    site_lock,
)
from common.audit.seal import public_key_from_hex
from common.errors import ConfigurationError, DataError, IntegrityError
from common.roster import Roster, key_fingerprint, load_roster

if TYPE_CHECKING:
    from client.site_policy import SiteSetup
    from policies import SitePolicy

LOCAL_ROSTER_FILE = "local-roster.json"
LOCAL_PIN_FILE = "local-roster.pin"
"""A local simulation's roster and the authority key its site pins, both in the site's
private state directory (written by ``fedseal-sim federation`` for Flower's own
``flwr run`` simulations, whose sites get no node config or setup to carry them)."""
NODE_CONFIG_ROSTER_PATH = "roster-path"
NODE_CONFIG_ROSTER_HASH = "roster-hash"
VERSION_FILE_FORMAT = 1


@dataclass(frozen=True, slots=True)
class RosterPin:
    """What a site pins a roster to: the authority's key and/or one roster's digest."""

    authority_key: bytes | None = None
    digest: bytes | None = None

    def __bool__(self) -> bool:
        return self.authority_key is not None or self.digest is not None


def roster_pin(policy: SitePolicy | None, setup: SiteSetup | None = None) -> RosterPin:
    """The site's pin: its policy's ``trust.roster_*``, else (simulations) the setup's authority."""
    if policy is not None:
        pin = RosterPin(policy.trust.roster_authority_bytes, policy.trust.roster_digest_bytes)
        if pin:
            return pin
    return RosterPin(setup.roster_authority if setup is not None else None)


def verify_roster(roster: Roster, pin: RosterPin) -> None:
    """Check ``roster`` under the site's ``pin``.

    Raises
    ------
    ConfigurationError
        Nothing is pinned: a roster checked only against the key it names
        itself proves nothing to the site.
    IntegrityError
        Another authority, a bad signature, or not the pinned digest.
    """
    if not pin:
        raise _no_pin()
    if pin.digest is not None and roster.digest() != pin.digest:
        raise IntegrityError(
            f"roster sha256 {roster.digest().hex()[:16]}... is not the digest the site pins "
            f"({pin.digest.hex()[:16]}...)"
        )
    roster.verify(pin.authority_key if pin.authority_key is not None else roster.authority_key)


@functools.lru_cache(maxsize=16)
def _verify_once(roster: Roster, pin: RosterPin) -> None:
    """:func:`verify_roster`, once per process for an equal (roster, pin): a failure is not cached."""
    verify_roster(roster, pin)


def accept_roster_version(directory: Path, roster: Roster) -> None:
    """Record ``roster`` as accepted unless it is older than (or differs at) the newest accepted.

    Stops a **replayed older roster**: the coordinator (or anyone handing a
    site its roster) presents a validly signed roster with a lower version
    than the one the site already accepted for the same federation; and an
    **equivocating authority**: two different rosters with one version.

    Raises
    ------
    IntegrityError
        ``roster.version`` is below the newest accepted, or equal to it with
        another digest.
    ConfigurationError
        The version store is unreadable (fail closed: repair or remove it).
    """
    path = directory / ROSTER_VERSION_FILE
    with site_lock(directory):
        newest = _read_versions(path)
        seen = newest.get(roster.federation)
        digest = roster.digest().hex()
        if seen is not None:
            version, seen_digest = seen
            if roster.version < version:
                raise IntegrityError(
                    f"roster version {roster.version} of federation {roster.federation!r} is "
                    f"below version {version}, which this site has accepted (an older roster "
                    "replayed?)"
                )
            if roster.version == version:
                if digest != seen_digest:
                    raise IntegrityError(
                        f"roster version {version} of federation {roster.federation!r} is not "
                        "the roster this site accepted under that version"
                    )
                return
        newest[roster.federation] = (roster.version, digest)
        doc = {
            "v": VERSION_FILE_FORMAT,
            "federations": {
                name: {"version": v, "sha256": d} for name, (v, d) in sorted(newest.items())
            },
        }
        replace_file(path, json.dumps(doc, sort_keys=True).encode("utf-8"))


def _read_versions(path: Path) -> dict[str, tuple[int, str]]:
    if not path.exists():
        return {}
    try:
        doc = json.loads(path.read_bytes())
        if not isinstance(doc, dict) or doc.get("v") != VERSION_FILE_FORMAT:
            raise ValueError("unknown format")
        out: dict[str, tuple[int, str]] = {}
        for name, item in doc["federations"].items():
            version, digest = item["version"], item["sha256"]
            if isinstance(version, bool) or not isinstance(version, int):
                raise ValueError("bad version")
            if not isinstance(digest, str):
                raise ValueError("bad digest")
            out[str(name)] = (version, digest)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigurationError(
            f"the site's roster version store {path} is unreadable ({exc})"
        ) from None
    return out


@functools.lru_cache(maxsize=16)
def _load(
    path: str, mtime_ns: int, size: int, authority: bytes | None, digest: bytes | None
) -> Roster:
    return load_roster(Path(path), authority_key=authority, digest=digest)


def load_pinned_roster(path: Path, pin: RosterPin) -> Roster:
    """Read and verify the roster at ``path`` under ``pin`` (cached per process while unchanged).

    Raises
    ------
    ConfigurationError
        Unreadable or malformed (naming the file), or nothing pinned.
    IntegrityError
        Not signed by the pinned authority, or not the pinned digest.
    """
    if not pin:
        raise _no_pin()
    try:
        info = Path(path).stat()
    except OSError as exc:
        raise ConfigurationError(f"cannot read roster {path}: {exc.strerror or exc}") from None
    return _load(str(path), info.st_mtime_ns, info.st_size, pin.authority_key, pin.digest)


def _no_pin() -> ConfigurationError:
    return ConfigurationError(
        "the site policy pins no roster authority (set trust.roster_authority, "
        "or trust.roster_digest)"
    )


@dataclass(frozen=True, slots=True)
class InstalledRoster:
    """The roster ``fedseal-client start --roster`` put in force."""

    roster: Roster
    source: Path
    path: Path

    def summary(self) -> str:
        """One line for the site's operator: the roster in force."""
        r = self.roster
        return (
            f"roster in force: federation {r.federation!r}, version {r.version}, "
            f"{len(r.members)} members, sha256 {r.digest().hex()} (from {self.source})"
        )


def install_site_roster(
    source: Path, state_dir: Path, policy: SitePolicy, identity: bytes | None = None
) -> InstalledRoster:
    """Verify the roster under the site policy's pin and put it in force for the SuperNode.

    The copy in ``state_dir`` (``roster.json``, read-only) freezes what was
    checked; its digest goes into the node config (``roster-hash``) and the
    ClientApp refuses a copy whose digest moved. The version is checked and
    recorded (:func:`accept_roster_version`). With ``identity`` (the site's
    public identity key) the roster must list it, or nothing is installed.

    Raises
    ------
    ConfigurationError
        The file is missing or malformed, the policy pins nothing, or the
        roster does not list ``identity``.
    IntegrityError
        The roster is not signed by the pinned authority, is not the pinned
        digest, or is older than the one this site accepted before.
    """
    pin = roster_pin(policy)
    if not pin:
        raise _no_pin()
    chosen = Path(source).resolve()
    roster = load_roster(chosen, authority_key=pin.authority_key, digest=pin.digest)
    if identity is not None and roster.member_by_identity(identity) is None:
        raise ConfigurationError(
            f"this site's identity key {key_fingerprint(identity)} is not in roster {chosen}; "
            "ask the roster authority to add it (`fedseal-client identity show` prints it)"
        )
    accept_roster_version(state_dir, roster)
    target = state_dir / ROSTER_FILE
    replace_file(target, roster.to_json().encode("utf-8"), mode=0o444)
    return InstalledRoster(roster, chosen, target)


def configured_roster(
    node_config: Mapping[str, Any],
    setup: SiteSetup | None,
    policy: SitePolicy | None,
    directory: Path,
) -> Roster | None:
    """The roster in force at this site, verified; None when the site has none.

    Deployed: ``roster-path`` in the node config, whose digest must still be
    ``roster-hash``; simulated: ``setup.roster``. Either way it is verified
    under the site's pin (:func:`roster_pin`) and its version checked
    (:func:`accept_roster_version`).

    Raises
    ------
    ConfigurationError
        A roster is configured but unreadable, or nothing pins it.
    IntegrityError
        It fails the signature, digest or version checks.
    """
    pin = roster_pin(policy, setup)
    path = node_config.get(NODE_CONFIG_ROSTER_PATH)
    if isinstance(path, str) and path:
        roster = load_pinned_roster(Path(path), pin)
        pinned = node_config.get(NODE_CONFIG_ROSTER_HASH)
        if not isinstance(pinned, str) or roster.digest().hex() != pinned:
            raise IntegrityError(
                f"roster {path} is not the one `fedseal-client start` put in force "
                f"(sha256 {roster.digest().hex()[:16]}..., expected {str(pinned)[:16]}...); "
                "restart the site agent"
            )
    elif setup is not None and setup.roster is not None:
        roster = setup.roster
        _verify_once(roster, pin)
    elif (directory / LOCAL_PIN_FILE).is_file():
        if not pin:  # the site's policy pins nothing: the pin its own state directory holds
            pin = RosterPin(_local_pin(directory))
        roster = load_pinned_roster(directory / LOCAL_ROSTER_FILE, pin)
    else:
        return None
    accept_roster_version(directory, roster)
    return roster


def _local_pin(directory: Path) -> bytes:
    """The authority key of a local simulation's roster, from the site's private state dir."""
    raw = read_private_file(directory / LOCAL_PIN_FILE, "local roster pin", 200)
    try:
        return public_key_from_hex(raw.decode("ascii").strip()).public_bytes_raw()
    except (UnicodeDecodeError, DataError, ValueError) as exc:
        raise ConfigurationError(f"{directory / LOCAL_PIN_FILE}: {exc}") from None


def install_local_roster(directory: Path, roster: Roster, authority_key: bytes) -> None:
    """Put ``roster`` in force at a local simulation's site, pinned to ``authority_key``.

    Both files are private to the site's user (its state directory is the
    trust anchor of a site anyway: ledger, state key, identity). Only for
    sites on the machine that makes the federation (``fedseal-sim
    federation``); a deployed site pins its authority in its policy.
    """
    verify_roster(roster, RosterPin(authority_key))
    replace_file(directory / LOCAL_ROSTER_FILE, roster.to_json().encode("utf-8"))
    replace_file(directory / LOCAL_PIN_FILE, authority_key.hex().encode("ascii") + b"\n")


def site_roster(
    node_config: Mapping[str, Any],
    setup: SiteSetup | None,
    policy: SitePolicy | None,
    directory: Path,
) -> Roster:
    """:func:`configured_roster`, or ConfigurationError when the site has no roster."""
    roster = configured_roster(node_config, setup, policy, directory)
    if roster is None:
        raise ConfigurationError(
            "no roster in force at this site: start it with `fedseal-client start --roster FILE`"
        )
    return roster
