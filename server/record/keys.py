"""The server's Ed25519 audit-signing key pair: create and load.

The private key file is created with mode 0600 from the first byte
(``os.open(..., O_CREAT | O_EXCL, 0o600)``), never chmod-ed afterwards, and an
existing key is only replaced when asked (``force``). Loading refuses a private
key file that group or others can read, as OpenSSH does.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.audit.seal import load_public_key_pem
from common.errors import ConfigurationError

__all__ = [
    "PRIVATE_KEY_FILE",
    "PUBLIC_KEY_FILE",
    "KeyPaths",
    "create_keypair",
    "load_private_key",
    "load_public_key",
]

PRIVATE_KEY_FILE = "audit.key"
PUBLIC_KEY_FILE = "audit.pub"


@dataclass(frozen=True, slots=True)
class KeyPaths:
    """Where a key pair lives."""

    private_key: Path
    public_key: Path

    @classmethod
    def in_dir(cls, directory: Path) -> KeyPaths:
        return cls(Path(directory) / PRIVATE_KEY_FILE, Path(directory) / PUBLIC_KEY_FILE)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def create_keypair(directory: Path, *, force: bool = False) -> KeyPaths:
    """Create ``audit.key`` (PKCS#8 PEM, mode 0600) and ``audit.pub`` (PEM) in ``directory``.

    Raises
    ------
    ConfigurationError
        If either file exists and ``force`` is false, or the directory cannot be written.
    """
    paths = KeyPaths.in_dir(directory)
    existing = [p for p in (paths.private_key, paths.public_key) if p.exists()]
    if existing and not force:
        names = ", ".join(str(p) for p in existing)
        raise ConfigurationError(f"{names} already exists; pass --force to replace the key pair")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        for p in existing:
            p.unlink()
        _write_new(paths.private_key, private_pem, 0o600)
        _write_new(paths.public_key, public_pem, 0o644)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot write the key pair in {directory}: {exc.strerror}"
        ) from None
    return paths


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Load the audit-signing key, refusing a file readable by group or others.

    Raises
    ------
    ConfigurationError
        If the file is missing, too permissive, not PEM, or not Ed25519.
    """
    try:
        info = Path(path).stat()
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read private key {path}: {exc.strerror}") from None
    if os.name == "posix" and info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigurationError(
            f"private key {path} is accessible by group or others; run chmod 600 {path}"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ConfigurationError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigurationError(f"{path} is not an Ed25519 key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Load an Ed25519 public key from a PEM file (raises :class:`ConfigurationError`)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read public key {path}: {exc.strerror}") from None
    try:
        return load_public_key_pem(data)
    except ConfigurationError as exc:
        raise ConfigurationError(f"{path}: {exc}") from None
