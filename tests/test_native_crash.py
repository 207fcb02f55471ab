"""llama.cpp must not crash on the quantized types we serve.

llama.cpp's AMX int8 path once died with SIGSEGV in ggml_backend_amx_mul_mat on these CPUs during
batched prefill (the Makefile now builds without AMX). A native crash would kill pytest itself, so
the work runs in a subprocess, where a segfault shows up as returncode -11 with faulthandler's stack.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

QUANTS = ["q4_0", "q4_k_m", "q8_0"]
PREFILL = 96  # >= 64 tokens in one batch: the matrix-matrix kernels, not the vector ones
DECODE = 16

SCRIPT = r"""
import faulthandler, json, sys
from pathlib import Path

import numpy as np

faulthandler.enable()
from shrinkserve.compression.cache import ArtifactCache
from shrinkserve.compression.profiles import BaseSpec, ProfileBuilder, ProfileSpec
from shrinkserve.server.engines.llamacpp import LlamaCppEngine

cache, prefill, decode = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
names = ["f16", *sys.argv[4:]]
builder = ProfileBuilder(ArtifactCache(cache), {"smollm2": BaseSpec()},
                         {n: ProfileSpec(method=f"gguf:{n}") for n in names}, threads=2)
text = ("The quick brown fox jumps over the lazy dog. " * 4
        + "Paris is the capital of France, and Berlin is the capital of Germany. " * 6)
reference = None
for name in names:
    engine = LlamaCppEngine(builder.build(name).path, threads=2, context_length=512)
    ids = engine.tokenize(text)[:prefill]
    assert len(ids) == prefill, len(ids)
    seq = engine.new_sequence()
    logits = seq.forward(ids, all_logits=True)
    top = logits.argmax(axis=1)
    finite = bool(np.isfinite(logits).all())
    token, generated = int(top[-1]), []
    for _ in range(decode):
        step = seq.forward([token], all_logits=False)
        finite = finite and bool(np.isfinite(step).all())
        token = int(step[0].argmax())
        generated.append(token)
    if reference is None:
        reference = top
    print(json.dumps({
        "name": name, "shape": list(logits.shape), "finite": finite, "cached": len(seq.tokens),
        "agree_with_f16": float((top == reference).mean()), "logit_std": float(logits.std()),
        "text": engine.detokenize(generated),
    }), flush=True)
    engine.close()
print("done", flush=True)
"""


def test_quantized_prefill_and_decode_do_not_crash(cache_dir: Path, tmp_path: Path) -> None:
    script = tmp_path / "native_probe.py"
    script.write_text(SCRIPT)
    r = subprocess.run([sys.executable, str(script), str(cache_dir), str(PREFILL), str(DECODE), *QUANTS],
                       capture_output=True, text=True, timeout=600)
    if r.returncode < 0:
        raise AssertionError(f"the subprocess died of {signal.Signals(-r.returncode).name} (a llama.cpp crash):\n"
                             f"{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
    assert r.returncode == 0, r.stderr[-6000:]
    lines = r.stdout.splitlines()
    assert lines[-1] == "done", r.stdout
    rows = {row["name"]: row for row in map(json.loads, lines[:-1])}
    assert list(rows) == ["f16", *QUANTS]
    for name, row in rows.items():
        assert row["finite"], row
        assert row["shape"] == [PREFILL, 49152] and row["cached"] == PREFILL + DECODE, row
        assert row["logit_std"] > 0.5, row  # not a constant or zeroed output
        assert row["text"].strip(), row
        # A wrong kernel gives finite garbage; a sound quantization mostly agrees with F16 on the next token.
        assert row["agree_with_f16"] >= 0.6, (name, row)
