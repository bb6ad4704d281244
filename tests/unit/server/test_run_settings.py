"""A deployed run's settings: recorded at ``start``, read back and held to by ``resume``.

``fedseal-server start``/``resume`` run through typer's CliRunner with
``server.cli.serve`` replaced by a spy (nothing is started); the ServerApp's
side (``server.app.open_run`` and the RunBook) runs in-process on a SQLite
record. Each refusal is one line naming what is missing or different.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from typer.testing import CliRunner

import server.cli as server_cli
from common.config import RunConfig
from common.errors import ConfigurationError
from common.pki import make_certs, make_node_key
from policies import load_server_policy, policy_hash
from server.app import ServerSettings, open_run
from server.book import RunBook
from server.deploy import LinkSettings, SuperLink
from server.record import SqlRecord
from server.record.keys import create_keypair, load_private_key, load_public_key
from server.run_settings import (
    RUN_SETTINGS_EVENT,
    DeploymentSettings,
    check_resume,
    differences,
    node_key,
    recorded_settings,
    signing_key_fingerprint,
)

POLICY = 'kind = "server"\nname = "unit"\n[secure_aggregation]\nrequired = false\n'


@dataclass
class Coordinator:
    """A coordinator's files: certificates, signing key, allow-listed keys, policy, record."""

    root: Path
    certs: Path
    keys: Path
    allowed: Path
    policy: Path
    state: Path

    @property
    def db(self) -> Path:
        return self.state / "record.db"

    def common(self) -> list[str]:
        return [
            "--state-dir",
            str(self.state),
            "--db",
            str(self.db),
            "--host",
            "127.0.0.1",
            "--port",
            "9",
        ]


@pytest.fixture()
def coordinator(tmp_path: Path) -> Coordinator:
    certs = tmp_path / "certs"
    make_certs(certs, ["127.0.0.1"])
    create_keypair(tmp_path / "keys")
    allowed = tmp_path / "allowed"
    for i in range(3):
        make_node_key(allowed / f"site{i}")
    policy = tmp_path / "server.toml"
    policy.write_text(POLICY)
    return Coordinator(tmp_path, certs, tmp_path / "keys", allowed, policy, tmp_path / "srv")


