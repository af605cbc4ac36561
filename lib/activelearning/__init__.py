from .uncertainty import MissingROIUncertainty, TTAUncertainty

__all__ = ["TTAUncertainty", "MissingROIUncertainty"]
