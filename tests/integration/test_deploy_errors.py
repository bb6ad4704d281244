"""A deployment that survives: crash-clean processes and one clear line for each failure.

Through the command lines, as a user runs them: ``fedseal-server start``/``resume`` and
``fedseal-client start`` against a real SuperLink (TLS, node authentication) or a plain TLS
listener. Each failure is one line naming the cause and the fix, with its exit code, no
traceback and no hang; a killed coordinator leaves no Flower process behind.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from deployment import alive, descendants, free_port, wait_for

from client.run_end import mark_run_finished
from common.env import SAFE_FLOWER_ENV
from common.pki import CertPaths, make_node_key

pytestmark = pytest.mark.deployment
BIN = Path(sys.executable).parent
ENV = {**os.environ, **SAFE_FLOWER_ENV}


def _run(*argv: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True, timeout=timeout_s, env=ENV
    )


def _one_clear_line(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    """The ``error:`` line of a failed command: the exit code, every needle, no traceback."""
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# --- certificates --------------------------------------------------------------------------


@dataclass(frozen=True)
class Certs:
    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / "ca.crt"

    def issue(
        self,
        out: Path,
        hosts: tuple[str, ...] = ("127.0.0.1",),
        *,
        valid_from: dt.timedelta = dt.timedelta(minutes=-5),
        valid_for: dt.timedelta = dt.timedelta(days=1),
    ) -> tuple[Path, Path]:
        """A server certificate (and key) signed by this CA, for ``hosts``, valid as given."""
        import ipaddress

        ca_key = serialization.load_pem_private_key((self.directory / "ca.key").read_bytes(), None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        ca_cert = x509.load_pem_x509_certificate(self.ca.read_bytes())
        key = ec.generate_private_key(ec.SECP384R1())
        sans: list[x509.GeneralName] = []
        for h in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                sans.append(x509.DNSName(h))
        start = dt.datetime.now(dt.UTC) + valid_from
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + valid_for)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(ca_key, hashes.SHA384())
        )
        out.mkdir(parents=True, exist_ok=True)
        (out / "server.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (out / "server.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        (out / "server.key").chmod(0o600)
        (out / "ca.crt").write_bytes(self.ca.read_bytes())
        return out / "server.crt", out / "server.key"


def _make_certs(directory: Path) -> Certs:
    proc = _run("fedseal-server", "certs", str(directory))
    assert proc.returncode == 0, proc.stderr
    return Certs(directory)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return _make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """A second `fedseal-server certs` run: another CA."""
    return _make_certs(tmp_path_factory.mktemp("other-certs"))


@contextmanager
def tls_listener(cert: Path, key: Path, port: int | None = None) -> Iterator[int]:
    """A plain TLS server on loopback (handshakes, then closes): stands in for a SuperLink."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port or 0))
    server.listen()
    server.settimeout(0.2)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            conn.settimeout(5)
            try:
                with ctx.wrap_socket(conn, server_side=True):
                    pass
            except OSError:
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(server.getsockname()[1])
    finally:
        done.set()
        thread.join(timeout=5)
        server.close()


@pytest.fixture(scope="module")
def site_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "site.csv"
    path.write_text("a,label\n1,0\n2,1\n")
    return path


def _site(
    data: Path, state: Path, port: int, *, ca: Path | None, extra: tuple[str, ...] = ()
) -> list[str]:
    argv = [
        str(BIN / "fedseal-client"),
        "start",
        "--data",
        str(data),
        "--superlink",
        f"127.0.0.1:{port}",
        "--port",
        str(free_port()),
        "--state-dir",
        str(state),
        "--dataset-id",  # the shipped default policy requires DP: the budget needs an identity
        "site",
        *extra,
    ]
    return [*argv, "--ca", str(ca)] if ca is not None else [*argv, "--insecure"]


# --- TLS at the site: a preflight handshake, one line per cause ------------------------------


