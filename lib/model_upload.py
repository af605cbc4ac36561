"""``PUT /model/cdpdnet`` (model upload): the file is checked, then published as the next version.

MONAI Label 0.8.5's endpoint (``monailabel.endpoints.model.update_model``) copies whatever was uploaded
over the served file, in place: a truncated, foreign or malicious file replaced the model (and an
infer running meanwhile could read half a file). :func:`install` puts :func:`upload_checkpoint` in
its place for the models served from a :class:`lib.model_store.ModelStore` (other apps' models keep
MONAI Label's behaviour). The upload is

1. stored in a temp file (outside the model folder);
2. refused with 422 and the reason when it is not a loadable CDPDNet checkpoint: not a zip / torch
   file, truncated, unpickling refused (``weights_only``: a pickle that would run code is never
   executed), not a CDPDNet checkpoint, weights that do not fit its preset, or a model of another
   preset than the one served (serve another preset from another ``model_dir``);
3. published like a trained model (``versions/cdpdnet-vNNNN.pt``, then ``cdpdnet.pt`` replaced
   atomically; origin ``upload``); no space left on the device gives 507 and changes nothing.

The answer is MONAI Label's (``checksum``, ``modified_time``) plus ``model_version``.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile

from .errors import HTTPException, unprocessable

logger = logging.getLogger(__name__)

__all__ = ["install", "upload_checkpoint"]

_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def install() -> None:
    """Route ``PUT /model/<model>`` of the store-backed models through :func:`upload_checkpoint` (idempotent)."""
    import monailabel.endpoints.model as endpoint

    if getattr(endpoint.update_model, "_cdpdnet_upload", False):
        return
    original = endpoint.update_model

    def update_model(background_tasks, model, file):
        from monailabel.interfaces.utils.app import app_instance

        task = (getattr(app_instance(), "_infers", None) or {}).get(model)
        store = getattr(task, "store", None)
        if store is None or not hasattr(store, "publish"):
            return original(background_tasks, model, file)
        return upload_checkpoint(store, file.file, file.filename or f"{model}.pt")

    update_model._cdpdnet_upload = True
    endpoint.update_model = update_model


def upload_checkpoint(store, fileobj, filename: str) -> dict:
    """Validate an uploaded checkpoint and publish it (see the module docstring); raises HTTP errors."""
    from monailabel.utils.others.generic import file_checksum

    from cdpdnet.checkpoint import CheckpointError
    from cdpdnet.factory import model_from_checkpoint

    name = os.path.basename(str(filename)) or "upload.pt"
    fd, tmp = tempfile.mkstemp(prefix="cdpdnet_upload_", suffix=".pt")
    try:
        try:
            with os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(fileobj, out, 1 << 22)
        except OSError as e:
            if e.errno in _NO_SPACE_ERRNOS:
                raise HTTPException(status_code=507, detail=f"model not uploaded: no space left on device for the "
                                                            f"upload ({e.strerror or e})") from None
            raise
        try:
            loaded = model_from_checkpoint(tmp, "cpu")
        except CheckpointError as e:
            raise unprocessable(f"model refused: {str(e).replace(tmp, name)}; the served model is unchanged") from None
        preset = loaded.preset.name
        del loaded
        served = store.current().get("preset") or ""
        if served and preset != served:
            raise unprocessable(f"model refused: {name} is a '{preset}' model but this server serves '{served}' "
                                f"models (incompatible preset); serve it from another --conf model_dir; the served "
                                f"model is unchanged")
        try:
            version = store.publish(tmp, "upload", source=name)
        except OSError as e:
            if e.errno in _NO_SPACE_ERRNOS:
                raise HTTPException(status_code=507, detail=f"model not published: no space left on device "
                                                            f"({e.strerror or e}); the served model is unchanged") from None
            raise
        st = os.stat(store.published)
        logger.info(f"Uploaded model {name} published as {version}")
        return {"checksum": file_checksum(str(store.published)), "modified_time": int(st.st_mtime),
                "model_version": version}
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
