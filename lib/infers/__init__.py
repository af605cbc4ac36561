from .cdpdnet import CDPDNetInfer, CDPDNetPromptInfer

__all__ = ["CDPDNetInfer", "CDPDNetPromptInfer"]
