"""Flower's Deployment Engine on loopback: fedseal-server (SuperLink + ServerApp, TLS) and two sites."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

pytestmark = pytest.mark.deployment
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_site_csv(path: Path, start: int) -> None:
    d = load_digits()
    idx = np.arange(start, len(d.target), 2)[:500]
    rows = [",".join([f"f{j}" for j in range(64)] + ["label"])]
    rows += [",".join(str(v) for v in d.data[k]) + f",{d.target[k]}" for k in idx]
    path.write_text("\n".join(rows) + "\n")


def _start(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as fh:
        return subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def _make_audit_key(state_dir: Path) -> None:
    """The coordinator's signing key where `start` looks by default (it is never made implicitly)."""
    subprocess.run([str(BIN / "fedseal-server"), "keys", str(state_dir / "keys")], check=True, capture_output=True)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            continue


def test_deployment_tls_node_auth_two_sites_two_rounds_complete(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    subprocess.run([str(BIN / "fedseal-server"), "certs", str(certs)], check=True, capture_output=True)
    assert oct((certs / "server.key").stat().st_mode & 0o777) == "0o600"
    keys, stranger = tmp_path / "allowed", tmp_path / "stranger"
    for stem in (keys / "site0", keys / "site1", stranger / "site9"):
        subprocess.run([str(BIN / "fedseal-client"), "keys", str(stem)], check=True, capture_output=True)
    for i in range(2):
        _write_site_csv(tmp_path / f"site{i}.csv", i)
    # the coordinator's audit key, made beforehand so that the sites can pin it
    audit_keys = tmp_path / "audit-keys"
    subprocess.run([str(BIN / "fedseal-server"), "keys", str(audit_keys)], check=True, capture_output=True)
    port = _free_port()
    out = tmp_path / "out"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        server = _start(
            [str(BIN / "fedseal-server"), "start", "--certs", str(certs), "--host", "127.0.0.1",
             "--port", str(port), "--rounds", "2", "--min-sites", "2", "--round-timeout", "150",
             "--state-dir", str(tmp_path / "srv"), "--out", str(out), "--auth-keys", str(keys),
             "--keys", str(audit_keys), "--dp", "--secagg"],
            tmp_path / "server.log",
        )
        procs.append(server)
        # "SuperLink listening" is printed once the SuperLink is up and site keys are registered.
        deadline = time.monotonic() + 90
        while "SuperLink listening" not in (tmp_path / "server.log").read_text():
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline, "SuperLink did not come up"
            time.sleep(0.3)
        for i in range(2):
            procs.append(
                _start(
                    [str(BIN / "fedseal-client"), "start", "--data", str(tmp_path / f"site{i}.csv"),
                     "--superlink", f"127.0.0.1:{port}", "--ca", str(certs / "ca.crt"),
                     "--port", str(_free_port()), "--state-dir", str(tmp_path / f"site{i}"),
                     "--auth-key", str(keys / f"site{i}"), "--server-key", str(audit_keys / "audit.pub")],
                    tmp_path / f"site{i}.log",
                )
            )
        # A site whose key the coordinator never allow-listed is refused.
        intruder = subprocess.run(
            [str(BIN / "fedseal-client"), "start", "--data", str(tmp_path / "site0.csv"),
             "--superlink", f"127.0.0.1:{port}", "--ca", str(certs / "ca.crt"),
             "--port", str(_free_port()), "--state-dir", str(tmp_path / "site9"),
             "--auth-key", str(stranger / "site9")],
            capture_output=True, text=True, timeout=120,
        )
        assert intruder.returncode == 1
        assert "not registered" in intruder.stderr, intruder.stderr[-2000:]
        code = server.wait(timeout=240)
        log = (tmp_path / "server.log").read_text()
        assert code == 0, log[-4000:]
        doc = json.loads((out / "result.json").read_text())
        assert [r["round"] for r in doc["rounds"]] == [1, 2]
        assert all(r["participants"] == 2 for r in doc["rounds"])
        assert all(r["secagg"]["participants"] == 2 for r in doc["rounds"])
        eps = [s["record_level_epsilon"] for r in doc["rounds"] for s in r["sites"]]
        assert all(e is not None and 0 < e <= 8.0 for e in eps)  # DP-SGD ran at both sites
        assert doc["rounds"][-1]["accuracy"] > 0.5
        verify = subprocess.run(
            [str(BIN / "fedseal-server"), "audit", "verify", "--db", str(tmp_path / "srv" / "record.db"),
             "--public-key", str(audit_keys / "audit.pub")],
            capture_output=True, text=True, timeout=60,
        )
        assert verify.returncode == 0 and verify.stdout.startswith("OK:"), verify.stdout + verify.stderr
        # every message (each in a fresh ClientApp process) was verified under the pinned key,
        # and the final signed head reached both sites after the run ended
        from client.witness import read_heads

        seq_files = [tmp_path / f"site{i}" / "site" / "instruction-seq.json" for i in range(2)]
        assert all(f.is_file() for f in seq_files)
        from server.record import SqlRecord

        with SqlRecord(f"sqlite:///{tmp_path / 'srv' / 'record.db'}", create=False) as record:
            final, last = record.latest_seal(), record.events()[-1]
        assert final is not None and last.kind == "run_finished" and final.seq == last.seq
        for i in range(2):
            assert read_heads(tmp_path / f"site{i}" / "site" / "witnessed-heads.jsonl")[-1] == final
    finally:
        for p in procs:
            _kill(p)


def test_server_start_missing_certs_one_clear_line(tmp_path: Path) -> None:
    _make_audit_key(tmp_path / "srv")
    proc = subprocess.run(
        [str(BIN / "fedseal-server"), "start", "--certs", str(tmp_path / "none"), "--port", str(_free_port()),
         "--state-dir", str(tmp_path / "srv")],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "missing TLS files" in proc.stderr and "Traceback" not in proc.stderr


def test_server_start_port_in_use_one_clear_line(tmp_path: Path) -> None:
    subprocess.run([str(BIN / "fedseal-server"), "certs", str(tmp_path / "c")], check=True, capture_output=True)
    _make_audit_key(tmp_path / "srv")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = subprocess.run(
            [str(BIN / "fedseal-server"), "start", "--certs", str(tmp_path / "c"), "--host", "127.0.0.1",
             "--port", str(port), "--state-dir", str(tmp_path / "srv")],
            capture_output=True, text=True, timeout=60,
        )
    assert proc.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr and "Traceback" not in proc.stderr


def test_server_start_without_audit_key_one_clear_line_and_no_key_made(tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(BIN / "fedseal-server"), "start", "--insecure", "--port", str(_free_port()),
         "--state-dir", str(tmp_path / "srv")],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert f"fedseal-server keys {tmp_path / 'srv' / 'keys'}" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "srv" / "keys").exists()


def test_client_start_unreachable_superlink_one_clear_line(tmp_path: Path) -> None:
    data = tmp_path / "d.csv"
    data.write_text("a,label\n1,0\n")
    proc = subprocess.run(
        [str(BIN / "fedseal-client"), "start", "--data", str(data), "--superlink", f"127.0.0.1:{_free_port()}",
         "--insecure", "--port", str(_free_port()), "--state-dir", str(tmp_path / "s")],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 1
    assert "cannot reach the SuperLink" in proc.stderr and "Traceback" not in proc.stderr


def test_server_start_without_tls_choice_refused(tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(BIN / "fedseal-server"), "start", "--state-dir", str(tmp_path / "srv")],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2 and "--insecure" in proc.stderr
