"""Structured outputs: JSON schemas and Lark grammars enforced token by token with llguidance.

Three layers, each usable alone:

- grammar *text* (pure functions, no tokenizer): ``response_format_grammar``, ``json_schema_grammar``,
  ``lark_grammar``. They turn an OpenAI ``response_format`` (or a tool-call grammar from
  ``serving/tools/``) into llguidance's serialized grammar, checking size and nesting first.
- ``GrammarTokenizer``: llguidance's view of one model's vocabulary. Building it walks the whole vocabulary
  (~0.5 s for 49,152 tokens on this box), so it is made once per engine (``grammar_tokenizer(engine)``)
  and caches compiled grammars (``compile``).
- ``GrammarConstraint``: the per-sequence, stateful ``TokenConstraint`` (interfaces.md §1) the sampler
  consults: ``allowed()`` → bool mask, ``accept(token)``, ``is_finished()``.

Cost, measured on the default model's 49,152-token vocabulary (scripts/bench_grammar.py): see README
"Structured outputs"; mask + accept is a fraction of a millisecond against ~7 ms of forward.

Every user-caused problem (bad schema, unsupported keyword under ``strict``, a grammar over the limits)
raises ``GrammarError`` (a ValueError with ``param`` set) so the API can answer 400 before generating.
Compiling can take up to ~1 s for a huge schema (llguidance drops the GIL meanwhile); callers run
``compile`` off the event loop.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

__all__ = [
    "DEFAULT_LIMITS",
    "JSON_OPTIONS",
    "CompiledGrammar",
    "GrammarConstraint",
    "GrammarError",
    "GrammarLimits",
    "GrammarTokenizer",
    "GrammarViolation",
    "VocabSource",
    "grammar_tokenizer",
    "json_object_grammar",
    "json_schema_grammar",
    "json_schema_lark",
    "lark_grammar",
    "response_format_grammar",
]

# JSON layout the grammar allows. llguidance's default ("flexible") lets whitespace appear anywhere, and a
# 135M model then loops on newlines/spaces inside an object until max_tokens; a fixed layout bounds that
# and is the layout these models write anyway (`{"a": 1, "b": 2}`). A schema can override it through
# llguidance's own "x-guidance" key.
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """The request's schema or grammar cannot be used; the API answers 400 naming ``param``."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class GrammarViolation(RuntimeError):
    """A token outside the mask was accepted: a sampler bug, never the client's fault."""


@dataclass(frozen=True)
class GrammarLimits:
    """Bounds on what a request may ask the grammar engine to build (checked before compiling)."""

    max_schema_bytes: int = 256 * 1024  # serialized JSON of one schema / grammar text
    max_schema_depth: int = 64  # nesting of objects/arrays in the schema document itself
    # llguidance's own fuel limits (its defaults, kept explicit): they bound compile time and per-token work.
    max_grammar_size: int = 500_000
    initial_lexer_fuel: int = 1_000_000
    step_lexer_fuel: int = 200_000
    step_max_items: int = 50_000
    max_lexer_states: int = 250_000

    def parser_limits(self) -> Any:
        import llguidance as llg

        # verbose_errors off: the default puts the whole grammar and parser state into the message,
        # which would then travel to the client (and the log) on every bad schema.
        return llg.LLParserLimits(
            max_grammar_size=self.max_grammar_size, initial_lexer_fuel=self.initial_lexer_fuel,
            step_lexer_fuel=self.step_lexer_fuel, step_max_items=self.step_max_items,
            max_lexer_states=self.max_lexer_states, verbose_errors=False,
        )


DEFAULT_LIMITS = GrammarLimits()


# --------------------------------------------------------------------------- grammar text (no tokenizer)


