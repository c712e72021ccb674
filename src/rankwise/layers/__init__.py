"""Factorized layers that replace ``nn.Linear``, and the helpers that find, swap and merge them."""

from rankwise.layers.factorized import FactorizedLinear, FactorizedShape
from rankwise.layers.modules import is_factorized, merge_factorized_, replace_module

__all__ = ["FactorizedLinear", "FactorizedShape", "is_factorized", "merge_factorized_", "replace_module"]
