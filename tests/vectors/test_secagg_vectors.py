"""Known-answer vectors pinning the mask stream, the KDF labels and outputs, and the wire header.

Changing any of these values changes the protocol: bump the version label.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.crypto import commitment, kdf, prg
from common.secagg import signing
from common.secagg.messages import (
    AdvertiseKeysReply,
    AdvertiseKeysRequest,
    ConsistencyReply,
    ConsistencyRequest,
    Signed,
    UnmaskRequest,
)
from common.secagg.params import IDENTITY_SIZE, PROTOCOL_VERSION, SecAggConfig, make_config

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
    assert PROTOCOL_VERSION == 3
    assert AdvertiseKeysRequest(1, 2, 3).encode() == (
        b"fsam\x03\x01" + (1).to_bytes(8, "big") + (2).to_bytes(8, "big") + (3).to_bytes(8, "big")
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


def _head(kind: int) -> bytes:
    return (
        b"fsam\x03"
        + bytes([kind])
        + (1).to_bytes(8, "big")
        + (2).to_bytes(8, "big")
        + (3).to_bytes(8, "big")
    )


def test_advertise_keys_reply_layout_pinned() -> None:
    enc, mask, commit = bytes([1]) * 32, bytes([2]) * 32, bytes([3]) * 32
    identity, signature = bytes([4]) * 32, bytes([5]) * 64
    reply = AdvertiseKeysReply(1, 2, 3, enc, mask, commit, identity, signature)
    assert reply.encode() == _head(2) + enc + mask + commit + identity + signature
    assert AdvertiseKeysReply.SIZE == 30 + 192
    assert reply.advertisement().encode() == (3).to_bytes(8, "big") + reply.encode()[30:]


def test_consistency_and_unmask_layouts_pinned() -> None:
    assert ConsistencyRequest(1, 2, 3, (2, 3)).encode() == _head(9) + struct.pack(">IQQ", 2, 2, 3)
    assert ConsistencyReply(1, 2, 3, bytes([7]) * 64).encode() == _head(10) + bytes([7]) * 64
    request = UnmaskRequest(1, 2, 3, (2, 3), (Signed(2, bytes([8]) * 64),))
    assert request.encode() == (
        _head(7) + struct.pack(">IIQQ", 2, 1, 2, 3) + (2).to_bytes(8, "big") + bytes([8]) * 64
    )


def test_signing_labels_and_quorum_pinned() -> None:
    assert signing.LABEL_ADVERTISEMENT == b"fedseal/secagg/v3/advertisement\x00"
    assert signing.LABEL_CONSISTENCY == b"fedseal/secagg/v3/consistency\x00"
    assert signing.LABEL_GRAPH_SEED == b"fedseal/secagg/v3/graph-seed\x00"
    cases = {(5, 3, 4): 4, (6, 3, 5): 5, (20, 9, 14): 15, (30, 9, 16): 20, (3, 2, 2): 3}
    for (n, t, k), expected in cases.items():
        config = make_config(
            run_id=1,
            round=2,
            cohort=list(range(1, n + 1)),
            identities=[bytes([u]) * 32 for u in range(1, n + 1)],
            threshold=t,
            neighbours=k,
            value_bound=1.0,
            vector_length=1,
        )
        assert signing.quorum(config) == expected, (n, t, k)


def _pinned_config() -> SecAggConfig:
    """n = 3 (cohort given out of order), node u bound to the key ``bytes([u]) * 32``."""
    return make_config(
        run_id=1,
        round=2,
        cohort=[8, 3, 5],
        identities=[bytes([8]) * 32, bytes([3]) * 32, bytes([5]) * 32],
        threshold=2,
        value_bound=1.0,
        vector_length=4,
    )


def test_config_layout_pinned_with_identities() -> None:
    config = _pinned_config()
    assert (config.cohort, config.neighbours, config.bits) == ((3, 5, 8), 2, 32)
    assert config.scale == 715827882.0  # floor((2^31 - 1) / 3) / 1.0
    head = b"fsac\x03" + struct.pack(">QQI", 1, 2, 3)
    cohort = struct.pack(">3Q", 3, 5, 8)
    identities = bytes([3]) * 32 + bytes([5]) * 32 + bytes([8]) * 32  # in cohort order
    tail = struct.pack(">IIIdBd", 2, 2, 4, 1.0, 32, 715827882.0)
    expected = head + cohort + identities + tail
    assert config.encode() == expected
    assert len(expected) == 25 + 3 * (8 + 32) + 29 == 174
    assert config.digest() == hashlib.sha256(expected).digest()
    assert config.digest().hex() == (
        "24d2b654f53fa4280c87ac2bce4203673b3a97e77b244530067ec57f8b4ef90e"
    )
    assert SecAggConfig.decode(expected) == config
    assert IDENTITY_SIZE == signing.IDENTITY_KEY_SIZE == 32


def test_identity_claim_layout_pinned() -> None:
    assert signing.LABEL_IDENTITY == b"fedseal/secagg/v3/identity\x00"
    assert signing.IDENTITY_CLAIM_SIZE == 32 + 64
    assert signing.identity_message(7, 9) == (
        b"fedseal/secagg/v3/identity\x00" + (7).to_bytes(8, "big") + (9).to_bytes(8, "big")
    )


def test_signed_messages_and_graph_seed_match_reference() -> None:
    config = _pinned_config()
    digest = hashlib.sha256(config.encode()).digest()
    enc, mask, commit = bytes([1]) * 32, bytes([2]) * 32, bytes([3]) * 32
    assert (
        signing.advertisement_message(config, 5, enc, mask, commit)
        == (b"fedseal/secagg/v3/advertisement\x00" + digest + (5).to_bytes(8, "big") + enc + mask)
        + commit
    )
    seed = bytes(range(32))
    assert signing.consistency_message(config, seed, (3, 5)) == (
        b"fedseal/secagg/v3/consistency\x00" + digest + seed + struct.pack(">IQQ", 2, 3, 5)
    )
    entries = [bytes([9]) * 200, bytes([10]) * 200]
    reference = hashlib.sha256(
        b"fedseal/secagg/v3/graph-seed\x00" + digest + struct.pack(">I", 2) + b"".join(entries)
    ).digest()
    assert signing.graph_seed(config, entries) == reference
    # the identity signature is Ed25519 (RFC 8032 section 7.1, test 1)
    identity = Ed25519PrivateKey.from_private_bytes(
        bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
    )
    assert signing.public_bytes(identity).hex() == (
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
    )
    assert signing.sign(identity, b"").hex() == (
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
        "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
    )
    message = signing.advertisement_message(config, 5, enc, mask, commit)
    signature = signing.sign(identity, message)
    assert signing.verifies(signing.public_bytes(identity), message, signature)
    assert not signing.verifies(signing.public_bytes(identity), message + b"\x00", signature)
