"""The site's preflight: is the coordinator's SuperLink there, and does its TLS check out?

``fedseal-client start`` makes one TLS handshake with Python's ``ssl`` to the
SuperLink address, under the coordinator CA it was given (chain and host name
verified, as the SuperNode will), before it starts a SuperNode. A failure
that retrying cannot mend (a CA from another ``fedseal-server certs`` run, an
unreadable CA file, a certificate for another name, an expired or
not-yet-valid certificate, a SuperLink without TLS) is one line naming the
cause and the fix (:class:`~common.errors.ConfigurationError`); a SuperLink
that is not up yet is waited for (:func:`wait_for_superlink`), as
``--max-retries`` and ``--max-wait-time`` say.

This is a probe only: no byte of Flower's protocol is sent, and the
SuperNode makes its own connection afterwards.
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path

from cryptography import x509

from common.errors import ConfigurationError, FedsealError

PROBE_TIMEOUT_S = 5.0
FIRST_DELAY_S = 0.5
MAX_DELAY_S = 5.0

# OpenSSL's X509_V_ERR_* codes (ssl.SSLCertVerificationError.verify_code)
CERT_NOT_YET_VALID = 9
CERT_EXPIRED = 10
HOSTNAME_MISMATCH = 62
IP_ADDRESS_MISMATCH = 64
UNTRUSTED = frozenset({2, 7, 18, 19, 20, 21, 24, 30, 31})


class LinkUnreachable(FedsealError):
    """Nothing answers at the SuperLink address yet (a reason to wait, not to give up)."""


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 as ``[::1]:PORT``) as (host, port); ConfigurationError otherwise."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigurationError(f"SuperLink address must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def load_ca(ca: Path) -> ssl.SSLContext:
    """A client TLS context trusting only the coordinator CA ``ca`` (chain and host name checked).

    Raises
    ------
    ConfigurationError
        The file is missing, unreadable or holds no PEM certificate.
    """
    try:
        return ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    except FileNotFoundError:
        raise ConfigurationError(f"CA certificate not found: {ca}") from None
    except (ssl.SSLError, ValueError, OSError):
        raise ConfigurationError(
            f"CA file {ca} holds no readable PEM certificate; give the coordinator's ca.crt "
            "(made by `fedseal-server certs`)"
        ) from None


def _peer_certificate(host: str, port: int, timeout_s: float) -> x509.Certificate | None:
    """The SuperLink's certificate, fetched without verification (only to explain a failure)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((host, port), timeout=timeout_s) as sock,
            ctx.wrap_socket(sock, server_hostname=host) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der) if der else None
    except (OSError, ValueError):
        return None


def _names(cert: x509.Certificate | None) -> str:
    if cert is None:
        return "?"
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "no subject alternative names"
    names = [str(n) for n in sans.get_values_for_type(x509.DNSName)]
    names += [str(n) for n in sans.get_values_for_type(x509.IPAddress)]
    return ", ".join(names) or "no host names"


def _when(cert: x509.Certificate | None, attr: str) -> str:
    if cert is None:
        return "?"
    value: dt.datetime = getattr(cert, attr)
    return f"{value:%Y-%m-%d %H:%M} UTC"


def explain_verification(
    exc: ssl.SSLCertVerificationError, address: str, ca: Path, cert: x509.Certificate | None
) -> str:
    """One line: why the SuperLink's certificate was refused under ``ca``, and the fix."""
    host, _ = split_address(address)
    code = exc.verify_code
    if code in (HOSTNAME_MISMATCH, IP_ADDRESS_MISMATCH):
        return (
            f"the SuperLink's certificate is not valid for {host} (it names {_names(cert)}); "
            f"dial one of those names, or have the coordinator remake it with "
            f"`fedseal-server certs DIR --host {host}`"
        )
    if code == CERT_EXPIRED:
        return (
            f"the SuperLink's certificate expired on {_when(cert, 'not_valid_after_utc')}; "
            "the coordinator must remake it (`fedseal-server certs DIR --force`)"
        )
    if code == CERT_NOT_YET_VALID:
        return (
            f"the SuperLink's certificate is not valid before "
            f"{_when(cert, 'not_valid_before_utc')}; check this machine's clock and the "
            "coordinator's"
        )
    if code in UNTRUSTED:
        return (
            f"the SuperLink at {address} has a certificate not signed by the CA {ca} "
            "(a CA from another `fedseal-server certs` run?); get the coordinator's current ca.crt"
        )
    return f"the SuperLink's certificate is refused under the CA {ca}: {exc.verify_message}"


