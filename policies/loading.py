"""Reading policy files: TOML in, a validated model or every problem out.

``load_server_policy``/``load_site_policy`` read one file;
``load_site_policies`` reads one file meant for every site or a directory
with one file per site. Problems never surface as a traceback: they are
collected into :class:`PolicyFileError`, whose ``violations`` list each one as
``FILE: field: problem`` (TOML syntax error, unknown key, wrong type,
out-of-range value, a file of the other kind, ...).

``policy_hash`` identifies a policy in the audit log: the SHA-256 of the
*canonical dump* of the validated model, i.e. compact UTF-8 JSON with
sorted keys, every field with its effective value (defaults filled in; an
optional limit that is absent, meaning "no limit", is left out), numbers of
float fields as floats, lists sorted, keys in canonical form. Comments, whitespace, key order,
``1`` vs ``1.0`` and writing a default explicitly therefore do not change
the hash; any change of meaning does.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Literal, TypeVar

from common.errors import ConfigurationError
from policies.decisions import Violation
from policies.models import Policy, ServerPolicy, SitePolicy
from policies.schema import build, to_plain

PolicyKind = Literal["server", "site"]
P = TypeVar("P", ServerPolicy, SitePolicy)

_SERVER_SECTIONS = frozenset({"admission", "secure_aggregation", "central_dp", "energy", "release"})
_SITE_SECTIONS = frozenset({"privacy", "trust"})
DEFAULTS_DIR = Path(__file__).resolve().parent / "defaults"
DEFAULT_SITE_KEY = "default"


class PolicyFileError(ConfigurationError):
    """A policy file (or several) is invalid; ``violations`` lists every problem."""

    def __init__(self, violations: Sequence[Violation]) -> None:
        self.violations = tuple(violations)
        super().__init__("\n".join(str(v) for v in self.violations) or "invalid policy")


def _read_toml(path: Path, label: str) -> dict[str, object] | list[Violation]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        return [Violation(label, "<file>", f"cannot read: {exc.strerror or exc}")]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return [Violation(label, "<file>", "not UTF-8 text")]
    return parse_toml(text, label)


def parse_toml(text: str, label: str = "<memory>") -> dict[str, object] | list[Violation]:
    """Parse TOML text; a syntax error becomes a one-item violation list."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return [Violation(label, "<syntax>", f"TOML syntax error: {exc}")]


def detect_kind(table: Mapping[str, object]) -> PolicyKind | None:
    """The kind of a parsed policy: its ``kind`` key, or else its sections.

    Returns ``None`` when neither tells (or they disagree with each other).
    """
    kind = table.get("kind")
    if kind in ("server", "site"):
        return "server" if kind == "server" else "site"
    keys = set(table)
    server, site = bool(keys & _SERVER_SECTIONS), bool(keys & _SITE_SECTIONS)
    if server and not site:
        return "server"
    if site and not server:
        return "site"
    return None


def _from_table(
    cls: type[P], table: Mapping[str, object], label: str, expected: PolicyKind
) -> P | list[Violation]:
    kind = table.get("kind", expected)
    if kind in ("server", "site") and kind != expected:
        return [Violation(label, "kind", f"this is a {kind} policy, expected a {expected} policy")]
    policy, problems = build(cls, table)
    if problems:
        return [Violation(label, field, problem) for field, problem in problems]
    return policy


def parse_policy(
    text: str, kind: PolicyKind | Literal["auto"] = "auto", label: str = "<memory>"
) -> Policy:
    """Validate policy TOML text.

    Raises
    ------
    PolicyFileError
        With every problem found.
    """
    table = parse_toml(text, label)
    if isinstance(table, list):
        raise PolicyFileError(table)
    return _policy_from(table, kind, label)


def _policy_from(
    table: Mapping[str, object], kind: PolicyKind | Literal["auto"], label: str
) -> Policy:
    if kind == "auto":
        detected = detect_kind(table)
        if detected is None:
            raise PolicyFileError(
                [
                    Violation(
                        label,
                        "kind",
                        'cannot tell a server from a site policy; add kind = "server" or "site"',
                    )
                ]
            )
        kind = detected
    result: Policy | list[Violation]
    if kind == "server":
        result = _from_table(ServerPolicy, table, label, "server")
    else:
        result = _from_table(SitePolicy, table, label, "site")
    if isinstance(result, list):
        raise PolicyFileError(result)
    return result


