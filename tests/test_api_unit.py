"""The API layer without a model: protocol rules, error mapping, the ApiGate middleware, OpenAPI, the
Responses adapter, sampler parameters in DecodeState and n > 1 on the fake engine. Milliseconds each."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter
from pydantic import ValidationError

from shrinkserve.server.api.errors import param_path, validation_error
from shrinkserve.server.api.middleware import ApiGate, Authenticator
from shrinkserve.server.protocol import openai as P
from shrinkserve.server.protocol.errors import APIError
from shrinkserve.server.runtime.batching import BatchingCore
from shrinkserve.server.runtime.decode import DecodeState
from shrinkserve.server.runtime.metrics import Metrics
from shrinkserve.server.runtime.types import GenerationRequest, SamplingParams
from shrinkserve.server.serving import base, responses
from tests.fake_engine import EOS, VOCAB, FakeEngine, ids_of

CHAT = [{"role": "user", "content": "hi"}]


def chat(**fields: Any) -> P.ChatCompletionRequest:
    return P.ChatCompletionRequest.model_validate({"model": "m", "messages": CHAT, **fields})


def error_of(cls: type, body: dict) -> APIError:
    with pytest.raises(ValidationError) as info:
        cls.model_validate(body)
    return validation_error(info.value.errors())


# ----------------------------------------------------------------------------- protocol: nothing silently ignored


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "m", "messages": CHAT, "frobnicate": 1}, "frobnicate"),
    ({"model": "m", "messages": [{"role": "user", "content": "x", "cache_control": {}}]}, "messages[0].cache_control"),
    ({"model": "m", "messages": CHAT, "stream_options": {"include_usage": True, "x": 1}}, "stream_options.x"),
    ({"model": "m", "messages": CHAT, "response_format": {"type": "json_schema", "json_schema": {"nme": "a"}}},
     "response_format.json_schema.nme"),
    ({"model": "m", "messages": CHAT, "min_tokens": 3}, "min_tokens"),
])
def test_unknown_fields_are_400_naming_them_and_logged_once(body: dict, param: str,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    from shrinkserve.server.api import errors

    with errors._LOGGED_LOCK:  # other tests may have logged this field already
        errors._LOGGED_UNKNOWN.discard(re.sub(r"\[\d+\]", "[]", param))
    with caplog.at_level(logging.WARNING, logger="shrinkserve.api"):
        err = error_of(P.ChatCompletionRequest, body)
        error_of(P.ChatCompletionRequest, body)
        error_of(P.ChatCompletionRequest, body)
    assert (err.status, err.param, err.code) == (400, param, "unknown_parameter")
    assert param in err.message
    logged = [r for r in caplog.records if "is unknown to shrinkserve" in r.getMessage()]
    assert len(logged) == 1, [r.getMessage() for r in logged]  # once per field name, not per request


CHAT_OFF = {"audio": {"voice": "x", "format": "mp3"}, "functions": [{"name": "f"}], "function_call": "auto",
            "prediction": {"type": "content", "content": "x"}, "reasoning_effort": "low",
            "web_search_options": {}, "moderation": {"model": "x"}, "modalities": ["text", "audio"],
            "verbosity": "high", "add_generation_prompt": False, "skip_special_tokens": False,
            "include_stop_str_in_output": True}


@pytest.mark.parametrize("field", sorted(CHAT_OFF))
def test_unimplemented_chat_fields_are_400_saying_why(field: str) -> None:
    err = error_of(P.ChatCompletionRequest, {"model": "m", "messages": CHAT, field: CHAT_OFF[field]})
    assert err.status == 400 and err.param == field
    assert "not supported by shrinkserve" in err.message


@pytest.mark.parametrize(("field", "value"), [("best_of", 2), ("suffix", "tail"), ("skip_special_tokens", False)])
def test_unimplemented_completion_fields_are_400(field: str, value: object) -> None:
    err = error_of(P.CompletionRequest, {"model": "m", "prompt": "x", field: value})
    assert err.param == field and "not supported" in err.message


@pytest.mark.parametrize(("field", "value"), [
    ("previous_response_id", "resp_1"), ("conversation", "c"), ("reasoning", {"effort": "low"}), ("background", True),
    ("truncation", "auto"), ("include", ["file_search_call.results"]), ("prompt", {"id": "p"}),
    ("max_tool_calls", 3)])
def test_unimplemented_responses_fields_are_400(field: str, value: object) -> None:
    err = error_of(P.ResponsesRequest, {"model": "m", "input": "x", field: value})
    assert err.param == field and "not supported" in err.message


def test_off_values_and_metadata_are_accepted() -> None:
    r = chat(audio=None, functions=None, reasoning_effort=None, modalities=["text"], verbosity="medium",
             user="u", metadata={"k": "v"}, store=False, service_tier="auto", safety_identifier="s",
             prompt_cache_key="k", prompt_cache_retention="24h", skip_special_tokens=True,
             guided_decoding_backend="xgrammar", temperature=None, top_p=None, n=None, stream=None)
    assert r.n is None and r.user == "u"
    c = P.CompletionRequest.model_validate({"model": "m", "prompt": "x", "best_of": 1, "suffix": "", "echo": None})
    assert c.best_of == 1
    P.ResponsesRequest.model_validate({"model": "m", "input": "x", "store": True, "truncation": "disabled",
                                       "include": ["message.output_text.logprobs"], "reasoning": None})


def test_stream_options_without_stream_and_top_logprobs_zero_are_accepted() -> None:
    r = chat(stream=False, stream_options={"include_usage": True})
    assert not r.include_usage  # nothing to stream, nothing to add
    assert chat(stream=True, stream_options={"include_usage": True}).include_usage
    assert chat(top_logprobs=0).top_logprobs == 0
    err = error_of(P.ChatCompletionRequest, {"model": "m", "messages": CHAT, "top_logprobs": 2})
    assert "requires logprobs" in err.message


def test_lone_surrogates_become_replacement_characters_everywhere() -> None:
    call = {"id": "c\udfff", "type": "function", "function": {"name": "f", "arguments": '{"a": "\ud83d"}'}}
    r = chat(messages=[{"role": "user", "content": "hi \ud800 there"},
                       {"role": "assistant", "content": None, "tool_calls": [call]},
                       {"role": "tool", "tool_call_id": "c", "content": [{"type": "text", "text": "\udc00"}]}],
             stop=["\ud800"], metadata={"\ud800": "\udfff"})
    dumped = json.dumps(r.model_dump(), ensure_ascii=False)
    dumped.encode("utf-8")  # would raise on a lone surrogate
    assert r.messages[0].content == "hi \ufffd there" and r.stop == ["\ufffd"]
    assert P.valid_text("pair \U0001f600 ok") == "pair \U0001f600 ok"
    assert P.TokenizeRequest.model_validate({"prompt": "\ud800"}).prompt == "\ufffd"
    assert P.CompletionRequest.model_validate({"model": "m", "prompt": ["a\udbff"]}).prompt == ["a\ufffd"]


def test_messages_by_role() -> None:
    history = [{"role": "user", "content": "q"},
               {"role": "assistant", "content": None, "refusal": None, "annotations": [], "audio": None,
                "function_call": None, "tool_calls": [{"id": "a", "type": "function",
                                                       "function": {"name": "f", "arguments": "{}"}}]},
               {"role": "tool", "tool_call_id": "a", "content": "r"}]
    r = chat(messages=history)  # what the openai client sends back after a tool call
    assert [m.calls for m in r.messages][1][0].function.name == "f"
    for bad, param in [({"role": "tool", "content": "x"}, "messages[0].tool_call_id"),
                       ({"role": "user", "content": "x", "tool_calls": []}, "messages[0].tool_calls"),
                       ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                        "messages[0].content")]:
        err = error_of(P.ChatCompletionRequest, {"model": "m", "messages": [bad]})
        assert err.param == param, err.message


def test_structured_output_fields_are_exclusive_and_well_formed() -> None:
    err = error_of(P.ChatCompletionRequest, {"model": "m", "messages": CHAT, "guided_regex": "a+",
                                             "response_format": {"type": "json_object"}})
    assert "at most one" in err.message
    err = error_of(P.ChatCompletionRequest, {"model": "m", "messages": CHAT,
                                             "structured_outputs": {"regex": "a", "choice": ["b"]}})
    assert "exactly one" in err.message
    assert chat(response_format={"type": "text"}, guided_regex="a").guided_regex == "a"  # text = no constraint


@pytest.mark.parametrize(("loc", "param"), [
    (("body", "messages", 0, "tool", "tool_call_id"), "messages[0].tool_call_id"),
    (("response_format", "json_schema", "json_schema", "schema"), "response_format.json_schema.schema"),
    (("stop", "list[constrained-str]", 1), "stop[1]"),
    (("messages", 0, "user", "content", "list[TextPart]", 0, "text"), "messages[0].content[0].text"),
    (("input", 2, "function_call", "name"), "input[2].name"),
    (("text", "format", "json_schema", "schema"), "text.format.schema"),
])
def test_param_paths_drop_union_tags(loc: tuple, param: str) -> None:
    assert param_path(loc) == param


# ----------------------------------------------------------------------------- ApiGate (plain ASGI)


class Recorder:
    """An ASGI app standing in for the API: records what it got, answers 200 (or runs `behaviour`)."""

    def __init__(self, behaviour: Any = None) -> None:
        self.calls: list[bytes] = []
        self.behaviour = behaviour

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        body = b""
        while True:
            m = await receive()
            body += m.get("body", b"")
            if not m.get("more_body"):
                break
        self.calls.append(body)
        if self.behaviour is not None:
            await self.behaviour(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def gate(app: Any, *, keys: tuple[str, ...] = (), limit: int = 100, draining: bool = False
         ) -> tuple[ApiGate, Counter]:
    counter = Counter("req", "r", ["profile", "status"], registry=CollectorRegistry())
    lifecycle = SimpleNamespace(draining=draining)
    return ApiGate(app, lifecycle=lifecycle, auth=Authenticator(keys), max_body_bytes=limit,  # type: ignore[arg-type]
                   requests=counter, profile_label=lambda scope: "p"), counter


def call(app: Any, *, headers: dict[str, str] | None = None, chunks: list[bytes] | None = None,
         disconnect_after: int | None = None, path: str = "/v1/chat/completions") -> dict:
    """Drive one request through `app`; returns status, body and how many body chunks were read."""
    chunks = [b"{}"] if chunks is None else chunks
    out: dict = {"status": None, "body": b"", "reads": 0}

    async def receive() -> dict:
        i = out["reads"]
        out["reads"] += 1
        if disconnect_after is not None and i >= disconnect_after:
            return {"type": "http.disconnect"}
        if i < len(chunks):
            return {"type": "http.request", "body": chunks[i], "more_body": i < len(chunks) - 1}
        await asyncio.sleep(3600)  # no more messages until a disconnect
        return {"type": "http.disconnect"}

    async def send(m: dict) -> None:
        if m["type"] == "http.response.start":
            out["status"] = m["status"]
        else:
            out["body"] += m.get("body", b"")

    scope = {"type": "http", "method": "POST", "path": path,
             "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]}
    asyncio.run(app(scope, receive, send))
    return out


def count(counter: Counter, status: str) -> float:
    return counter.labels("p", status)._value.get()


@pytest.mark.parametrize(("header", "ok"), [
    (None, False), ("secret", False), ("Basic secret", False), ("Bearer wrong", False), ("Bearer secret", True),
    ("bearer secret", True), ("BEARER  secret ", True), ("Bearer secret2", True), ("Bearer secre", False),
])
def test_auth_is_bearer_only_and_checked_before_the_body_is_read(header: str | None, ok: bool) -> None:
    app = Recorder()
    g, counter = gate(app, keys=("secret", "secret2"))
    out = call(g, headers={"Authorization": header} if header else {})
    assert out["status"] == (200 if ok else 401)
    if not ok:
        assert out["reads"] == 0 and not app.calls  # rejected before reading a byte
        assert json.loads(out["body"])["error"]["code"] == "invalid_api_key"
    assert count(counter, str(out["status"])) == 1


def test_body_limit_declared_and_streamed() -> None:
    app = Recorder()
    g, counter = gate(app, limit=100)
    declared = call(g, headers={"Content-Length": "5000000"}, chunks=[b"x" * 60] * 3)
    assert declared["status"] == 413 and declared["reads"] == 0
    streamed = call(g, chunks=[b"x" * 60] * 1000)  # no Content-Length: cut off once past the limit
    assert streamed["status"] == 413 and streamed["reads"] == 2
    assert json.loads(streamed["body"])["error"]["code"] == "request_too_large"
    fits = call(g, chunks=[b"x" * 50, b"y" * 50])
    assert fits["status"] == 200 and app.calls == [b"x" * 50 + b"y" * 50]
    assert count(counter, "413") == 2 and count(counter, "200") == 1


def test_client_leaving_is_499_without_an_error(caplog: pytest.LogCaptureFixture) -> None:
    g, counter = gate(Recorder(), limit=1000)
    out = call(g, chunks=[b"x", b"y", b"z"], disconnect_after=1)  # gone while the body was read
    assert out["status"] is None and count(counter, "499") == 1

    async def leave_mid_stream(scope: dict, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        while (await receive())["type"] != "http.disconnect":
            pass
        raise RuntimeError("stream write after the client left")

    g2, counter2 = gate(Recorder(leave_mid_stream))
    with caplog.at_level(logging.ERROR):
        call(g2, disconnect_after=1)
    assert count(counter2, "499") == 1 and count(counter2, "200") == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_draining_is_503_and_errors_count_500() -> None:
    g, counter = gate(Recorder(), draining=True)
    assert call(g)["status"] == 503 and count(counter, "503") == 1

    async def boom(scope: dict, receive: Any, send: Any) -> None:
        raise ValueError("bug")

    g2, counter2 = gate(Recorder(boom))
    with pytest.raises(ValueError, match="bug"):
        call(g2)
    assert count(counter2, "500") == 1


def test_open_paths_skip_the_gate() -> None:
    g, counter = gate(Recorder(), keys=("k",), draining=True)
    for path in ("/health", "/metrics", "/ready", "/openapi.json"):
        assert call(g, path=path)["status"] == 200
    assert count(counter, "200") == 0


# ----------------------------------------------------------------------------- OpenAPI


@pytest.mark.parametrize("keys", [[], ["k"]])
def test_openapi_documents_what_the_api_answers(keys: list[str]) -> None:
    from shrinkserve.server.app import create_app
    from shrinkserve.server.settings import Settings

    app = create_app(Settings(profiles={"a": {"method": "gguf:q8_0"}, "b": {"method": "hf"}}, routes={"/x": "a"},
                              api_keys=keys))
    doc = app.openapi()
    text = json.dumps(doc)
    assert '"422"' not in text and "HTTPValidationError" not in text
    ops = {(path, method): op for path, methods in doc["paths"].items() for method, op in methods.items()}
    for path in ("/v1/chat/completions", "/x/v1/completions", "/v1/responses"):
        responses_ = ops[(path, "post")]["responses"]
        assert {"200", "400", "404", "413", "429", "503"} <= set(responses_)
        assert ("401" in responses_) == bool(keys)
        assert "text/event-stream" in responses_["200"]["content"]
        assert responses_["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert set(ops[("/tokenize", "post")]["responses"]) >= {"200", "400", "404", "413", "503"}
    assert "text/plain" in ops[("/metrics", "get")]["responses"]["200"]["content"]
    assert "503" in ops[("/ready", "get")]["responses"]
    model = doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]["model"]
    assert model["enum"] == ["a", "b"]
    assert ("securitySchemes" in doc["components"]) == bool(keys)


# ----------------------------------------------------------------------------- Responses → chat


def test_responses_input_maps_to_chat_history() -> None:
    req = P.ResponsesRequest.model_validate({
        "model": "m", "instructions": "be brief", "max_output_tokens": 9, "parallel_tool_calls": False,
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "weather?"}]},
                  {"type": "function_call", "call_id": "c1", "name": "w", "arguments": '{"city": "Paris"}'},
                  {"type": "function_call", "call_id": "c2", "name": "w", "arguments": '{"city": "Rome"}'},
                  {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
                  {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
                   "content": [{"type": "output_text", "text": "Sunny.", "annotations": []}]}],
        "tools": [{"type": "function", "name": "w", "parameters": {"type": "object"}, "strict": True}],
        "tool_choice": {"type": "function", "name": "w"},
        "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}, "strict": True}},
        "include": ["message.output_text.logprobs"], "top_logprobs": 2})
    c = responses.to_chat(req)
    assert [m.role for m in c.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert [t.id for t in c.messages[2].calls] == ["c1", "c2"]
    assert c.messages[3].tool_call_id == "c1" and c.messages[3].content == "sunny"
    assert c.max_tokens == 9 and c.parallel_tool_calls is False and c.logprobs and c.top_logprobs == 2
    assert c.tool_choice.function.name == "w" and c.tools[0].function.strict is True
    assert c.response_format.json_schema.schema_ == {"type": "object"}
    with pytest.raises(APIError, match="input is empty") as info:
        responses.to_chat(P.ResponsesRequest.model_validate({"model": "m", "input": []}))
    assert info.value.status == 400 and info.value.param == "input"


# ----------------------------------------------------------------------------- sampler parameters


def state(params: SamplingParams, prompt: list[int] | None = None, constraint: Any = None) -> DecodeState:
    return DecodeState(GenerationRequest(prompt or [1, 2], params, constraint=constraint), FakeEngine(), capacity=100)


def flat_row(best: int, second: int) -> np.ndarray:
    row = np.zeros(VOCAB, dtype=np.float32)
    row[best], row[second] = 5.0, 4.0
    return row


def test_logit_bias_and_penalties_change_greedy_choices() -> None:
    row = flat_row(3, 4)
    assert state(SamplingParams(max_tokens=4, temperature=0)).advance(row)[1] == 3
    assert state(SamplingParams(max_tokens=4, temperature=0, logit_bias=((4, 2.0),))).advance(row)[1] == 4
    s = state(SamplingParams(max_tokens=4, temperature=0, presence_penalty=1.5))
    assert [s.advance(row)[1], s.advance(row)[1]] == [3, 4]  # 3 is present after the first step
    s = state(SamplingParams(max_tokens=4, temperature=0, frequency_penalty=0.6))
    assert [s.advance(row)[1] for _ in range(3)] == [3, 3, 4]  # 3 scores 5, then 5 - 0.6 > 4, then 5 - 1.2 < 4
    assert state(SamplingParams(max_tokens=4, temperature=0, repetition_penalty=2.0), prompt=[3]).advance(row)[1] == 4


def test_top_k_min_p_and_seed() -> None:
    rng = np.random.default_rng(0)
    rows = [rng.standard_normal(VOCAB).astype(np.float32) * 3 for _ in range(20)]

    def sample(**kw: Any) -> list[int | None]:
        s = state(SamplingParams(max_tokens=50, temperature=1.0, ignore_eos=True, **kw))
        return [s.advance(r)[1] for r in rows]

    assert sample(seed=7, top_k=5, min_p=0.05) == sample(seed=7, top_k=5, min_p=0.05)
    top1 = [int(np.argmax(r)) for r in rows]
    assert sample(seed=1, top_k=1) == top1 == sample(seed=2, min_p=1.0)
    top3 = [set(np.argsort(-r)[:3].tolist()) for r in rows]
    assert all(t in allowed for t, allowed in zip(sample(seed=3, top_k=3), top3, strict=True))


class OnlyToken:
    """A constraint allowing one token id."""

    def __init__(self, token: int) -> None:
        self.token = token

    def allowed(self) -> np.ndarray:
        mask = np.zeros(VOCAB, dtype=bool)
        mask[self.token] = True
        return mask

    def accept(self, token: int) -> None:
        assert token == self.token, f"sampled {token}, a masked token"

    def is_finished(self) -> bool:
        return False


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_extreme_penalties_never_pick_a_masked_token(temperature: float) -> None:
    row = np.full(VOCAB, 3.0, dtype=np.float32)
    p = SamplingParams(max_tokens=5, temperature=temperature, repetition_penalty=1e-300, seed=1,
                       logit_bias=((5, -100.0),))
    s = state(p, prompt=list(range(VOCAB)), constraint=OnlyToken(5))  # every logit overflows to inf
    assert s.advance(row)[1] == 5


# ----------------------------------------------------------------------------- n > 1 through the batching core


def run_request(core: BatchingCore, prompt: str, n: int, seed: int | None, stream: bool = False) -> list[str]:
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=seed, ignore_eos=True)
    rt = SimpleNamespace(core=core, name="fake")
    prepared = base.Prepared(rt, base.choices([ids_of(prompt)], params, n), [prompt], 0.0, n=n)  # type: ignore[arg-type]

    async def go() -> tuple[list[str], list[int]]:
        run = await base.start(prepared, Metrics())
        order: list[int] = []
        texts = [""] * n
        async for i, step in run.steps():
            order.append(i)
            texts[i] += step.text
        assert run.prepared.prompt_tokens == len(ids_of(prompt))  # usage counts the prompt once
        assert run.completion_tokens == 12 * n
        return texts, order

    texts, order = asyncio.run(go())
    if n > 1:
        # choices interleave: the last of those the ticket runs at once starts before the first ends
        assert order.index(min(n, 4) - 1) < len(order) - 12
    return texts


def test_n_choices_run_together_with_derived_seeds() -> None:
    engine = FakeEngine()
    engine.step_delay = 0.003  # steps slow enough that all choices are submitted before the first one ends
    core = BatchingCore("fake", engine, max_seqs=4, slot_capacity=64, kv_tokens=256, max_queue=4, probe=False)
    try:
        three = run_request(core, "once upon", 3, seed=11)
        assert len(set(three)) == 3  # seed, seed+1, seed+2
        assert run_request(core, "once upon", 3, seed=11) == three
        assert run_request(core, "once upon", 1, seed=11) == three[:1]
        five = run_request(core, "once upon", 5, seed=11)  # more choices than slots: they queue on the ticket
        assert five[:3] == three
    finally:
        core.close()


def test_choices_each_get_their_own_constraint() -> None:
    made: list[object] = []
    reqs = base.choices([[1], [2]], SamplingParams(max_tokens=1, seed=None), 2,
                        constraint=lambda: made.append(object()) or made[-1])
    assert [r.prompt_ids for r in reqs] == [[1], [1], [2], [2]]
    assert len({id(r.constraint) for r in reqs}) == 4 and all(r.params.seed is None for r in reqs)
    assert EOS == 0
