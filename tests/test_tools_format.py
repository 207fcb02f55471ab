"""Tools in chat (server/serving/tools/): validation, prompt rendering, grammars, parsing and streaming."""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterator

import jsonschema
import numpy as np
import pytest

from shrinkserve.compression.base_model import embedded_gguf_path
from shrinkserve.server.engines.llamacpp import LlamaCppEngine
from shrinkserve.server.runtime.grammar import GrammarError, GrammarTokenizer, grammar_tokenizer, lark_grammar
from shrinkserve.server.serving.tools.formats import HERMES, SMOLLM2, detect_tool_format, template_supports_tools
from shrinkserve.server.serving.tools.grammar import tool_grammar
from shrinkserve.server.serving.tools.render import format_calls, render_chat
from shrinkserve.server.serving.tools.stream import ContentDelta, ToolCallDelta, ToolCallParser, parse_tool_calls
from shrinkserve.server.serving.tools.validate import ToolChoice, ToolsError, parse_tool_choice, parse_tools

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40},
                           "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two numbers",
        "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                       "required": ["a", "b"], "additionalProperties": False},
    },
}
# What openai.pydantic_function_tool() sends for a nested model: $defs + $ref at the parameters' root.
BOOKING = {
    "type": "function",
    "function": {
        "name": "book",
        "parameters": {
            "$defs": {"Guest": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                                                  "age": {"type": "integer", "minimum": 0,
                                                                          "maximum": 120}},
                                "required": ["name", "age"], "additionalProperties": False}},
            "type": "object",
            "properties": {"hotel": {"type": "string", "maxLength": 30},
                           "guests": {"type": "array", "items": {"$ref": "#/$defs/Guest"}, "minItems": 1,
                                      "maxItems": 2}},
            "required": ["hotel", "guests"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}

SMOL_TEMPLATE_MARK = "<|im_start|>"
HERMES_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTools:{% for t in tools %} {{ t.function.name }}{% endfor %}\n"
    "Call as <tool_call>\n{\"name\": ..., \"arguments\": ...}\n</tool_call><|im_end|>\n{% endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{%- if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>\n{{ c.function | tojson }}\n</tool_call>"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def ids_counter() -> Iterator[str]:
    return (f"call_{i}" for i in itertools.count())


@pytest.fixture(scope="module")
def engine() -> Iterator[LlamaCppEngine]:
    eng = LlamaCppEngine(embedded_gguf_path(), threads=2, context_length=2048)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def tok(engine: LlamaCppEngine) -> GrammarTokenizer:
    return grammar_tokenizer(engine)


# --------------------------------------------------------------------------- request validation


@pytest.mark.parametrize(
    ("tools", "param"),
    [
        ({"type": "function"}, "tools"),
        ([{"type": "custom", "custom": {"name": "x"}}], "tools[0].type"),
        ([{"type": "function"}], "tools[0].function"),
        ([{"type": "function", "function": {"name": "has space"}}], "tools[0].function.name"),
        ([{"type": "function", "function": {"name": "x" * 65}}], "tools[0].function.name"),
        ([ADD, ADD], "tools[1].function.name"),
        ([{"type": "function", "function": {"name": "f", "parameters": "{}"}}], "tools[0].function.parameters"),
        ([{"type": "function", "function": {"name": "f", "strict": "yes"}}], "tools[0].function.strict"),
        ([{"type": "function", "function": {"name": "f", "description": 3}}], "tools[0].function.description"),
    ],
)
def test_parse_tools_rejects(tools: object, param: str) -> None:
    with pytest.raises(ToolsError) as e:
        parse_tools(tools)  # type: ignore[arg-type]
    assert e.value.param == param


def test_parse_tools_defaults() -> None:
    (t,) = parse_tools([{"type": "function", "function": {"name": "ping"}}])
    assert t.parameters == {"type": "object", "properties": {}} and t.strict is None
    assert parse_tools(None) == ()


def test_parse_tool_choice() -> None:
    tools = parse_tools([WEATHER, ADD])
    assert parse_tool_choice(None, tools) == ToolChoice("auto", tools, True)
    assert parse_tool_choice(None, ()).mode == "none"
    assert parse_tool_choice("none", tools).mode == "none"
    assert parse_tool_choice("auto", (), None).mode == "none"
    assert parse_tool_choice("required", tools, False) == ToolChoice("required", tools, False)
    named = parse_tool_choice({"type": "function", "function": {"name": "add"}}, tools)
    assert named.mode == "required" and named.named and [t.name for t in named.tools] == ["add"]
    assert not named.parallel
    allowed = parse_tool_choice({"type": "allowed_tools", "allowed_tools": {
        "mode": "required", "tools": [{"type": "function", "function": {"name": "get_weather"}}]}}, tools)
    assert allowed.mode == "required" and [t.name for t in allowed.tools] == ["get_weather"]
    for bad, param in [("always", "tool_choice"), (3, "tool_choice"),
                       ({"type": "function", "function": {"name": "nope"}}, "tool_choice"),
                       ({"type": "function"}, "tool_choice.function.name"),
                       ({"type": "custom", "custom": {"name": "x"}}, "tool_choice.type"),
                       ({"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": []}},
                        "tool_choice.allowed_tools.tools")]:
        with pytest.raises(ToolsError) as e:
            parse_tool_choice(bad, tools)
        assert e.value.param == param, bad
    with pytest.raises(ToolsError, match="tool_choice 'required' needs tools") as e:
        parse_tool_choice("required", ())
    assert e.value.param == "tool_choice"


