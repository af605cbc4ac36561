"""Prompt embeddings for the model (organ/ROI and task tables) and free-text ROI resolution."""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from .. import taxonomy as tx
from .base import TextEncoder, TextEncoderError, l2_normalise
from .precomputed import (
    PUBLISHED_CLIP_ENCODER,
    PUBLISHED_ORGAN_FILE,
    PUBLISHED_TASK_FILE,
    PUBLISHED_TASK_PROMPTS,
    load_published_tensor,
    reorder_published_task_rows,
    task_keys_by_id,
)

__all__ = [
    "default_tasks",
    "compute_prompt_embeddings",
    "published_prompt_embeddings",
    "reference_clip_embeddings",
    "RoiMatch",
    "RoiNameIndex",
    "nearest_rois",
]

ORGAN_TEMPLATE = "A computerized tomography of a {}"


def default_tasks() -> list[tuple[str, tuple[int, ...]]]:
    """The 11 source datasets as ``(key, ROI label values)`` in task-id order (01 .. 09, 10, 12, 13)."""
    return [(tx.DATASET_BY_KEY[k].key, tx.DATASET_BY_KEY[k].rois) for k in task_keys_by_id()]


def _as_roi(r: tx.ROI | int | str) -> tx.ROI:
    return r if isinstance(r, tx.ROI) else tx.roi(r)


def compute_prompt_embeddings(
    encoder: TextEncoder,
    rois: Iterable[tx.ROI | int | str] | None = None,
    tasks: Sequence[tuple[str, Iterable[int | str]]] | None = None,
    *,
    template: str = ORGAN_TEMPLATE,
    original_spelling: bool = True,
    published_task_prompts: bool = False,
) -> dict:
    """Embed the ROI prompts and the task prompts with ``encoder``.

    ``rois``: default all 32 in class order. ``tasks``: ``[(name, [ROI, ...]), ...]``, default the 11
    source datasets in task-id order (:func:`default_tasks`). Prompts come from
    :func:`cdpdnet.taxonomy.organ_prompt` / :func:`~cdpdnet.taxonomy.task_prompt`; with
    ``published_task_prompts=True`` a task named by a dataset key gets the verbatim published prompt
    (:data:`~cdpdnet.text.precomputed.PUBLISHED_TASK_PROMPTS`) instead, needed to reproduce
    ``txt_task_encoding.pth`` with the OpenAI CLIP weights.

    Returns ``{"organ_prompts", "organ_names", "organ_embeddings" [R, D], "task_names",
    "task_prompts", "task_embeddings" [T, D], "encoder", "dim"}`` (float32 CPU tensors, plain
    lists/strings otherwise, so it can be stored in a checkpoint and loaded with
    ``torch.load(weights_only=True)``).
    """
    roi_list = [_as_roi(r) for r in (tx.ROIS if rois is None else rois)]
    task_list = default_tasks() if tasks is None else [(str(n), tuple(rs)) for n, rs in tasks]
    organ_prompts = [tx.organ_prompt(r, template, original_spelling) for r in roi_list]
    task_prompts = []
    for name, rs in task_list:
        if published_task_prompts and name in PUBLISHED_TASK_PROMPTS:
            task_prompts.append(PUBLISHED_TASK_PROMPTS[name])
        else:
            task_prompts.append(tx.task_prompt(rs, original_spelling))
    emb = encoder.encode(organ_prompts + task_prompts).float().cpu()
    dim = int(getattr(encoder, "dim", emb.shape[1]))
    if emb.shape != (len(organ_prompts) + len(task_prompts), dim):
        raise TextEncoderError(f"encoder {encoder.name!r} returned {tuple(emb.shape)}, expected "
                               f"({len(organ_prompts) + len(task_prompts)}, {dim})")
    n = len(organ_prompts)
    return {
        "organ_prompts": organ_prompts,
        "organ_names": [r.name for r in roi_list],
        "organ_embeddings": emb[:n].contiguous(),
        "task_names": [name for name, _ in task_list],
        "task_prompts": task_prompts,
        "task_embeddings": emb[n:].contiguous(),
        "encoder": str(encoder.name),
        "dim": dim,
    }


def published_prompt_embeddings(organ_rows: torch.Tensor | None, task_rows: torch.Tensor | None,
                                reorder_tasks: bool = True) -> dict:
    """The prompt-embedding dict for the published tables (either may be ``None``)."""
    out: dict = {"organ_prompts": [], "organ_names": [], "organ_embeddings": torch.zeros(0, 0),
                 "task_names": [], "task_prompts": [], "task_embeddings": torch.zeros(0, 0),
                 "encoder": PUBLISHED_CLIP_ENCODER, "dim": 0}
    dims = set()
    if organ_rows is not None:
        organ_rows = torch.as_tensor(organ_rows).float()
        if organ_rows.ndim != 2 or organ_rows.shape[0] != tx.NUM_CLASSES:
            raise TextEncoderError(f"published ROI table must be [32, D], got {tuple(organ_rows.shape)}")
        out.update(organ_prompts=[tx.organ_prompt(r) for r in tx.ROIS], organ_names=[r.name for r in tx.ROIS],
                   organ_embeddings=organ_rows)
        dims.add(organ_rows.shape[1])
    if task_rows is not None:
        task_rows = torch.as_tensor(task_rows).float()
        rows = reorder_published_task_rows(task_rows) if reorder_tasks else task_rows
        keys = task_keys_by_id()
        out.update(task_names=keys, task_prompts=[PUBLISHED_TASK_PROMPTS[k] for k in keys], task_embeddings=rows)
        dims.add(rows.shape[1])
    if len(dims) > 1:
        raise TextEncoderError(f"published ROI and task tables differ in width: {sorted(dims)}")
    d = dims.pop() if dims else 0
    for k in ("organ_embeddings", "task_embeddings"):
        if out[k].numel() == 0:
            out[k] = torch.zeros(0, d)
    out["dim"] = int(d)
    return out


