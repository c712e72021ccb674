"""Analysis of a model's target weights without changing them (``rankwise inspect``)."""

from rankwise.analysis.spectrum import TargetSpectrum, inspect_model, singular_values, spectrum_stats

__all__ = ["TargetSpectrum", "inspect_model",
    "singular_values", "spectrum_stats"]
