"""Energy from hardware counters: RAPL on CPU (Linux powercap), NVML on NVIDIA GPUs. Never estimated.

Where no counter is readable, :func:`find_counter` returns ``None`` and the reason, and reports say
"energy: not measurable on this machine (<reason>)" with ``"energy": null`` in JSON. The paper sampled
``nvidia-smi`` power every second; a cumulative energy counter is more accurate for short runs.

* **RAPL** (``/sys/class/powercap/intel-rapl:*``; AMD exposes the same interface): each zone has a
  microjoule counter ``energy_uj`` that wraps around at ``max_energy_range_uj``. We read the package zones
  (and their ``dram`` sub-zones where present). Scope: the whole CPU package, so other processes running
  at the same time are included: the number is an upper bound on a shared machine.
* **NVML** (``pynvml``): ``nvmlDeviceGetTotalEnergyConsumption`` is millijoules since the driver loaded
  (Volta and newer); scope: the whole GPU board.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

RAPL_ROOT = Path("/sys/class/powercap")


class EnergyCounter(Protocol):
    """A cumulative energy counter: ``read()`` a raw reading, ``joules(start, end)`` between two readings."""

    name: str
    scope: str

    def read(self) -> Any: ...

    def joules(self, start: Any, end: Any) -> float: ...


@dataclass(frozen=True)
class RaplZone:
    path: Path
    name: str
    max_range_uj: int


class RaplCounter:
    """Sum of RAPL zones; each reading is a tuple of microjoule counters, deltas handle one wraparound."""

    def __init__(self, zones: Sequence[RaplZone]) -> None:
        self.zones = list(zones)
        self.name = "rapl:" + "+".join(z.name for z in self.zones)
        self.scope = "CPU package(s) incl. other processes on them"

    def read(self) -> tuple[int, ...]:
        return tuple(int((z.path / "energy_uj").read_text().strip()) for z in self.zones)

    def joules(self, start: tuple[int, ...], end: tuple[int, ...]) -> float:
        total = 0
        for zone, a, b in zip(self.zones, start, end, strict=True):
            total += b - a if b >= a else b + zone.max_range_uj - a
        return total / 1e6


class NvmlCounter:
    """Total energy of one NVIDIA GPU (millijoules since driver load) through pynvml."""

    def __init__(self, pynvml: Any, index: int) -> None:
        self._nvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self.name = f"nvml:gpu{index}"
        self.scope = "whole GPU board"

    def read(self) -> int:
        return int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))

    def joules(self, start: int, end: int) -> float:
        return (end - start) / 1e3


def _zone(path: Path) -> RaplZone | None:
    try:
        name = (path / "name").read_text().strip()
        max_range = int((path / "max_energy_range_uj").read_text().strip())
    except (OSError, ValueError):
        return None
    return RaplZone(path=path, name=name, max_range_uj=max_range)


def rapl_zones(root: Path) -> list[RaplZone]:
    """Package zones (``intel-rapl:N`` named ``package-*``) and their ``dram`` sub-zones under ``root``.

    Other top-level zones (``psys``) are used only when there is no package zone, since ``psys`` already
    contains the packages and adding both would count twice.
    """
    if not root.is_dir():
        return []
    top = [z for p in sorted(root.glob("intel-rapl:*")) if p.name.count(":") == 1 and (z := _zone(p))]
    packages = [z for z in top if z.name.startswith("package")]
    if not packages:
        return top
    zones = list(packages)
    for pkg in packages:
        for sub in sorted(pkg.path.glob(f"{pkg.path.name}:*")):
            z = _zone(sub)
            if z is not None and z.name == "dram":
                zones.append(z)
    return zones


def find_counter(device: str | torch.device = "cpu", rapl_root: Path | None = None
                 ) -> tuple[EnergyCounter | None, str]:
    """A readable energy counter for ``device`` and a description, or ``None`` and why there is none."""
    dev = torch.device(device)
    rapl_root = rapl_root if rapl_root is not None else RAPL_ROOT
    if dev.type == "cuda":
        return _nvml_counter(dev.index if dev.index is not None else torch.cuda.current_device())
    if dev.type != "cpu":
        return None, f"no energy counter known for device type '{dev.type}'"
    zones = rapl_zones(rapl_root)
    if not zones:
        return None, f"no RAPL zones under {rapl_root} (the kernel or the VM does not expose them)"
    counter = RaplCounter(zones)
    try:
        counter.read()
    except PermissionError:
        return None, f"RAPL counters under {rapl_root} are not readable (permission denied; needs root)"
    except (OSError, ValueError) as exc:
        return None, f"RAPL counters under {rapl_root} are unreadable ({exc})"
    return counter, counter.name


def _nvml_counter(index: int) -> tuple[EnergyCounter | None, str]:
    try:
        import pynvml
    except ImportError:
        return None, "pynvml is not installed (pip install nvidia-ml-py for GPU energy counters)"
    try:
        pynvml.nvmlInit()
        counter = NvmlCounter(pynvml, index)
        counter.read()
    except Exception as exc:  # pynvml raises NVMLError subclasses (not supported, no permission, ...)
        return None, f"NVML energy counter unavailable on GPU {index} ({exc})"
    return counter, counter.name


@dataclass
class EnergyTally:
    """Energy summed over repeated runs of one workload, with the tokens and runs it covers."""

    counter: str
    scope: str
    joules: float = 0.0
    runs: int = 0
    tokens: int = 0

    def add(self, joules: float, tokens: int) -> None:
        self.joules += joules
        self.runs += 1
        self.tokens += tokens

    @property
    def per_run(self) -> float | None:
        return self.joules / self.runs if self.runs else None

    @property
    def per_token(self) -> float | None:
        return self.joules / self.tokens if self.tokens else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "joules_per_run": self.per_run, "joules_per_token": self.per_token}
