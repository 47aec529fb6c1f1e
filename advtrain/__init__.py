"""advtrain: layer-wise adversarial training for PyTorch Lightning.

After Szegedy et al., "Intriguing properties of neural networks" (2013).
"""

from advtrain.classifier import Classifier
from advtrain.metrics import ErrorRate

__version__ = "0.1.0"

__all__ = ["Classifier", "ErrorRate", "__version__"]