# --------------------------------------------------------------------------- rendering


def test_smollm2_template_has_no_tools(engine: LlamaCppEngine) -> None:
    assert engine.chat_template and not template_supports_tools(engine.chat_template)
    assert detect_tool_format(engine.chat_template) is SMOLLM2
    assert template_supports_tools(HERMES_TEMPLATE) and detect_tool_format(HERMES_TEMPLATE) is HERMES


def test_convention_rendering_with_history(engine: LlamaCppEngine) -> None:
    tools = parse_tools([WEATHER])
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
    ]
    text = render_chat(messages, chat_template=engine.chat_template, tools=tools,
                       choice=parse_tool_choice("auto", tools))
    assert text.startswith("<|im_start|>system\nYou are an expert in composing functions.")
    assert '<tools>[{"type": "function", "function": {"name": "get_weather"' in text
    assert "]</tool_call>\n\nBe brief.<|im_end|>" in text  # the client's system prompt follows the tools block
    assert ('<|im_start|>assistant\n<tool_call>[{"name": "get_weather", "arguments": {"city": "Paris", '
            '"unit": "celsius"}}]</tool_call><|im_end|>') in text
    assert "<|im_start|>user\n<tool_response>\n18 C, sunny\n</tool_response><|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    # tool_choice none: no tools block (it demands a call); the history stays.
    none = render_chat(messages, chat_template=engine.chat_template, tools=tools,
                       choice=parse_tool_choice("none", tools))
    assert "composing functions" not in none and "<tool_response>" in none
    assert none.startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_native_template_rendering() -> None:
    tools = parse_tools([WEATHER, ADD])
    messages = [
        {"role": "user", "content": "2+3?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "5"},
    ]
    text = render_chat(messages, chat_template=HERMES_TEMPLATE, tools=tools, choice=parse_tool_choice("auto", tools))
    assert text.startswith("<|im_start|>system\nTools: get_weather add")  # the template saw the tools
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>' in text  # dict arguments
    assert "<|im_start|>tool\n5<|im_end|>" in text


def test_rendering_rejects_non_text_parts(engine: LlamaCppEngine) -> None:
    with pytest.raises(ToolsError) as e:
        render_chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
                    chat_template=engine.chat_template, tools=parse_tools([ADD]))
    assert e.value.param == "messages[0].content[0]"


