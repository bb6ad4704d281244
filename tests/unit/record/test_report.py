"""write_report: PNGs and a self-contained HTML (images embedded, no external references)."""

from __future__ import annotations

from pathlib import Path

from server.record.store import SqlRecord
from server.report import write_report


def test_write_report_files_and_embedded_images(tmp_path: Path) -> None:
    with SqlRecord(str(tmp_path / "record.db")) as rec:
        run = rec.create_run({"rounds": 3})
        parent = None
        for rnd in (1, 2, 3):
            rec.start_round(run, rnd, [1, 2])
            for node in (1, 2):
                rec.record_energy(run, rnd, node, 0.001 * rnd, 0.4, node == 2)
            v = rec.add_model_version(
                run,
                rnd,
                parent,
                bytes([rnd]),
                {"accuracy": 0.5 + 0.1 * rnd},
                0.7 * rnd,
                0.2 * rnd,
                rec.energy_total_kwh(run, rnd),
                [1, 2],
            )
            parent = v.version
            rec.finish_round(run, rnd, {"accuracy": 0.5 + 0.1 * rnd, "loss": 1.0 / rnd})
        paths = write_report(rec, run, tmp_path / "report")
    for png in (paths.accuracy_png, paths.epsilon_png, paths.energy_png):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = paths.html.read_text()
    assert text.count("data:image/png;base64,") == 3
    assert 'src="http' not in text and "includes estimates" in text
