"""Server-Sent Events framing of a chunk stream: `data: <json>` events, in-band errors, `data: [DONE]`."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

from pydantic import BaseModel

from shrinkserve.server.api.errors import APIError

log = logging.getLogger("shrinkserve.sse")


def sse_data(model: BaseModel) -> str:
    return f"data: {model.model_dump_json(exclude_none=False)}\n\n"


async def sse_events(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """Frame `chunks`; a failure after the headers went out is reported in-band, as vLLM does. Every
    stream that is not cut by its client ends with `data: [DONE]`."""
    try:
        async for data in chunks:
            yield data
    except APIError as exc:
        yield f"data: {json.dumps(exc.body())}\n\n"
    except Exception as exc:
        log.exception("stream failed")
        yield f"data: {json.dumps(APIError(500, f'generation failed: {exc}').body())}\n\n"
    yield "data: [DONE]\n\n"