# --------------------------------------------------------------------------- grammars on the real vocabulary


def test_grammar_per_choice(tok: GrammarTokenizer) -> None:
    tools = parse_tools([WEATHER, ADD, BOOKING])
    assert tool_grammar(parse_tool_choice("none", tools)) is None
    for choice in ("auto", "required", {"type": "function", "function": {"name": "book"}}):
        for fmt in (SMOLLM2, HERMES):
            for parallel in (True, False):
                tok.compile(lark_grammar(tool_grammar(parse_tool_choice(choice, tools, parallel), fmt)))

    def calls_schema(g: str) -> dict:
        return json.loads(g.split("%json ", 1)[1])

    serial = calls_schema(tool_grammar(parse_tool_choice("required", tools, False)))
    assert (serial["minItems"], serial["maxItems"]) == (1, 1)
    parallel = calls_schema(tool_grammar(parse_tool_choice("required", tools, True)))
    assert "maxItems" not in parallel
    assert calls_schema(tool_grammar(parse_tool_choice("auto", tools)))["minItems"] == 0  # "[]" = no call
    # Each tool's $defs move to the root under its own prefix, and its $refs follow them.
    assert set(parallel["$defs"]) == {"tool0", "tool1", "tool2", "tool2_Guest"}
    assert parallel["$defs"]["tool2"]["properties"]["guests"]["items"] == {"$ref": "#/$defs/tool2_Guest"}


