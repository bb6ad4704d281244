"""Content digests of Flower records: canonical, transport-proof, sensitive to every byte."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ConfigRecord, MetricRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

import common.record_digest as rd
from common.audit.instruction import InstructionSignature
from common.errors import DataError
from common.records import KEY_INSTRUCTION_SIGNATURE, bytes_to_record, vector_to_record

CONFIG = {
    "a-bool": True, "an-int": 3, "big": (1 << 64) - 1, "neg": -5, "a-float": 0.25,
    "a-str": "héllo", "some-bytes": b"\x00\x01", "ints": [1, 2], "floats": [0.5],
    "strs": ["x", "y"], "blobs": [b"z"], "bools": [False, True], "empty": [],
}  # fmt: skip


def content() -> RecordDict:
    return RecordDict(
        {
            "config": ConfigRecord(dict(CONFIG)),
            "arrays": vector_to_record(np.arange(8, dtype=np.float32)),
            "secagg-msg": bytes_to_record(b"protocol bytes"),
            "metrics": MetricRecord({"m": 1.5, "n": [1, 2]}),
        }
    )


def test_digest_survives_the_wire_and_ignores_insertion_order() -> None:
    c = content()
    wired = recorddict_from_proto(recorddict_to_proto(c))
    assert rd.content_digest(wired) == rd.content_digest(c)
    reordered = RecordDict({k: c[k] for k in reversed(list(c.keys()))})
    reordered["config"] = ConfigRecord({k: CONFIG[k] for k in reversed(list(CONFIG))})
    assert rd.content_digest(reordered) == rd.content_digest(c)


def _changed(edit: str) -> RecordDict:
    c = content()
    config = c.config_records["config"]
    if edit == "value":
        config["an-int"] = 4
    elif edit == "int-to-float":
        config["an-int"] = 3.0
    elif edit == "int-to-bool":
        config["an-int"] = True
    elif edit == "str-to-bytes":
        config["a-str"] = "héllo".encode()
    elif edit == "list-element":
        config["ints"] = [1, 3]
    elif edit == "key-renamed":
        config["an-int2"] = config.pop("an-int")
    elif edit == "key-added":
        config["local-epochs"] = 9
    elif edit == "array-byte":
        arr = c.array_records["arrays"]["vector"]
        data = bytearray(arr.data)
        data[-1] ^= 1
        c.array_records["arrays"]["vector"] = Array(
            arr.dtype, tuple(arr.shape), arr.stype, bytes(data)
        )
    elif edit == "array-dtype":
        arr = c.array_records["arrays"]["vector"]
        c.array_records["arrays"]["vector"] = Array("int32", tuple(arr.shape), arr.stype, arr.data)
    elif edit == "array-shape":
        arr = c.array_records["arrays"]["vector"]
        c.array_records["arrays"]["vector"] = Array(arr.dtype, (2, 4), arr.stype, arr.data)
    elif edit == "payload-byte":
        c["secagg-msg"] = bytes_to_record(b"protocol bytez")
    elif edit == "record-renamed":
        c["config2"] = c.pop("config")
    elif edit == "record-removed":
        del c["metrics"]
    elif edit == "record-added":
        c["secagg-config"] = bytes_to_record(b"cohort")
    elif edit == "record-kind":
        c["metrics"] = ConfigRecord({"m": 1.5, "n": [1, 2]})
    return c


@pytest.mark.parametrize(
    "edit",
    ["value", "int-to-float", "int-to-bool", "str-to-bytes", "list-element", "key-renamed",
     "key-added", "array-byte", "array-dtype", "array-shape", "payload-byte", "record-renamed",
     "record-removed", "record-added", "record-kind"],
)  # fmt: skip
def test_any_change_changes_the_digest(edit: str) -> None:
    assert rd.content_digest(_changed(edit)) != rd.content_digest(content())


def test_signature_record_is_not_covered_and_is_read_back_checked() -> None:
    c = content()
    sig = InstructionSignature(9, bytes(32), bytes(64))
    signed = rd.signed_copy(c, sig)
    assert KEY_INSTRUCTION_SIGNATURE not in c  # the original is left alone
    assert signed["arrays"] is c["arrays"]  # records are shared, not copied
    assert rd.content_digest(signed) == rd.content_digest(c)
    wired = recorddict_from_proto(recorddict_to_proto(signed))
    assert rd.read_signature(wired) == sig
    assert rd.read_signature(c) is None
    wired[KEY_INSTRUCTION_SIGNATURE] = ConfigRecord({**sig.to_fields(), "seq": -1})
    with pytest.raises(DataError):
        rd.read_signature(wired)
    wired[KEY_INSTRUCTION_SIGNATURE] = bytes_to_record(b"x")
    with pytest.raises(DataError):
        rd.read_signature(wired)


def test_shared_records_are_hashed_once_with_a_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = rd._array_digest
    monkeypatch.setattr(rd, "_array_digest", lambda r: calls.append(1) or real(r))
    model = vector_to_record(np.zeros(1000, dtype=np.float32))
    cache: rd.DigestCache = {}
    digests = {
        rd.content_digest(
            RecordDict({"arrays": model, "secagg-msg": bytes_to_record(bytes([n]))}), cache
        )
        for n in range(5)
    }
    assert len(digests) == 5 and len(calls) == 5 + 1  # one per payload, the model once


def test_values_without_a_canonical_encoding_fail_closed() -> None:
    with pytest.raises(DataError):
        rd._value([[1]])
    with pytest.raises(DataError):
        rd._value(None)
    with pytest.raises(DataError):
        rd._value(1 << 200)
    with pytest.raises(DataError):
        rd.record_digest(object())
