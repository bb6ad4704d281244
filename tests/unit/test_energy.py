"""Energy meters: the estimate is flagged and positive, sensors fall back cleanly, never a silent zero.

No test here reaches carbontracker's network code: sensors are fakes, and the
one test that opens carbontracker's real handlers checks that only its
component modules are imported.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from common import energy
from common.energy import (
    J_PER_KWH,
    CarbonTrackerMeter,
    EnergyConfig,
    EnergyMeter,
    EnergyReading,
    EstimateMeter,
    make_meter,
    open_carbontracker_sources,
)
from common.errors import ConfigurationError, ProtocolError

CPU_ONLY = EnergyConfig(gpu_count=0, sample_interval_s=0.01)


class FakeClock:
    """A clock returning the given readings in turn."""

    def __init__(self, *values: float) -> None:
        self._values: Iterator[float] = iter(values)

    def __call__(self) -> float:
        return next(self._values)


class FakeSource:
    """A power sensor with a fixed reading, or one that raises."""

    def __init__(self, component: str, watts: float = 100.0, exc: BaseException | None = None):
        self.component, self.label = component, f"fake-{component}"
        self.watts, self.exc = watts, exc
        self.reads = 0
        self.closed = False

    def read_power_w(self) -> float:
        self.reads += 1
        if self.exc is not None:
            raise self.exc
        return self.watts

    def close(self) -> None:
        self.closed = True


def _busy(seconds: float) -> int:
    end, n = time.perf_counter() + seconds, 0
    while time.perf_counter() < end:
        n += 1
    return n


def test_estimate_meter_busy_loop_estimated_and_positive() -> None:
    meter = EstimateMeter(CPU_ONLY)
    meter.start()
    _busy(0.2)
    reading = meter.stop()
    assert reading.estimated is True
    assert reading.kwh > 0
    assert reading.co2eq_g == pytest.approx(reading.kwh * CPU_ONLY.grid_intensity_g_per_kwh)
    assert reading.duration_s >= 0.2
    assert reading.source.startswith("estimate")


def test_estimate_meter_arithmetic_matches_formula() -> None:
    config = EnergyConfig(
        grid_intensity_g_per_kwh=300.0,
        pue=1.5,
        cpu_watts_per_core=15.0,
        gpu_watts=250.0,
        gpu_count=2,
    )
    meter = EstimateMeter(config, cpu_time=FakeClock(1.0, 11.0), wall_time=FakeClock(0.0, 5.0))
    meter.start()
    reading = meter.stop()
    joules = 10.0 * 15.0 + 5.0 * 2 * 250.0
    assert reading.kwh == pytest.approx(joules * 1.5 / J_PER_KWH)
    assert reading.co2eq_g == pytest.approx(reading.kwh * 300.0)
    assert reading.duration_s == 5.0
    assert reading.estimated


def test_estimate_meter_stop_before_start_raises() -> None:
    with pytest.raises(ProtocolError):
        EstimateMeter(CPU_ONLY).stop()


def test_carbontracker_meter_readable_sensors_measured_not_estimated() -> None:
    gpu, cpu = FakeSource("gpu", 200.0), FakeSource("cpu", 50.0)
    meter = CarbonTrackerMeter(
        EnergyConfig(pue=1.2, gpu_count=0, sample_interval_s=0.01),
        sources=[gpu, cpu],
        cpu_time=FakeClock(0.0, 1.0),
        wall_time=FakeClock(0.0, 36.0),
    )
    meter.start()
    time.sleep(0.05)
    reading = meter.stop()
    assert reading.estimated is False
    assert reading.kwh == pytest.approx(250.0 * 36.0 * 1.2 / J_PER_KWH)
    assert gpu.reads >= 1 and cpu.reads >= 1
    assert reading.source == "fake-gpu(gpu)+fake-cpu(cpu)"
    meter.close()
    assert gpu.closed and cpu.closed


def test_carbontracker_meter_short_interval_still_sampled() -> None:
    source = FakeSource("cpu", 40.0)
    meter = CarbonTrackerMeter(EnergyConfig(gpu_count=0, sample_interval_s=30.0), sources=[source])
    meter.start()
    reading = meter.stop()  # stop immediately: the first sample is taken at start
    assert source.reads >= 1
    assert reading.estimated is False


@pytest.mark.parametrize(
    "exc", [RuntimeError("nvml gone"), SystemExit(1), OSError("permission denied")]
)
def test_carbontracker_meter_component_raises_falls_back_to_estimate(exc: BaseException) -> None:
    gpu, cpu = FakeSource("gpu", 200.0), FakeSource("cpu", exc=exc)
    meter = CarbonTrackerMeter(
        EnergyConfig(pue=1.0, cpu_watts_per_core=10.0, gpu_count=0, sample_interval_s=0.01),
        sources=[gpu, cpu],
        cpu_time=FakeClock(0.0, 3.0),
        wall_time=FakeClock(0.0, 2.0),
    )
    meter.start()
    time.sleep(0.03)
    reading = meter.stop()
    assert reading.estimated is True
    assert "estimate(cpu: fake-cpu failed" in reading.source
    assert reading.kwh == pytest.approx((200.0 * 2.0 + 3.0 * 10.0) / J_PER_KWH)


def test_carbontracker_meter_zero_power_not_a_silent_zero() -> None:
    meter = CarbonTrackerMeter(
        CPU_ONLY,
        sources=[FakeSource("cpu", 0.0)],
        cpu_time=FakeClock(0.0, 2.0),
        wall_time=FakeClock(0.0, 2.0),
    )
    meter.start()
    reading = meter.stop()
    assert reading.estimated is True
    assert reading.kwh > 0
    assert "read no power" in reading.source


def test_carbontracker_meter_no_sources_estimates_cpu() -> None:
    meter = CarbonTrackerMeter(CPU_ONLY, sources=[])
    meter.start()
    _busy(0.05)
    reading = meter.stop()
    assert reading.estimated and reading.kwh > 0
    assert reading.source == "estimate(cpu: no sensor)"


def test_carbontracker_meter_start_twice_raises() -> None:
    meter = CarbonTrackerMeter(CPU_ONLY, sources=[])
    meter.start()
    with pytest.raises(ProtocolError):
        meter.start()
    meter.stop()


def test_make_meter_no_sensor_gives_estimate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(energy, "open_carbontracker_sources", lambda: [])
    meter = make_meter(CPU_ONLY)
    assert isinstance(meter, EstimateMeter)
    assert isinstance(meter, EnergyMeter)


def test_make_meter_readable_sensor_gives_carbontracker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(energy, "open_carbontracker_sources", lambda: [FakeSource("gpu")])
    meter = make_meter(CPU_ONLY)
    assert isinstance(meter, CarbonTrackerMeter)
    assert meter.sensors == ("fake-gpu(gpu)",)


def test_make_meter_sensors_off_never_opens_carbontracker(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom() -> list[object]:
        raise AssertionError("carbontracker must not be opened")

    monkeypatch.setattr(energy, "open_carbontracker_sources", boom)
    config = EnergyConfig(gpu_count=0, use_sensors=False)
    assert isinstance(make_meter(config), EstimateMeter)


@pytest.mark.parametrize("exc", [RuntimeError("driver"), SystemExit(2), KeyError("x")])
def test_open_carbontracker_sources_handler_errors_swallowed(
    monkeypatch: pytest.MonkeyPatch, exc: BaseException
) -> None:
    def raising() -> None:
        raise exc

    monkeypatch.setattr(energy, "_open_nvml", raising)
    monkeypatch.setattr(energy, "_open_rapl", raising)
    assert open_carbontracker_sources() == []


def test_open_carbontracker_sources_nvml_handler_raising_swallowed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from carbontracker.components.gpu import nvidia

    class BrokenGPU:
        def __init__(self, pids: object, devices_by_pid: bool) -> None:
            pass

        def available(self) -> bool:
            raise RuntimeError("NVML exploded")

    monkeypatch.setattr(nvidia, "NvidiaGPU", BrokenGPU)
    monkeypatch.setattr(energy, "_open_rapl", lambda: None)
    assert open_carbontracker_sources() == []


def test_open_carbontracker_sources_imports_no_network_code() -> None:
    code = (
        "import sys; from common.energy import open_carbontracker_sources as o; o(); "
        "bad = [m for m in sys.modules if m.startswith(('carbontracker.emissions', "
        "'carbontracker.tracker', 'requests', 'geocoder'))]; print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"pue": 0.9},
        {"grid_intensity_g_per_kwh": -1.0},
        {"cpu_watts_per_core": 0.0},
        {"gpu_count": -1},
        {"gpu_count": True},
        {"sample_interval_s": float("nan")},
    ],
)
def test_energy_config_invalid_raises(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        EnergyConfig(**kwargs)  # type: ignore[arg-type]


def test_energy_reading_payload_has_json_fields() -> None:
    reading = EnergyReading(0.5, 200.0, True, "estimate(cpu)", 3.0)
    payload = reading.to_payload()
    assert payload["kwh"] == 0.5 and payload["estimated"] is True
    with pytest.raises(ConfigurationError):
        EnergyReading(-0.1, 0.0, True, "x", 1.0)