def test_strict_tool_with_unenforceable_keyword_is_rejected(tok: GrammarTokenizer) -> None:
    bad = {"type": "function", "function": {"name": "f", "strict": True, "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "format": "no-such-format"}}}}}
    g = tool_grammar(parse_tool_choice("required", parse_tools([bad])))
    with pytest.raises(GrammarError, match="no-such-format"):
        tok.compile(lark_grammar(g), param="tools")
    lax = {"type": "function", "function": {**bad["function"], "strict": False}}
    tok.compile(lark_grammar(tool_grammar(parse_tool_choice("required", parse_tools([lax])))))


def test_auto_commits_to_a_call_after_the_marker(engine: LlamaCppEngine, tok: GrammarTokenizer) -> None:
    c = tok.constraint(lark_grammar(tool_grammar(parse_tool_choice("auto", parse_tools([ADD])))))
    hello = engine.tokenize("Hello", add_special=False)[0]
    assert c.allowed()[hello]
    assert c.allowed()[sorted(engine.eos_token_ids)].all()  # free text may end at once
    for t in engine.tokenize("Let me add. <tool_call>", add_special=False):
        assert c.allowed()[t]
        c.accept(t)
    mask = c.allowed()
    assert not mask[hello] and not mask[sorted(engine.eos_token_ids)].any()
    assert all(engine.token_bytes(int(t)).startswith(b"[") for t in np.flatnonzero(mask))


def decode(engine: LlamaCppEngine, prompt: str, constraint, max_tokens: int, prefix: str = "") -> tuple[str, str]:
    seq = engine.new_sequence()
    out = engine.tokenize(prefix, add_special=False) if prefix else []
    for t in out:
        constraint.accept(t)
    try:
        ids = engine.tokenize(prompt) + out
        for i in range(0, len(ids), engine.max_batch):  # prefill in chunks the engine accepts
            logits = seq.forward(ids[i: i + engine.max_batch], all_logits=False)[0]
        for _ in range(max_tokens):
            row = logits.copy()
            row[~constraint.allowed()] = -np.inf
            token = int(np.argmax(row))
            constraint.accept(token)
            if token in engine.eos_token_ids:
                return engine.detokenize(out), "stop"
            out.append(token)
            if constraint.is_finished():
                return engine.detokenize(out), "stop"
            logits = seq.forward([token], all_logits=False)[0]
        return engine.detokenize(out), "length"
    finally:
        seq.close()


@pytest.mark.parametrize(
    ("choice", "user", "tool"),
    [
        ("required", "What's the weather like in Paris?", WEATHER),
        ({"type": "function", "function": {"name": "add"}}, "What is 17 plus 25?", ADD),
        ({"type": "function", "function": {"name": "book"}}, "Book the Ritz for Ann, 30.", BOOKING),
    ],
)
def test_forced_calls_on_the_real_model(engine: LlamaCppEngine, tok: GrammarTokenizer, choice: object, user: str,
                                        tool: dict) -> None:
    tools = parse_tools([WEATHER, ADD, BOOKING])
    ch = parse_tool_choice(choice, tools)
    prompt = render_chat([{"role": "user", "content": user}], chat_template=engine.chat_template, tools=tools,
                         choice=ch)
    text, finish = decode(engine, prompt, tok.constraint(lark_grammar(tool_grammar(ch))), 150)
    assert finish == "stop", text
    parsed = parse_tool_calls(text)
    assert parsed.complete and parsed.content is None and parsed.finish_reason("stop") == "tool_calls"
    assert parsed.tool_calls, text
    for call in parsed.tool_calls:
        assert call.id.startswith("call_")
        if ch.named:
            assert call.name == tool["function"]["name"]
        spec = {t["function"]["name"]: t for t in (WEATHER, ADD, BOOKING)}[call.name]
        jsonschema.validate(json.loads(call.arguments), spec["function"]["parameters"])


def test_auto_call_after_marker_on_the_real_model(engine: LlamaCppEngine, tok: GrammarTokenizer) -> None:
    tools = parse_tools([WEATHER])
    ch = parse_tool_choice("auto", tools)
    prompt = render_chat([{"role": "user", "content": "Weather in Rome?"}], chat_template=engine.chat_template,
                         tools=tools, choice=ch)
    # The 135M model rarely opens a call by itself under `auto`; start it as the model would.
    text, finish = decode(engine, prompt, tok.constraint(lark_grammar(tool_grammar(ch))), 80, prefix="<tool_call>")
    assert finish == "stop"
    parsed = parse_tool_calls("<tool_call>" + text)
    assert [c.name for c in parsed.tool_calls] in ([], ["get_weather"])  # auto may also write "[]"
    for call in parsed.tool_calls:
        jsonschema.validate(json.loads(call.arguments), WEATHER["function"]["parameters"])


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "content", "calls", "complete"),
    [
        ('<tool_call>[{"name": "add", "arguments": {"a": 1, "b": 2}}]</tool_call>', None,
         [("add", '{"a": 1, "b": 2}')], True),
        ('Sure.\n<tool_call>[{"name": "a", "arguments": {"x": [1, {"y": "}]"}]}}, '
         '{"arguments": {"q": "\\"<tool_call>\\""}, "name": "b"}]</tool_call>', "Sure.",
         [("a", '{"x": [1, {"y": "}]"}]}'), ("b", '{"q": "\\"<tool_call>\\""}')], True),
        ("<tool_call>[]</tool_call>", None, [], True),
        ("no call here, <tool_ only a prefix", "no call here, <tool_ only a prefix", [], True),
        ('<tool_call>[{"name": "a", "arguments": {"x": 1', None, [("a", '{"x": 1')], False),
        ("<tool_call>not json</tool_call> ok", "<tool_call>not json</tool_call> ok", [], True),
        ('<tool_call>[{"name": "a", "arguments": "{\\"x\\": 1}"}]</tool_call>', None, [("a", '{"x": 1}')], True),
        ('<tool_call>[{"name": "a"}]</tool_call>', None, [("a", "{}")], True),
        ('<tool_call>{"name": "a", "parameters": {"k": null}}</tool_call>', None, [("a", '{"k": null}')], True),
        ('<tool_call>[{"arguments": {}}]</tool_call>', '<tool_call>[{"arguments": {}}]</tool_call>', [], True),
    ],
)
def test_parse(text: str, content: str | None, calls: list[tuple[str, str]], complete: bool) -> None:
    got = parse_tool_calls(text, id_factory=ids_counter().__next__)
    assert got.content == content
    assert [(c.name, c.arguments) for c in got.tool_calls] == calls
    assert got.complete is complete
    assert [c.id for c in got.tool_calls] == [f"call_{i}" for i in range(len(calls))]


