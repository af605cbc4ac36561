"""CLIP text encoder through ``open_clip`` (the paper's CDPDNet used OpenAI CLIP ViT-B/32).

The published embeddings are OpenAI CLIP ``encode_text`` outputs, **not** L2-normalised (row norms
about 8 to 9), so ``normalize=False`` is the default here too.

Weights, in order of preference offline:

* a local file: an OpenAI ``clip`` package TorchScript archive (``ViT-B-32.pt``, loaded with
  QuickGELU exactly as the original), or an open_clip state dict / training checkpoint for
  ``model_name`` (use ``model_name="ViT-B-32-quickgelu"`` for OpenAI weights saved as a state dict);
* ``"openai"``: open_clip's own download of the OpenAI weights (Hugging Face hub; only when asked
  explicitly, and it fails fast under ``HF_HUB_OFFLINE=1`` unless already cached);
* ``"random"``: untrained weights, for plumbing tests only (the name says so).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from .base import TextEncoderError, as_text_list, l2_normalise

__all__ = ["CLIPEncoder", "import_open_clip"]

_HINT = "pass clip:/path/to/open_clip_ViT-B-32.pt (or OpenAI's ViT-B-32.pt) or use the default minilm encoder"


def import_open_clip():
    """``import open_clip``, or a :class:`TextEncoderError` that says what to install."""
    try:
        import open_clip  # noqa: PLC0415 - heavy optional import (pulls torchvision)
    except Exception as e:  # ImportError, or RuntimeError from a torch/torchvision mismatch
        raise TextEncoderError(
            "the CLIP text encoder needs open_clip_torch and a torchvision build matching torch "
            f"(`pip install open_clip_torch==3.3.0`); importing open_clip failed: {type(e).__name__}: {e}. "
            "Use the default minilm encoder or precomputed:/path/to/embeddings.pt instead"
        ) from e
    return open_clip


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive (OpenAI ``clip`` ``ViT-B-32.pt``) rather than a ``torch.save`` file."""
    import zipfile  # noqa: PLC0415

    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


class CLIPEncoder:
    """``open_clip`` CLIP text tower; ``encode`` returns ``encode_text`` rows (float32, ``[N, 512]`` for ViT-B-32)."""

    def __init__(self, weights: str | os.PathLike = "openai", model_name: str = "ViT-B-32",
                 normalize: bool = False, device: str | torch.device = "cpu", batch_size: int = 64):
        open_clip = import_open_clip()
        self.model_name = model_name
        self.normalize = normalize
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        w = str(weights)
        if w == "openai":
            try:
                model = open_clip.create_model(model_name, pretrained="openai", device="cpu")
            except Exception as e:
                offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
                why = "the hub is offline (HF_HUB_OFFLINE=1)" if offline else "the download failed"
                raise TextEncoderError(
                    f"CLIP weights {model_name} 'openai' are not in the local Hugging Face cache and {why}: {e}. "
                    f"Download them on a connected machine, or {_HINT}"
                ) from e
            self.name = f"clip:{model_name}:openai"
        elif w == "random":
            model = open_clip.create_model(model_name, pretrained=None, device="cpu")
            self.name = f"clip:{model_name}:random-untrained"
        else:
            path = Path(w).expanduser()
            if not path.is_file():
                raise TextEncoderError(f"CLIP weights not found at {str(path)!r}; {_HINT}")
            path = path.resolve()
            try:
                if _is_torchscript(path):
                    # OpenAI ``clip`` archive: the architecture (QuickGELU) comes from the file itself
                    model = open_clip.load_openai_model(str(path), precision="fp32", device="cpu")
                else:
                    model = open_clip.create_model(model_name, pretrained=str(path), device="cpu")
            except Exception as e:
                raise TextEncoderError(
                    f"cannot load CLIP {model_name} weights from {str(path)!r}: {type(e).__name__}: {e}; {_HINT}"
                ) from e
            self.name = f"clip:{path}"
        model.visual = None  # text tower only; frees the image tower's memory
        self.model = model.eval().to(self.device).requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        proj = getattr(model, "text_projection", None)
        if isinstance(proj, torch.nn.Linear):
            self.dim = int(proj.out_features)
        elif proj is not None:
            self.dim = int(proj.shape[-1])
        else:  # pragma: no cover - custom text towers
            self.dim = int(self.encode(["x"]).shape[-1])

    def __repr__(self) -> str:
        return f"CLIPEncoder(name={self.name!r}, dim={self.dim}, normalize={self.normalize})"

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        texts = as_text_list(texts)
        if not texts:
            return torch.zeros(0, getattr(self, "dim", 0))
        out = []
        for i in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(texts[i:i + self.batch_size]).to(self.device)
            out.append(self.model.encode_text(tokens).float().cpu())
        emb = torch.cat(out)
        return l2_normalise(emb) if self.normalize else emb