def load_policy(path: str | Path, kind: PolicyKind | Literal["auto"] = "auto") -> Policy:
    """Read and validate one policy file of the given kind (``auto``: detect it).

    Raises
    ------
    PolicyFileError
        The file cannot be read, is not TOML, is of the other kind, or has
        invalid fields; every problem is listed.
    """
    label = str(path)
    table = _read_toml(Path(path), label)
    if isinstance(table, list):
        raise PolicyFileError(table)
    return _policy_from(table, kind, label)


def load_server_policy(path: str | Path) -> ServerPolicy:
    """Read and validate a server policy file (see :func:`load_policy`)."""
    policy = load_policy(path, "server")
    if not isinstance(policy, ServerPolicy):
        raise PolicyFileError([Violation(str(path), "kind", "expected a server policy")])
    return policy


def load_site_policy(path: str | Path) -> SitePolicy:
    """Read and validate a site policy file (see :func:`load_policy`)."""
    policy = load_policy(path, "site")
    if not isinstance(policy, SitePolicy):
        raise PolicyFileError([Violation(str(path), "kind", "expected a site policy")])
    return policy


def default_server_policy_path() -> Path:
    """The shipped default server policy file."""
    return DEFAULTS_DIR / "server.toml"


def default_site_policy_path() -> Path:
    """The shipped default site policy file."""
    return DEFAULTS_DIR / "site.toml"


@dataclass(frozen=True, slots=True)
class SitePolicies:
    """Site policies for a simulation: one for all sites, or one per site.

    Attributes
    ----------
    default : SitePolicy or None
        The policy for sites with no file of their own (a single file, or
        ``default.toml`` in a directory).
    by_site : mapping of str to SitePolicy
        Per-site policies keyed by file stem (``site-3.toml`` -> ``"site-3"``).
    """

    default: SitePolicy | None
    by_site: Mapping[str, SitePolicy]

    def for_site(self, site: str | int) -> SitePolicy:
        """The policy of ``site`` (its own, else the default).

        Raises
        ------
        ConfigurationError
            The site has no policy and there is no default.
        """
        key = str(site)
        found = self.by_site.get(key, self.default)
        if found is None:
            known = ", ".join(sorted(self.by_site)) or "none"
            raise ConfigurationError(
                f"no site policy for site {key!r} and no {DEFAULT_SITE_KEY}.toml (policies for: {known})"
            )
        return found


def load_site_policies(path_or_dir: str | Path) -> SitePolicies:
    """Read one site policy for all sites, or a directory of ``<site>.toml`` files.

    In a directory, each ``*.toml`` file is the policy of the site named by
    its stem; ``default.toml`` (if present) applies to every other site.
    Problems of all files are reported together.

    Raises
    ------
    PolicyFileError
        Any file is invalid, or the directory holds no ``.toml`` file.
    """
    root = Path(path_or_dir)
    if not root.is_dir():
        return SitePolicies(default=load_site_policy(root), by_site=MappingProxyType({}))
    files = sorted(p for p in root.glob("*.toml") if p.is_file())
    if not files:
        raise PolicyFileError([Violation(str(root), "<file>", "no *.toml site policy files")])
    violations: list[Violation] = []
    policies: dict[str, SitePolicy] = {}
    for file in files:
        try:
            policies[file.stem] = load_site_policy(file)
        except PolicyFileError as exc:
            violations.extend(exc.violations)
    if violations:
        raise PolicyFileError(violations)
    default = policies.pop(DEFAULT_SITE_KEY, None)
    return SitePolicies(default=default, by_site=MappingProxyType(policies))


def canonical_dump(policy: Policy) -> bytes:
    """The canonical encoding hashed by :func:`policy_hash` (UTF-8 JSON, sorted keys)."""
    return json.dumps(
        to_plain(policy), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def policy_hash(policy: Policy) -> str:
    """SHA-256 (hex) of :func:`canonical_dump`: the policy's identity in the audit log."""
    return hashlib.sha256(canonical_dump(policy)).hexdigest()