def reference_clip_embeddings(folder: str | os.PathLike) -> dict:
    """The paper-faithful prompt-embedding dict from the published CLIP tables in ``folder``.

    Reads ``txt_encoding.pth`` [32, 512] and ``txt_task_encoding.pth`` [11, 512] (float16 in the
    files, float32 here), reorders the task rows into task-id order
    (:func:`~cdpdnet.text.precomputed.reorder_published_task_rows`) and returns the same dict as
    :func:`compute_prompt_embeddings` (``task_prompts`` are the verbatim published prompts).
    """
    p = Path(folder).expanduser()
    missing = [f for f in (PUBLISHED_ORGAN_FILE, PUBLISHED_TASK_FILE) if not (p / f).is_file()]
    if missing:
        raise TextEncoderError(
            f"published CLIP embeddings {', '.join(missing)} not found in {str(p)!r}: pass the folder that holds "
            f"{PUBLISHED_ORGAN_FILE} and {PUBLISHED_TASK_FILE} (CDPDNet pretrained_weights/), or compute embeddings "
            "with a text encoder (compute_prompt_embeddings)")
    return published_prompt_embeddings(load_published_tensor(p / PUBLISHED_ORGAN_FILE),
                                       load_published_tensor(p / PUBLISHED_TASK_FILE))


# ---------------------------------------------------------------------------------------------
# Free-text -> ROI


class RoiMatch(NamedTuple):
    roi: tx.ROI
    score: float      # cosine similarity (1.0 for an exact name/synonym match)
    matched: str      # the ROI name or synonym that matched best

    @property
    def name(self) -> str:
        return self.roi.name


def _roi_candidate_names(r: tx.ROI) -> list[str]:
    return sorted({tx.normalise_name(k) for k in (r.name, r.display, r.clip_name, *r.synonyms)})


class RoiNameIndex:
    """Embeddings of every ROI's names and synonyms under one encoder, for :func:`nearest_rois`."""

    def __init__(self, encoder: TextEncoder):
        self.encoder = encoder
        self.texts: list[str] = []
        owners: list[int] = []
        for r in tx.ROIS:
            for k in _roi_candidate_names(r):
                self.texts.append(k)
                owners.append(r.index)
        self.owners = torch.tensor(owners)
        self.embeddings = l2_normalise(encoder.encode(self.texts))

    def query(self, text: str, k: int = 3, use_names: bool = True) -> list[RoiMatch]:
        k = max(1, min(int(k), tx.NUM_CLASSES))
        exact = tx.resolve_roi_name(text) if use_names else None
        q = l2_normalise(self.encoder.encode([tx.normalise_name(text) or text]))[0]
        sim = self.embeddings @ q
        best: dict[int, tuple[float, str]] = {}
        for j in range(len(self.texts)):
            i, s = int(self.owners[j]), float(sim[j])
            if i not in best or s > best[i][0]:
                best[i] = (s, self.texts[j])
        if exact is not None:
            best[exact.index] = (1.0, tx.normalise_name(text))
        ranked = sorted(best.items(), key=lambda kv: (-kv[1][0], kv[0]))
        if exact is not None:  # an exact name wins even if another candidate ties at 1.0
            ranked.sort(key=lambda kv: kv[0] != exact.index)
        return [RoiMatch(tx.ROIS[i - 1], s, m) for i, (s, m) in ranked[:k]]


_INDEX_CACHE: "weakref.WeakKeyDictionary[object, RoiNameIndex]" = weakref.WeakKeyDictionary()


def _index_for(encoder: TextEncoder) -> RoiNameIndex:
    try:
        idx = _INDEX_CACHE.get(encoder)
    except TypeError:  # not weak-referenceable
        return RoiNameIndex(encoder)
    if idx is None:
        idx = RoiNameIndex(encoder)
        _INDEX_CACHE[encoder] = idx
    return idx


def nearest_rois(encoder_or_index: TextEncoder | RoiNameIndex, text: str, k: int = 3,
                 use_names: bool = True) -> list[RoiMatch]:
    """The ``k`` ROIs closest to a free-text prompt, best first.

    Each ROI scores the best cosine similarity between the text's embedding and the embeddings of
    the ROI's names and synonyms (taxonomy display name, canonical name, CLIP name, synonyms). With
    ``use_names`` an exact name/synonym match (:func:`cdpdnet.taxonomy.resolve_roi_name`) comes
    first with score 1.0 whatever the encoder. The name index of an encoder is built once and
    cached. With a :class:`~cdpdnet.text.precomputed.PrecomputedEncoder` only known names resolve
    (other text raises :class:`~cdpdnet.text.base.MissingTextError`).
    """
    idx = encoder_or_index if isinstance(encoder_or_index, RoiNameIndex) else _index_for(encoder_or_index)
    return idx.query(text, k, use_names)
