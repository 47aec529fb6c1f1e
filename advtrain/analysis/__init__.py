"""Instability and unit analysis: the paper's Sections 4.3 and 3."""

from advtrain.analysis.lipschitz import LayerBound, LipschitzTable, lipschitz_bounds, register_bound
from advtrain.analysis.normalization import ContrastNormalization
from advtrain.analysis.units import TopActivating, layer_activations, random_directions, top_activating

__all__ = ["ContrastNormalization", "LayerBound", "LipschitzTable", "TopActivating", "layer_activations", "lipschitz_bounds",
           "random_directions", "register_bound", "top_activating"]
