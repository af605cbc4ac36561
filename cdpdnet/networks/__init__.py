"""CDPDNet networks: one module per building block (MONAI style)."""

from .cdpdnet import CDPDNet, TaskPromptGenerator
from .config import NetworkConfig
from .cross_attention import WindowCrossAttentionFusion
from .dino_branch import DinoAdaptor, DinoSliceEncoder
from .film import TextFiLM
from .model import CDPDNetModel

__all__ = ["CDPDNet", "CDPDNetModel", "NetworkConfig", "TaskPromptGenerator", "WindowCrossAttentionFusion",
           "DinoAdaptor", "DinoSliceEncoder", "TextFiLM"]
