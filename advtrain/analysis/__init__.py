"""Instability and unit analysis: the paper's Sections 4.3 and 3."""

from advtrain.analysis.lipschitz import LayerBound, LipschitzTable, lipschitz_bounds, register_bound
from advtrain.analysis.normalization import ContrastNormalization

__all__ = ["ContrastNormalization", "LayerBound", "LipschitzTable", "lipschitz_bounds", "register_bound"]
