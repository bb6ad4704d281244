"""A deployed run's settings, recorded sealed at ``start`` and held to on ``resume``.

Stops the downgrade-on-restart attack: the coordinator's process dies (or is
killed) mid-run and ``fedseal-server resume`` relaunches it with weaker
settings than the run was started with, e.g. node authentication off (any
SuperNode, even one with no key, then joins and trains in the resumed
rounds), another allow-list, no server policy (its rules and its decisions
vanish from the audit log), no TLS, or another audit-signing key (a second
history under a key the sites never saw).

``fedseal-server start`` hands the settings it launched with to the ServerApp
(:class:`DeploymentSettings`, as JSON in a coordinator-only run_config key);
the ServerApp adds the fingerprint of the signing key it loaded and records
them as the run's ``run_settings`` audit event, sealed with the run's start.
``fedseal-server resume`` reads that event back, builds what it is about to
launch, and refuses with one line naming every difference
(:func:`check_resume`) before any process starts; the resumed ServerApp checks
again with the key it actually loaded, and records the settings it runs with
(``resumed: true``) after ``run_resumed``.

Fingerprints: certificates are the SHA-256 of their DER encoding (hex); node
keys are OpenSSH's ``SHA256:<base64>`` of the key blob (what ``ssh-keygen
-lf`` prints), kept with the key itself (public) so that a resume can
re-register the recorded allow-list; the signing key is the SHA-256 (hex) of
its raw 32-byte Ed25519 public key.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from common.errors import ConfigurationError
from common.pki import CertPaths
from common.roster import Roster
from policies.keys import canonical_node_key

__all__ = [
    "ROSTER_EVENT",
    "RUN_SETTINGS_EVENT",
    "RosterInForce",
    "check_roster_resume",
    "recorded_roster",
    "DeploymentSettings",
    "NodeKey",
    "cert_fingerprint",
    "check_resume",
    "differences",
    "node_key",
    "node_keys_in",
    "recorded_settings",
    "require_recorded",
    "signing_key_fingerprint",
    "tls_fingerprints",
]

RUN_SETTINGS_EVENT = "run_settings"
ROSTER_EVENT = "roster"


@dataclass(frozen=True, slots=True, order=True)
class NodeKey:
    """One allow-listed SuperNode public key: its fingerprint and canonical OpenSSH text."""

    fingerprint: str
    key: str


def node_key(text: str | bytes) -> NodeKey:
    """A node public key (OpenSSH line, PEM or DER) with its ``SHA256:`` fingerprint.

    Raises
    ------
    ConfigurationError
        ``text`` is not a public key.
    """
    canonical = canonical_node_key(text)
    blob = base64.b64decode(canonical.split()[1])
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii").rstrip("=")
    return NodeKey(f"SHA256:{digest}", canonical)


def node_keys_in(paths: Iterable[Path]) -> tuple[NodeKey, ...]:
    """The distinct keys of the given ``.pub`` files, sorted by fingerprint."""
    keys: dict[str, NodeKey] = {}
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read site public key {path}: {exc.strerror or exc}"
            ) from None
        try:
            key = node_key(data)
        except ConfigurationError as exc:
            raise ConfigurationError(f"{path}: {exc}") from None
        keys[key.fingerprint] = key
    return tuple(sorted(keys.values()))


def cert_fingerprint(path: Path) -> str:
    """SHA-256 (hex) of the DER encoding of the PEM certificate at ``path``."""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as exc:
        raise ConfigurationError(f"cannot read certificate {path}: {exc.strerror or exc}") from None
    except ValueError:
        raise ConfigurationError(f"{path} is not a PEM certificate") from None
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def tls_fingerprints(certs: CertPaths) -> tuple[str, str]:
    """The (CA, server) certificate fingerprints of a ``fedseal-server certs`` directory."""
    if missing := certs.missing():
        raise ConfigurationError(
            "missing TLS files: "
            + ", ".join(str(p) for p in missing)
            + " (create them with `fedseal-server certs DIR`, or pass --insecure explicitly)"
        )
    return cert_fingerprint(certs.ca_cert), cert_fingerprint(certs.server_cert)


def signing_key_fingerprint(public_key: Ed25519PublicKey) -> str:
    """SHA-256 (hex) of the raw 32-byte Ed25519 public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


