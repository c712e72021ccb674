"""Factorized layers that replace ``nn.Linear``."""

from rankwise.layers.factorized import FactorizedLinear, FactorizedShape

__all__ = ["FactorizedLinear", "FactorizedShape"]
