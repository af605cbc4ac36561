"""Limits on MONAI Label's DICOMweb proxy (``/proxy/dicom/...``, used by OHIF).

* With a local studies folder there is nothing to proxy: MONAI Label answered 500 (it tried to fetch
  ``<folder>/studies`` as a URL); this answers 404 with the reason.
* The proxy sends requests to the PACS with the server's own PACS credentials: a path with ``..``
  segments (also percent-encoded) could leave the DICOMweb root for the PACS's other APIs, so it is
  refused with 400.
"""

from __future__ import annotations

from urllib.parse import unquote

from .asgi import route_path, send_json

__all__ = ["ProxyGuard"]


class ProxyGuard:
    def __init__(self, app, dicomweb: bool):
        self.app = app
        self.dicomweb = dicomweb

    async def __call__(self, scope, receive, send):
        path = route_path(scope) if scope["type"] == "http" else ""
        if not path.startswith("/proxy/"):
            return await self.app(scope, receive, send)
        if not self.dicomweb:
            return await send_json(send, 404, {"detail": "the DICOMweb proxy needs a DICOMweb datastore "
                                                         "(--studies http(s)://.../dicom-web); this server "
                                                         "serves a local studies folder"})
        raw = scope.get("raw_path") or path.encode()
        decoded = unquote(unquote(raw.decode("latin-1")))
        if any(seg in ("..", ".") for seg in decoded.replace("\\", "/").split("/")):
            return await send_json(send, 400, {"detail": "refused: '.' or '..' in a DICOMweb proxy path"})
        return await self.app(scope, receive, send)
