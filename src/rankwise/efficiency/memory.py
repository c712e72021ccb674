"""Peak memory of a piece of work: process RSS on CPU, ``torch.cuda.max_memory_allocated`` on GPU.

On CPU the honest number is the process's resident set, which also holds every other model loaded in
the process; so each measurement carries the RSS at the start (``baseline_bytes``) and the peak during the
work, and the increase (``peak_bytes - baseline_bytes``: activations, KV cache, temporaries) is what
differs between a dense and a decomposed model, next to their static weight bytes.

How the CPU peak is found, best first (the method is recorded with the number):

* ``vmhwm``: Linux resets the "high water mark" when ``5`` is written to ``/proc/self/clear_refs``; the
  exact peak is then ``VmHWM`` in ``/proc/self/status``. Some kernels accept the reset but do not raise the
  mark for memory mapped and unmapped in between (seen on a CI machine: a touched 256 MiB tensor left
  ``VmHWM`` 28 KiB above the baseline), so the method is used only after a once-per-process probe shows the
  mark rising for a touched, then unmapped, 64 MiB buffer;
* ``sampled``: a thread samples RSS (psutil) every millisecond: a short spike can be missed;
* ``ru_maxrss``: the process lifetime peak (``resource``), which cannot be reset: an upper bound.
"""

from __future__ import annotations

import functools
import gc
import mmap
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


@dataclass(frozen=True)
class MemoryResult:
    """Peak memory during some work, with the baseline at its start and the method that measured it."""

    device: str
    peak_bytes: int
    baseline_bytes: int
    method: str

    @property
    def increase_bytes(self) -> int:
        return max(0, self.peak_bytes - self.baseline_bytes)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "increase_bytes": self.increase_bytes}


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def current_rss() -> int:
    """Resident set size of this process now, in bytes."""
    rss = _status_kib("VmRSS")
    if rss is not None:
        return rss
    try:
        import psutil

        return int(psutil.Process(os.getpid()).memory_info().rss)
    except ImportError:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter; False where the kernel or permissions do not allow it."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    hwm, rss = _status_kib("VmHWM"), _status_kib("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + (1 << 20)


_PROBE_BYTES = 64 << 20


@functools.cache
def _hwm_follows_allocations() -> bool:
    """Whether ``VmHWM`` rises for memory that is mapped, touched and unmapped after a reset.

    Large tensors are ``mmap``-ed and returned with ``munmap``, exactly as this probe's buffer, so a kernel
    that passes it reports their peak; one that fails it would report the baseline as the peak.
    """
    if not _reset_hwm():
        return False
    before = _status_kib("VmHWM")
    buffer = mmap.mmap(-1, _PROBE_BYTES)
    try:
        buffer.write(b"\x01" * _PROBE_BYTES)  # touch every page
    finally:
        buffer.close()
    after = _status_kib("VmHWM")
    return before is not None and after is not None and after - before >= _PROBE_BYTES * 3 // 4


class _Sampler(threading.Thread):
    """Samples RSS every ``interval`` seconds until stopped; keeps the maximum."""

    def __init__(self, interval: float = 0.001) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = current_rss()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.peak = max(self.peak, current_rss())

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self.peak, current_rss())


class PeakMemory:
    """``with PeakMemory(device) as pm: work()`` then ``pm.result``: the peak memory during ``work``."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.result: MemoryResult | None = None
        self._method = ""
        self._baseline = 0
        self._sampler: _Sampler | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._baseline = torch.cuda.memory_allocated(self.device)
            self._method = "torch.cuda.max_memory_allocated"
            return self
        # Garbage of earlier work (a model dropped but still in a reference cycle) would otherwise be freed
        # by the cyclic collector in the middle of the measured work, lowering RSS below the baseline and
        # hiding the work's own peak; collect it before the baseline is taken.
        gc.collect()
        trust_hwm = _hwm_follows_allocations()
        self._baseline = current_rss()
        if trust_hwm and _reset_hwm():
            self._method = "vmhwm"
        else:
            try:
                import psutil  # noqa: F401

                self._sampler = _Sampler()
                self._sampler.start()
                self._method = "sampled"
            except ImportError:
                self._method = "ru_maxrss"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self._method == "vmhwm":
            peak = _status_kib("VmHWM") or current_rss()
        elif self._sampler is not None:
            peak = self._sampler.stop()
        else:
            import resource

            peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
        self.result = MemoryResult(device=str(self.device), peak_bytes=int(peak), baseline_bytes=self._baseline,
                                   method=self._method)
