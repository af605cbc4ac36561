from .uncertainty import INFO_KEY, TTAUncertaintyScoring, tta_uncertainty

__all__ = ["TTAUncertaintyScoring", "tta_uncertainty", "INFO_KEY"]
