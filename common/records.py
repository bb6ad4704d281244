"""One place for model weights on the wire: torch state_dict <-> flat vector <-> Flower record.

Weights and updates travel as a single flat float32 vector (one Flower
``Array`` inside an ``ArrayRecord``); the receiver rebuilds the structure
from its own :class:`ModelSpec`. Everything arriving from the network is
checked for type, dtype, shape, size and finiteness *before* it is used.

Wire keys (the record names in a message's ``RecordDict``) are defined here
and nowhere else.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, overload

import numpy as np
import numpy.lib.format as npy_format
from flwr.app import Array, ArrayRecord, ConfigRecord

from common.config import RunConfig
from common.errors import ConfigurationError, DataError

if TYPE_CHECKING:  # torch is imported where a state dict is converted, not with the wire keys
    import torch

# Record names inside a Message's RecordDict.
KEY_ARRAYS = "arrays"
KEY_CONFIG = "config"
KEY_METRICS = "metrics"
KEY_REFUSAL = "refusal"  # ConfigRecord {"reason": str} when a site declines a round
KEY_SITE_DECISIONS = "site-decisions"  # ConfigRecord {"policy-hash", "decisions" (JSON)}
# ConfigRecord {"v": 1, "seq": int, "key-id": 32 bytes, "signature": 64 bytes}: the
# coordinator's signature over the instruction (common.audit.instruction, common.record_digest)
KEY_INSTRUCTION_SIGNATURE = "instruction-signature"
# Array name inside the ArrayRecord.
KEY_VECTOR = "vector"
# The action of the query message carrying a run's final signed audit head to every site
# (message type ``query.audit_head``; the site's ack is an empty reply).
AUDIT_HEAD_ACTION = "audit_head"

WIRE_DTYPE = np.dtype("<f4")


@dataclass(frozen=True, slots=True)
class ParamSpec:
    name: str
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Names and shapes of a model's floating-point parameters, in state_dict order."""

    params: tuple[ParamSpec, ...]

    @property
    def size(self) -> int:
        return sum(p.size for p in self.params)

    @classmethod
    def of(cls, state_dict: Mapping[str, torch.Tensor]) -> ModelSpec:
        specs = []
        for name, tensor in state_dict.items():
            if not tensor.is_floating_point():
                raise DataError(f"parameter {name!r} is not floating point ({tensor.dtype})")
            specs.append(ParamSpec(name, tuple(int(s) for s in tensor.shape)))
        return cls(tuple(specs))


def state_dict_to_vector(state_dict: Mapping[str, torch.Tensor]) -> np.ndarray:
    """Concatenate all parameters (state_dict order) into one float32 vector."""
    import torch

    parts = []
    for name, tensor in state_dict.items():
        if not tensor.is_floating_point():
            raise DataError(f"parameter {name!r} is not floating point ({tensor.dtype})")
        parts.append(tensor.detach().to("cpu", torch.float32).reshape(-1).numpy())
    if not parts:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate(parts).astype(np.float32, copy=False)


