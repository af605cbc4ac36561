"""Embeddings read from a file instead of computed by a text model.

Accepted files (see :meth:`PrecomputedEncoder.from_file`):

* our format, a ``torch.save``-d dict ``{"prompts": [...], "embeddings": Tensor[N, D], "encoder": str}``
  (optional ``"names"``: one extra lookup name per row);
* a prompt-embedding dict as returned by :func:`cdpdnet.text.compute_prompt_embeddings` (the dict
  stored in model checkpoints), also when nested one level deep in a checkpoint dict;
* the two bare tensors published with CDPDNet / the CLIP-Driven Universal Model:
  ``txt_encoding.pth`` ``[32, 512]`` (the 32 ROI prompts in class order) and
  ``txt_task_encoding.pth`` ``[11, 512]`` (one row per source dataset, in the published row order
  01, 02, 03, 04, 05, 07, 08, 09, 12, 13, 10, which :func:`reorder_published_task_rows` puts into
  task-id order); a folder holding either or both files.

Lookup in :meth:`PrecomputedEncoder.encode`: the exact prompt, then the prompt after
:func:`~cdpdnet.taxonomy.normalise_name`, then ROI names and synonyms (ROI rows) and dataset keys
and names (task rows). Anything else raises :class:`~cdpdnet.text.base.MissingTextError`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from .. import taxonomy as tx
from .base import MissingTextError, TextEncoderError, as_text_list

__all__ = [
    "PrecomputedEncoder",
    "PUBLISHED_TASK_ROW_KEYS",
    "PUBLISHED_TASK_PROMPTS",
    "PUBLISHED_CLIP_ENCODER",
    "PUBLISHED_ORGAN_FILE",
    "PUBLISHED_TASK_FILE",
    "task_keys_by_id",
    "reorder_published_task_rows",
    "load_published_tensor",
]

PUBLISHED_ORGAN_FILE = "txt_encoding.pth"
PUBLISHED_TASK_FILE = "txt_task_encoding.pth"
PUBLISHED_CLIP_ENCODER = "openai-clip:ViT-B/32 (published CDPDNet txt_encoding.pth / txt_task_encoding.pth)"

#: Dataset key of each row of the published ``txt_task_encoding.pth`` (``clip_embedding.py TASK_NAME``).
PUBLISHED_TASK_ROW_KEYS: tuple[str, ...] = ("01", "02", "03", "04", "05", "07", "08", "09", "12", "13", "10")

#: The verbatim task prompts that produced ``txt_task_encoding.pth``, by dataset key. They differ
#: from :func:`cdpdnet.taxonomy.task_prompt` for 01 ("Aorta", and "Portal Vein, Splenic Vein" as two
#: names), 09 ("Aorta"), 10 (another order) and 13 (no "Left Kidney"); the ROI prompts of
#: ``txt_encoding.pth`` keep the "Arota" spelling.
PUBLISHED_TASK_PROMPTS: dict[str, str] = {
    k: f"A task of segmenting {v} in computerized tomography" for k, v in {
        "01": "Spleen, Right Kidney, Left Kidney, Gall Bladder, Esophagus, Liver, Stomach, Aorta, Postcava, "
              "Portal Vein, Splenic Vein, Pancreas, Right Adrenal Gland, Left Adrenal Gland, Duodenum",
        "02": "Spleen, Left Kidney, Gall Bladder, Esophagus, Liver, Stomach, Pancreas, Duodenum",
        "03": "Liver",
        "04": "Liver, Liver Tumor",
        "05": "Right Kidney, Left Kidney, Kidney Tumor, Kidney Cyst",
        "07": "Liver, Spleen, Left Kidney, Right Kidney, Stomach, Gall Bladder, Esophagus, Pancreas, Duodenum, "
              "Colon, Intestine, Right Adrenal Gland, Left Adrenal Gland, Rectum, Bladder, Left Head of Femur, "
              "Right Head of Femur",
        "08": "Liver, Right Kidney, Left Kidney, Spleen, Pancreas",
        "09": "Spleen, Right Kidney, Left Kidney, Gall Bladder, Esophagus, Liver, Stomach, Aorta, Postcava, "
              "Pancreas, Right Adrenal Gland, Left Adrenal Gland, Duodenum, Bladder, Prostate",
        "12": "Liver, Bladder, Right Lung, Left Lung, Right Kidney, Left Kidney",
        "13": "Liver, Right Kidney, Spleen, Pancreas, Aorta, Postcava, Stomach, Gall Bladder, Esophagus, "
              "Right Adrenal Gland, Left Adrenal Gland, Celiac Truck",
        "10": "Spleen, Liver, Pancreas, Liver Tumor, Lung Tumor, Pancreas Tumor, Hepatic Vessel, "
              "Hepatic Vessel Tumor, Colon Tumor",
    }.items()
}


def task_keys_by_id() -> list[str]:
    """Dataset keys in task-id order 0..10: ``01 02 03 04 05 07 08 09 10 12 13``."""
    return [d.key for d in sorted(tx.DATASETS, key=lambda d: d.task_id)]


def reorder_published_task_rows(rows: torch.Tensor) -> torch.Tensor:
    """Put the rows of the published ``txt_task_encoding.pth`` into task-id order.

    The published file has one row per dataset in the order 01, 02, 03, 04, 05, 07, 08, 09, 12, 13,
    10 (:data:`PUBLISHED_TASK_ROW_KEYS`), but the reference's task-id map (``tasknames``,
    :attr:`cdpdnet.taxonomy.SourceDataset.task_id`) is 01->0 ... 09->7, **10->8, 12->9, 13->10**
    (reference section 2.3). Row ``t`` of the result belongs to task id ``t``: result rows 0-7 are
    rows 0-7, result row 8 (MSD, key 10) is published row 10, rows 9 and 10 (12, 13) are published
    rows 8 and 9.
    """
    if rows.ndim != 2 or rows.shape[0] != len(PUBLISHED_TASK_ROW_KEYS):
        raise ValueError(f"expected the published task table [11, D], got {tuple(rows.shape)}")
    by_key = {k: i for i, k in enumerate(PUBLISHED_TASK_ROW_KEYS)}
    order = [by_key[k] for k in task_keys_by_id()]
    return rows[order]


def load_published_tensor(path: str | os.PathLike) -> torch.Tensor:
    """A bare published embedding tensor as float32 (they are stored as float16)."""
    path = Path(path)
    if not path.is_file():
        raise TextEncoderError(f"precomputed embeddings not found at {str(path)!r}")
    t = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(t, torch.Tensor) or t.ndim != 2:
        raise TextEncoderError(f"{str(path)!r} is not a bare [N, D] embedding tensor")
    return t.float()


def _key(text: str) -> str:
    return tx.normalise_name(text)


def _roi_lookup_names(r: tx.ROI) -> list[str]:
    return [r.name, r.display, r.clip_name, *r.synonyms,
            tx.organ_prompt(r), tx.organ_prompt(r, original_spelling=False)]


def _task_lookup_names(key: str) -> list[str]:
    d = tx.DATASET_BY_KEY[key]
    return [key, d.name, f"task {key}", f"task {d.task_id}", PUBLISHED_TASK_PROMPTS[key],
            tx.task_prompt(d.rois), tx.task_prompt(d.rois, original_spelling=False)]


class PrecomputedEncoder:
    """A fixed table of embeddings, looked up by prompt or name (see the module docstring)."""

    def __init__(self, prompts: Sequence[str], embeddings: torch.Tensor, encoder: str = "precomputed",
                 names: Mapping[str, int] | None = None, source: str = ""):
        emb = torch.as_tensor(embeddings).detach().float().cpu()
        prompts = list(prompts)
        if emb.ndim != 2 or emb.shape[0] != len(prompts):
            raise TextEncoderError(
                f"precomputed embeddings {tuple(emb.shape)} do not match {len(prompts)} prompts" +
                (f" in {source}" if source else ""))
        self.prompts = prompts
        self.embeddings = emb
        self.name = str(encoder)
        self.dim = int(emb.shape[1])
        self.source = source
        self._exact: dict[str, int] = {}
        self._alias: dict[str, int] = {}
        for i, p in enumerate(prompts):
            self._exact.setdefault(p, i)
            self._alias.setdefault(_key(p), i)
        for n, i in (names or {}).items():
            self._alias.setdefault(_key(n), int(i))

    def __repr__(self) -> str:
        return f"PrecomputedEncoder(name={self.name!r}, rows={len(self.prompts)}, dim={self.dim}, source={self.source!r})"

    def __len__(self) -> int:
        return len(self.prompts)

    # -- lookup ---------------------------------------------------------------------------------
    def index_of(self, text: str) -> int:
        """Row of ``text``; :class:`MissingTextError` naming the text when there is none."""
        if text in self._exact:
            return self._exact[text]
        k = _key(text)
        if k in self._alias:
            return self._alias[k]
        r = tx.resolve_roi_name(text)
        if r is not None and _key(r.name) in self._alias:
            return self._alias[_key(r.name)]
        raise MissingTextError(text, self.source or self.name, len(self.prompts))

    def __contains__(self, text: str) -> bool:
        try:
            self.index_of(text)
            return True
        except MissingTextError:
            return False

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        texts = as_text_list(texts)
        if not texts:
            return torch.zeros(0, self.dim)
        return self.embeddings[[self.index_of(t) for t in texts]].clone()

    # -- constructors ---------------------------------------------------------------------------
    @classmethod
    def from_prompt_embeddings(cls, data: Mapping, source: str = "") -> "PrecomputedEncoder":
        """From a :func:`~cdpdnet.text.compute_prompt_embeddings` dict (organ rows, then task rows)."""
        organ_prompts = list(data.get("organ_prompts") or [])
        task_prompts = list(data.get("task_prompts") or [])
        parts = []
        if organ_prompts:
            parts.append(torch.as_tensor(data["organ_embeddings"]).float())
        if task_prompts:
            parts.append(torch.as_tensor(data["task_embeddings"]).float())
        if not parts:
            raise TextEncoderError(f"no organ or task embeddings in {source or 'the prompt-embedding dict'}")
        names: dict[str, int] = {}
        organ_names = list(data.get("organ_names") or [])
        if not organ_names and len(organ_prompts) == tx.NUM_CLASSES:
            organ_names = [r.name for r in tx.ROIS]
        for i, n in enumerate(organ_names):
            r = tx.resolve_roi_name(n)
            for alias in (_roi_lookup_names(r) if r is not None else [n]):
                names.setdefault(alias, i)
        off = len(organ_prompts)
        for j, n in enumerate(list(data.get("task_names") or [])):
            for alias in (_task_lookup_names(n) if n in tx.DATASET_BY_KEY else [n]):
                names.setdefault(alias, off + j)
        return cls(organ_prompts + task_prompts, torch.cat(parts), str(data.get("encoder", "precomputed")),
                   names, source)

    @classmethod
    def from_published(cls, organ_rows: torch.Tensor | None = None, task_rows: torch.Tensor | None = None,
                       source: str = "", reorder_tasks: bool = True) -> "PrecomputedEncoder":
        """From the published bare tensors (``task_rows`` in the published row order unless
        ``reorder_tasks=False`` says they are already in task-id order)."""
        from .prompts import published_prompt_embeddings  # noqa: PLC0415 - avoid an import cycle

        data = published_prompt_embeddings(organ_rows, task_rows, reorder_tasks=reorder_tasks)
        return cls.from_prompt_embeddings(data, source)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "PrecomputedEncoder":
        p = Path(path).expanduser()
        hint = ("pass precomputed:/path/to/file.pt holding {'prompts', 'embeddings', 'encoder'}, a prompt-embedding "
                f"dict, the published {PUBLISHED_ORGAN_FILE} / {PUBLISHED_TASK_FILE} or a folder with them, "
                "or use the default minilm encoder")
        if p.is_dir():
            organ, task = p / PUBLISHED_ORGAN_FILE, p / PUBLISHED_TASK_FILE
            if not organ.is_file() and not task.is_file():
                raise TextEncoderError(f"no {PUBLISHED_ORGAN_FILE} or {PUBLISHED_TASK_FILE} in folder {str(p)!r}; {hint}")
            return cls.from_published(load_published_tensor(organ) if organ.is_file() else None,
                                      load_published_tensor(task) if task.is_file() else None, source=str(p))
        if not p.is_file():
            raise TextEncoderError(f"precomputed embeddings not found at {str(p)!r}; {hint}")
        try:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as e:
            raise TextEncoderError(f"cannot read precomputed embeddings from {str(p)!r}: {e}; {hint}") from e
        src = str(p)
        if isinstance(obj, torch.Tensor):
            if obj.ndim == 2 and obj.shape[0] == tx.NUM_CLASSES:
                return cls.from_published(obj.float(), None, source=src)
            if obj.ndim == 2 and obj.shape[0] == len(PUBLISHED_TASK_ROW_KEYS):
                return cls.from_published(None, obj.float(), source=src)
            raise TextEncoderError(
                f"bare tensor {tuple(obj.shape)} in {src!r}: expected the published [32, D] ROI table or the "
                f"[11, D] task table; {hint}")
        if isinstance(obj, Mapping):
            found = _find_embedding_dict(obj)
            if found is not None:
                if "embeddings" in found and "prompts" in found:
                    names = found.get("names")
                    names = {n: i for i, n in enumerate(names)} if names else None
                    return cls(found["prompts"], found["embeddings"], str(found.get("encoder", "precomputed")),
                               names, src)
                return cls.from_prompt_embeddings(found, source=src)
        raise TextEncoderError(f"{src!r} holds no embeddings this encoder can read; {hint}")


def _find_embedding_dict(obj: Mapping, depth: int = 0) -> Mapping | None:
    if ("prompts" in obj and "embeddings" in obj) or "organ_embeddings" in obj or "task_embeddings" in obj:
        return obj
    if depth < 2:
        for v in obj.values():
            if isinstance(v, Mapping):
                f = _find_embedding_dict(v, depth + 1)
                if f is not None:
                    return f
    return None