def test_client_start_garbage_ca_one_clear_line_at_once(tmp_path: Path, site_data: Path) -> None:
    garbage = tmp_path / "ca.crt"
    garbage.write_text(
        "-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n"
    )
    started = time.monotonic()
    argv = _site(site_data, tmp_path / "s", free_port(), ca=garbage)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=ENV)
    _one_clear_line(proc, 2, f"CA file {garbage} holds no readable PEM certificate", "ca.crt")
    assert time.monotonic() - started < 30  # no retrying, no hang


@pytest.mark.parametrize(
    ("case", "needles"),
    [
        ("wrong-ca", ("not signed by the CA", "another `fedseal-server certs` run")),
        ("name-mismatch", ("not valid for 127.0.0.1", "it names elsewhere.example", "--host")),
        ("expired", ("certificate expired on", "fedseal-server certs DIR --force")),
        ("not-yet-valid", ("not valid before", "clock")),
    ],
)
def test_client_start_tls_failure_one_clear_line(
    case: str,
    needles: tuple[str, ...],
    certs: Certs,
    other_certs: Certs,
    site_data: Path,
    tmp_path: Path,
) -> None:
    """The SuperLink's certificate is refused before any SuperNode starts, naming why."""
    ca = certs.ca
    if case == "wrong-ca":
        cert, key = certs.issue(tmp_path / "srv")
        ca = other_certs.ca
    elif case == "name-mismatch":
        cert, key = certs.issue(tmp_path / "srv", ("elsewhere.example",))
    elif case == "expired":
        cert, key = certs.issue(
            tmp_path / "srv", valid_from=dt.timedelta(days=-30), valid_for=dt.timedelta(days=1)
        )
    else:
        cert, key = certs.issue(tmp_path / "srv", valid_from=dt.timedelta(days=2))
    with tls_listener(cert, key) as port:
        argv = _site(site_data, tmp_path / "s", port, ca=ca, extra=("--max-retries", "1"))
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=ENV)
    _one_clear_line(proc, 2, *needles)
    assert "SuperNode started" not in proc.stdout


def test_client_start_waits_for_a_late_superlink_then_connects(
    certs: Certs, site_data: Path, tmp_path: Path
) -> None:
    """Coordinator not up yet: the site waits (progress lines), then its TLS check passes."""
    port = free_port()
    cert, key = certs.issue(tmp_path / "srv")
    log = tmp_path / "site.log"
    with log.open("wb") as fh:
        site = subprocess.Popen(
            _site(site_data, tmp_path / "s", port, ca=certs.ca),
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=ENV,
        )
    try:
        wait_for(log, "waiting for it: retry 2 in", site, 60)
        with tls_listener(cert, key, port):
            wait_for(log, f"SuperLink at 127.0.0.1:{port} answers (TLS verified", site, 30)
            wait_for(log, "SuperNode started", site, 30)
        site.send_signal(signal.SIGTERM)
        assert site.wait(timeout=30) == 0
    finally:
        site.kill()
        site.wait()
    text = log.read_text()
    assert "cannot reach the SuperLink at" in text and "Traceback" not in text


def test_client_start_unreachable_with_max_retries_gives_up_one_clear_line(
    site_data: Path, tmp_path: Path
) -> None:
    port = free_port()
    argv = _site(site_data, tmp_path / "s", port, ca=None, extra=("--max-retries", "2"))
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=ENV)
    _one_clear_line(
        proc, 1, f"cannot reach the SuperLink at 127.0.0.1:{port}", "gave up after 3 attempts"
    )
    assert proc.stderr.count("waiting for it: retry") == 2


# --- the coordinator's own TLS material --------------------------------------------------------


@pytest.fixture(scope="module")
def audit_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    keys = tmp_path_factory.mktemp("audit") / "keys"
    assert _run("fedseal-server", "keys", str(keys)).returncode == 0
    return keys