def vector_to_state_dict(vector: np.ndarray, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Inverse of :func:`state_dict_to_vector` for a model with ``spec``."""
    import torch

    vector = check_vector(vector, spec.size, what="model vector")
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for p in spec.params:
        out[p.name] = torch.from_numpy(vector[offset : offset + p.size].reshape(p.shape).copy())
        offset += p.size
    return out


def check_vector(vector: object, expected_size: int, *, what: str = "vector") -> np.ndarray:
    """Return ``vector`` as float32 if it is a finite 1-D float array of ``expected_size``.

    Raises
    ------
    DataError
        Not an ndarray, not floating point, wrong shape, NaN or Inf.
    """
    if not isinstance(vector, np.ndarray):
        raise DataError(f"{what}: expected a numpy array, got {type(vector).__name__}")
    if vector.dtype.kind != "f":
        raise DataError(f"{what}: expected floating point values, got dtype {vector.dtype}")
    if vector.shape != (expected_size,):
        raise DataError(f"{what}: expected shape ({expected_size},), got {vector.shape}")
    if not np.all(np.isfinite(vector)):
        raise DataError(f"{what}: contains NaN or infinite values")
    return vector.astype(np.float32, copy=False)


def vector_to_record(vector: np.ndarray) -> ArrayRecord:
    """Wrap a flat vector in an ArrayRecord (one array named :data:`KEY_VECTOR`)."""
    return ArrayRecord({KEY_VECTOR: Array(np.ascontiguousarray(vector, dtype=WIRE_DTYPE))})


def record_to_vector(record: object, expected_size: int, *, what: str = "vector") -> np.ndarray:
    """Extract and validate the flat vector from a received ArrayRecord.

    The array's declared dtype, shape and byte length are checked before its
    bytes are parsed, so an oversized or mistyped payload costs no decoding.
    """
    if not isinstance(record, ArrayRecord):
        raise DataError(f"{what}: expected an ArrayRecord, got {type(record).__name__}")
    if list(record.keys()) != [KEY_VECTOR]:
        raise DataError(f"{what}: expected exactly one array named {KEY_VECTOR!r}")
    arr = record[KEY_VECTOR]
    if tuple(arr.shape) != (expected_size,):
        raise DataError(f"{what}: expected shape ({expected_size},), got {tuple(arr.shape)}")
    if np.dtype(arr.dtype) != WIRE_DTYPE:
        raise DataError(f"{what}: expected dtype float32, got {arr.dtype}")
    # .npy header is at most a few hundred bytes; anything larger is not our encoding.
    if not (
        expected_size * WIRE_DTYPE.itemsize
        <= len(arr.data)
        <= expected_size * WIRE_DTYPE.itemsize + 4096
    ):
        raise DataError(f"{what}: payload size {len(arr.data)} does not match the declared shape")
    try:
        vector = arr.numpy()
    except Exception as exc:  # numpy raises several types for corrupt .npy bytes
        raise DataError(f"{what}: undecodable array ({exc})") from exc
    return check_vector(vector, expected_size, what=what)


# ---------------------------------------------------------------- run config
# Keys in an instruction's config record besides the RunConfig fields.
KEY_ROUND = "server-round"
KEY_AUDIT_HEAD = "audit-head"  # the server's latest signed audit head (bytes)
KEY_RUN_ID = "run-id"  # the run's id in the central record (str)
KEY_COHORT_SIZE = "cohort-size"  # plain rounds: sites invited to this round (int)
KEY_APP_HASH = "app-hash"  # SHA-256 of the coordinator's fedseal code, as in its run_started event


def config_to_record(
    cfg: RunConfig, server_round: int, **extra: bool | int | float | str
) -> ConfigRecord:
    """The config record the server sends with each instruction."""
    return ConfigRecord({**cfg.to_flower(), KEY_ROUND: server_round, **extra})


def record_to_config(
    record: object,
    extra_keys: tuple[str, ...] = (KEY_AUDIT_HEAD, KEY_RUN_ID, KEY_COHORT_SIZE, KEY_APP_HASH),
) -> tuple[RunConfig, int, dict[str, object]]:
    """Parse an instruction's config record into (RunConfig, round, extra values).

    Raises
    ------
    ConfigurationError
        Not a ConfigRecord, an unknown key, or a value of the wrong type.
    """
    if not isinstance(record, ConfigRecord):
        raise ConfigurationError(f"expected a ConfigRecord, got {type(record).__name__}")
    values: dict[str, Any] = dict(record.items())
    if KEY_ROUND not in values:
        raise ConfigurationError(f"instruction lacks {KEY_ROUND!r}")
    server_round = values.pop(KEY_ROUND)
    if isinstance(server_round, bool) or not isinstance(server_round, int) or server_round < 0:
        raise ConfigurationError(f"bad {KEY_ROUND}: {server_round!r}")
    extra = {k: values.pop(k) for k in extra_keys if k in values}
    return RunConfig.from_flower(values), server_round, extra


# ---------------------------------------------------------------- opaque payloads
# Protocol messages (secure aggregation) travel as one uint8 array, so Flower
# chunks them like model weights; the protocol decodes and checks the bytes.
KEY_PAYLOAD = "payload"


_PAYLOAD_DTYPE = np.dtype("u1")
_NPY_STYPE = "numpy.ndarray"  # flwr's SType.NUMPY: ``data`` holds .npy bytes
_NPY_HEADER_MAX = 4096


def _npy_header(length: int) -> bytes:
    out = io.BytesIO()
    npy_format.write_array_header_1_0(
        out,
        {
            "descr": npy_format.dtype_to_descr(_PAYLOAD_DTYPE),
            "fortran_order": False,
            "shape": (length,),
        },
    )
    return out.getvalue()


def _payload_array(data: bytes | Sequence[bytes | memoryview]) -> Array:
    parts = [data] if isinstance(data, bytes) else list(data)
    length = sum(memoryview(p).nbytes for p in parts)
    return Array(
        dtype=str(_PAYLOAD_DTYPE),
        shape=(length,),
        stype=_NPY_STYPE,
        data=b"".join([_npy_header(length), *parts]),
    )


def bytes_to_record(data: bytes | Sequence[bytes | memoryview]) -> ArrayRecord:
    """Wrap protocol bytes in an ArrayRecord (one uint8 array named :data:`KEY_PAYLOAD`).

    ``data`` is the payload, or a sequence of buffers whose concatenation is
    the payload (so a large message is copied once, here, and not first
    joined by its encoder). The array's ``data`` is exactly what ``np.save``
    writes for ``np.frombuffer(payload, np.uint8)``.
    """
    return ArrayRecord({KEY_PAYLOAD: _payload_array(data)})


def bundle_names(count: int) -> list[str]:
    """Array names of a bundle of ``count`` payloads: ``payload``, ``payload.1``, ..."""
    return [KEY_PAYLOAD] + [f"{KEY_PAYLOAD}.{i}" for i in range(1, count)]


def bundle_to_record(items: Sequence[bytes | Sequence[bytes | memoryview]]) -> ArrayRecord:
    """Several protocol payloads in one ArrayRecord, in order (a bundle of one is
    exactly :func:`bytes_to_record`)."""
    if not items:
        raise DataError("a bundle needs at least one payload")
    return ArrayRecord(
        {
            name: _payload_array(item)
            for name, item in zip(bundle_names(len(items)), items, strict=True)
        }
    )


def record_to_bundle(
    record: object, max_count: int, max_size: int, *, what: str = "payload"
) -> list[bytes]:
    """The payloads of a bundle: 1 to ``max_count`` arrays, each checked as :func:`record_to_bytes`.

    The count and every declared size are checked before any payload is parsed.
    """
    if not isinstance(record, ArrayRecord):
        raise DataError(f"{what}: expected an ArrayRecord")
    count = len(record)
    if not 1 <= count <= max_count or list(record.keys()) != bundle_names(count):
        raise DataError(f"{what}: expected a bundle of 1 to {max_count} payloads")
    arrays = [record[name] for name in bundle_names(count)]
    for arr in arrays:
        _check_declared(arr, max_size, what)
    return [bytes(_payload_bytes(arr, what, copy=True)) for arr in arrays]


@overload
def record_to_bytes(
    record: object, max_size: int, *, what: str = ..., copy: Literal[True] = ...
) -> bytes: ...


@overload
def record_to_bytes(
    record: object, max_size: int, *, what: str = ..., copy: Literal[False]
) -> memoryview: ...


def record_to_bytes(
    record: object, max_size: int, *, what: str = "payload", copy: bool = True
) -> bytes | memoryview:
    """Extract protocol bytes, refusing anything but one 1-D uint8 array of at most ``max_size``.

    The declared shape and the total size are checked before any bytes are
    parsed; then the .npy header (format 1.0/2.0, at most 4 KiB, parsed by
    numpy's safe header reader, never unpickled) must declare the same 1-D
    uint8 shape and be followed by exactly that many bytes, which are
    returned (one copy; with ``copy=False`` a read-only memoryview on the
    record's own bytes instead).
    """
    if not isinstance(record, ArrayRecord) or list(record.keys()) != [KEY_PAYLOAD]:
        raise DataError(f"{what}: expected an ArrayRecord with one array {KEY_PAYLOAD!r}")
    arr = record[KEY_PAYLOAD]
    _check_declared(arr, max_size, what)
    return _payload_bytes(arr, what, copy=copy)


def _check_declared(arr: Array, max_size: int, what: str) -> None:
    if np.dtype(arr.dtype) != _PAYLOAD_DTYPE or len(arr.shape) != 1:
        raise DataError(f"{what}: expected a 1-D uint8 array")
    if arr.shape[0] > max_size or len(arr.data) > max_size + _NPY_HEADER_MAX:
        raise DataError(f"{what}: {arr.shape[0]} bytes exceeds the limit of {max_size}")


def _payload_bytes(arr: Array, what: str, *, copy: bool) -> bytes | memoryview:
    data = arr.data
    if arr.stype != _NPY_STYPE or type(data) is not bytes:
        raise DataError(f"{what}: expected .npy bytes")
    try:
        stream = io.BytesIO(data)
        version = npy_format.read_magic(stream)
        if version == (1, 0):
            shape, fortran_order, dtype = npy_format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran_order, dtype = npy_format.read_array_header_2_0(stream)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except Exception as exc:  # numpy raises several types for a corrupt header
        raise DataError(f"{what}: undecodable payload ({exc})") from exc
    offset = stream.tell()
    if (
        dtype != _PAYLOAD_DTYPE
        or shape != (arr.shape[0],)
        or offset > _NPY_HEADER_MAX
        or len(data) - offset != arr.shape[0]
    ):
        raise DataError(f"{what}: payload does not match its declared 1-D uint8 shape")
    del fortran_order  # irrelevant for a 1-D array
    return data[offset:] if copy else memoryview(data)[offset:]


# ---------------------------------------------------------------- secure aggregation
# Record names of the SecAgg+ messages (stage names and actions: common.secagg.stages).
KEY_SECAGG_CONFIG = "secagg-config"
KEY_SECAGG_MSG = "secagg-msg"
MAX_SECAGG_CONFIG_BYTES = 1 << 20


def max_secagg_request_bytes(cohort_size: int) -> int:
    """Upper bound on a server->client SecAgg message (checked before parsing)."""
    return (1 << 16) + 1024 * cohort_size


def max_secagg_reply_bytes(cohort_size: int, masked_size: int) -> int:
    """Upper bound on a client->server SecAgg message (checked before parsing)."""
    return (1 << 16) + 1024 * cohort_size + masked_size