def _check_size(document: Any, limits: GrammarLimits, param: str) -> str:
    """Serialize ``document`` after checking its nesting depth iteratively (no recursion to blow)."""
    stack: list[tuple[Any, int]] = [(document, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limits.max_schema_depth:
            raise GrammarError(f"{param} nests deeper than {limits.max_schema_depth} levels", param)
        if isinstance(node, Mapping):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list | tuple):
            stack.extend((v, depth + 1) for v in node)
    try:
        text = json.dumps(document, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise GrammarError(f"{param} is not valid JSON: {exc}", param) from exc
    if len(text.encode("utf-8")) > limits.max_schema_bytes:
        raise GrammarError(f"{param} is larger than {limits.max_schema_bytes} bytes", param)
    return text


def json_schema_grammar(
    schema: Mapping[str, Any] | bool, *, strict: bool | None = None, param: str = "response_format",
    limits: GrammarLimits = DEFAULT_LIMITS,
) -> str:
    """llguidance grammar text for JSON documents valid against ``schema``.

    ``strict`` true: a keyword llguidance cannot enforce is an error (400), as OpenAI's strict mode refuses
    such schemas. Otherwise unenforceable keywords are skipped (llguidance's "lenient"), the best-effort
    meaning OpenAI gives ``strict: false``. The output always parses as JSON and follows every keyword
    llguidance implements, in both modes.
    """
    import llguidance as llg

    if schema is True:
        schema = {}
    if not isinstance(schema, Mapping):
        raise GrammarError(f"{param}: the JSON schema must be an object", param)
    _check_size(schema, limits, param)
    options = {**JSON_OPTIONS, "lenient": not strict}
    try:
        return llg.LLMatcher.grammar_from_json_schema(dict(schema), defaults=options)
    except ValueError as exc:
        raise GrammarError(f"{param}: invalid JSON schema: {exc}", param) from exc


def json_schema_lark(
    schema: Mapping[str, Any] | bool, *, strict: bool | None = None, param: str = "response_format",
    limits: GrammarLimits = DEFAULT_LIMITS,
) -> str:
    """The same constraint as ``json_schema_grammar`` as a Lark expression (``%json {…}``), to combine with
    other rules (a tool-call grammar whose free-text answer must follow ``response_format``)."""
    if schema is True:
        schema = {}
    if not isinstance(schema, Mapping):
        raise GrammarError(f"{param}: the JSON schema must be an object", param)
    _check_size(schema, limits, param)
    options = {**JSON_OPTIONS, "lenient": not strict, **(schema.get("x-guidance") or {})}
    return "%json " + json.dumps({**schema, "x-guidance": options}, ensure_ascii=False)


def json_object_grammar() -> str:
    """Any JSON object: OpenAI's ``{"type": "json_object"}``."""
    return json_schema_grammar({"type": "object"})


def lark_grammar(text: str, *, param: str = "grammar", limits: GrammarLimits = DEFAULT_LIMITS) -> str:
    """llguidance grammar text from a Lark grammar (llguidance's dialect, with ``%json {…}``)."""
    import llguidance as llg

    if len(text.encode("utf-8")) > limits.max_schema_bytes:
        raise GrammarError(f"{param} is larger than {limits.max_schema_bytes} bytes", param)
    return llg.LLMatcher.grammar_from_lark(text)


def response_format_grammar(
    response_format: Mapping[str, Any] | None, *, limits: GrammarLimits = DEFAULT_LIMITS,
) -> str | None:
    """Grammar text for an OpenAI ``response_format`` (chat), or None for plain text.

    Accepts ``{"type": "text"}``, ``{"type": "json_object"}`` and
    ``{"type": "json_schema", "json_schema": {"name": …, "schema": {…}, "strict": …, "description": …}}``.
    A ``json_schema`` without ``schema`` allows any JSON object (OpenAI's schema field is optional).
    """
    param = "response_format"
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise GrammarError("response_format must be an object", param)
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_object_grammar()
    if kind != "json_schema":
        raise GrammarError(
            f"response_format.type must be 'text', 'json_object' or 'json_schema', not {kind!r}", param)
    spec = response_format.get("json_schema")
    if not isinstance(spec, Mapping):
        raise GrammarError("response_format.json_schema must be an object with a 'schema'",
                           "response_format.json_schema")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise GrammarError("response_format.json_schema.strict must be a boolean",
                           "response_format.json_schema.strict")
    schema = spec.get("schema", {"type": "object"})
    return json_schema_grammar(schema, strict=strict, param="response_format.json_schema.schema", limits=limits)


# --------------------------------------------------------------------------- tokenizer


class VocabSource(Protocol):
    """What the bytes path needs from an engine (both in-process engines have it)."""

    vocab_size: int
    eos_token_ids: frozenset[int]

    def token_bytes(self, token_id: int) -> bytes: ...

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]: ...


class _TokenList:
    """The object llguidance.TokenizerWrapper reads: token bytes, specials, EOS and an encoder."""

    def __init__(self, tokens: list[bytes], special_ids: list[int], eos: int, encode: Callable[[str], list[int]]):
        self.tokens = tokens
        self.special_token_ids = special_ids
        self.eos_token_id = eos
        self.bos_token_id = None
        self._encode = encode

    def __call__(self, text: bytes | str) -> list[int]:
        # llguidance hands over valid UTF-8 prefixes (it greedy-tokenizes any incomplete tail itself).
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return list(self._encode(text))


class GrammarTokenizer:
    """llguidance's tokenizer for one model, plus the model's EOS ids and logits width.

    llguidance knows one EOS token; models often have several (SmolLM2 in llama.cpp: ids 0, 2 and 4), so the
    mask allows all of them wherever llguidance allows its EOS and ``accept`` maps them back.
    """

    def __init__(self, ll_tokenizer: Any, *, n_vocab: int, eos_token_ids: frozenset[int],
                 limits: GrammarLimits = DEFAULT_LIMITS, cache_size: int = 64) -> None:
        if not eos_token_ids:
            raise ValueError("a grammar tokenizer needs at least one EOS token id")
        self.ll = ll_tokenizer
        self.n_vocab = n_vocab  # width of the model's logits row, which may exceed the tokenizer's
        self.eos_token_ids = frozenset(eos_token_ids)
        self.ll_eos = int(ll_tokenizer.eos_token)
        self._eos_array = np.fromiter(sorted(self.eos_token_ids), dtype=np.int64)
        self.limits = limits
        self._parser_limits = limits.parser_limits()
        self._cache: OrderedDict[str, CompiledGrammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    # -- construction ----------------------------------------------------------------------------

    @classmethod
    def from_token_bytes(
        cls, tokens: Sequence[bytes], *, eos_token_ids: frozenset[int], encode: Callable[[str], list[int]],
        n_vocab: int | None = None, special_names: Mapping[int, str] | None = None,
        limits: GrammarLimits = DEFAULT_LIMITS,
    ) -> GrammarTokenizer:
        """From each token's output bytes; empty bytes mark a control token (or vocabulary padding).

        Control tokens get a unique name (from ``special_names`` when known, e.g. ``<|im_end|>``) so that a
        grammar can never produce them as text: llguidance only emits a special token the grammar names.
        ``encode`` tokenizes text without adding BOS (used by llguidance for forced text).
        """
        import llguidance as llg

        names = special_names or {}
        toks: list[bytes] = []
        specials: list[int] = []
        for i, b in enumerate(tokens):
            if not b:
                specials.append(i)
                b = names.get(i, f"<|special_{i}|>").encode("utf-8")
            toks.append(bytes(b))
        eos = min(eos_token_ids)
        wrapper = llg.TokenizerWrapper(_TokenList(toks, specials, eos, encode))
        ll = llg.LLTokenizer(wrapper)
        return cls(ll, n_vocab=max(n_vocab or 0, len(toks)), eos_token_ids=frozenset(eos_token_ids), limits=limits)

    @classmethod
    def from_engine(cls, engine: VocabSource, *, limits: GrammarLimits = DEFAULT_LIMITS) -> GrammarTokenizer:
        """The bytes path: works for every engine, including llama.cpp (which has no HF tokenizer)."""
        n = engine.vocab_size
        return cls.from_token_bytes(
            [engine.token_bytes(i) for i in range(n)], eos_token_ids=engine.eos_token_ids,
            encode=lambda s: engine.tokenize(s, add_special=False), n_vocab=n, limits=limits,
        )

    @classmethod
    def from_hf(cls, hf_tokenizer: Any, *, eos_token_ids: frozenset[int] | None = None, n_vocab: int | None = None,
                limits: GrammarLimits = DEFAULT_LIMITS) -> GrammarTokenizer:
        """From a fast Hugging Face tokenizer (llguidance reads its tokenizer.json itself)."""
        from llguidance.hf import from_tokenizer

        eos = frozenset(eos_token_ids or {int(hf_tokenizer.eos_token_id)})
        ll = from_tokenizer(hf_tokenizer, n_vocab=n_vocab, eos_token=min(eos))
        return cls(ll, n_vocab=max(n_vocab or 0, int(ll.vocab_size)), eos_token_ids=eos, limits=limits)

    # -- compiling -------------------------------------------------------------------------------

    def compile(self, grammar: str, *, param: str | None = None) -> CompiledGrammar:
        """Check and compile grammar text (from the ``*_grammar`` functions); cached by text.

        Raises GrammarError naming ``param`` when llguidance refuses it (bad regex, unsupported keyword
        under strict, a ``$ref`` it cannot resolve, over the limits).
        """
        import llguidance as llg

        with self._lock:
            hit = self._cache.get(grammar)
            if hit is not None:
                self._cache.move_to_end(grammar)
                return hit
        matcher = llg.LLMatcher(self.ll, grammar, log_level=0, limits=self._parser_limits)
        if matcher.is_error():
            msg = _first_line(matcher.get_error())
            raise GrammarError(f"{param}: {msg}" if param else f"invalid grammar: {msg}", param)
        compiled = CompiledGrammar(self, matcher, grammar)
        with self._lock:
            self._cache[grammar] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def constraint(self, grammar: str, *, param: str | None = None) -> GrammarConstraint:
        return self.compile(grammar, param=param).new_constraint()


def _first_line(message: str) -> str:
    """The message without llguidance's parser/grammar dumps, on one line, bounded."""
    for marker in ("<state>", "<grammar>"):
        message = message.split(marker, 1)[0]
    return " ".join(message.split())[:500]


class CompiledGrammar:
    """A checked grammar in its start state; ``new_constraint()`` per sequence (copies are cheap)."""

    def __init__(self, tokenizer: GrammarTokenizer, pristine: Any, source: str = "") -> None:
        self.tokenizer = tokenizer
        self.source = source  # the grammar text it was compiled from
        self._pristine = pristine
        self._lock = threading.Lock()

    def new_constraint(self) -> GrammarConstraint:
        with self._lock:
            matcher = self._pristine.deep_copy()
        return GrammarConstraint(self.tokenizer, matcher, self.source)


class GrammarConstraint:
    """One sequence's grammar state: the ``TokenConstraint`` of interfaces.md §1. Not thread-safe."""

    def __init__(self, tokenizer: GrammarTokenizer, matcher: Any, source: str = "") -> None:
        self._tok = tokenizer
        self._m = matcher
        # llguidance grammar text: what an out-of-process core (vLLM's guidance backend, which takes the
        # same format as `structured_outputs.grammar`) enforces instead of calling allowed()/accept().
        self.source = source
        ll_vocab = int(tokenizer.ll.vocab_size)
        self._bits = np.full(((ll_vocab + 31) // 32,), -1, dtype=np.int32)
        self._ll_vocab = ll_vocab
        self.n_tokens = 0

    def allowed(self) -> np.ndarray:
        """Bool mask over the model's logits row: the tokens that keep the output a valid prefix."""
        m = self._m
        if m.is_error():
            raise GrammarViolation(f"grammar is in an error state: {_first_line(m.get_error())}")
        m.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        mask = np.unpackbits(self._bits.view(np.uint8), bitorder="little", count=self._ll_vocab).view(np.bool_)
        if self._tok.n_vocab != self._ll_vocab:
            full = np.zeros(self._tok.n_vocab, dtype=np.bool_)
            n = min(self._tok.n_vocab, self._ll_vocab)
            full[:n] = mask[:n]
            mask = full
        if mask[self._tok.ll_eos]:
            mask[self._tok._eos_array] = True
        return mask

    def accept(self, token: int) -> None:
        """Advance with the sampled token; raises GrammarViolation if the mask did not allow it."""
        t = self._tok.ll_eos if token in self._tok.eos_token_ids else int(token)
        if not self._m.consume_token(t):
            raise GrammarViolation(f"token {token} violates the grammar: {_first_line(self._m.get_error())}")
        self.n_tokens += 1

    def is_finished(self) -> bool:
        """True once nothing but EOS may follow (the document is complete) or EOS was accepted."""
        return bool(self._m.is_stopped()) and not self._m.is_error()

    def is_accepting(self) -> bool:
        """The output so far is a complete document (EOS would be allowed now)."""
        return bool(self._m.is_accepting())

    def forced_text(self) -> bytes:
        """Bytes the grammar forces next (diagnostics; e.g. the rest of a key name)."""
        return bytes(self._m.compute_ff_bytes())


# --------------------------------------------------------------------------- per-engine cache

_TOKENIZERS: weakref.WeakKeyDictionary[Any, GrammarTokenizer] = weakref.WeakKeyDictionary()
_TOKENIZERS_LOCK = threading.Lock()
_BUILD_LOCKS: weakref.WeakKeyDictionary[Any, threading.Lock] = weakref.WeakKeyDictionary()


def grammar_tokenizer(engine: VocabSource, *, limits: GrammarLimits = DEFAULT_LIMITS) -> GrammarTokenizer:
    """The engine's GrammarTokenizer, built on first use (~0.5 s) and kept as long as the engine lives.

    Concurrent first requests build it once: the others wait for the first build.
    """
    with _TOKENIZERS_LOCK:
        tok = _TOKENIZERS.get(engine)
        if tok is not None:
            return tok
        build_lock = _BUILD_LOCKS.setdefault(engine, threading.Lock())
    with build_lock:
        with _TOKENIZERS_LOCK:
            tok = _TOKENIZERS.get(engine)
        if tok is None:
            tok = GrammarTokenizer.from_engine(engine, limits=limits)
            with _TOKENIZERS_LOCK:
                _TOKENIZERS[engine] = tok
    return tok
