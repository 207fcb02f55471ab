"""The serving layer's pieces that need no model: SSE framing of text chunks."""

from __future__ import annotations

import json

import pytest

from shrinkserve.server.protocol import openai as P
from shrinkserve.server.serving.sse import TextChunks, sse_data


@pytest.mark.parametrize("text", ["plain", ' "quoted" \\\\ back', "line\nbreak\ttab\r", "é€😀", "\x00\x1f ctl", ""])
def test_text_chunk_splice_equals_the_model_dump(text: str) -> None:
    def chunk(t: str) -> P.ChatCompletionChunk:
        return P.ChatCompletionChunk(id="c-1", created=1, model="m",
                                     choices=[P.ChatChunkChoice(index=0, delta=P.DeltaMessage(content=t))])

    fast = TextChunks(chunk(TextChunks.placeholder()))(text)
    slow = sse_data(chunk(text))
    assert fast.startswith("data: ") and fast.endswith("\n\n")
    assert json.loads(fast[6:]) == json.loads(slow[6:])
    choice = P.CompletionChoice(index=3, text=TextChunks.placeholder())
    comp = P.CompletionChunk(id="x", created=2, model="m", choices=[choice])
    assert json.loads(TextChunks(comp)(text)[6:])["choices"][0] == {"index": 3, "text": text, "logprobs": None,
                                                                    "finish_reason": None}
