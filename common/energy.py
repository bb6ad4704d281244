"""Energy and carbon accounting for one measured interval (a site's local training).

What it guarantees: :meth:`EnergyMeter.stop` always returns a reading whose
``estimated`` flag says whether any part of it is an estimate; a reading is
never a silent zero. Where a sensor can be read, energy is measured; where
not, it is estimated from measured process CPU time (and GPU time) and
configured power. Nothing here touches the network, prompts, exits the
process or writes to stdout.

Measured path (:class:`CarbonTrackerMeter`): carbontracker's component
handlers are used directly (never its ``CarbonTracker`` front end, which
geolocates by IP, fetches grid intensity over the network, may prompt and
may call ``sys.exit``). carbontracker is imported lazily, inside
:func:`open_carbontracker_sources`, and every call into it is wrapped so that
any exception falls back to the estimate for that component:

- GPU: NVML through carbontracker's ``NvidiaGPU`` handler — instantaneous
  board power of the visible GPUs (``CUDA_VISIBLE_DEVICES``), sampled every
  ``sample_interval_s``. Whole-device power: other processes on the same GPU
  are included.
- CPU: Intel RAPL (``/sys/class/powercap``) through carbontracker's
  ``IntelCPU`` handler — package and DRAM power, averaged over 1 s windows
  by the handler. Whole-package power: other processes are included.

Energy = mean sampled power x interval duration, as carbontracker computes it
(Anthony, Kanding & Selvan, "Carbontracker: Tracking and
Predicting the Carbon Footprint of Training Deep Learning Models", ICML
workshop 2020).

Estimated path (:class:`EstimateMeter`): ``cpu_s x cpu_watts_per_core`` with
``cpu_s`` this process's CPU time (all threads, ``time.process_time``), plus
``duration_s x gpu_count x gpu_watts`` when GPUs are in use (the GPUs are
counted busy for the whole interval: an upper bound). Memory, disks and
network are not included.

Both paths multiply by the data centre's power usage effectiveness (PUE) and
convert to CO2-equivalent with a configured grid carbon intensity; neither is
ever looked up online. Defaults: grid intensity 445 gCO2eq/kWh (IEA world
average for 2024, "Electricity 2025", the figure carbontracker 2.4 uses),
PUE 1.58 (Uptime Institute global survey 2023), 15 W per busy CPU core (a
server core's share of a typical 150-250 W TDP package), 250 W per busy GPU
(board power of a data-centre GPU such as an A100 PCIe).
"""

from __future__ import annotations

import math
import os
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from common.errors import ConfigurationError, ProtocolError

J_PER_KWH = 3_600_000.0


@dataclass(frozen=True, slots=True)
class EnergyConfig:
    """How energy is measured or estimated, and converted to carbon.

    Attributes
    ----------
    grid_intensity_g_per_kwh : float
        Carbon intensity of the site's electricity (gCO2eq/kWh), >= 0.
    pue : float
        Power usage effectiveness of the site (>= 1).
    cpu_watts_per_core : float
        Power of one fully busy CPU core for the estimate (W), > 0.
    gpu_watts : float
        Power of one busy GPU for the estimate (W), > 0.
    gpu_count : int or None
        GPUs the measured work uses, for the estimate; ``None`` asks torch
        (if importable) how many CUDA devices are visible. Pass 0 when
        training on the CPU of a machine that has GPUs.
    use_sensors : bool
        ``False`` always estimates (no carbontracker at all).
    sample_interval_s : float
        Seconds between sensor samples (> 0).
    """

    grid_intensity_g_per_kwh: float = 445.0
    pue: float = 1.58
    cpu_watts_per_core: float = 15.0
    gpu_watts: float = 250.0
    gpu_count: int | None = None
    use_sensors: bool = True
    sample_interval_s: float = 1.0

    def __post_init__(self) -> None:
        for name, low, strict in (
            ("grid_intensity_g_per_kwh", 0.0, False),
            ("pue", 1.0, False),
            ("cpu_watts_per_core", 0.0, True),
            ("gpu_watts", 0.0, True),
            ("sample_interval_s", 0.0, True),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigurationError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value) or value < low or (strict and value == low):
                bound = f"> {low:g}" if strict else f">= {low:g}"
                raise ConfigurationError(f"{name} must be finite and {bound}, got {value!r}")
        if self.gpu_count is not None and (
            isinstance(self.gpu_count, bool)
            or not isinstance(self.gpu_count, int)
            or self.gpu_count < 0
        ):
            raise ConfigurationError(f"gpu_count must be an integer >= 0, got {self.gpu_count!r}")
        if not isinstance(self.use_sensors, bool):
            raise ConfigurationError(f"use_sensors must be a boolean, got {self.use_sensors!r}")


