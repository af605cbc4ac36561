from .cdpdnet import CDPDNet

__all__ = ["CDPDNet"]
