"""Structured outputs (server/runtime/grammar.py) on the real default model's vocabulary."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Iterator

import jsonschema
import numpy as np
import pytest

from shrinkserve.compression.base_model import embedded_gguf_path
from shrinkserve.server.engines.llamacpp import LlamaCppEngine
from shrinkserve.server.runtime.grammar import (
    GrammarConstraint,
    GrammarError,
    GrammarLimits,
    GrammarTokenizer,
    GrammarViolation,
    grammar_tokenizer,
    json_object_grammar,
    json_schema_grammar,
    lark_grammar,
    response_format_grammar,
)

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
    },
    "required": ["name", "age", "hobbies"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine() -> Iterator[LlamaCppEngine]:
    # The embedded GGUF: the default model's tokenizer (49,152 tokens) and weights, no artifact build needed.
    eng = LlamaCppEngine(embedded_gguf_path(), threads=2, context_length=1024)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def tok(engine: LlamaCppEngine) -> GrammarTokenizer:
    return grammar_tokenizer(engine)


def ids(engine: LlamaCppEngine, text: str) -> list[int]:
    return engine.tokenize(text, add_special=False)


def feed(c: GrammarConstraint, tokens: list[int]) -> None:
    for t in tokens:
        assert c.allowed()[t], f"token {t} was not allowed"
        c.accept(t)


def greedy(engine: LlamaCppEngine, prompt: str, c: GrammarConstraint, max_tokens: int) -> tuple[str, str, list[float]]:
    """Constrained greedy decode; returns (text, finish_reason, per-token mask+accept seconds)."""
    seq = engine.new_sequence()
    out: list[int] = []
    costs: list[float] = []
    try:
        logits = seq.forward(engine.tokenize(prompt), all_logits=False)[0]
        for _ in range(max_tokens):
            t0 = time.perf_counter()
            row = logits.copy()
            row[~c.allowed()] = -np.inf
            token = int(np.argmax(row))
            c.accept(token)
            costs.append(time.perf_counter() - t0)
            if token in engine.eos_token_ids:
                return engine.detokenize(out), "stop", costs
            out.append(token)
            if c.is_finished():
                return engine.detokenize(out), "stop", costs
            logits = seq.forward([token], all_logits=False)[0]
        return engine.detokenize(out), "length", costs
    finally:
        seq.close()


def chat(user: str) -> str:
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


# --------------------------------------------------------------------------- grammar text, no tokenizer


def test_response_format_kinds() -> None:
    assert response_format_grammar(None) is None
    assert response_format_grammar({"type": "text"}) is None
    assert response_format_grammar({"type": "json_object"}) == json_object_grammar()
    g = response_format_grammar({"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON, "strict": True}})
    assert '"maxLength":30' in g.replace(" ", "")
    # OpenAI's schema field is optional: any JSON object then.
    assert response_format_grammar({"type": "json_schema", "json_schema": {"name": "x"}}) == json_object_grammar()


@pytest.mark.parametrize(
    ("rf", "param"),
    [
        ({"type": "xml"}, "response_format"),
        ("json", "response_format"),
        ({"type": "json_schema"}, "response_format.json_schema"),
        ({"type": "json_schema", "json_schema": {"schema": PERSON, "strict": "yes"}},
         "response_format.json_schema.strict"),
        ({"type": "json_schema", "json_schema": {"schema": [1, 2]}}, "response_format.json_schema.schema"),
        ({"type": "json_schema", "json_schema": {"schema": {"type": "number", "minimum": float("nan")}}},
         "response_format.json_schema.schema"),
    ],
)
def test_response_format_rejects(rf: object, param: str) -> None:
    with pytest.raises(GrammarError) as e:
        response_format_grammar(rf)  # type: ignore[arg-type]
    assert e.value.param == param
    assert isinstance(e.value, ValueError)


def test_schema_limits() -> None:
    deep: dict = {"type": "object"}
    for _ in range(200):
        deep = {"type": "object", "properties": {"a": deep}}
    with pytest.raises(GrammarError, match="nests deeper"):
        json_schema_grammar(deep)
    big = {"type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 100} for i in range(100)}}
    with pytest.raises(GrammarError, match="larger than"):
        json_schema_grammar(big, limits=GrammarLimits(max_schema_bytes=4096))
    json_schema_grammar(big)  # under the default limit
    with pytest.raises(GrammarError, match="larger than"):
        lark_grammar("start: " + " | ".join(f'"{i}"' for i in range(2000)), limits=GrammarLimits(max_schema_bytes=4096))


# --------------------------------------------------------------------------- on the model's vocabulary


def test_tokenizer_is_cached_per_engine(engine: LlamaCppEngine, tok: GrammarTokenizer) -> None:
    assert grammar_tokenizer(engine) is tok
    assert tok.n_vocab == engine.vocab_size == 49152
    assert tok.eos_token_ids == engine.eos_token_ids


@pytest.mark.parametrize(
    ("schema", "strict", "message"),
    [
        ({"type": "strin"}, None, "strin"),
        ({"type": "string", "pattern": "(?<=a)b"}, True, "look-around"),
        ({"type": "string", "format": "no-such-format"}, True, "no-such-format"),
        ({"$ref": "#/$defs/missing"}, None, "missing"),
        ({"$ref": "https://example.com/schema.json"}, None, "example.com"),
    ],
)
def test_invalid_schema_is_a_grammar_error(tok: GrammarTokenizer, schema: dict, strict: bool | None,
                                           message: str) -> None:
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": strict}}
    with pytest.raises(GrammarError, match=message) as e:
        tok.compile(response_format_grammar(rf), param="response_format")
    assert e.value.param == "response_format"
    assert "<grammar>" not in str(e.value)  # no parser dump in client-facing messages


def test_unenforceable_keyword_is_skipped_when_not_strict(tok: GrammarTokenizer) -> None:
    tok.compile(json_schema_grammar({"type": "string", "format": "no-such-format"}, strict=False))


def test_mask_follows_schema(engine: LlamaCppEngine, tok: GrammarTokenizer) -> None:
    c = tok.constraint(json_schema_grammar(PERSON, strict=True))
    first = c.allowed()
    assert first.dtype == np.bool_ and first.shape == (engine.vocab_size,)
    # The layout is fixed, so the first bytes are forced; llguidance then allows only the tokenizer's own
    # (longest) tokens for them: `{"`, not `{`.
    assert c.forced_text() == b'{"name": "'
    assert [engine.token_bytes(int(t)) for t in np.flatnonzero(first)] == [b'{"']
    assert not first[ids(engine, "Hello")[0]]
    assert not first[list(engine.eos_token_ids)].any()  # an empty output is not a document
    feed(c, ids(engine, '{"name": "Ann", "age": 7'))
    assert not c.is_finished() and not c.is_accepting()
    # Only the next required key may follow, with the fixed layout (", " then the key).
    assert not c.allowed()[ids(engine, "}")[0]]
    feed(c, ids(engine, ', "hobbies": ["chess"]}'))
    assert c.is_finished()
    assert set(np.flatnonzero(c.allowed())) == set(engine.eos_token_ids)  # nothing but EOS after the end


def test_every_eos_id_maps_to_the_grammars_eos(engine: LlamaCppEngine, tok: GrammarTokenizer) -> None:
    for eos in sorted(engine.eos_token_ids):
        c = tok.constraint(lark_grammar('start: /[a-z ]+/'))
        feed(c, ids(engine, "hello world"))
        assert c.allowed()[eos] and not c.is_finished()
        c.accept(eos)
        assert c.is_finished()


def test_disallowed_token_raises(engine: LlamaCppEngine, tok: GrammarTokenizer) -> None:
    c = tok.constraint(json_object_grammar())
    with pytest.raises(GrammarViolation):
        c.accept(ids(engine, "Hello")[0])


def test_constraints_from_one_compiled_grammar_are_independent(engine: LlamaCppEngine,
                                                               tok: GrammarTokenizer) -> None:
    g = json_object_grammar()
    compiled = tok.compile(g)
    assert tok.compile(g) is compiled  # cached by text
    a, b = compiled.new_constraint(), compiled.new_constraint()
    feed(a, ids(engine, '{"a": 1}'))
    assert a.is_finished() and not b.is_finished()
    assert b.allowed()[ids(engine, "{")[0]]


def test_synthetic_vocab_specials_and_padding() -> None:
    # A 10-token vocabulary padded to 16 logits (as some checkpoints pad their embedding matrix).
    tokens = [b"", b"", b"{", b"}", b'"a"', b": ", b"1", b"2", b"x", b'{"a": ']
    vocab = {t.decode(): i for i, t in enumerate(tokens) if t}

    def encode(s: str) -> list[int]:
        out, i = [], 0
        while i < len(s):
            best = max((k for k in vocab if s.startswith(k, i)), key=len)
            out.append(vocab[best])
            i += len(best)
        return out

    tok = GrammarTokenizer.from_token_bytes(tokens, eos_token_ids=frozenset({0}), encode=encode, n_vocab=16,
                                            special_names={0: "<|end|>"})
    c = tok.constraint(json_schema_grammar({"type": "object", "properties": {"a": {"type": "integer"}},
                                            "required": ["a"], "additionalProperties": False}))
    m = c.allowed()
    assert m.shape == (16,)
    assert list(np.flatnonzero(m)) == [9]  # forced '{"a": ' → only the longest token covering it
    for t in (9, 6, 7):
        c.accept(t)
    assert c.is_accepting() is False
    c.accept(3)
    assert c.is_finished()
    # Free text: every text token, EOS once accepting; never the other control token (1) or the padding.
    c = tok.constraint(lark_grammar("start: /[a-z0-9{}]*/"))
    assert list(np.flatnonzero(c.allowed())) == [0, 2, 3, 6, 7, 8]


def test_hf_and_bytes_paths_agree(engine: LlamaCppEngine, tok: GrammarTokenizer, tmp_path_factory) -> None:
    from transformers import AutoTokenizer

    path = embedded_gguf_path()
    hf = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    hf_tok = GrammarTokenizer.from_hf(hf, eos_token_ids=engine.eos_token_ids, n_vocab=engine.vocab_size)
    g = json_schema_grammar(PERSON, strict=True)
    a, b = tok.constraint(g), hf_tok.constraint(g)
    for t in ids(engine, '{"name": "Ann", "age": 7, "hobbies": ["chess", "go"]}'):
        assert np.array_equal(a.allowed(), b.allowed())
        a.accept(t)
        b.accept(t)
    assert a.is_finished() and b.is_finished()


# --------------------------------------------------------------------------- decoding the real model


def test_greedy_decode_follows_the_schema(engine: LlamaCppEngine, tok: GrammarTokenizer) -> None:
    c = tok.constraint(json_schema_grammar(PERSON, strict=True))
    text, finish, costs = greedy(engine, chat("Describe a person as JSON."), c, max_tokens=120)
    assert finish == "stop", text
    jsonschema.validate(json.loads(text), PERSON)
    # Loose bound (the issue measured ~0.1-0.2 ms on a quiet box): catches a mask path gone quadratic or
    # per-token rebuilds of the tokenizer, not noise on a shared machine.
    assert statistics.median(costs) < 5e-3, f"median mask+accept {statistics.median(costs) * 1e3:.2f} ms"


def test_json_object_mode(engine: LlamaCppEngine, tok: GrammarTokenizer) -> None:
    c = tok.constraint(json_object_grammar())
    text, finish, _ = greedy(engine, chat("What is the capital of France? Answer in JSON."), c, max_tokens=120)
    assert finish == "stop", text
    assert json.loads(text) == {"capital": "Paris"}


def test_grammar_that_runs_out_of_tokens_is_honest(engine: LlamaCppEngine, tok: GrammarTokenizer) -> None:
    c = tok.constraint(json_schema_grammar(PERSON, strict=True))
    text, finish, _ = greedy(engine, chat("Describe a person as JSON."), c, max_tokens=5)
    assert finish == "length"
    assert not c.is_finished() and not c.is_accepting()
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
