from .cdpdnet import CDPDNetTrain

__all__ = ["CDPDNetTrain"]
