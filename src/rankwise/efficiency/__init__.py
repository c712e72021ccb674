"""Efficiency: what a decomposition saves on paper (size, bytes, FLOPs) and in practice (time, memory, energy).

* :mod:`.accounting` - parameters and bytes by dtype, layer and role; bytes on disk;
* :mod:`.flops` - analytic FLOPs of prefill and decode (checked against torch's FlopCounterMode);
* :mod:`.ideal` - bytes per decode step and the ideal speedups, and how much of them is realized;
* :mod:`.timing` - measured prefill, decode and scoring latency (median and spread, interleaved);
* :mod:`.memory` - peak RSS on CPU, max allocated on GPU; :mod:`.energy` - RAPL and NVML counters;
* :mod:`.execution` - per-layer choice of three-factor / folded / dense execution by measurement;
* :mod:`.compare` - all of it side by side (``rankwise bench``, ``bench/speedup.py``).
"""

from rankwise.efficiency.accounting import ModelSize, disk_bytes, model_size
from rankwise.efficiency.compare import BenchConfig, BenchResult, compare
from rankwise.efficiency.energy import find_counter
from rankwise.efficiency.execution import ExecutionReport, choose_execution, merged_copy
from rankwise.efficiency.flops import FlopCount, counted_flops, decode_flops, prefill_flops
from rankwise.efficiency.ideal import decode_bytes, ideal_decode, ideal_prefill, realized
from rankwise.efficiency.memory import PeakMemory
from rankwise.efficiency.timing import Stats, Workload, measure

__all__ = [
    "BenchConfig",
    "BenchResult",
    "ExecutionReport",
    "FlopCount",
    "ModelSize",
    "PeakMemory",
    "Stats",
    "Workload",
    "choose_execution",
    "compare",
    "counted_flops",
    "decode_bytes",
    "decode_flops",
    "disk_bytes",
    "find_counter",
    "ideal_decode",
    "ideal_prefill",
    "measure",
    "merged_copy",
    "model_size",
    "prefill_flops",
    "realized",
]
