"""Lightning callbacks of advtrain, installed as ``advtrain.callbacks``."""

from advtrain.callbacks.adversarial_evaluation import AdversarialEvaluation, AdversarialReport
from advtrain.callbacks.layerwise_adversarial_training import LayerwiseAdversarialTraining
from advtrain.callbacks.lipschitz_monitor import LipschitzMonitor

__all__ = ["AdversarialEvaluation", "AdversarialReport", "LayerwiseAdversarialTraining", "LipschitzMonitor"]
