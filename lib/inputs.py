"""Checks of what clients send: ids and tags that become file names, uploaded volume files, JSON form fields.

* **Ids and tags** (:func:`id_problem`, :func:`check_new_id`): MONAI Label's local datastore joins image ids
  and label tags into paths (``<studies>/<id><ext>``, ``<studies>/labels/<tag>/<id><ext>``) without checking
  them, so ``PUT /datastore/image?image=../x`` wrote outside the studies folder. A new id or tag must be a
  plain file name: not empty, no ``/`` or ``\\``, no control characters (NUL), not starting with ``.``, at
  most 200 bytes.
* **Uploaded files** (:func:`check_upload`): only the volume formats the app reads (by file name suffix),
  and the header is checked before any voxel is read (:mod:`cdpdnet.fileheaders`: truncation, absurd
  sizes, detached data files, complex / RGB voxels, zero or non-finite spacings).
* **Uploaded infer input** (:func:`is_uploaded_file`): MONAI Label hands an infer task either an image id
  or, for an uploaded file, the path of its temporary copy, and it treated *any* existing path as an
  upload, so ``?image=/any/file/on/the/server`` was read and segmented. Only MONAI Label's own temporary
  upload files and session images count as uploads now; everything else is an image id.
* **JSON form fields** (:func:`harden_endpoints`): MONAI Label's datastore and infer endpoints parse the
  ``params`` / ``info`` form fields with ``json.loads`` before the app sees the request, so malformed JSON
  (or a JSON list where an object belongs) ended as ``500``; the endpoints' ``json`` is replaced by one
  whose ``loads`` answers 400. An infer request with neither image, file nor session answers 400 instead
  of MONAI Label's 500.
* **Session ids and archives** (:func:`guard_sessions`): see :class:`SessionGuardMixin`.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import sys
import tempfile
from typing import Any

from .errors import bad_request, unprocessable

logger = logging.getLogger(__name__)

__all__ = ["id_problem", "check_new_id", "check_upload", "suffix_of", "is_uploaded_file", "harden_endpoints",
           "guard_sessions",
           "IMAGE_UPLOAD_SUFFIXES", "LABEL_UPLOAD_SUFFIXES", "INFER_UPLOAD_SUFFIXES", "MAX_ID_BYTES"]

MAX_ID_BYTES = 200
IMAGE_UPLOAD_SUFFIXES = (".nii.gz", ".nii", ".nrrd")  # volume formats a local datastore lists
LABEL_UPLOAD_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".bin")  # .bin: OHIF's raw label, converted first
INFER_UPLOAD_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".dcm")


def id_problem(value: Any) -> str | None:
    """Why ``value`` cannot be an image id or label tag (a plain file name), or ``None`` when it can."""
    if not isinstance(value, str):
        return f"it is a {type(value).__name__}, not a string"
    if not value:
        return "it is empty"
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        return "it contains control characters (NUL, newline, ...)"
    if "/" in value or "\\" in value:
        return "it contains a path separator ('/' or '\\')"
    if value.startswith("."):
        return "it starts with '.' (a relative or hidden path)"
    try:
        n = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        return "it is not valid unicode text"
    if n > MAX_ID_BYTES:
        return f"it is {n} bytes long (at most {MAX_ID_BYTES})"
    return None


def _shown(value: Any) -> str:
    s = repr(value)
    return s if len(s) <= 80 else s[:77] + "..."


def check_new_id(value: Any, what: str = "image id") -> str:
    """400 unless ``value`` can name a file in the datastore (see :func:`id_problem`)."""
    problem = id_problem(value)
    if problem:
        raise bad_request(f"{what} {_shown(value)} is not valid: {problem}; ids and tags are plain file names "
                          "(letters, digits, '_', '-', '.')")
    return value


def suffix_of(path: str, suffixes) -> str | None:
    low = os.path.basename(str(path)).lower()
    return next((s for s in suffixes if low.endswith(s)), None)


def check_upload(path: str, what: str, suffixes, full: bool = True, volume: bool = False) -> dict | None:
    """422 unless ``path`` has one of ``suffixes`` and a sane header (:func:`cdpdnet.fileheaders.inspect_volume_file`);
    with ``volume`` also unless the header describes a 3D volume (trailing axes of size 1 aside).
    Returns the header summary (``None`` for ``.bin``)."""
    from cdpdnet.fileheaders import inspect_volume_file
    from cdpdnet.imageio import InvalidImageError

    suffix = suffix_of(path, suffixes)
    if suffix is None:
        name = os.path.basename(str(path))
        ext = "".join(c for c in name[name.find("."):] if c.isprintable())[:20] if "." in name else "(none)"
        raise unprocessable(f"{what} refused: unsupported file type {ext!r}; send {', '.join(suffixes)}")
    if suffix == ".bin":
        return None
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        raise unprocessable(f"{what} refused: the file is empty")
    try:
        head = inspect_volume_file(path, f"the {suffix} file", full=full)
    except InvalidImageError as e:
        raise unprocessable(f"{what} refused: {e}") from None
    if volume and head is not None and head["format"] != "dicom":
        shape = list(head["shape"])
        while len(shape) > 3 and shape[-1] == 1:
            shape.pop()
        if len(shape) != 3:
            raise unprocessable(f"{what} refused: the {suffix} file has {len(shape)} dimensions {shape}; a 3D CT "
                                "volume is needed")
    return head


def is_uploaded_file(path: Any, sessions=None) -> bool:
    """True for MONAI Label's temporary copy of an uploaded file (``<tmp>/tmp*``) or an image of an infer
    session (under the session store); other paths on the server are never read for a client."""
    if not isinstance(path, str) or not path or "\0" in path or not os.path.exists(path):
        return False
    real = os.path.realpath(path)
    tmp = os.path.realpath(tempfile.gettempdir())
    if os.path.dirname(real) == tmp and os.path.basename(real).startswith("tmp") and os.path.isfile(real):
        return True
    store = getattr(sessions, "store_path", None)
    if store:
        store = os.path.realpath(store)
        return real.startswith(store + os.sep)
    return False


# -- MONAI Label's endpoints ----------------------------------------------------------------------
class _FormJSON:
    """Stands in for the ``json`` module in MONAI Label's endpoint modules: ``loads`` parses a form field
    and answers 400 for malformed JSON or anything but a JSON object; everything else is ``json``'s."""

    def __getattr__(self, name):
        return getattr(json, name)

    @staticmethod
    def loads(s, *args, **kwargs):
        try:
            value = json.loads(s, *args, **kwargs)
        except (ValueError, RecursionError) as e:
            raise bad_request(f"the form field (params / info) is not valid JSON ({str(e)[:200]}); send a JSON "
                              "object such as {}") from None
        if not isinstance(value, dict):
            raise bad_request(f"the form field (params / info) must be a JSON object, got a JSON "
                              f"{type(value).__name__}: {_shown(value)}")
        return value


