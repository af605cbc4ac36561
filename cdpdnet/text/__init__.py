"""Pluggable text encoders and the prompt embeddings of CDPDNet.

* :class:`TextEncoder` the interface (``name``, ``dim``, ``encode(texts) -> Tensor[N, dim]``);
* :class:`MiniLMEncoder` (offline default, 384-d, L2-normalised), :class:`CLIPEncoder` (open_clip
  ViT-B-32, 512-d, not normalised by default, as the published embeddings), :class:`PrecomputedEncoder`
  (a table in a file, including the published ``txt_encoding.pth`` / ``txt_task_encoding.pth``);
* :func:`build_text_encoder` from a spec string (``"minilm"``, ``"clip:/path.pt"``, ``"precomputed:/f.pt"`` ...);
* :func:`compute_prompt_embeddings` the ROI and task tables stored in model checkpoints, and
  :func:`reference_clip_embeddings` the same from the published CLIP files (task rows reordered by
  :func:`reorder_published_task_rows`);
* :func:`nearest_rois` free-text prompt -> closest ROIs.

Encoders are imported lazily by the classes that need them (open_clip pulls torchvision).
"""

from .base import MissingTextError, TextEncoder, TextEncoderError
from .clip import CLIPEncoder
from .factory import SPEC_HELP, build_text_encoder
from .minilm import MiniLMEncoder, default_minilm_folder
from .precomputed import (
    PUBLISHED_CLIP_ENCODER,
    PUBLISHED_TASK_PROMPTS,
    PUBLISHED_TASK_ROW_KEYS,
    PrecomputedEncoder,
    reorder_published_task_rows,
    task_keys_by_id,
)
from .prompts import (
    RoiMatch,
    RoiNameIndex,
    compute_prompt_embeddings,
    default_tasks,
    nearest_rois,
    published_prompt_embeddings,
    reference_clip_embeddings,
)

__all__ = [
    "TextEncoder",
    "TextEncoderError",
    "MissingTextError",
    "MiniLMEncoder",
    "default_minilm_folder",
    "CLIPEncoder",
    "PrecomputedEncoder",
    "PUBLISHED_CLIP_ENCODER",
    "PUBLISHED_TASK_PROMPTS",
    "PUBLISHED_TASK_ROW_KEYS",
    "reorder_published_task_rows",
    "task_keys_by_id",
    "build_text_encoder",
    "SPEC_HELP",
    "compute_prompt_embeddings",
    "published_prompt_embeddings",
    "reference_clip_embeddings",
    "default_tasks",
    "RoiMatch",
    "RoiNameIndex",
    "nearest_rois",
]