def _server_start(
    certs_dir: Path, tmp_path: Path, audit_keys: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    return _run(
        "fedseal-server",
        "start",
        "--allow-no-dropout",  # these runs never get that far; the flag keeps the cohort check out
        "--certs",
        str(certs_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(free_port()),
        "--state-dir",
        str(tmp_path / "srv"),
        "--keys",
        str(audit_keys),
        *extra,
    )


@pytest.mark.parametrize(
    ("case", "needles"),
    [
        ("expired", ("server certificate", "expired on", "fedseal-server certs DIR --force")),
        ("not-yet-valid", ("server certificate", "is not valid before", "clock")),
        ("other-ca", ("is not signed by the CA", "one `fedseal-server certs` run")),
        ("key-mismatch", ("does not match the certificate", "server.key made with it")),
    ],
)
def test_server_start_bad_tls_material_one_clear_line(
    case: str,
    needles: tuple[str, ...],
    certs: Certs,
    other_certs: Certs,
    audit_keys: Path,
    tmp_path: Path,
) -> None:
    out = tmp_path / "c"
    if case == "expired":
        certs.issue(out, valid_from=dt.timedelta(days=-30), valid_for=dt.timedelta(days=1))
    elif case == "not-yet-valid":
        certs.issue(out, valid_from=dt.timedelta(days=2))
    elif case == "other-ca":
        other_certs.issue(out)
        (out / "ca.crt").write_bytes(certs.ca.read_bytes())
    else:
        certs.issue(out)
        (out / "server.key").write_bytes((other_certs.directory / "server.key").read_bytes())
    proc = _server_start(out, tmp_path, audit_keys)
    _one_clear_line(proc, 2, *needles)
    assert not (tmp_path / "srv" / "superlink.log").exists()  # nothing was launched


# --- an unwritable --db, before anything launches ----------------------------------------------


@pytest.mark.parametrize("case", ["directory", "missing-parent", "read-only-dir"])
def test_server_start_unwritable_db_one_clear_line(
    case: str, certs: Certs, audit_keys: Path, tmp_path: Path
) -> None:
    if case == "directory":
        db = tmp_path / "record.db"
        db.mkdir()
        needles: tuple[str, ...] = (f"--db {db} is a directory",)
    elif case == "missing-parent":
        db = tmp_path / "nowhere" / "record.db"
        needles = (f"directory {db.parent} does not exist",)
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes anywhere: no unwritable directory to test with")
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        db = locked / "record.db"
        needles = (f"directory {locked} is not writable",)
    proc = _server_start(certs.directory, tmp_path, audit_keys, "--db", str(db))
    _one_clear_line(proc, 2, *needles)
    assert not (tmp_path / "srv").exists()  # checked before anything was made or launched


def test_server_resume_db_directory_one_clear_line(tmp_path: Path) -> None:
    db = tmp_path / "record.db"
    db.mkdir()
    proc = _run(
        "fedseal-server",
        "resume",
        "0123abcd",
        "--insecure",
        "--state-dir",
        str(tmp_path / "srv"),
        "--db",
        str(db),
    )
    _one_clear_line(proc, 2, f"--db {db} is a directory")


# --- against a real SuperLink: node authentication, stopping, the run's end ----------------------


@dataclass
class Link:
    port: int
    certs: Certs
    key: Path  # a registered site's private key


@pytest.fixture(scope="module")
def link(certs: Certs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Link]:
    """fedseal's SuperLink (TLS, node authentication, one registered key), for the module."""
    from server.deploy import LinkSettings, SuperLink

    root = tmp_path_factory.mktemp("link")
    key, pub = make_node_key(root / "site0")
    port = free_port()
    settings = LinkSettings(
        host="127.0.0.1",
        port=port,
        state_dir=root / "srv",
        certs=CertPaths.in_dir(certs.directory),
        auth_keys=(pub,),
        startup_timeout_s=120,
    )
    with SuperLink(settings):
        yield Link(port, certs, key)


def test_client_start_unregistered_key_says_not_registered(
    link: Link, site_data: Path, tmp_path: Path
) -> None:
    stranger, _ = make_node_key(tmp_path / "stranger")
    argv = _site(
        site_data, tmp_path / "s", link.port, ca=link.certs.ca, extra=("--auth-key", str(stranger))
    )
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=ENV)
    _one_clear_line(proc, 1, "its public key is not registered with the coordinator")


def test_client_start_without_key_on_node_auth_superlink_one_clear_line(
    link: Link, site_data: Path, tmp_path: Path
) -> None:
    """Node authentication on, no --auth-key: the SuperLink refuses self-registration (2001)."""
    argv = _site(site_data, tmp_path / "s", link.port, ca=link.certs.ca)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=ENV)
    _one_clear_line(proc, 1, "admits only registered node keys and this site gave none")


