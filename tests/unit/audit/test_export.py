"""The JSON-lines export round-trips and verifies; malformed lines are named."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.audit.chain import GENESIS_HASH, make_event
from common.audit.export import encode_export, parse_export
from common.audit.seal import sign_head, verify_chain
from common.errors import DataError

KEY = Ed25519PrivateKey.from_private_bytes(b"\x04" * 32)


def test_export_round_trip_verifies() -> None:
    ev1 = make_event(GENESIS_HASH, 1, "t", None, "k", "s", {"x": 0.1, "n": [1, "é"]})
    ev2 = make_event(ev1.hash, 2, "t", "r", "k", "s", {})
    seal = sign_head(KEY, "rec", 2, ev2.hash, "t")
    parsed = parse_export(encode_export("rec", None, [ev1, ev2], [seal]))
    assert parsed.events == (ev1, ev2) and parsed.seals == (seal,)
    assert verify_chain(parsed.events, parsed.seals, KEY.public_key(), parsed.record_id).ok


@pytest.mark.parametrize(
    "lines,match",
    [
        ([], "empty"),
        (['{"format":"other","v":1}'], "header"),
        (
            ['{"format":"fedseal-audit-export","v":1,"record_id":"r","public_key":null}', "[1]"],
            "line 2",
        ),
        (
            [
                '{"format":"fedseal-audit-export","v":1,"record_id":"r","public_key":null}',
                '{"type":"x"}',
            ],
            "line 2",
        ),
        (
            [
                '{"format":"fedseal-audit-export","v":1,"record_id":"r","public_key":null}',
                '{"type":"event","seq":NaN}',
            ],
            "line 2",
        ),
    ],
)
def test_parse_export_malformed_refused(lines: list[str], match: str) -> None:
    with pytest.raises(DataError, match=match):
        parse_export(lines)
