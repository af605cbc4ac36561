"""Bounds on what the server accepts: request body size, and how many inferences wait in line.

* :class:`UploadLimit`: a body larger than ``max_bytes`` gets ``413`` with a message, before it is
  read when ``Content-Length`` says so, or as soon as a chunked body passes the limit (the endpoint
  then sees a disconnect and nothing of the request is kept).
* :class:`InferAdmission`: at most ``max_waiting`` inference requests are running or waiting at once;
  the next one gets ``503`` with ``Retry-After`` (seconds, from the recent inference times), so a
  client backs off instead of piling threads, uploads and memory onto a busy CPU. Nothing queued is
  dropped: every admitted request is answered.
"""

from __future__ import annotations

import logging
import math
import re
import time

from .asgi import header, route_path, send_json

logger = logging.getLogger(__name__)

__all__ = ["UploadLimit", "InferAdmission"]

_INFER = re.compile(r"/infer/[^/]+/?")


class UploadLimit:
    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = int(max_bytes)

    def _message(self) -> dict:
        return {"detail": f"request body too large: the limit is {self.max_bytes / 2 ** 20:.0f} MiB "
                          f"(--conf max_upload_mb)"}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        length = header(scope, b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_bytes
            except ValueError:
                return await send_json(send, 400, {"detail": f"bad Content-Length header {length!r}"})
            if too_big:
                return await send_json(send, 413, self._message())
        seen = {"bytes": 0, "over": False, "started": False}

        async def counted_receive():
            if seen["over"]:
                return {"type": "http.disconnect"}
            msg = await receive()
            if msg["type"] == "http.request":
                seen["bytes"] += len(msg.get("body", b""))
                if seen["bytes"] > self.max_bytes:
                    seen["over"] = True
                    return {"type": "http.disconnect"}
            return msg

        async def guarded_send(msg):
            if seen["over"]:
                return  # the endpoint's answer to a cut-off body is replaced by the 413 below
            if msg["type"] == "http.response.start":
                seen["started"] = True
            await send(msg)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not seen["over"]:
                raise
        if seen["over"] and not seen["started"]:
            await send_json(send, 413, self._message())


class InferAdmission:
    def __init__(self, app, max_waiting: int):
        self.app = app
        self.max_waiting = max(1, int(max_waiting))
        self.in_flight = 0
        self.refused = 0
        self._mean_s = 5.0  # running mean of admitted inference times (seeded with a CPU-ish guess)

    def retry_after(self) -> int:
        return max(1, math.ceil(self._mean_s * self.in_flight / self.max_waiting))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or not _INFER.fullmatch(route_path(scope)):
            return await self.app(scope, receive, send)
        if self.in_flight >= self.max_waiting:
            self.refused += 1
            wait = self.retry_after()
            return await send_json(send, 503, {"detail": f"the server is busy: {self.in_flight} inference requests "
                                                         f"are running or waiting (limit {self.max_waiting}, "
                                                         f"--conf max_queued_infers); retry in {wait} s"},
                                   {"retry-after": str(wait)})
        self.in_flight += 1
        t = time.monotonic()
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            self._mean_s = 0.8 * self._mean_s + 0.2 * (time.monotonic() - t)
