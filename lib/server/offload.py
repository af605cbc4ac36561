"""Run MONAI Label's blocking endpoints off the server's event loop.

In MONAI Label 0.8.5 the endpoints are ``async def`` functions that call synchronous code directly
(inference, label saving, strategies, the datastore), so one 10-second inference froze the event loop:
no other request, not even ``/info`` or a ``503 busy``, was answered until it ended. FastAPI 0.165
builds its routes lazily from included routers, so the endpoints are not swapped; instead each such
request is handled in a worker thread with an event loop of its own, and the ASGI ``receive`` and
``send`` calls are passed back to the server's loop. Only the DICOMweb proxy, which really awaits its
upstream, stays on the main loop.
"""

from __future__ import annotations

import asyncio

import anyio.to_thread

from .asgi import route_path

__all__ = ["OffloadBlocking"]


class OffloadBlocking:
    def __init__(self, app, keep_on_loop: tuple[str, ...] = ("/proxy/",)):
        self.app = app
        self.keep_on_loop = keep_on_loop

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or route_path(scope).startswith(self.keep_on_loop):
            return await self.app(scope, receive, send)
        main = asyncio.get_running_loop()

        async def bridged_receive():
            return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(receive(), main))

        async def bridged_send(message):
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(send(message), main))

        def worker():
            asyncio.run(self.app(scope, bridged_receive, bridged_send))

        await anyio.to_thread.run_sync(worker)