def test_parse_hermes_blocks() -> None:
    text = ('<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
            '<tool_call>\n{"name": "b", "arguments": {"y": 2}}\n</tool_call>')
    got = parse_tool_calls(text, HERMES)
    assert [(c.name, c.arguments) for c in got.tool_calls] == [("a", '{"x": 1}'), ("b", '{"y": 2}')]
    assert got.complete and got.content is None


def test_history_format_round_trips() -> None:
    written = format_calls([("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Oslo"})])
    got = parse_tool_calls(written)
    assert [(c.name, json.loads(c.arguments)) for c in got.tool_calls] == [
        ("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Oslo"})]


def test_finish_reason() -> None:
    done = parse_tool_calls('<tool_call>[{"name": "a", "arguments": {}}]</tool_call>')
    assert done.finish_reason("stop") == "tool_calls"
    cut = parse_tool_calls('<tool_call>[{"name": "a", "arguments": {"x"')
    assert cut.finish_reason("length") == "length"
    assert parse_tool_calls("plain").finish_reason("stop") == "stop"


STREAM_TEXTS = [
    'Ok <tool_call>[{"name": "a", "arguments": {"x": [1, 2], "s": "a<tool_call>"}}, '
    '{"name": "b", "arguments": {}}]</tool_call>',
    '<tool_call>[{"name": "add", "arguments": {"a": 1.5, "b": -2}}]</tool_call>',
    "just text, with a < and <tool and trailing spaces   ",
    '<tool_call>[{"name": "a", "arguments": "{\\"x\\": 1}"}]</tool_call>',
    '<tool_call>[{"name": "a", "arguments": {"x": "unfinished',
    "<tool_call>[not a call]</tool_call>",
]


def replay(deltas: list, ) -> tuple[str, dict[int, dict[str, str]]]:
    content = ""
    calls: dict[int, dict[str, str]] = {}
    for d in deltas:
        if isinstance(d, ContentDelta):
            content += d.text
        else:
            assert isinstance(d, ToolCallDelta)
            if d.id is not None:
                assert d.index not in calls and d.index == len(calls)  # announced once, in order
                calls[d.index] = {"id": d.id, "name": d.name, "arguments": ""}
            calls[d.index]["arguments"] += d.arguments
    return content, calls


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_deltas_reassemble_to_the_final_answer(text: str) -> None:
    rng = random.Random(0)
    whole = parse_tool_calls(text, id_factory=ids_counter().__next__)
    splits = [[1] * len(text), [len(text)]] + [[rng.randint(1, 7) for _ in range(len(text))] for _ in range(20)]
    for sizes in splits:
        p = ToolCallParser(id_factory=ids_counter().__next__)
        deltas, i = [], 0
        for n in sizes:
            if i >= len(text):
                break
            deltas += p.feed(text[i: i + n])
            i += n
        deltas += p.finish()
        content, calls = replay(deltas)
        result = p.result()
        assert result == whole
        assert content == (whole.content or "")  # trailing spaces of plain text included
        assert [(c["id"], c["name"], c["arguments"]) for c in calls.values()] == [
            (c.id, c.name, c.arguments) for c in whole.tool_calls]


def test_delta_openai_shape() -> None:
    assert ToolCallDelta(0, id="call_x", name="f").as_openai() == {
        "index": 0, "id": "call_x", "type": "function", "function": {"name": "f", "arguments": ""}}
    assert ToolCallDelta(1, arguments='{"a"').as_openai() == {"index": 1, "function": {"arguments": '{"a"'}}
