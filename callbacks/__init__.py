"""Lightning callbacks of advtrain, installed as ``advtrain.callbacks``."""

__all__: list[str] = []
