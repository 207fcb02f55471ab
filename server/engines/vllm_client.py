"""Async client of one vLLM child: streamed `/v1/completions` with token-id prompts and `return_token_ids`,
parsed into per-chunk token ids, text, logprobs and the finish reason. Closing a stream closes its HTTP
response, which vLLM turns into an abort of the request."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from shrinkserve.server.engines.vllm_process import Endpoint

__all__ = ["CompletionChunk", "TopLogprob", "VllmClient", "VllmRequestError", "completion_body",
           "parse_completion_chunk"]


@dataclass
class TopLogprob:
    token_id: int
    logprob: float


@dataclass
class CompletionChunk:
    """What one streamed `/v1/completions` chunk carries for our single choice.

    `token_ids` are the tokens this chunk adds (vLLM's `return_token_ids`); `logprobs[i]` is token i's own
    logprob and `top_logprobs[i]` its top-k alternatives by id, best first (when logprobs were asked for).
    The first chunk also carries `prompt_token_ids`, and with `echo` the prompt's logprobs: `prompt_logprobs[i]`
    of prompt token i (None for the first) and `prompt_top_logprobs[i]`. Usage arrives on a final chunk with no
    choice.
    """

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[TopLogprob]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_token_ids: list[int] | None = None
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[TopLogprob]] | None = None
    usage: dict[str, Any] | None = None


class VllmRequestError(RuntimeError):
    """vLLM answered an error (status + OpenAI error body), before or inside the stream."""

    def __init__(self, status: int, body: Any) -> None:
        self.status = status
        self.body = body
        super().__init__(f"vLLM error {status}: {json.dumps(body)[:500] if not isinstance(body, str) else body}")


def _token_id(key: str) -> int:
    # With return_tokens_as_token_ids vLLM names tokens "token_id:<id>" instead of their (ambiguous) text.
    prefix, _, num = key.partition("token_id:")
    if prefix or not num:
        raise ValueError(f"expected 'token_id:<n>', got {key!r}")
    return int(num)


def parse_completion_chunk(obj: Mapping[str, Any], *, echo: bool = False) -> CompletionChunk:
    """One SSE `data:` JSON object of a streamed completion (n = 1) → CompletionChunk. With `echo`, the chunk
    that carries `prompt_token_ids` (the first) has the prompt's logprobs ahead of its own tokens'."""
    if "error" in obj and obj.get("error"):
        err = obj["error"]
        raise VllmRequestError(int(err.get("code") or 500) if isinstance(err, dict) else 500, err)
    chunk = CompletionChunk(usage=obj.get("usage"))
    choices = obj.get("choices") or []
    if not choices:
        return chunk
    c = choices[0]
    chunk.text = c.get("text") or ""
    listed = c.get("token_ids")
    chunk.token_ids = list(listed or [])
    chunk.prompt_token_ids = c.get("prompt_token_ids")
    chunk.finish_reason = c.get("finish_reason")
    chunk.stop_reason = c.get("stop_reason")
    lp = c.get("logprobs")
    if lp:
        values: list[float | None] = [float(x) if x is not None else None for x in lp.get("token_logprobs") or []]
        tops = [sorted((TopLogprob(_token_id(k), float(v)) for k, v in (top or {}).items()), key=lambda e: -e.logprob)
                for top in lp.get("top_logprobs") or []]
        if listed is None and lp.get("tokens"):
            chunk.token_ids = [_token_id(t) for t in lp["tokens"]]
        if echo and chunk.prompt_token_ids is not None:
            # vLLM 0.32: the first chunk's logprobs cover the prompt, then this chunk's tokens (none when the
            # request has max_tokens 0, although token_ids then lists the one token vLLM generated internally).
            n_prompt = len(chunk.prompt_token_ids)
            chunk.prompt_logprobs, values = values[:n_prompt], values[n_prompt:]
            chunk.prompt_top_logprobs, tops = tops[:n_prompt], tops[n_prompt:]
        chunk.logprobs = [float("nan") if v is None else v for v in values]
        chunk.top_logprobs = tops
    return chunk


def completion_body(
    model: str,
    prompt_ids: Sequence[int],
    *,
    max_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    logprobs: int | None = None,
    echo: bool = False,
    ignore_eos: bool = False,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON body of one streamed token-id completion (vLLM 0.32's CompletionRequest fields)."""
    body: dict[str, Any] = {
        "model": model,
        "prompt": list(prompt_ids),
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": False},
        "return_token_ids": True,
        "return_tokens_as_token_ids": True,
        # Our ids already hold any BOS the chat template put there; the default would add one more.
        "add_special_tokens": False,
        # Stop strings are not part of the text we get back (OpenAI's behaviour, as in our engines).
        "include_stop_str_in_output": False,
        # Detokenized text: streamed by vLLM, so stop strings work on it.
        "skip_special_tokens": True,
    }
    if seed is not None:
        body["seed"] = seed
    if stop:
        body["stop"] = list(stop)
    if logprobs is not None:
        body["logprobs"] = logprobs
    if echo:
        # The prompt's logprobs (same k as `logprobs`) in the first chunk; with return_token_ids the prompt's text
        # is not repeated.
        body["echo"] = True
    if ignore_eos:
        body["ignore_eos"] = True
    if extra:
        body.update(extra)
    return body


_CLOSING: set[asyncio.Future[None]] = set()  # stream closes in flight (the loop keeps only weak references)


class VllmClient:
    """Async client of one vLLM server (base URL or Unix socket). One httpx client, reused per request."""

    def __init__(self, endpoint: Endpoint, model: str, *, timeout: float = 600.0, max_connections: int = 256) -> None:
        self.endpoint = endpoint
        self.model = model
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._http = httpx.AsyncClient(base_url=endpoint.base_url, transport=endpoint.transport(),
                                       timeout=httpx.Timeout(timeout, connect=10.0), limits=limits)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def stream_completion(self, prompt_ids: Sequence[int], **kwargs: Any) -> AsyncIterator[CompletionChunk]:
        """Stream one completion; `kwargs` as `completion_body`. Closing the iterator (aclose, or breaking out
        of `async for`) closes the HTTP stream, which vLLM turns into an abort of the request."""
        body = completion_body(self.model, prompt_ids, **kwargs)
        echo = bool(body.get("echo"))
        resp = await self._http.send(self._http.build_request("POST", "/v1/completions", json=body), stream=True)
        try:
            if resp.status_code != 200:
                raw = await resp.aread()
                try:
                    detail = json.loads(raw)
                except ValueError:
                    detail = raw.decode("utf-8", errors="replace")
                raise VllmRequestError(resp.status_code, detail)
            async for data in _sse_data(resp.aiter_lines()):
                if data.strip() == "[DONE]":
                    return
                yield parse_completion_chunk(json.loads(data), echo=echo)
        finally:
            # Closed in a task of its own, shielded: a consumer cancelled (abort, or a generation that ended before
            # the stream did) would otherwise interrupt the close half-way, and httpcore then kept the connection
            # as in use: under `make bench` 32 connections to vLLM sat in CLOSE-WAIT, the pool ran dry and every
            # later request waited forever with vLLM idle.
            closing = asyncio.ensure_future(resp.aclose())
            _CLOSING.add(closing)
            closing.add_done_callback(_CLOSING.discard)
            await asyncio.shield(closing)

    async def get(self, path: str) -> httpx.Response:
        return await self._http.get(path)


async def _sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """`data:` payloads of an SSE stream (vLLM sends one line per event)."""
    buf: list[str] = []
    async for line in lines:
        if not line:
            if buf:
                yield "\n".join(buf)
                buf = []
            continue
        if line.startswith("data:"):
            buf.append(line[5:].removeprefix(" "))
    if buf:
        yield "\n".join(buf)
