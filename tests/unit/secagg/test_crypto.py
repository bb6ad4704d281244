"""Unit tests of common.crypto: keys, kdf, aead, prg, shamir."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from common.crypto import aead, kdf, keys, prg, shamir
from common.errors import ConfigurationError, IntegrityError, ProtocolAbort, ProtocolError
from common.rng import secure_bytes


def test_parse_public_key_wrong_size_or_type_raises() -> None:
    for bad in (b"", bytes(31), bytes(33), bytearray(32), "x" * 32, 7, None):
        with pytest.raises(ProtocolError):
            keys.parse_public_key(bad)


def test_agree_both_sides_equal_secret() -> None:
    a, b = keys.generate_key_pair(), keys.generate_key_pair()
    assert keys.agree(a.private_key, b.public_bytes) == keys.agree(b.private_key, a.public_bytes)


def test_agree_low_order_point_raises_integrity() -> None:
    a = keys.generate_key_pair()
    with pytest.raises(IntegrityError):
        keys.agree(a.private_key, bytes(32))


def test_key_pair_from_private_bytes_roundtrip_same_public() -> None:
    a = keys.generate_key_pair()
    assert keys.key_pair_from_private_bytes(keys.private_bytes(a)).public_bytes == a.public_bytes


def test_derive_pair_key_order_independent_and_purpose_separated() -> None:
    secret = secure_bytes(32)
    k1 = kdf.derive_pair_key(secret, kdf.LABEL_PAIRWISE_MASK, run_id=1, round=2, node_a=3, node_b=9)
    k2 = kdf.derive_pair_key(secret, kdf.LABEL_PAIRWISE_MASK, run_id=1, round=2, node_a=9, node_b=3)
    k3 = kdf.derive_pair_key(
        secret, kdf.LABEL_SHARE_ENCRYPTION, run_id=1, round=2, node_a=3, node_b=9
    )
    k4 = kdf.derive_pair_key(secret, kdf.LABEL_PAIRWISE_MASK, run_id=1, round=3, node_a=3, node_b=9)
    assert k1 == k2
    assert len({k1, k3, k4}) == 3


def test_derive_key_unknown_label_or_bad_ids_raise() -> None:
    with pytest.raises(ConfigurationError):
        kdf.derive_node_key(bytes(32), b"fedseal/v1/other", run_id=1, round=1, node_id=1)
    with pytest.raises(ConfigurationError):
        kdf.derive_pair_key(
            bytes(32), kdf.LABEL_PAIRWISE_MASK, run_id=1, round=1, node_a=2, node_b=2
        )
    with pytest.raises(ConfigurationError):
        kdf.derive_node_key(bytes(32), kdf.LABEL_SELF_MASK, run_id=True, round=1, node_id=1)


def test_labels_distinct_and_versioned() -> None:
    assert len(set(kdf.LABELS)) == len(kdf.LABELS)
    assert all(label.startswith(b"fedseal/v1/") and b"\x00" not in label for label in kdf.LABELS)


def _ad(**overrides: int) -> bytes:
    fields = {"version": 1, "run_id": 1, "round": 2, "sender": 3, "receiver": 4, "stage": 2}
    fields.update(overrides)
    return aead.associated_data(**fields)


def test_aead_roundtrip_and_any_context_change_rejected() -> None:
    key = secure_bytes(32)
    blob = aead.encrypt(key, b"share", _ad())
    assert aead.decrypt(key, blob, _ad()) == b"share"
    for field in ("version", "run_id", "round", "sender", "receiver", "stage"):
        with pytest.raises(IntegrityError):
            aead.decrypt(key, blob, _ad(**{field: 5}))
    with pytest.raises(IntegrityError):
        aead.decrypt(secure_bytes(32), blob, _ad())


def test_aead_every_flipped_byte_rejected() -> None:
    key = secure_bytes(32)
    blob = aead.encrypt(key, b"x" * 20, _ad())
    for i in range(len(blob)):
        tampered = blob[:i] + bytes([blob[i] ^ 1]) + blob[i + 1 :]
        with pytest.raises(IntegrityError):
            aead.decrypt(key, tampered, _ad())
    for bad in (b"", blob[:-1], bytearray(blob)):
        with pytest.raises(IntegrityError):
            aead.decrypt(key, bad, _ad())  # type: ignore[arg-type]


def test_expand_seed_values_in_ring_for_every_width() -> None:
    for bits in (1, 8, 12, 31, 32, 33, 53, 64):
        out = prg.expand_seed(bytes(range(32)), 1000, bits)
        assert out.dtype == (np.uint32 if bits <= 32 else np.uint64)
        if bits < 64:
            assert int(out.max()) < 2**bits
        assert out.shape == (1000,)


def test_expand_seed_prefix_consistent_and_seed_sensitive() -> None:
    seed = secure_bytes(32)
    long = prg.expand_seed(seed, 1000, 32)
    assert np.array_equal(prg.expand_seed(seed, 10, 32), long[:10])
    other = bytes([seed[0] ^ 1]) + seed[1:]
    assert not np.array_equal(prg.expand_seed(other, 10, 32), long[:10])


def test_expand_seed_bad_seed_or_length_raises() -> None:
    for bad in (bytes(16), bytes(33), "a" * 32):
        with pytest.raises(ConfigurationError):
            prg.expand_seed(bad, 4, 32)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        prg.expand_seed(bytes(32), -1, 32)
    with pytest.raises(ConfigurationError):
        prg.expand_seed(bytes(32), prg.MAX_KEYSTREAM_BYTES // 4 + 1, 32)


def test_shamir_any_t_shares_reconstruct() -> None:
    secret = secure_bytes(32)
    shares = shamir.split_secret(secret, threshold=3, indices=[1, 2, 5, 7, 11])
    for subset in itertools.combinations(shares, 3):
        assert shamir.combine_shares(subset, threshold=3) == secret
    assert shamir.combine_shares(shares, threshold=3) == secret


def test_shamir_fewer_than_t_shares_abort() -> None:
    shares = shamir.split_secret(secure_bytes(32), threshold=3, indices=[1, 2, 3])
    with pytest.raises(ProtocolAbort):
        shamir.combine_shares(shares[:2], threshold=3)


def test_shamir_duplicate_or_zero_index_rejected() -> None:
    shares = shamir.split_secret(secure_bytes(32), threshold=2, indices=[1, 2, 3])
    with pytest.raises(ProtocolError):
        shamir.combine_shares([shares[0], shares[0]], threshold=2)
    with pytest.raises(ProtocolError):
        shamir.Share(index=0, value=1)
    with pytest.raises(ConfigurationError):
        shamir.split_secret(bytes(32), threshold=2, indices=[1, 1, 2])
    with pytest.raises(ProtocolError):
        shamir.split_secret(bytes(32), threshold=2, indices=[0, 1, 2])


def test_shamir_inconsistent_shares_detected_or_wrong() -> None:
    secret = secure_bytes(32)
    shares = shamir.split_secret(secret, threshold=2, indices=[1, 2])
    bad = shamir.Share(index=2, value=(shares[1].value + 1) % shamir.PRIME)
    try:
        assert shamir.combine_shares([shares[0], bad], threshold=2) != secret
    except IntegrityError:
        pass


def test_shamir_value_codec_rejects_out_of_field() -> None:
    assert shamir.decode_value(shamir.encode_value(shamir.PRIME - 1)) == shamir.PRIME - 1
    with pytest.raises(ProtocolError):
        shamir.decode_value(shamir.PRIME.to_bytes(66, "big"))
    with pytest.raises(ProtocolError):
        shamir.decode_value(bytes(65))
