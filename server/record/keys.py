"""The server's Ed25519 audit-signing key pair: create and load.

The private key file is created with mode 0600 from the first byte
(``os.open(..., O_CREAT | O_EXCL, 0o600)``), never chmod-ed afterwards, and an
existing key is only replaced when asked (``force``). Loading refuses a private
key file that group or others can read, as OpenSSH does.

Keys are made only on purpose (``fedseal-server keys DIR``, or a simulation
for a fresh run directory). :func:`load_signing_key` never creates one: a
signing key that silently reappears after being deleted would let whoever
deleted it start a new history under a fresh key, so a missing key is a
one-line :class:`~common.errors.ConfigurationError` naming the path and the
command that makes it. Rotation (:mod:`server.record.rotation`) stages the
next key as ``audit.key.next`` and archives retired keys as
``audit.key.<n>`` / ``audit.pub.<n>`` (0600 / 0644).
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
    "load_signing_key",
    "write_keypair",
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

    @classmethod
    def staged(cls, directory: Path) -> KeyPaths:
        """Where a rotation keeps the next key until the record names it."""
        base = cls.in_dir(directory)
        return cls(
            base.private_key.with_name(PRIVATE_KEY_FILE + ".next"),
            base.public_key.with_name(PUBLIC_KEY_FILE + ".next"),
        )

    @classmethod
    def archived(cls, directory: Path, number: int) -> KeyPaths:
        """Where the ``number``-th retired key pair is kept."""
        return cls(
            Path(directory) / f"{PRIVATE_KEY_FILE}.{number}",
            Path(directory) / f"{PUBLIC_KEY_FILE}.{number}",
        )


def _write_new(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _pem_pair(key: Ed25519PrivateKey) -> tuple[bytes, bytes]:
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private_pem, public_pem


def write_keypair(paths: KeyPaths, key: Ed25519PrivateKey) -> None:
    """Write ``key`` to ``paths`` (private 0600 from the first byte, public 0644); never overwrites.

    Raises
    ------
    ConfigurationError
        If either file exists or cannot be written.
    """
    private_pem, public_pem = _pem_pair(key)
    directory = paths.private_key.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _write_new(paths.private_key, private_pem, 0o600)
        _write_new(paths.public_key, public_pem, 0o644)
    except FileExistsError as exc:
        raise ConfigurationError(f"{exc.filename} already exists") from None
    except OSError as exc:
        raise ConfigurationError(
            f"cannot write the key pair in {directory}: {exc.strerror}"
        ) from None


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
    try:
        for p in existing:
            p.unlink()
    except OSError as exc:
        raise ConfigurationError(
            f"cannot replace the key pair in {directory}: {exc.strerror}"
        ) from None
    write_keypair(paths, Ed25519PrivateKey.generate())
    return paths


def load_signing_key(directory: Path) -> Ed25519PrivateKey:
    """The audit-signing key in ``directory``; never created here.

    Defends against a **deleted-key reset**: if a missing key were re-created
    on demand, whoever deleted it (with the database) would get a fresh,
    unrelated history sealed as if nothing happened. Only
    ``fedseal-server keys DIR`` (or a simulation, for a fresh run directory)
    makes a key.

    Raises
    ------
    ConfigurationError
        One line naming the missing path and the command that makes a key,
        or why the existing file is refused (:func:`load_private_key`).
    """
    path = KeyPaths.in_dir(directory).private_key
    if not path.exists():
        raise ConfigurationError(
            f"no audit-signing key at {path}; create one with `fedseal-server keys {directory}` "
            "(a missing key is never re-created)"
        )
    return load_private_key(path)


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
