"""Server-Sent Events framing of a chunk stream: `data: <json>` events, in-band errors, `data: [DONE]`."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator

from pydantic import BaseModel

from shrinkserve.server.protocol.errors import APIError

log = logging.getLogger("shrinkserve.sse")


def sse_data(model: BaseModel) -> str:
    return f"data: {model.model_dump_json(exclude_none=False)}\n\n"


_SENTINEL = "\ue000shrinkserve\ue000"  # private-use characters: never in a model's output by accident


class TextChunks:
    """The SSE event of a chunk whose only change from chunk to chunk is one text field, without building
    and serializing a pydantic model per token: `template` is dumped once with a sentinel in that field
    and the text is spliced in as a JSON string (measured: ~3 µs per token instead of ~60)."""

    def __init__(self, template: BaseModel) -> None:
        dumped = sse_data(template)
        at = dumped.index(json.dumps(_SENTINEL, ensure_ascii=False))
        self._prefix = dumped[:at]
        self._suffix = dumped[at + len(json.dumps(_SENTINEL, ensure_ascii=False)):]

    @staticmethod
    def placeholder() -> str:
        return _SENTINEL

    def __call__(self, text: str) -> str:
        return self._prefix + json.dumps(text, ensure_ascii=False) + self._suffix


async def sse_events(chunks: AsyncIterator[str]) -> AsyncGenerator[str, None]:
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