def test_client_start_other_supernode_failure_is_not_called_unregistered(
    link: Link, site_data: Path, tmp_path: Path
) -> None:
    """A node key Flower cannot use is named as such, not as an unregistered key."""
    bad = tmp_path / "bad.key"
    bad.write_text("not a key\n")
    argv = _site(
        site_data, tmp_path / "s", link.port, ca=link.certs.ca, extra=("--auth-key", str(bad))
    )
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=ENV)
    line = _one_clear_line(proc, 1, f"node key {bad} is not an elliptic-curve private key")
    assert "registered" not in line


def _start_site(
    link: Link, site_data: Path, tmp_path: Path
) -> tuple[subprocess.Popen[bytes], Path]:
    log = tmp_path / "site.log"
    argv = _site(
        site_data, tmp_path / "s", link.port, ca=link.certs.ca, extra=("--auth-key", str(link.key))
    )
    with log.open("wb") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=ENV)
    wait_for(log, "SuperNode ID:", proc, 90)  # connected: the SuperLink activated the node
    return proc, log


def test_client_start_sigterm_stops_the_site_within_2_s(
    link: Link, site_data: Path, tmp_path: Path
) -> None:
    site, log = _start_site(link, site_data, tmp_path)
    tree = descendants(site.pid)
    try:
        assert tree  # the supervisor, flower-supernode, its superexec
        started = time.monotonic()
        site.send_signal(signal.SIGTERM)
        code = site.wait(timeout=30)
        took = time.monotonic() - started
        assert code == 0, log.read_text()[-3000:]
        assert took < 2.0, f"took {took:.1f} s"
        assert [p for p in tree if alive(p)] == []
        assert "stopped on request" in log.read_text()
    finally:
        site.kill()
        _kill_all(tree)


def test_client_start_exits_when_its_run_finished(
    link: Link, site_data: Path, tmp_path: Path
) -> None:
    """The run-finished marker (written once the final audit head is witnessed) ends the site."""
    site, log = _start_site(link, site_data, tmp_path)
    tree = descendants(site.pid)
    try:
        mark_run_finished(tmp_path / "s" / "site", "run-0042")
        assert site.wait(timeout=30) == 0, log.read_text()[-3000:]
        assert "run run-0042 ended: SuperNode stopped, site exits" in log.read_text()
        deadline = time.monotonic() + 5
        while [p for p in tree if alive(p)] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [p for p in tree if alive(p)] == []
    finally:
        site.kill()
        _kill_all(tree)


# --- a killed coordinator leaves nothing behind ---------------------------------------------------


def test_server_cli_sigkilled_leaves_no_flower_process_and_port_free(
    certs: Certs, audit_keys: Path, tmp_path: Path
) -> None:
    """kill -9 of `fedseal-server start`: SuperLink, superexec, serverapp and `flwr run` die too."""
    from common.processes import check_port_free

    port = free_port()
    log = tmp_path / "server.log"
    argv = [
        str(BIN / "fedseal-server"),
        "start",
        "--allow-no-dropout",
        "--certs",
        str(certs.directory),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--state-dir",
        str(tmp_path / "srv"),
        "--keys",
        str(audit_keys),
        "--rounds",
        "1",
        "--min-sites",
        "2",
    ]
    with log.open("wb") as fh:
        server = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=ENV)
    tree: list[int] = []
    try:
        wait_for(log, "SuperLink listening", server, 120)
        # `flwr run` submitted the app: the SuperLink started a ServerApp process for it
        deadline = time.monotonic() + 60
        while not any("flwr-serverapp" in _cmdline(p) for p in descendants(server.pid)):
            assert server.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)
        tree = descendants(server.pid)
        server.kill()
        server.wait(timeout=10)
        deadline = time.monotonic() + 15
        while (left := [p for p in tree if alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert left == [], f"left running: {left}"
        check_port_free("127.0.0.1", port)  # at once free for `fedseal-server resume`
    finally:
        server.kill()
        _kill_all(tree)
