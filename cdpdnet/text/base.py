"""The text-encoder interface shared by all encoders, and their error types."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

__all__ = ["TextEncoder", "TextEncoderError", "MissingTextError", "as_text_list", "l2_normalise"]


@runtime_checkable
class TextEncoder(Protocol):
    """Anything that turns a list of texts into one embedding row per text.

    ``name`` identifies the encoder and its weights (it is stored next to the embeddings in model
    checkpoints); ``dim`` is the embedding size ``D``; ``encode`` returns a float32 CPU tensor
    ``[len(texts), D]``. Whether rows are L2-normalised depends on the encoder (MiniLM: yes;
    CLIP: no by default, as in the published CDPDNet embeddings; precomputed: as stored).
    """

    name: str
    dim: int

    def encode(self, texts: Sequence[str]) -> torch.Tensor: ...


class TextEncoderError(RuntimeError):
    """A text encoder cannot be built: missing weights file, missing package, bad spec."""


class MissingTextError(KeyError):
    """A :class:`~cdpdnet.text.precomputed.PrecomputedEncoder` holds no embedding for a text."""

    def __init__(self, text: str, source: str = "", available: int | None = None):
        self.text = text
        where = f" in {source}" if source else ""
        n = f" ({available} prompts available)" if available is not None else ""
        super().__init__(
            f"no precomputed embedding for {text!r}{where}{n}; precomputed embeddings only cover their "
            "stored prompts, ROI names and task names: use a real text encoder (e.g. 'minilm') for other text"
        )

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


def as_text_list(texts: Sequence[str] | str) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    out = list(texts)
    for t in out:
        if not isinstance(t, str):
            raise TypeError(f"texts must be strings, got {type(t).__name__}")
    return out


def l2_normalise(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1, eps=eps)
