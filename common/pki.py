"""TLS and node-authentication material: a private CA, a server certificate, site keys.

Made with ``cryptography`` (ECDSA P-384, SHA-384). The CA's private key is
only needed to issue certificates and can be moved offline afterwards; the
server key is written with mode 0600 from creation.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import ConfigurationError

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.crt", "server.key"


@dataclass(frozen=True, slots=True)
class CertPaths:
    ca_cert: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def in_dir(cls, directory: Path) -> CertPaths:
        return cls(directory / CA_CERT, directory / SERVER_CERT, directory / SERVER_KEY)

    def missing(self) -> list[Path]:
        return [p for p in (self.ca_cert, self.server_cert, self.server_key) if not p.is_file()]


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_certs(
    directory: Path, hosts: list[str], *, days: int = 365, force: bool = False
) -> CertPaths:
    """Create ``ca.crt``/``ca.key`` and ``server.crt``/``server.key`` in ``directory``.

    ``hosts`` become the server certificate's subject alternative names (DNS
    names or IP addresses); include every name the sites will dial.

    Raises
    ------
    ConfigurationError
        Files exist (without ``force``), no hosts, or days < 1.
    """
    if not hosts:
        raise ConfigurationError("at least one host name or IP address is required")
    if days < 1:
        raise ConfigurationError("days must be >= 1")
    directory.mkdir(parents=True, exist_ok=True)
    names = [CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY]
    existing = [n for n in names if (directory / n).exists()]
    if existing and not force:
        raise ConfigurationError(
            f"{directory} already holds {', '.join(existing)}; use --force to replace them"
        )
    for n in existing:
        (directory / n).unlink()

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedseal coordinator CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )

    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )

    _write_private(directory / CA_KEY, _key_pem(ca_key))
    _write_private(directory / SERVER_KEY, _key_pem(server_key))
    (directory / CA_CERT).write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    (directory / SERVER_CERT).write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    return CertPaths.in_dir(directory)


def make_node_key(path_stem: Path, *, force: bool = False) -> tuple[Path, Path]:
    """An ECDSA P-384 key pair in OpenSSH format for Flower node authentication.

    Writes ``<stem>`` (private, 0600) and ``<stem>.pub``; the coordinator
    allow-lists the ``.pub`` file.
    """
    priv, pub = path_stem, path_stem.with_name(path_stem.name + ".pub")
    for p in (priv, pub):
        if p.exists():
            if not force:
                raise ConfigurationError(f"{p} exists; use --force to replace it")
            p.unlink()
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(
        priv,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + b"\n"
    )
    return priv, pub


def _load_cert(path: Path, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        raise ConfigurationError(
            f"{what} {path} is not a PEM certificate; remake it with `fedseal-server certs DIR`"
        ) from None


def _check_validity(cert: x509.Certificate, path: Path, what: str, now: dt.datetime) -> None:
    if now < cert.not_valid_before_utc:
        raise ConfigurationError(
            f"{what} {path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC "
            "(check this machine's clock, or remake it with `fedseal-server certs DIR --force`)"
        )
    if now > cert.not_valid_after_utc:
        raise ConfigurationError(
            f"{what} {path} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; "
            "remake it with `fedseal-server certs DIR --force` and give the sites the new ca.crt"
        )


def check_server_tls(paths: CertPaths, now: dt.datetime | None = None) -> None:
    """Refuse TLS material the sites could not accept, one line naming the file and the fix.

    Checked: the CA and server certificates parse and are valid now; the
    server certificate is signed by that CA (a certificate from another
    ``certs`` run would fail every site's handshake); the server key is the
    private half of the certificate's public key (else the SuperLink could not
    complete any handshake).

    Raises
    ------
    ConfigurationError
        The first problem found.
    """
    now = now or dt.datetime.now(dt.UTC)
    ca = _load_cert(paths.ca_cert, "CA certificate")
    server = _load_cert(paths.server_cert, "server certificate")
    _check_validity(ca, paths.ca_cert, "CA certificate", now)
    _check_validity(server, paths.server_cert, "server certificate", now)
    try:
        server.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise ConfigurationError(
            f"server certificate {paths.server_cert} is not signed by the CA {paths.ca_cert}; "
            "use the ca.crt/server.crt pair of one `fedseal-server certs` run"
        ) from None
    try:
        key = serialization.load_pem_private_key(paths.server_key.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        raise ConfigurationError(
            f"server key {paths.server_key} is not an unencrypted PEM private key"
        ) from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, public) != server.public_key().public_bytes(der, public):
        raise ConfigurationError(
            f"server key {paths.server_key} does not match the certificate {paths.server_cert}; "
            "use the server.key made with it"
        )