@dataclass(frozen=True, slots=True)
class DeploymentSettings:
    """What a deployed run was launched with (``None`` where it does not apply).

    Attributes
    ----------
    tls : bool
        TLS on (``--certs``) or off (``--insecure``).
    ca_cert_sha256, server_cert_sha256 : str or None
        The CA and SuperLink certificates' fingerprints (TLS only).
    node_auth : bool
        Flower node authentication on: only the allow-listed keys may connect.
    auth_keys_dir : str or None
        The ``--auth-keys`` directory the allow-list was read from (informative;
        a resume is held to the keys, not to the directory's name).
    auth_keys : tuple of NodeKey
        The allow-list: ``--auth-keys`` keys and the server policy's admission
        keys, sorted by fingerprint.
    policy_path, policy_sha256 : str or None
        The server policy file and its hash (:func:`policies.policy_hash`).
    signing_key_sha256 : str or None
        The audit-signing key's fingerprint; filled in by the ServerApp from the
        key it loaded (the command line reads the public half on resume).
    resumed : bool
        Whether these are the settings of a resume (``run_settings`` after
        ``run_resumed``) rather than of the run's start.
    """

    tls: bool
    ca_cert_sha256: str | None = None
    server_cert_sha256: str | None = None
    node_auth: bool = False
    auth_keys_dir: str | None = None
    auth_keys: tuple[NodeKey, ...] = field(default_factory=tuple)
    policy_path: str | None = None
    policy_sha256: str | None = None
    signing_key_sha256: str | None = None
    resumed: bool = False

    def to_payload(self) -> dict[str, Any]:
        """The audit event's payload (and the run_config transport, as JSON)."""
        return {
            "tls": self.tls,
            "ca_cert_sha256": self.ca_cert_sha256,
            "server_cert_sha256": self.server_cert_sha256,
            "node_auth": self.node_auth,
            "auth_keys_dir": self.auth_keys_dir,
            "auth_keys": [{"fingerprint": k.fingerprint, "key": k.key} for k in self.auth_keys],
            "policy_path": self.policy_path,
            "policy_sha256": self.policy_sha256,
            "signing_key_sha256": self.signing_key_sha256,
            "resumed": self.resumed,
        }

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> DeploymentSettings:
        """Parse :meth:`to_payload`'s output; ConfigurationError naming a malformed field."""

        def text(name: str) -> str | None:
            value = payload.get(name)
            if value is None or isinstance(value, str):
                return value
            raise ConfigurationError(f"run settings: {name} must be text, got {value!r}")

        def flag(name: str) -> bool:
            value = payload.get(name, False)
            if isinstance(value, bool):
                return value
            raise ConfigurationError(f"run settings: {name} must be true or false, got {value!r}")

        raw_keys = payload.get("auth_keys") or []
        if not isinstance(raw_keys, list):
            raise ConfigurationError("run settings: auth_keys must be a list")
        keys: list[NodeKey] = []
        for item in raw_keys:
            if not isinstance(item, Mapping) or not isinstance(item.get("key"), str):
                raise ConfigurationError("run settings: each auth key needs its key text")
            key = node_key(item["key"])
            if item.get("fingerprint") != key.fingerprint:
                raise ConfigurationError(
                    f"run settings: recorded fingerprint {item.get('fingerprint')!r} "
                    f"does not match its key ({key.fingerprint})"
                )
            keys.append(key)
        return cls(
            tls=flag("tls"),
            ca_cert_sha256=text("ca_cert_sha256"),
            server_cert_sha256=text("server_cert_sha256"),
            node_auth=flag("node_auth"),
            auth_keys_dir=text("auth_keys_dir"),
            auth_keys=tuple(sorted(keys)),
            policy_path=text("policy_path"),
            policy_sha256=text("policy_sha256"),
            signing_key_sha256=text("signing_key_sha256"),
            resumed=flag("resumed"),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_payload(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> DeploymentSettings:
        try:
            payload = json.loads(text)
        except json.JSONDecodeError:
            raise ConfigurationError("run settings are not valid JSON") from None
        if not isinstance(payload, dict):
            raise ConfigurationError("run settings must be a JSON object")
        return cls.from_payload(payload)

    def describe(self) -> str:
        """One line for the operator: what this run is launched with."""
        parts = ["TLS" if self.tls else "NO TLS (--insecure)"]
        parts.append(
            f"node authentication ({len(self.auth_keys)} allow-listed keys)"
            if self.node_auth
            else "no node authentication"
        )
        parts.append(
            f"server policy {self.policy_path} (sha256 {_short(self.policy_sha256)}...)"
            if self.policy_sha256
            else "no server policy"
        )
        if self.signing_key_sha256:
            parts.append(f"audit signing key sha256 {_short(self.signing_key_sha256)}...")
        return ", ".join(parts)

    def with_signing_key(self, public_key: Ed25519PublicKey) -> DeploymentSettings:
        return replace(self, signing_key_sha256=signing_key_fingerprint(public_key))


def recorded_settings(events: Iterable[Any]) -> DeploymentSettings | None:
    """The settings the run was started with: its first ``run_settings`` event, if any.

    ``events`` are a run's audit events (:meth:`server.record.SqlRecord.events`).
    """
    for event in events:
        if event.kind == RUN_SETTINGS_EVENT:
            return DeploymentSettings.from_payload(event.payload())
    return None


def _short(value: str | None) -> str:
    return "none" if value is None else value[:16]


def differences(recorded: DeploymentSettings, offered: DeploymentSettings) -> list[str]:
    """Each way ``offered`` (a resume) differs from ``recorded`` (the run's start), in words.

    The signing key is compared only when both sides know its fingerprint.
    """
    found: list[str] = []
    if recorded.tls != offered.tls:
        found.append(
            "TLS: the run started with TLS (--certs), this launch has --insecure"
            if recorded.tls
            else "TLS: the run started with --insecure, this launch has --certs"
        )
    elif recorded.tls:
        if recorded.ca_cert_sha256 != offered.ca_cert_sha256:
            found.append(
                f"CA certificate: sha256 {_short(offered.ca_cert_sha256)}... is not the run's "
                f"{_short(recorded.ca_cert_sha256)}..."
            )
        if recorded.server_cert_sha256 != offered.server_cert_sha256:
            found.append(
                f"server certificate: sha256 {_short(offered.server_cert_sha256)}... is not the "
                f"run's {_short(recorded.server_cert_sha256)}..."
            )
    if recorded.node_auth != offered.node_auth:
        found.append(
            "node authentication: on at the run's start, off in this launch (give --auth-keys DIR)"
            if recorded.node_auth
            else "node authentication: off at the run's start, on in this launch"
        )
    elif recorded.node_auth:
        had = {k.fingerprint for k in recorded.auth_keys}
        has = {k.fingerprint for k in offered.auth_keys}
        if missing := sorted(had - has):
            found.append(f"node keys: the run's {', '.join(missing)} missing")
        if extra := sorted(has - had):
            found.append(f"node keys: {', '.join(extra)} not in the run's allow-list")
    if recorded.policy_sha256 != offered.policy_sha256:
        if offered.policy_sha256 is None:
            found.append(
                f"server policy: the run started with {recorded.policy_path} "
                f"(sha256 {_short(recorded.policy_sha256)}...), none is in force here; "
                "give --policy FILE (or put the file back)"
            )
        elif recorded.policy_sha256 is None:
            found.append("server policy: the run started without one, this launch has --policy")
        else:
            found.append(
                f"server policy: {offered.policy_path} has sha256 "
                f"{_short(offered.policy_sha256)}..., the run's is "
                f"{_short(recorded.policy_sha256)}..."
            )
    if (
        recorded.signing_key_sha256 is not None
        and offered.signing_key_sha256 is not None
        and recorded.signing_key_sha256 != offered.signing_key_sha256
    ):
        found.append(
            f"audit signing key: sha256 {_short(offered.signing_key_sha256)}... is not the run's "
            f"{_short(recorded.signing_key_sha256)}... (give --keys with the run's key)"
        )
    return found


def require_recorded(run_id: str, recorded: DeploymentSettings | None) -> DeploymentSettings:
    """``recorded``, or ConfigurationError: a run with no recorded settings cannot be resumed.

    Without them nothing says what the resume must restore, so it could only
    guess, and a guess is a downgrade waiting to happen.
    """
    if recorded is None:
        raise ConfigurationError(
            f"cannot resume run {run_id}: the record holds no deployment settings for it "
            "(only a run started by `fedseal-server start` can be resumed this way)"
        )
    return recorded


def check_resume(
    run_id: str, recorded: DeploymentSettings | None, offered: DeploymentSettings | None
) -> None:
    """Refuse a resume that would not restore the run's recorded settings.

    Raises
    ------
    ConfigurationError
        One line: ``cannot resume run ID: <difference>; <difference>...``; also when
        the run has no recorded settings (not started by ``fedseal-server start``)
        or the launch states none.
    """
    recorded = require_recorded(run_id, recorded)
    if offered is None:
        raise ConfigurationError(
            f"cannot resume run {run_id}: this launch states no deployment settings "
            "(resume it with `fedseal-server resume`)"
        )
    if found := differences(recorded, offered):
        raise ConfigurationError(f"cannot resume run {run_id}: " + "; ".join(found))


@dataclass(frozen=True, slots=True)
class RosterInForce:
    """The federation roster a run is held to: recorded at start (``roster`` event), checked on resume.

    Attributes
    ----------
    federation : str
        The roster's federation.
    version : int
        The roster's version.
    sha256 : str
        Its digest (:meth:`common.roster.Roster.digest`, hex).
    members : int
        How many sites it lists.
    path : str or None
        The file it was read from (a resume without ``--roster`` reuses it).
    """

    federation: str
    version: int
    sha256: str
    members: int
    path: str | None = None

    @classmethod
    def of(cls, roster: Roster, path: Path | None) -> RosterInForce:
        """The summary of a :class:`common.roster.Roster` read from ``path``."""
        return cls(
            roster.federation,
            roster.version,
            roster.digest().hex(),
            len(roster.members),
            str(path) if path is not None else None,
        )

    def to_payload(self) -> dict[str, Any]:
        return {
            "federation": self.federation,
            "version": self.version,
            "sha256": self.sha256,
            "members": self.members,
            "path": self.path,
        }

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> RosterInForce:
        """Parse :meth:`to_payload`'s output; ConfigurationError naming a malformed field."""
        federation, version, sha = (
            payload.get("federation"),
            payload.get("version"),
            payload.get("sha256"),
        )
        members, path = payload.get("members"), payload.get("path")
        if not isinstance(federation, str) or not isinstance(sha, str):
            raise ConfigurationError("recorded roster: federation and sha256 must be text")
        for name, value in (("version", version), ("members", members)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigurationError(f"recorded roster: {name} must be an integer")
        if path is not None and not isinstance(path, str):
            raise ConfigurationError("recorded roster: path must be text")
        return cls(federation, int(version), sha, int(members), path)  # type: ignore[arg-type]

    def describe(self) -> str:
        return (
            f"roster of federation {self.federation!r} version {self.version} "
            f"({self.members} members, sha256 {_short(self.sha256)}...)"
        )


def recorded_roster(events: Iterable[Any]) -> RosterInForce | None:
    """The roster the run was started with: its first ``roster`` event, if any."""
    for event in events:
        if event.kind == ROSTER_EVENT:
            return RosterInForce.from_payload(event.payload())
    return None


def check_roster_resume(
    run_id: str, recorded: RosterInForce | None, offered: RosterInForce | None
) -> None:
    """Refuse a resume that would not run under the roster the run started with.

    Stops a relaunch under another roster (one that adds a member the sites'
    authority never signed for this run, or drops one) or under none.

    Raises
    ------
    ConfigurationError
        One line naming the difference.
    """
    if recorded is None and offered is None:
        return
    if recorded is None:
        raise ConfigurationError(
            f"cannot resume run {run_id}: it started without a roster, this launch has "
            f"{offered.describe() if offered else 'one'}"
        )
    if offered is None:
        raise ConfigurationError(
            f"cannot resume run {run_id}: it started under the {recorded.describe()} "
            f"from {recorded.path}; none is given here (give --roster FILE)"
        )
    if offered.sha256 != recorded.sha256:
        raise ConfigurationError(
            f"cannot resume run {run_id}: the {offered.describe()} is not the run's "
            f"{recorded.describe()}"
        )
