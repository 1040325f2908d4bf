"""WhiteNoise for an ASGI server.

WhiteNoise hands Django a ``FileResponse`` whose content is a *synchronous* file iterator. Under
ASGI, Django then warns on every static file ("StreamingHttpResponse must consume synchronous
iterators in order to serve them asynchronously") and drains the iterator through
``sync_to_async``, one thread hop per chunk. This middleware gives the same response an
asynchronous iterator instead: no warning, and each chunk is one ``asyncio.to_thread`` read.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import IO, Any

from django.http import HttpRequest, HttpResponseBase
from whitenoise.middleware import WhiteNoiseMiddleware

CHUNK_BYTES = 64 * 1024


async def _chunks(handle: IO[bytes]) -> AsyncIterator[bytes]:
    while chunk := await asyncio.to_thread(handle.read, CHUNK_BYTES):
        yield chunk


class AsgiWhiteNoiseMiddleware(WhiteNoiseMiddleware):
    @staticmethod
    def serve(static_file: Any, request: HttpRequest) -> HttpResponseBase:
        response = WhiteNoiseMiddleware.serve(static_file, request)
        handle = getattr(response, "file_to_stream", None)
        if handle is not None:
            # FileResponse registered handle.close() already; only the iterator changes.
            response.streaming_content = _chunks(handle)
        return response