def probe_superlink(
    address: str,
    context: ssl.SSLContext | None,
    ca: Path | None,
    timeout_s: float = PROBE_TIMEOUT_S,
) -> None:
    """Connect to the SuperLink once; with ``context``, complete a verified TLS handshake.

    Raises
    ------
    LinkUnreachable
        Nothing accepts connections there (yet), or the connection broke.
    ConfigurationError
        The TLS handshake failed for a reason retrying cannot mend (one line).
    """
    host, port = split_address(address)
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except OSError as exc:
        raise LinkUnreachable(
            f"cannot reach the SuperLink at {address}: {exc.strerror or exc}"
        ) from None
    with sock:
        if context is None:
            return
        try:
            with context.wrap_socket(sock, server_hostname=host):
                return
        except ssl.SSLCertVerificationError as exc:
            cert = _peer_certificate(host, port, timeout_s)
            raise ConfigurationError(
                explain_verification(exc, address, ca or Path("?"), cert)
            ) from None
        except ssl.SSLError as exc:
            raise ConfigurationError(
                f"no TLS handshake with the SuperLink at {address} ({exc.reason or exc}); "
                "is it started with --insecure, or is another service on that port?"
            ) from None
        except OSError as exc:
            raise LinkUnreachable(
                f"the SuperLink at {address} closed the connection during the TLS handshake "
                f"({exc.strerror or exc})"
            ) from None


def wait_for_superlink(
    address: str,
    context: ssl.SSLContext | None,
    ca: Path | None,
    *,
    max_retries: int = 0,
    max_wait_s: float = 0.0,
    progress: Callable[[str], None] = lambda line: None,
    stopped: Callable[[], bool] = lambda: False,
) -> bool:
    """Probe until the SuperLink answers (:func:`probe_superlink`), retrying when it is not up.

    Parameters
    ----------
    max_retries : int
        Retries after the first attempt (0: no limit), as ``flower-supernode``'s option.
    max_wait_s : float
        Give up once this many seconds have passed (0: no limit).
    progress
        Called with one line before each retry.
    stopped
        Polled while waiting: True stops the wait (a requested stop).

    Returns
    -------
    bool
        True once the SuperLink answered; False if ``stopped`` ended the wait.

    Raises
    ------
    FedsealError
        Still unreachable after ``max_retries`` retries or ``max_wait_s`` seconds.
    ConfigurationError
        From :func:`probe_superlink`, at once (never retried).
    """
    start = time.monotonic()
    delay = FIRST_DELAY_S
    failures = 0
    while True:
        try:
            probe_superlink(address, context, ca)
            return True
        except LinkUnreachable as exc:
            failures += 1
            elapsed = time.monotonic() - start
            if (max_retries and failures > max_retries) or (
                max_wait_s and elapsed + delay > max_wait_s
            ):
                raise FedsealError(
                    f"{exc} (gave up after {failures} attempts in {elapsed:.0f} s); start the "
                    "coordinator first or check --superlink, or raise --max-retries/--max-wait-time"
                ) from None
            limit = f"/{max_retries}" if max_retries else ""
            progress(
                f"{exc}; waiting for it: retry {failures}{limit} in {delay:.1f} s "
                f"({elapsed:.0f} s so far)"
            )
            deadline = time.monotonic() + delay
            while time.monotonic() < deadline:
                if stopped():
                    return False
                time.sleep(0.1)
            delay = min(delay * 2, MAX_DELAY_S)
