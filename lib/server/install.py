"""Put the server's guards in front of MONAI Label's FastAPI app (called once the app is up).

MONAI Label builds its FastAPI app at import time and loads this project's app inside the server's
start-up (lifespan), when the middleware stack already exists; :func:`install` therefore wraps the
built stack (idempotent: a second call rebuilds from the original)::

    AuthMiddleware -> UploadLimit -> ProxyGuard -> InferAdmission -> OffloadBlocking -> MONAI Label's stack

(``OffloadBlocking`` runs MONAI Label's blocking endpoints in worker threads, see :mod:`.offload`.)
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

__all__ = ["ServerOptions", "install"]


class ServerOptions:
    """The ``--conf`` keys of the server guards (see docs/security.md)."""

    def __init__(self, conf: dict, app_dir: str, studies: str | None = None):
        conf = conf or {}
        if studies is None:  # the server's --studies
            from monailabel.config import settings

            studies = settings.MONAI_LABEL_STUDIES or ""
        self.dicomweb = str(studies).startswith(("http://", "https://"))
        self.auth = str(conf.get("auth", "true")).strip().lower() not in ("false", "0", "no", "off")
        self.auth_dir = os.path.abspath(conf.get("auth_dir") or os.path.join(app_dir, "auth"))
        self.token_hours = float(conf.get("auth_token_hours", 12))
        self.max_upload_mb = float(conf.get("max_upload_mb", 2048))
        self.max_queued_infers = int(conf.get("max_queued_infers", 4))


def install(fastapi_app, options: ServerOptions) -> dict:
    """Wrap the app's middleware stack with the guards ``options`` ask for; returns what was installed."""
    from .auth import AuthMiddleware
    from .limits import InferAdmission, UploadLimit
    from .offload import OffloadBlocking
    from .proxy_guard import ProxyGuard
    from .users import TokenIssuer, UserStore

    base = getattr(fastapi_app.state, "cdpdnet_base_stack", None)
    if base is None:
        base = fastapi_app.middleware_stack
        if base is None:
            base = fastapi_app.middleware_stack = fastapi_app.build_middleware_stack()
        fastapi_app.state.cdpdnet_base_stack = base
    admission = InferAdmission(OffloadBlocking(base), options.max_queued_infers)
    stack = UploadLimit(ProxyGuard(admission, options.dicomweb), int(options.max_upload_mb * 2 ** 20))
    done = {"max_upload_mb": options.max_upload_mb,
            "max_queued_infers": options.max_queued_infers, "auth": options.auth}
    if options.auth:
        users = UserStore(options.auth_dir)
        note = users.initialise()
        if note is not None:
            logger.warning(f"Authentication: created the auth folder {options.auth_dir} with user 'admin'; its "
                           f"password is in {note} (readable by this account only). Add users with "
                           f"scripts/users.py --auth-dir {options.auth_dir} add <name> --role annotator")
        stack = AuthMiddleware(stack, users, TokenIssuer(options.auth_dir, options.token_hours))
        logger.info(f"Authentication on: {len(users.list())} users in {users.path}")
        done["auth_dir"] = options.auth_dir
    else:
        logger.warning("Authentication is OFF (--conf auth false): anyone who reaches this port can read images, "
                       "save labels and start training. Use it only on 127.0.0.1 (the demo) or behind a proxy "
                       "that authenticates.")
    fastapi_app.middleware_stack = stack
    fastapi_app.state.cdpdnet_admission = admission
    return done