def _checked_run_inference(fn):
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def run_inference(*args, **kwargs):
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError:
            return fn(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        if not a.get("file") and not a.get("image") and not a.get("session_id"):
            raise bad_request("no image: pass ?image=<image id>, upload a file, or give a session_id")
        return fn(*args, **kwargs)

    run_inference.__cdpdnet_checked__ = True
    return run_inference


def harden_endpoints() -> None:
    """Patch MONAI Label's datastore and infer endpoint modules (when loaded: the server, not the training
    subprocesses) as described in the module docstring; idempotent."""
    for name in ("monailabel.endpoints.datastore", "monailabel.endpoints.infer"):
        mod = sys.modules.get(name)
        if mod is None:
            continue
        if not isinstance(getattr(mod, "json", None), _FormJSON):
            mod.json = _FormJSON()
        fn = getattr(mod, "run_inference", None)
        if fn is not None and not getattr(fn, "__cdpdnet_checked__", False):
            mod.run_inference = _checked_run_inference(fn)


# -- MONAI Label's infer sessions ----------------------------------------------------------------
class SessionGuardMixin:
    """In front of MONAI Label's ``Sessions`` (see :func:`guard_sessions`).

    ``Sessions`` joins the client's session id into a path (``<store>/<id>``): an id such as
    ``../other`` read a ``meta.info`` outside the store and, when that session's image was missing,
    removed the folder (``shutil.rmtree``); and ``PUT /session/?uncompress=true`` unpacked a tar
    archive with ``shutil.unpack_archive``, which in Python 3.11 writes members named ``../x`` or
    ``/x`` outside the target folder. Session ids must be plain file names (400), and archives are
    unpacked with the ``data`` filter (members outside the folder, links out of it and device files
    are refused, 422).
    """

    def get_session(self, session_id: str, *args, **kwargs):
        check_new_id(session_id, "session id")
        return super().get_session(session_id, *args, **kwargs)

    def remove_session(self, session_id: str):
        check_new_id(session_id, "session id")
        return super().remove_session(session_id)

    def add_session(self, data_file: str, expiry: int = 0, uncompress: bool = False, session_id=None):
        import shutil
        import tarfile

        if session_id is not None:
            check_new_id(session_id, "session id")
        if uncompress:
            folder = tempfile.mkdtemp(prefix="cdpdnet_session_")
            try:
                shutil.unpack_archive(data_file, folder, filter="data")
            except (tarfile.TarError, shutil.ReadError, ValueError, OSError) as e:
                shutil.rmtree(folder, ignore_errors=True)
                raise unprocessable(f"session archive refused: {str(e)[:300]}") from None
            data_file = folder
        return super().add_session(data_file, expiry, False, session_id)


def guard_sessions(sessions):
    """``sessions`` (MONAI Label's ``Sessions`` or ``None``) with :class:`SessionGuardMixin` in front (idempotent)."""
    if sessions is None or isinstance(sessions, SessionGuardMixin):
        return sessions
    cls = type(sessions)
    sessions.__class__ = type(f"Guarded{cls.__name__}", (SessionGuardMixin, cls), {})
    return sessions
