"""Calibration: the text windows and per-layer statistics the data-aware decomposition methods read."""

from rankwise.calibration.cache import CalibrationRun, cached_stats, model_fingerprint
from rankwise.calibration.data import DEFAULT_SOURCE, SOURCES, CalibrationConfig, calibration_ids
from rankwise.calibration.stats import collect_stats

__all__ = [
    "DEFAULT_SOURCE",
    "SOURCES",
    "CalibrationConfig",
    "CalibrationRun",
    "cached_stats",
    "calibration_ids",
    "collect_stats",
    "model_fingerprint",
]