@dataclass(frozen=True, slots=True)
class EnergyReading:
    """Energy of one measured interval.

    Attributes
    ----------
    kwh : float
        Energy in kWh, PUE included (>= 0).
    co2eq_g : float
        Emissions in grams of CO2-equivalent.
    estimated : bool
        ``True`` when any part comes from the estimate rather than a sensor.
    source : str
        How it was obtained, e.g. ``"nvml(gpu)+estimate(cpu)"``, with the
        reason a sensor fell back when it did.
    duration_s : float
        Wall-clock length of the interval.
    """

    kwh: float
    co2eq_g: float
    estimated: bool
    source: str
    duration_s: float

    def __post_init__(self) -> None:
        for name in ("kwh", "co2eq_g", "duration_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ConfigurationError(f"{name} must be a finite number >= 0, got {value!r}")

    def to_payload(self) -> dict[str, object]:
        """JSON-ready form (``--json`` output, audit payload)."""
        return {
            "kwh": self.kwh,
            "co2eq_g": self.co2eq_g,
            "estimated": self.estimated,
            "source": self.source,
            "duration_s": self.duration_s,
        }


@runtime_checkable
class EnergyMeter(Protocol):
    """Measures the energy of the interval between :meth:`start` and :meth:`stop`."""

    def start(self) -> None:
        """Begin an interval."""
        ...

    def stop(self) -> EnergyReading:
        """End the interval and return its reading (never raises for sensor failures)."""
        ...


class PowerSource(Protocol):
    """One readable power sensor (the seam between the meter and carbontracker)."""

    component: str  # "cpu" or "gpu"
    label: str  # "rapl", "nvml", ...

    def read_power_w(self) -> float:
        """Current power in watts (may block briefly); raises on failure."""
        ...

    def close(self) -> None:
        """Release the sensor."""
        ...


def _to_kwh_co2(joules: float, config: EnergyConfig) -> tuple[float, float]:
    kwh = joules * config.pue / J_PER_KWH
    return kwh, kwh * config.grid_intensity_g_per_kwh


def detect_gpu_count() -> int:
    """Visible CUDA devices according to torch (0 if torch or CUDA is unavailable)."""
    try:
        import torch

        return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    except Exception:  # any failure means "no usable GPU"
        return 0


class _Interval:
    """Process CPU time and wall time since a start point."""

    def __init__(self, cpu_time: Callable[[], float], wall_time: Callable[[], float]) -> None:
        self._cpu_time, self._wall_time = cpu_time, wall_time
        self._cpu0: float | None = None
        self._wall0 = 0.0

    def start(self) -> None:
        self._cpu0, self._wall0 = self._cpu_time(), self._wall_time()

    @property
    def running(self) -> bool:
        return self._cpu0 is not None

    def stop(self) -> tuple[float, float]:
        if self._cpu0 is None:
            raise ProtocolError("energy meter stopped before it was started")
        cpu_s = max(0.0, self._cpu_time() - self._cpu0)
        wall_s = max(0.0, self._wall_time() - self._wall0)
        self._cpu0 = None
        return cpu_s, wall_s


class EstimateMeter:
    """Energy estimated from measured CPU (and GPU) time and configured power; always ``estimated``.

    Parameters
    ----------
    config : EnergyConfig
        Power figures, PUE and grid intensity.
    cpu_time, wall_time : callable
        Clocks (seconds); injectable for tests.
    """

    def __init__(
        self,
        config: EnergyConfig | None = None,
        *,
        cpu_time: Callable[[], float] = time.process_time,
        wall_time: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.config = config or EnergyConfig()
        self._gpu_count = (
            detect_gpu_count() if self.config.gpu_count is None else self.config.gpu_count
        )
        self._interval = _Interval(cpu_time, wall_time)

    @property
    def gpu_count(self) -> int:
        """GPUs counted busy by the estimate."""
        return self._gpu_count

    def start(self) -> None:
        """Begin an interval."""
        self._interval.start()

    def stop(self) -> EnergyReading:
        """End the interval; ``estimated=True``."""
        cpu_s, wall_s = self._interval.stop()
        joules = self.estimate_cpu_joules(cpu_s) + self.estimate_gpu_joules(wall_s)
        kwh, co2 = _to_kwh_co2(joules, self.config)
        gpus = f"+{self._gpu_count}gpu" if self._gpu_count else ""
        return EnergyReading(kwh, co2, True, f"estimate(cpu{gpus})", wall_s)

    def estimate_cpu_joules(self, cpu_s: float) -> float:
        """CPU energy (J, before PUE) for ``cpu_s`` seconds of process CPU time."""
        return cpu_s * self.config.cpu_watts_per_core

    def estimate_gpu_joules(self, wall_s: float) -> float:
        """GPU energy (J, before PUE), counting every GPU busy for ``wall_s`` seconds."""
        return wall_s * self._gpu_count * self.config.gpu_watts


# ---------------------------------------------------------------- carbontracker


class _HandlerSource:
    """A carbontracker component handler as a :class:`PowerSource`; every call guarded by the caller."""

    def __init__(self, component: str, label: str, handler: object) -> None:
        self.component, self.label, self._handler = component, label, handler

    def read_power_w(self) -> float:
        values = self._handler.power_usage()  # type: ignore[attr-defined]
        watts = [float(v) for v in values]
        if not watts or not all(math.isfinite(w) and w >= 0 for w in watts):
            raise ValueError(f"{self.label} returned unusable power {values!r}")
        return sum(watts)

    def close(self) -> None:
        self._handler.shutdown()  # type: ignore[attr-defined]


def _open_nvml() -> _HandlerSource | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from carbontracker.components.gpu import nvidia

        handler = nvidia.NvidiaGPU(pids=[os.getpid()], devices_by_pid=False)
        if not handler.available():
            return None
        handler.init()
    source = _HandlerSource("gpu", "nvml", handler)
    try:
        source.read_power_w()  # readable, not merely present
    except (Exception, SystemExit):
        _close_quietly(source)
        return None
    return source


def _open_rapl() -> _HandlerSource | None:
    from carbontracker.components.cpu import intel

    rapl_dir = str(intel.RAPL_DIR)
    if not os.path.isdir(rapl_dir):
        return None
    readable = [
        entry
        for entry in os.listdir(rapl_dir)
        if entry.startswith("intel-rapl:")
        and os.access(os.path.join(rapl_dir, entry, "energy_uj"), os.R_OK)
    ]
    if not readable:
        return None
    handler = intel.IntelCPU(pids=[os.getpid()], devices_by_pid=False)
    if not handler.available():
        return None
    handler.init()
    if not handler.devices():
        return None
    # Readability was checked above; a probe would cost the handler's 1 s window.
    return _HandlerSource("cpu", "rapl", handler)


def _close_quietly(source: PowerSource) -> None:
    try:
        source.close()
    except (Exception, SystemExit):  # closing a sensor must never fail a round
        pass


def open_carbontracker_sources() -> list[PowerSource]:
    """The carbontracker sensors readable here (NVML GPU, RAPL CPU); ``[]`` if none.

    Imports carbontracker's component handlers only (no network code), and
    swallows every error, including ``SystemExit``: an unreadable or broken
    sensor is simply not returned.
    """
    sources: list[PowerSource] = []
    for opener in (_open_nvml, _open_rapl):
        try:
            source = opener()
        except (Exception, SystemExit):  # any failure means "not readable"
            source = None
        if source is not None:
            sources.append(source)
    return sources


@dataclass(slots=True)
class _Samples:
    watts: dict[str, list[float]] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)


class CarbonTrackerMeter:
    """Energy measured with carbontracker's sensors, falling back to the estimate per component.

    Parameters
    ----------
    config : EnergyConfig
        Grid intensity, PUE, estimate figures and the sampling interval.
    sources : sequence of PowerSource or None
        The sensors; ``None`` opens carbontracker's (:func:`open_carbontracker_sources`).
    cpu_time, wall_time : callable
        Clocks for the estimate fallback; injectable for tests.

    Notes
    -----
    A background thread samples every source from :meth:`start` until
    :meth:`stop`, beginning immediately, so every source has been sampled
    at least once by the time :meth:`stop` returns (stop waits for a sample
    in progress: up to about 1 s with RAPL). A source that raises is dropped
    for the rest of the interval and its component is estimated instead; the
    reading is then ``estimated=True`` with the reason in ``source``.
    """

    def __init__(
        self,
        config: EnergyConfig | None = None,
        *,
        sources: Sequence[PowerSource] | None = None,
        cpu_time: Callable[[], float] = time.process_time,
        wall_time: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.config = config or EnergyConfig()
        self._sources = list(open_carbontracker_sources() if sources is None else sources)
        self._estimate = EstimateMeter(self.config, cpu_time=cpu_time, wall_time=wall_time)
        self._interval = _Interval(cpu_time, wall_time)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._samples = _Samples()

    @property
    def sensors(self) -> tuple[str, ...]:
        """The readable sensors, e.g. ``("nvml(gpu)", "rapl(cpu)")``."""
        return tuple(f"{s.label}({s.component})" for s in self._sources)

    def start(self) -> None:
        """Begin an interval and start sampling."""
        if self._thread is not None:
            raise ProtocolError("energy meter started twice without stop")
        self._samples = _Samples()
        self._stop.clear()
        self._interval.start()
        self._thread = threading.Thread(
            target=self._sample_loop, name="fedseal-energy", daemon=True
        )
        self._thread.start()

    def _sample_loop(self) -> None:
        samples, live = self._samples, list(self._sources)
        while live:
            for source in list(live):
                try:
                    watts = source.read_power_w()
                except (Exception, SystemExit) as exc:  # fall back, never crash
                    samples.failures[source.component] = (
                        f"{source.label} failed: {type(exc).__name__}"
                    )
                    live.remove(source)
                    continue
                samples.watts.setdefault(source.component, []).append(watts)
            if self._stop.wait(self.config.sample_interval_s):
                return

    def stop(self) -> EnergyReading:
        """End the interval and return the reading (falls back, never raises for sensors)."""
        if self._thread is None:
            raise ProtocolError("energy meter stopped before it was started")
        self._stop.set()
        self._thread.join(timeout=self.config.sample_interval_s + 5.0)
        self._thread = None
        cpu_s, wall_s = self._interval.stop()
        samples = self._samples

        joules = 0.0
        parts: list[str] = []
        estimated = False
        labels = {s.component: s.label for s in self._sources}
        for component in ("gpu", "cpu"):
            watts = samples.watts.get(component, [])
            failure = samples.failures.get(component)
            measured = bool(watts) and failure is None and sum(watts) > 0
            if measured:
                joules += (sum(watts) / len(watts)) * wall_s
                parts.append(f"{labels[component]}({component})")
                continue
            if component == "gpu":
                extra = self._estimate.estimate_gpu_joules(wall_s)
                if extra == 0 and failure is None and "gpu" not in labels:
                    continue  # no GPU in use and none to read: nothing to account
            else:
                extra = self._estimate.estimate_cpu_joules(cpu_s)
            joules += extra
            estimated = True
            why = failure or (
                f"{labels[component]} read no power" if component in labels else "no sensor"
            )
            parts.append(f"estimate({component}: {why})")
        kwh, co2 = _to_kwh_co2(joules, self.config)
        return EnergyReading(kwh, co2, estimated, "+".join(parts), wall_s)

    def close(self) -> None:
        """Release the sensors (NVML shutdown)."""
        for source in self._sources:
            _close_quietly(source)
        self._sources = []


def make_meter(config: EnergyConfig | None = None) -> EnergyMeter:
    """A :class:`CarbonTrackerMeter` when a sensor is readable, else an :class:`EstimateMeter`.

    Never returns a meter that would report a silent zero: without sensors the
    estimate is used and flagged.
    """
    config = config or EnergyConfig()
    if config.use_sensors:
        sources = open_carbontracker_sources()
        if sources:
            return CarbonTrackerMeter(config, sources=sources)
    return EstimateMeter(config)
