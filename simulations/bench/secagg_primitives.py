"""Micro-benchmark of the secure-aggregation primitives against the cipher's keystream ceiling.

Every figure is measured on the real code path (common.crypto, common.secagg);
nothing is hard-coded. Run ``python -m simulations.bench.secagg_primitives``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from common.crypto.prg import expand_seed
from common.rng import secure_bytes, seeded_generator
from common.secagg import SecAggClient, SecAggServer
from common.secagg.quantize import quantize
from common.secagg.simulate import federated_config, members_of


def _median_s(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _raw_keystream(seed: bytes, buffer: np.ndarray) -> None:
    """ChaCha20 keystream into a preallocated buffer: the cipher alone, the ceiling."""
    view = buffer.data.cast("B")
    Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor().update_into(view, view)


def _round_stage_times(clients_n: int, size: int) -> dict[str, float]:
    """Drive one full round and time each stage's client and server work."""
    config, identities = federated_config(
        run_id=1,
        round=1,
        cohort=list(range(1, clients_n + 1)),
        threshold=0.6,
        value_bound=1.0,
        vector_length=size,
    )
    rng = seeded_generator(0)
    inputs = {u: rng.uniform(-1.0, 1.0, size) for u in config.cohort}
    members = members_of(identities)
    clients = {u: SecAggClient(u, config, identities[u], members) for u in config.cohort}
    server = SecAggServer(config, members)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    keys = [clients[u].advertise_keys(r) for u, r in server.start().items()]
    shares = [clients[u].share_keys(r) for u, r in server.receive_advertise_keys(keys).items()]
    collect = server.receive_share_keys(shares)
    timings["setup_s"] = time.perf_counter() - start
    masked = []
    per_client = []
    for u, request in collect.items():
        t0 = time.perf_counter()
        reply = clients[u].collect_masked(request, inputs[u], seeded_generator(u))
        per_client.append(time.perf_counter() - t0)
        masked.append(type(reply).decode(reply.encode(), config))
    timings["mask_client_s"] = statistics.median(per_client)
    t0 = time.perf_counter()
    check = server.receive_masked(masked)
    signed = [clients[u].consistency(r) for u, r in check.items()]
    unmask = server.receive_consistency(signed)
    revealed = [clients[u].unmask(r) for u, r in unmask.items()]
    t1 = time.perf_counter()
    server.receive_unmask(revealed)
    timings["unmask_per_client_s"] = (time.perf_counter() - t1) / clients_n
    timings["server_sum_s"] = t1 - t0
    timings["round_s"] = time.perf_counter() - start
    timings["neighbours"] = float(config.neighbours)
    return timings


def bench_primitives(
    sizes: Sequence[int] = (100_000, 1_000_000), *, clients: int = 50, repeats: int = 5
) -> list[dict[str, Any]]:
    """Time the primitives for each vector size ``d``.

    Returns one dict per size with: ``params``, ``keystream_mb_s`` (raw ChaCha20
    keystream, the ceiling), ``mask_expand_mb_s`` (``expand_seed`` into ring
    words), ``quantize_ms``, ``mask_client_ms`` (one client's whole masked-input
    stage with ``neighbours`` pairwise masks), ``unmask_per_client_ms`` (server
    unmask work divided by the number of clients), ``round_s`` (a full
    in-memory round with ``clients`` clients, all clients' work serial).
    """
    rows: list[dict[str, Any]] = []
    for size in sizes:
        nbytes = 4 * size
        seed = secure_bytes(32)
        buffer = np.zeros(nbytes, dtype=np.uint8)
        keystream_s = _median_s(partial(_raw_keystream, seed, buffer), repeats)
        expand_s = _median_s(partial(expand_seed, seed, size, 32), repeats)
        config, _ = federated_config(  # only its quantisation parameters are used
            run_id=1,
            round=1,
            cohort=list(range(1, clients + 1)),
            threshold=0.6,
            value_bound=1.0,
            vector_length=size,
        )
        x = seeded_generator(1).uniform(-1.0, 1.0, size)
        rng = seeded_generator(2)
        quantize_s = _median_s(partial(quantize, x, config, rng), repeats)
        stages = _round_stage_times(clients, size)
        rows.append(
            {
                "params": size,
                "clients": clients,
                "neighbours": int(stages["neighbours"]),
                "keystream_mb_s": nbytes / keystream_s / 1e6,
                "mask_expand_mb_s": nbytes / expand_s / 1e6,
                "quantize_ms": quantize_s * 1e3,
                "mask_client_ms": stages["mask_client_s"] * 1e3,
                "unmask_per_client_ms": stages["unmask_per_client_s"] * 1e3,
                "round_s": stages["round_s"],
            }
        )
    return rows


COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("params", "params", "{:,}"),
    ("clients", "clients", "{}"),
    ("k", "neighbours", "{}"),
    ("keystream MB/s (ceiling)", "keystream_mb_s", "{:,.0f}"),
    ("mask expand MB/s", "mask_expand_mb_s", "{:,.0f}"),
    ("quantise ms", "quantize_ms", "{:.2f}"),
    ("mask 1 input ms", "mask_client_ms", "{:.2f}"),
    ("unmask/client ms", "unmask_per_client_ms", "{:.2f}"),
    ("round s (serial)", "round_s", "{:.2f}"),
)
"""Table columns of :func:`bench_primitives` rows: (title, key, format)."""


def main() -> None:
    """Print the benchmark as a rich table."""
    from rich.console import Console
    from rich.table import Table

    rows = bench_primitives()
    table = Table(title="fedseal secure-aggregation primitives (ChaCha20 PRG, uint32 ring)")
    for title, _, _ in COLUMNS:
        table.add_column(title, justify="right")
    for row in rows:
        table.add_row(*(fmt.format(row[key]) for _, key, fmt in COLUMNS))
    Console().print(table)


if __name__ == "__main__":
    main()
