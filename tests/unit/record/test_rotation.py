"""Key rotation: a key_rotated event sealed by the old key; verify follows it from the trusted key."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.audit.seal import KEY_ROTATED, public_key_hex, rotation_payload
from common.errors import ConfigurationError, RecordError
from server.record import (
    KeyPaths,
    SqlRecord,
    create_keypair,
    load_private_key,
    load_public_key,
    load_signing_key,
    rotate_signing_key,
    signing_key_for,
)
from server.record.keys import write_keypair


def _record(tmp_path: Path) -> tuple[SqlRecord, Path]:
    keys = tmp_path / "keys"
    create_keypair(keys)
    record = SqlRecord(f"sqlite:///{tmp_path / 'record.db'}")
    key = load_signing_key(keys)
    for i in range(3):
        record.append_event("run-a", "test_event", "server", {"i": i})
    record.seal(key)
    return record, keys


def test_rotation_verifies_with_the_original_key_and_hands_sealing_over(tmp_path: Path) -> None:
    record, keys = _record(tmp_path)
    original = load_public_key(KeyPaths.in_dir(keys).public_key)
    rotation = rotate_signing_key(record, keys)
    assert rotation.seq == 4 and rotation.archived == KeyPaths.archived(keys, 1)
    assert (keys / "audit.key.1").stat().st_mode & 0o777 == 0o600
    assert not KeyPaths.staged(keys).private_key.exists()
    new = load_signing_key(keys)
    assert public_key_hex(new.public_key()) == rotation.new_key_hex
    rotated = record.events()[-1]
    assert rotated.kind == KEY_ROTATED
    assert rotated.payload() == rotation_payload(original, new.public_key())
    # the rotation is sealed by the old key, then the new key seals its first head
    seals = record.seals()
    assert [s.seq for s in seals] == [3, 4, 4]
    seals[1].verify(original)
    seals[2].verify(new.public_key())
    record.append_event("run-a", "test_event", "server", {"i": 9})
    record.seal(signing_key_for(record, keys))
    report = record.verify(original)
    assert report.ok, report.summary()
    assert record.verify_trusting_stored_key().ok
    # the new key alone is not a trust anchor for the history before it
    assert not record.verify(new.public_key()).ok
    record.close()


def test_second_rotation_followed_through_the_chain(tmp_path: Path) -> None:
    record, keys = _record(tmp_path)
    original = load_public_key(KeyPaths.in_dir(keys).public_key)
    rotate_signing_key(record, keys)
    second = rotate_signing_key(record, keys)
    assert second.archived == KeyPaths.archived(keys, 2)
    assert record.verify(original).ok
    record.close()


def test_a_seal_by_a_planted_key_without_rotation_fails_naming_its_seq(tmp_path: Path) -> None:
    record, keys = _record(tmp_path)
    original = load_public_key(KeyPaths.in_dir(keys).public_key)
    record.append_event("run-a", "forged", "server", {"i": 4})
    record.seal(Ed25519PrivateKey.generate())
    report = record.verify(original)
    assert not report.ok and report.first_bad_seq == 4
    assert "signature does not verify under the key in force at seq 4" in (report.problem or "")
    record.close()


def test_a_rotation_sealed_only_by_the_key_it_introduces_is_refused(tmp_path: Path) -> None:
    record, keys = _record(tmp_path)
    original = load_public_key(KeyPaths.in_dir(keys).public_key)
    planted = Ed25519PrivateKey.generate()
    record.append_sealed(
        None, KEY_ROTATED, "operator", rotation_payload(original, planted.public_key()), planted
    )
    report = record.verify(original)
    assert not report.ok and report.first_bad_seq == 4
    assert "not sealed by the key in force" in (report.problem or "")
    # the writer refuses to go on sealing over a broken key history
    with pytest.raises(ConfigurationError, match="key history is broken at seq 4"):
        signing_key_for(record, keys)
    record.close()


def test_a_new_key_cannot_backdate_seals_before_its_rotation(tmp_path: Path) -> None:
    record, keys = _record(tmp_path)
    original = load_public_key(KeyPaths.in_dir(keys).public_key)
    old = load_signing_key(keys)
    new = Ed25519PrivateKey.generate()
    record.append_event("run-a", "test_event", "server", {"i": 4})
    # new key seals seq 4 before any rotation names it
    record.seal(new)
    record.append_sealed(
        None, KEY_ROTATED, "operator", rotation_payload(original, new.public_key()), old
    )
    report = record.verify(original)
    assert not report.ok and report.first_bad_seq == 4
    record.close()


def test_rotate_refuses_a_key_that_is_not_in_force(tmp_path: Path) -> None:
    record, keys = _record(tmp_path)
    create_keypair(keys, force=True)  # the operator replaced the key by hand
    with pytest.raises(RecordError, match="not the record's key in force"):
        rotate_signing_key(record, keys)
    with pytest.raises(ConfigurationError, match="audit rotate-key"):
        signing_key_for(record, keys)
    record.close()


def test_rotate_needs_a_sealed_record(tmp_path: Path) -> None:
    create_keypair(tmp_path / "keys")
    with SqlRecord(f"sqlite:///{tmp_path / 'record.db'}") as record:
        with pytest.raises(RecordError, match="no seal yet"):
            rotate_signing_key(record, tmp_path / "keys")


def test_interrupted_rotation_after_the_record_named_the_key_is_finished(tmp_path: Path) -> None:
    record, keys = _record(tmp_path)
    original = load_public_key(KeyPaths.in_dir(keys).public_key)
    old = load_signing_key(keys)
    staged_key = Ed25519PrivateKey.generate()
    write_keypair(KeyPaths.staged(keys), staged_key)
    record.rotate_key(old, staged_key.public_key())  # step 2 done, then the process died
    with pytest.raises(ConfigurationError, match="not the record's key in force"):
        signing_key_for(record, keys)  # the server refuses to seal with the retired key
    again = rotate_signing_key(record, keys)
    assert again.completed_earlier_attempt and again.seq == 4
    assert load_private_key(KeyPaths.in_dir(keys).private_key).public_key() == (
        staged_key.public_key()
    )
    assert record.verify(original).ok
    record.close()


def test_stale_staged_key_the_record_never_named_is_discarded(tmp_path: Path) -> None:
    record, keys = _record(tmp_path)
    original = load_public_key(KeyPaths.in_dir(keys).public_key)
    stale = Ed25519PrivateKey.generate()
    write_keypair(KeyPaths.staged(keys), stale)  # an attempt that stopped before step 2
    rotation = rotate_signing_key(record, keys)
    assert not rotation.completed_earlier_attempt
    assert rotation.new_key_hex != public_key_hex(stale.public_key())
    assert record.verify(original).ok
    record.close()