class Spy:
    """Stands in for ``server.cli.serve``: keeps what it was handed, starts no process.

    For a resume it plays the resumed ServerApp on what the app would receive
    (the run_config keys): open the run, reopen its book, end it.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[LinkSettings, RunConfig, ServerSettings]] = []
        self.play = True

    def __call__(self, link: LinkSettings, cfg: RunConfig, settings: ServerSettings) -> int:
        self.calls.append((link, cfg, settings))
        if settings.resume_run_id and self.play:
            chosen = ServerSettings.from_flower(settings.to_flower())
            policy = load_server_policy(chosen.policy_path) if chosen.policy_path else None
            _, book, _ = open_run(None, chosen, {}, policy)
            try:
                book.resume()
                book.finish()
            finally:
                book.record.close()
        return 0


@pytest.fixture()
def spy(monkeypatch: pytest.MonkeyPatch) -> Spy:
    spy = Spy()
    monkeypatch.setattr(server_cli, "serve", spy)
    return spy


def _invoke(*args: str) -> Any:
    return CliRunner().invoke(server_cli.app, list(args))


def _started(c: Coordinator, spy: Spy, *extra: str) -> str:
    """``fedseal-server start`` as the command line and then the ServerApp run it: the run id."""
    result = _invoke(
        "start",
        "--allow-no-dropout",  # a two-site secure run (this file tests settings, not cohorts)
        "--certs",
        str(c.certs),
        "--keys",
        str(c.keys),
        "--auth-keys",
        str(c.allowed),
        "--policy",
        str(c.policy),
        "--rounds",
        "2",
        *c.common(),
        *extra,
    )
    assert spy.calls, result.output  # the spy returned 0 without a result.json: start then errs
    link, cfg, settings = spy.calls.pop()
    assert "--enable-supernode-auth" in SuperLink(link).argv() and link.fresh_state
    # What the ServerApp receives: the run_config keys of the generated app.
    chosen = ServerSettings.from_flower(settings.to_flower())
    policy = load_server_policy(chosen.policy_path) if chosen.policy_path else None
    run_cfg, book, _ = open_run(cfg, chosen, {}, policy)
    try:
        book.start(asdict(run_cfg), policy_hash(policy) if policy is not None else None)
    finally:
        book.record.close()
    return book.run_id


def _events(c: Coordinator, run_id: str) -> list[Any]:
    with SqlRecord(f"sqlite:///{c.db}", create=False) as record:
        return record.events(run_id)


def _resume(c: Coordinator, run_id: str, *args: str) -> Any:
    return _invoke("resume", run_id, *c.common(), *args)


def _one_line_refusal(result: Any, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot resume run"), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in result.output


# ---------------------------------------------------------------- values


def test_node_key_fingerprint_is_openssh_sha256_whatever_the_key_form(tmp_path: Path) -> None:
    _, pub = make_node_key(tmp_path / "n")
    line = pub.read_text()
    pem = serialization.load_ssh_public_key(line.encode()).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    a, b = node_key(line), node_key(pem)
    assert a == b and a.fingerprint.startswith("SHA256:") and "=" not in a.fingerprint
    if shutil.which("ssh-keygen"):
        listed = subprocess.run(["ssh-keygen", "-lf", str(pub)], capture_output=True, text=True)
        assert a.fingerprint in listed.stdout


def test_settings_round_trip_json_and_audit_payload(coordinator: Coordinator) -> None:
    keys = tuple(sorted(node_key(p.read_bytes()) for p in coordinator.allowed.glob("*.pub")))
    settings = DeploymentSettings(
        tls=True,
        ca_cert_sha256="a" * 64,
        server_cert_sha256="b" * 64,
        node_auth=True,
        auth_keys_dir=str(coordinator.allowed),
        auth_keys=keys,
        policy_path="/p.toml",
        policy_sha256="c" * 64,
        signing_key_sha256="d" * 64,
    )
    assert DeploymentSettings.from_json(settings.to_json()) == settings
    assert DeploymentSettings.from_payload(settings.to_payload()) == settings
    assert differences(settings, settings) == []


def test_recorded_key_whose_fingerprint_was_swapped_is_refused(coordinator: Coordinator) -> None:
    a, b = (node_key(p.read_bytes()) for p in sorted(coordinator.allowed.glob("*.pub"))[:2])
    payload = DeploymentSettings(tls=True, node_auth=True, auth_keys=(a,)).to_payload()
    payload["auth_keys"][0]["fingerprint"] = b.fingerprint
    with pytest.raises(ConfigurationError, match="does not match its key"):
        DeploymentSettings.from_payload(payload)


def test_differences_name_each_changed_setting() -> None:
    start = DeploymentSettings(
        tls=True,
        ca_cert_sha256="a" * 64,
        server_cert_sha256="b" * 64,
        node_auth=True,
        auth_keys=(),
        policy_path="/p.toml",
        policy_sha256="c" * 64,
        signing_key_sha256="d" * 64,
    )
    insecure = DeploymentSettings(tls=False)
    found = " | ".join(differences(start, insecure))
    assert "TLS: the run started with TLS" in found
    assert "node authentication: on at the run's start, off" in found
    assert "server policy: the run started with /p.toml" in found
    with pytest.raises(ConfigurationError, match="^cannot resume run r1: TLS"):
        check_resume("r1", start, insecure)


# ---------------------------------------------------------------- start


def test_start_records_its_settings_sealed_right_after_run_started(
    coordinator: Coordinator, spy: Spy
) -> None:
    run_id = _started(coordinator, spy)
    events = _events(coordinator, run_id)
    kinds = [e.kind for e in events]
    assert kinds[:2] == ["run_started", RUN_SETTINGS_EVENT]
    settings = recorded_settings(events)
    assert settings is not None and settings.tls and settings.node_auth
    assert {k.key for k in settings.auth_keys} == {
        node_key(p.read_bytes()).key for p in coordinator.allowed.glob("*.pub")
    }
    assert settings.auth_keys_dir == str(coordinator.allowed.resolve())
    assert settings.policy_path == str(coordinator.policy.resolve())
    assert settings.policy_sha256 == policy_hash(load_server_policy(coordinator.policy))
    assert settings.signing_key_sha256 == signing_key_fingerprint(
        load_public_key(coordinator.keys / "audit.pub")
    )
    with SqlRecord(f"sqlite:///{coordinator.db}", create=False) as record:
        assert record.verify(load_public_key(coordinator.keys / "audit.pub")).ok


# ---------------------------------------------------------------- resume


def test_resume_relaunches_with_the_recorded_allow_list_policy_tls_and_key(
    coordinator: Coordinator, spy: Spy
) -> None:
    run_id = _started(coordinator, spy)
    result = _resume(
        coordinator, run_id, "--certs", str(coordinator.certs), "--keys", str(coordinator.keys)
    )
    assert result.exit_code == 0, result.output
    ((link, _, settings),) = spy.calls
    argv = SuperLink(link).argv()
    assert "--enable-supernode-auth" in argv and "--insecure" not in argv
    assert not link.fresh_state  # the crashed SuperLink's state: the sites reconnect by themselves
    recorded = recorded_settings(_events(coordinator, run_id))
    assert recorded is not None
    assert tuple(sorted(node_key(p.read_bytes()) for p in link.auth_keys)) == recorded.auth_keys
    assert settings.resume_run_id == run_id
    assert settings.policy_path == coordinator.policy.resolve()
    assert settings.deployment is not None and settings.deployment.resumed
    assert differences(recorded, settings.deployment) == []


def test_resume_with_the_same_auth_keys_directory_given_again(
    coordinator: Coordinator, spy: Spy
) -> None:
    run_id = _started(coordinator, spy)
    copy = coordinator.root / "allowed-again"
    shutil.copytree(coordinator.allowed, copy)
    result = _resume(
        coordinator,
        run_id,
        "--certs",
        str(coordinator.certs),
        "--keys",
        str(coordinator.keys),
        "--auth-keys",
        str(copy),
        "--policy",
        str(coordinator.policy),
    )
    assert result.exit_code == 0, result.output


def _without_one_key(c: Coordinator) -> list[str]:
    partial = c.root / "partial"
    partial.mkdir()
    for pub in sorted(c.allowed.glob("*.pub"))[:2]:
        shutil.copy(pub, partial / pub.name)
    return ["--certs", str(c.certs), "--keys", str(c.keys), "--auth-keys", str(partial)]


def _with_a_stranger(c: Coordinator) -> list[str]:
    more = c.root / "more"
    shutil.copytree(c.allowed, more)
    make_node_key(more / "stranger")
    return ["--certs", str(c.certs), "--keys", str(c.keys), "--auth-keys", str(more)]


def _other_ca(c: Coordinator) -> list[str]:
    make_certs(c.root / "other-certs", ["127.0.0.1"])
    return ["--certs", str(c.root / "other-certs"), "--keys", str(c.keys)]


def _other_policy(c: Coordinator) -> list[str]:
    other = c.root / "other.toml"
    other.write_text(POLICY + "[rounds]\nmax_rounds = 5\n")
    return ["--certs", str(c.certs), "--keys", str(c.keys), "--policy", str(other)]


def _policy_gone(c: Coordinator) -> list[str]:
    c.policy.unlink()
    return ["--certs", str(c.certs), "--keys", str(c.keys)]


def _other_signing_key(c: Coordinator) -> list[str]:
    create_keypair(c.root / "other-keys")
    return ["--certs", str(c.certs), "--keys", str(c.root / "other-keys")]


def _no_public_key(c: Coordinator) -> list[str]:
    (c.root / "empty-keys").mkdir()
    return ["--certs", str(c.certs), "--keys", str(c.root / "empty-keys")]


@pytest.mark.parametrize(
    ("arguments", "needles"),
    [
        (lambda c: ["--insecure", "--keys", str(c.keys)], ["TLS: the run started with TLS"]),
        (
            lambda c: ["--insecure"],
            ["TLS: the run started with TLS", "audit signing key:", "not found"],
        ),
        (_other_ca, ["CA certificate: sha256", "server certificate: sha256"]),
        (_without_one_key, ["node keys: the run's SHA256:", "missing"]),
        (_with_a_stranger, ["not in the run's allow-list"]),
        (_other_policy, ["server policy:", "the run's is"]),
        (_policy_gone, ["server policy: the run started with", "give --policy FILE"]),
        (_other_signing_key, ["audit signing key: sha256", "is not the run's"]),
        (_no_public_key, ["audit signing key:", "not found"]),
    ],
    ids=[
        "insecure",
        "insecure-no-key",
        "other-ca",
        "key-missing",
        "key-added",
        "other-policy",
        "policy-gone",
        "other-signing-key",
        "no-public-key",
    ],
)
def test_resume_refuses_what_differs_from_the_start_in_one_line(
    coordinator: Coordinator, spy: Spy, arguments: Any, needles: list[str]
) -> None:
    run_id = _started(coordinator, spy)
    result = _resume(coordinator, run_id, *arguments(coordinator))
    _one_line_refusal(result, run_id, *needles)
    assert spy.calls == []  # nothing was launched


def test_insecure_run_resumes_only_with_insecure_given_again(
    coordinator: Coordinator, spy: Spy
) -> None:
    result = _invoke(
        "start",
        "--allow-no-dropout",
        "--insecure",
        "--keys",
        str(coordinator.keys),
        *coordinator.common(),
    )
    link, cfg, settings = spy.calls.pop()
    assert "--insecure" in SuperLink(link).argv() and not link.auth_keys, result.output
    coordinator.state.mkdir(parents=True, exist_ok=True)  # the SuperLink would have made it
    run_cfg, book, _ = open_run(cfg, ServerSettings.from_flower(settings.to_flower()), {}, None)
    book.start(asdict(run_cfg), None)
    book.record.close()
    upgraded = _resume(
        coordinator, book.run_id, "--certs", str(coordinator.certs), "--keys", str(coordinator.keys)
    )
    _one_line_refusal(upgraded, "TLS: the run started with --insecure")
    again = _resume(coordinator, book.run_id, "--insecure", "--keys", str(coordinator.keys))
    assert again.exit_code == 0, again.output
    assert "NO TLS (--insecure), no node authentication, no server policy" in again.stdout


def test_resume_refuses_a_run_with_no_recorded_settings(coordinator: Coordinator, spy: Spy) -> None:
    coordinator.state.mkdir()
    record = SqlRecord(f"sqlite:///{coordinator.db}")
    book = RunBook(record, load_private_key(coordinator.keys / "audit.key"), "0000simulated")
    book.start(asdict(RunConfig()), None)  # e.g. a simulation's run: no deployment settings
    record.close()
    result = _resume(coordinator, "0000simulated", "--certs", str(coordinator.certs))
    _one_line_refusal(result, "no deployment settings")
    assert spy.calls == []


# ---------------------------------------------------------------- the ServerApp's own check


def test_server_app_refuses_a_resume_signed_under_another_key(
    coordinator: Coordinator, spy: Spy
) -> None:
    run_id = _started(coordinator, spy)
    spy.play = False  # keep the run interrupted: only what the app would be handed matters
    _resume(coordinator, run_id, "--certs", str(coordinator.certs), "--keys", str(coordinator.keys))
    ((_, _, settings),) = spy.calls
    create_keypair(coordinator.root / "other-keys")
    chosen = ServerSettings.from_flower(
        dataclasses.replace(settings, key_dir=coordinator.root / "other-keys").to_flower()
    )
    with pytest.raises(
        ConfigurationError, match="audit signing key: sha256|not the record.s key in force"
    ):
        open_run(None, chosen, {}, load_server_policy(coordinator.policy))


def test_server_app_refuses_a_deployed_run_resumed_without_settings(
    coordinator: Coordinator, spy: Spy
) -> None:
    run_id = _started(coordinator, spy)
    bare = ServerSettings(
        db_url=f"sqlite:///{coordinator.db}", key_dir=coordinator.keys, resume_run_id=run_id
    )  # e.g. `flwr run` against a SuperLink of one's own
    with pytest.raises(ConfigurationError, match="states no deployment settings"):
        open_run(None, bare, {}, None)


def test_resumed_server_app_records_its_settings_after_run_resumed(
    coordinator: Coordinator, spy: Spy
) -> None:
    run_id = _started(coordinator, spy)
    assert (
        _resume(
            coordinator, run_id, "--certs", str(coordinator.certs), "--keys", str(coordinator.keys)
        ).exit_code
        == 0
    )
    events = _events(coordinator, run_id)
    kinds = [e.kind for e in events]
    assert kinds[-3:] == ["run_resumed", RUN_SETTINGS_EVENT, "run_finished"]
    start, again = (e.payload() for e in events if e.kind == RUN_SETTINGS_EVENT)
    assert again["resumed"] and not start["resumed"]
    assert {**again, "resumed": False} == start


def test_resume_that_does_not_end_the_run_is_an_error(
    coordinator: Coordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = Spy()
    monkeypatch.setattr(server_cli, "serve", spy)
    run_id = _started(coordinator, spy)
    monkeypatch.setattr(server_cli, "serve", lambda *_: 0)  # `flwr run` exits 0, the app failed
    result = _resume(
        coordinator, run_id, "--certs", str(coordinator.certs), "--keys", str(coordinator.keys)
    )
    assert result.exit_code == server_cli.EXIT_RUN_UNFINISHED, result.stderr
    assert f"run {run_id} did not end" in result.stderr and "fedseal-server resume" in result.stderr


# ---------------------------------------------------------------- the SuperLink's registrations


class FakeFlwr:
    """``SuperLink.flwr`` answering ``supernode register``/``list`` from a script."""

    def __init__(self, register: list[tuple[int, str]], nodes: list[dict[str, str]]) -> None:
        self.register = list(register)
        self.nodes = nodes

    def __call__(self, args: list[str], *, check: bool = False, stream: bool = False) -> Any:
        if args[:2] == ["supernode", "register"]:
            code, text = self.register.pop(0)
            return subprocess.CompletedProcess(args, code, text, "")
        return subprocess.CompletedProcess(
            args, 0, json.dumps({"success": True, "nodes": self.nodes}), ""
        )


def _link(tmp_path: Path, fake: FakeFlwr, keys: int = 2) -> SuperLink:
    paths = tuple(make_node_key(tmp_path / f"k{i}")[1] for i in range(keys))
    link = SuperLink(LinkSettings("127.0.0.1", 9, tmp_path, None, paths, fresh_state=False))
    link.flwr = fake  # type: ignore[method-assign]
    return link


def test_registration_accepts_keys_the_reopened_state_already_holds(tmp_path: Path) -> None:
    fake = FakeFlwr(
        [(1, "[code: 23] Public key already in use."), (0, "registered")],
        [{"status": "online"}, {"status": "registered"}, {"status": "unregistered"}],
    )
    _link(tmp_path, fake)._register_keys()


def test_registration_refuses_a_state_with_a_node_beyond_the_allow_list(tmp_path: Path) -> None:
    fake = FakeFlwr(
        [(1, "Public key already in use."), (1, "Public key already in use.")],
        [{"status": "online"}, {"status": "offline"}, {"status": "online"}],
    )
    with pytest.raises(
        ConfigurationError, match="holds 3 registered SuperNodes but the run allow-lists 2"
    ):
        _link(tmp_path, fake)._register_keys()


def test_registration_failure_other_than_already_registered_is_an_error(tmp_path: Path) -> None:
    from common.errors import FedsealError

    fake = FakeFlwr([(1, "connection refused")], [])
    with pytest.raises(FedsealError, match="flwr supernode register"):
        _link(tmp_path, fake)._register_keys()


# ---------------------------------------------------------------- the federation roster


def _roster_file(
    c: Coordinator,
    version: int = 1,
    name: str = "roster.json",
    *,
    coordinator_key: bytes | None = None,
) -> Path:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from common.roster import RosterMember, sign_roster

    authority = Ed25519PrivateKey.from_private_bytes(b"\x31" * 32)
    members = [
        RosterMember(
            f"site-{i}",
            Ed25519PrivateKey.from_private_bytes(bytes([0x60 + i]) * 32)
            .public_key()
            .public_bytes_raw(),
        )
        for i in range(version + 1)
    ]
    own = load_public_key(c.keys / "audit.pub").public_bytes_raw()
    roster = sign_roster(
        federation="unit",
        version=version,
        members=members,
        authority=authority,
        coordinator_key=coordinator_key or own,
    )
    path = c.root / name
    path.write_text(roster.to_json())
    return path


def test_start_with_a_roster_records_it_and_resume_restores_it(
    coordinator: Coordinator, spy: Spy
) -> None:
    roster = _roster_file(coordinator)
    run_id = _started(coordinator, spy, "--roster", str(roster))
    result = _resume(
        coordinator, run_id, "--certs", str(coordinator.certs), "--keys", str(coordinator.keys)
    )
    assert result.exit_code == 0, result.output
    assert "roster of federation 'unit', version 1, 2 members" in result.stdout
    ((_, _, settings),) = spy.calls
    assert settings.roster_path == roster.resolve()  # the recorded path, without --roster
    start, again = (e.payload() for e in _events(coordinator, run_id) if e.kind == "roster")
    assert (
        start["version"] == 1 and start["members"] == 2 and start["path"] == str(roster.resolve())
    )
    assert again["resumed"] and {**again, "resumed": False} == start


@pytest.mark.parametrize("change", ["other-roster", "roster-gone", "roster-added"])
def test_resume_under_another_roster_or_none_refused(
    coordinator: Coordinator, spy: Spy, change: str
) -> None:
    first = _roster_file(coordinator)
    run_id = _started(
        coordinator, spy, *(() if change == "roster-added" else ("--roster", str(first)))
    )
    args = ["--certs", str(coordinator.certs), "--keys", str(coordinator.keys)]
    if change == "other-roster":
        result = _resume(
            coordinator, run_id, *args, "--roster", str(_roster_file(coordinator, 2, "v2.json"))
        )
        _one_line_refusal(result, "version 2", "is not the run's", "version 1")
    elif change == "roster-gone":
        first.unlink()
        _one_line_refusal(
            _resume(coordinator, run_id, *args), "started under the roster", "give --roster FILE"
        )
    else:
        _one_line_refusal(
            _resume(coordinator, run_id, *args, "--roster", str(first)), "started without a roster"
        )
    assert spy.calls == []


def test_server_app_refuses_a_resume_under_another_roster(
    coordinator: Coordinator, spy: Spy
) -> None:
    run_id = _started(coordinator, spy, "--roster", str(_roster_file(coordinator)))
    chosen = ServerSettings(
        db_url=f"sqlite:///{coordinator.db}",
        key_dir=coordinator.keys,
        resume_run_id=run_id,
        roster_path=_roster_file(coordinator, 2, "v2.json"),
    )
    with pytest.raises(ConfigurationError, match="cannot resume run .* is not the run's"):
        open_run(
            None,
            dataclasses.replace(chosen, deployment=_recorded(coordinator, run_id)),
            {},
            load_server_policy(coordinator.policy),
        )


def _recorded(c: Coordinator, run_id: str) -> DeploymentSettings:
    found = recorded_settings(_events(c, run_id))
    assert found is not None
    return dataclasses.replace(found, resumed=True)


def test_start_refuses_a_roster_naming_another_coordinator_key_or_tampered(
    coordinator: Coordinator, spy: Spy
) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    stranger = Ed25519PrivateKey.from_private_bytes(b"\x41" * 32).public_key().public_bytes_raw()
    other = _roster_file(coordinator, coordinator_key=stranger, name="other.json")
    base = [
        "start",
        "--allow-no-dropout",
        "--certs",
        str(coordinator.certs),
        "--keys",
        str(coordinator.keys),
        *coordinator.common(),
    ]
    result = _invoke(*base, "--roster", str(other))
    assert result.exit_code == 2 and "names coordinator key" in result.stderr, result.output
    tampered = coordinator.root / "tampered.json"
    doc = json.loads(_roster_file(coordinator).read_text())
    doc["members"].pop()
    tampered.write_text(json.dumps(doc))
    result = _invoke(*base, "--roster", str(tampered))
    assert result.exit_code == 2 and "signature does not verify" in result.stderr, result.output
    assert spy.calls == []
