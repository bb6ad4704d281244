"""Known-answer vectors pinning the mask stream, the KDF labels and outputs, and the wire header.

Changing any of these values changes the protocol: bump the version label.
"""

from __future__ import annotations

import hashlib
import hmac

from common.crypto import commitment, kdf, prg
from common.secagg.messages import AdvertiseKeysReply, AdvertiseKeysRequest
from common.secagg.params import PROTOCOL_VERSION

SEED = bytes(range(32))


def _hkdf_reference(ikm: bytes, info: bytes, length: int = 32) -> bytes:
    """RFC 5869 HKDF-SHA256 with an empty salt, written independently with hmac."""
    prk = hmac.new(bytes(32), ikm, hashlib.sha256).digest()
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def test_prg_keystream_matches_rfc8439_vector() -> None:
    # RFC 8439 Appendix A.1, test vector #1: all-zero key, nonce and counter.
    expected = bytes.fromhex(
        "76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7"
        "da41597c5157488d7724e03fb8d84a376a43b8f41518a11cc387b669b2ee6586"
    )
    assert prg.keystream(bytes(32), 64) == expected
    assert prg.expand_seed(bytes(32), 2, 32).tolist() == [0xADE0B876, 0x903DF1A0]


def test_prg_expand_seed_pinned_values() -> None:
    assert prg.expand_seed(SEED, 4, 32).tolist() == [2100034873, 1780073945, 1996733837, 1229642936]
    assert prg.expand_seed(SEED, 3, 12).tolist() == [3385, 1497, 3469]
    assert prg.expand_seed(SEED, 2, 64).tolist() == [7645359380336737593, 5281276197874154893]


def test_kdf_labels_pinned() -> None:
    assert kdf.LABEL_SHARE_ENCRYPTION == b"fedseal/v1/share-encryption"
    assert kdf.LABEL_PAIRWISE_MASK == b"fedseal/v1/pairwise-mask"
    assert kdf.LABEL_SELF_MASK == b"fedseal/v1/self-mask"
    assert kdf.LABEL_NEIGHBOUR_GRAPH == b"fedseal/v1/neighbour-graph"
    assert kdf.LABEL_CLIENT_STATE == b"fedseal/v1/client-state"
    info = kdf.pair_info(kdf.LABEL_PAIRWISE_MASK, run_id=1, round=2, node_a=5, node_b=3)
    assert info == (
        b"fedseal/v1/pairwise-mask\x00"
        + (1).to_bytes(8, "big")
        + (2).to_bytes(8, "big")
        + (3).to_bytes(8, "big")
        + (5).to_bytes(8, "big")
    )


def test_kdf_outputs_pinned_and_match_reference() -> None:
    cases = [
        (
            kdf.derive_pair_key(
                SEED, kdf.LABEL_PAIRWISE_MASK, run_id=1, round=2, node_a=5, node_b=3
            ),
            kdf.pair_info(kdf.LABEL_PAIRWISE_MASK, run_id=1, round=2, node_a=3, node_b=5),
            "a815208f82d2477d5636c78169408aab3319ad57b8b7f71d3a607faccd78b2be",
        ),
        (
            kdf.derive_pair_key(
                SEED, kdf.LABEL_SHARE_ENCRYPTION, run_id=1, round=2, node_a=5, node_b=3
            ),
            kdf.pair_info(kdf.LABEL_SHARE_ENCRYPTION, run_id=1, round=2, node_a=3, node_b=5),
            "07c554b9d13401db9d17676fe2dadf0363a2750673d30495d8fff084e6ae0fec",
        ),
        (
            kdf.derive_node_key(SEED, kdf.LABEL_SELF_MASK, run_id=1, round=2, node_id=5),
            kdf.node_info(kdf.LABEL_SELF_MASK, run_id=1, round=2, node_id=5),
            "ccd427a8c85353823d72fafc9d3e3e87b1dc374387a25a0c7812f4236ffd963f",
        ),
        (
            kdf.derive_round_key(SEED, kdf.LABEL_NEIGHBOUR_GRAPH, run_id=1, round=2),
            kdf.round_info(kdf.LABEL_NEIGHBOUR_GRAPH, run_id=1, round=2),
            "d2940a4f6840edf6619cc1177b86072b62f8571cb77533c587a684b9931945dc",
        ),
    ]
    for derived, info, pinned in cases:
        assert derived.hex() == pinned
        assert derived == _hkdf_reference(SEED, info)


def test_wire_header_pinned() -> None:
    assert PROTOCOL_VERSION == 2
    assert AdvertiseKeysRequest(1, 2, 3).encode() == (
        b"fsam\x02\x01" + (1).to_bytes(8, "big") + (2).to_bytes(8, "big") + (3).to_bytes(8, "big")
    )


def test_seed_commitment_pinned_and_matches_reference() -> None:
    assert commitment.LABEL_SEED_COMMITMENT == b"fedseal/v1/seed-commitment"
    derived = commitment.commit_seed(SEED, run_id=1, round=2, node_id=5)
    reference = hashlib.sha256(
        b"fedseal/v1/seed-commitment\x00"
        + (1).to_bytes(8, "big")
        + (2).to_bytes(8, "big")
        + (5).to_bytes(8, "big")
        + SEED
    ).digest()
    assert derived == reference
    assert derived.hex() == "3569d511186b44f0f1414ff04773b7278667c86f9525dc1f9a3844a70371adfc"


def test_advertise_keys_reply_layout_pinned() -> None:
    enc, mask, commit = bytes([1]) * 32, bytes([2]) * 32, bytes([3]) * 32
    assert AdvertiseKeysReply(1, 2, 3, enc, mask, commit).encode() == (
        b"fsam\x02\x02"
        + (1).to_bytes(8, "big")
        + (2).to_bytes(8, "big")
        + (3).to_bytes(8, "big")
        + enc
        + mask
        + commit
    )
    assert AdvertiseKeysReply.SIZE == 30 + 96
