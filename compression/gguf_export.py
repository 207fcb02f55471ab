"""An HF checkpoint directory (Llama architecture, byte-level BPE tokenizer) as an F16 GGUF llama.cpp loads.

Follows llama.cpp's own convert_hf_to_gguf.py (conversion/base.py + conversion/llama.py of the llama.cpp
vendored in llama-cpp-python 0.3.36) for what we serve — SmolLM2 and students pruned or narrowed from it:
- hyperparameters under `llama.*`; head_dim as the RoPE dimension count;
- tensor names through gguf-py's own map for MODEL_ARCH.LLAMA; q/k projections permuted from HF's
  rotate-half layout to llama.cpp's interleaved RoPE layout (q with n_head, k with n_head_kv);
- 2-D weights in F16, norms and other 1-D tensors in F32; a tied lm_head is not written (llama.cpp then
  uses token_embd, as it does for the upstream GGUF);
- tokenizer `gpt2` with the token list padded to vocab_size, added tokens CONTROL when special (or shaped
  like `<|...|>`) else USER_DEFINED, the BPE merges, special token ids and the chat template (gguf-py's
  SpecialVocab), and the pre-tokenizer named by llama.cpp's fingerprint of the tokenizer's output on a
  fixed probe text.
Whatever we do not handle (other architectures, RoPE scaling, SentencePiece vocabularies, a pre-tokenizer
outside the table) is an error, never a file that loads and tokenizes differently. After writing, the
GGUF's tokenizer is loaded by llama.cpp and must tokenize probe texts exactly as the HF tokenizer does.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("shrinkserve.gguf_export")

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)

# llama.cpp's probe text for BPE pre-tokenizers (convert_hf_to_gguf_update.py, `chktxt`): the sha256 of
# str(tokenizer.encode(CHKTXT)) names the pre-tokenizer that llama.cpp must apply to reproduce it.
CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
    "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 "
    "?我想在apple工作1314151天～ ------======= нещо на "
    "Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll "
    "make it, 'D you like some tea? We'Ve a'lL"
)
# Fingerprint → llama.cpp pre-tokenizer name, for the byte-level BPE tokenizers of Llama-architecture models
# (values from llama.cpp's get_vocab_base_pre).
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # HuggingFaceTB/SmolLM*
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
}

# Texts whose tokenization the written GGUF must reproduce (with special tokens parsed, as the server does).
# Not in them: non-ASCII numerals such as "½". The embedded model's HF tokenizer (transformers' conversion
# of its GGUF) keeps " ½" in one pre-token where llama.cpp's `smollm` pre-tokenizer (\p{N} split off)
# does not; the upstream GGUF itself tokenizes it the way our export does (checked by hand, 2026-11).
_PROBES = (
    CHKTXT,
    "The quick brown fox jumps over the lazy dog. 1234567890 -- 3.14 café naïve 日本語 👍🏽\n\n\tindent",
    "def f(x):\n    return x ** 2  # square\n\n{\"key\": [1, 2, 3], 'a': None}",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n",
)


def _probe_hash(tokenizer: Any) -> str:
    return hashlib.sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()


def _looks_special(token: str) -> bool:
    return token.startswith("<|") and token.endswith("|>")


def _hparams(cfg: dict[str, Any]) -> dict[str, Any]:
    arch = (cfg.get("architectures") or [None])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"GGUF export supports {', '.join(SUPPORTED_ARCHITECTURES)}, not {arch!r}")
    if cfg.get("quantization_config"):
        raise ValueError("GGUF export takes a dense checkpoint; this one is quantized")
    rope = cfg.get("rope_parameters") or {}
    if cfg.get("rope_scaling") or rope.get("rope_type", "default") not in ("default", None):
        raise ValueError(f"GGUF export does not handle RoPE scaling ({cfg.get('rope_scaling') or rope})")
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    n_head = int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // n_head)
    return {"n_layer": int(cfg["num_hidden_layers"]), "n_ctx": int(cfg["max_position_embeddings"]),
            "n_embd": int(cfg["hidden_size"]), "n_ff": int(cfg["intermediate_size"]), "n_head": n_head,
            "n_head_kv": int(cfg.get("num_key_value_heads") or n_head), "head_dim": head_dim,
            "rope_theta": float(theta), "rms_eps": float(cfg["rms_norm_eps"]), "vocab_size": int(cfg["vocab_size"]),
            "tied": bool(cfg.get("tie_word_embeddings", False))}


def permute_for_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF stores q/k rows per head as [first halves | second halves] (rotate-half RoPE); llama.cpp expects
    the pairs interleaved. Same reshape as llama.cpp's LlamaModel.permute (rows = n_head * head_dim)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _add_vocab(writer: Any, model_dir: Path, vocab_size: int) -> str:
    import gguf
    from transformers import AutoTokenizer

    tj = model_dir / "tokenizer.json"
    if not tj.is_file() or json.loads(tj.read_text(encoding="utf-8"))["model"]["type"] != "BPE":
        raise ValueError(f"{model_dir}: GGUF export supports byte-level BPE tokenizers (tokenizer.json), "
                         "not SentencePiece or others")
    tok = AutoTokenizer.from_pretrained(model_dir)
    fingerprint = _probe_hash(tok)
    pre = PRE_TOKENIZERS.get(fingerprint)
    if pre is None:
        raise ValueError(f"{model_dir}: unknown BPE pre-tokenizer (fingerprint {fingerprint}); known: "
                         f"{', '.join(PRE_TOKENIZERS.values())}")
    vocab: dict[str, int] = tok.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ValueError(f"tokenizer has ids up to {max(vocab.values())}, beyond the model's vocab_size {vocab_size}")
    by_id = {i: t for t, i in vocab.items()}
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        if token in added:
            if not decoder[i].normalized:
                # llama.cpp assumes added tokens are pre-normalized (as convert_hf_to_gguf does).
                token = tok.decode(tok.encode(token, add_special_tokens=False))
            types.append(gguf.TokenType.CONTROL if decoder[i].special or _looks_special(token)
                         else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise ValueError(f"{model_dir}: tokenizer.json has no BPE merges")
    # Whether BOS/EOS are added is what the HF tokenizer does, measured, not what a config file may say.
    with_special = tok("a")["input_ids"]
    plain = tok("a", add_special_tokens=False)["input_ids"]
    special.add_special_token = {"bos": with_special[:1] != plain[:1], "eos": with_special[-1:] != plain[-1:]}
    special.add_to_gguf(writer, quiet=True)
    return pre


def _tensors(model_dir: Path) -> dict[str, Any]:
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} has no .safetensors weights")
    out: dict[str, Any] = {}
    for f in files:
        handle = safe_open(str(f), framework="pt")
        for name in handle.keys():  # noqa: SIM118 - safe_open is not a dict
            out[name] = (handle, name)
    return out


def export_hf_to_gguf(model_dir: Path, out: Path, *, progress: Any = None, verify: bool = True) -> dict[str, Any]:
    """Write the checkpoint at `model_dir` as an F16 GGUF at `out`; returns manifest facts."""
    import gguf
    import torch

    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    hp = _hparams(cfg)
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(str(cfg.get("_model_name_or_path") or model_dir.name))
    writer.add_block_count(hp["n_layer"])
    writer.add_context_length(hp["n_ctx"])
    writer.add_embedding_length(hp["n_embd"])
    writer.add_feed_forward_length(hp["n_ff"])
    writer.add_head_count(hp["n_head"])
    writer.add_head_count_kv(hp["n_head_kv"])
    writer.add_rope_freq_base(hp["rope_theta"])
    writer.add_layer_norm_rms_eps(hp["rms_eps"])
    writer.add_vocab_size(hp["vocab_size"])
    writer.add_rope_dimension_count(hp["head_dim"])
    if hp["head_dim"] != hp["n_embd"] // hp["n_head"]:
        writer.add_key_length(hp["head_dim"])
        writer.add_value_length(hp["head_dim"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    pre = _add_vocab(writer, model_dir, hp["vocab_size"])

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, hp["n_layer"])
    tensors = _tensors(model_dir)
    bar = progress(total=len(tensors), desc="gguf export", unit="tensor") if progress else None
    written, params = 0, 0
    for name, (handle, key) in tensors.items():
        if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and hp["tied"]):
            continue  # recomputed by llama.cpp / the tied embedding is token_embd itself
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ValueError(f"{model_dir}: tensor {name!r} has no GGUF name for the llama architecture")
        data = handle.get_tensor(key).to(torch.float32).numpy()
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            data = permute_for_rope(data, hp["n_head"])
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            data = permute_for_rope(data, hp["n_head_kv"])
        if data.ndim <= 1 or new.endswith("_norm.weight"):
            data, qtype = data.astype(np.float32), gguf.GGMLQuantizationType.F32
        else:
            data, qtype = data.astype(np.float16), gguf.GGMLQuantizationType.F16
        writer.add_tensor(new, data, raw_dtype=qtype)
        written += 1
        params += data.size
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file(path=out)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if verify:
        verify_tokenizer(model_dir, out)
    log.info("exported %s → %s (%d tensors, pre-tokenizer %s)", model_dir, out.name, written, pre)
    return {"architecture": "llama", "tensors": written, "parameters": params, "tokenizer_pre": pre}


def verify_tokenizer(model_dir: Path, gguf_file: Path) -> None:
    """llama.cpp, reading the GGUF's vocabulary, must tokenize the probe texts exactly as the HF tokenizer."""
    import llama_cpp
    from transformers import AutoTokenizer

    from shrinkserve.compression.gguf import quiet_llama_cpp

    quiet_llama_cpp()
    tok = AutoTokenizer.from_pretrained(model_dir)
    llm = llama_cpp.Llama(model_path=str(gguf_file), vocab_only=True, verbose=False)
    try:
        for text in _PROBES:
            ours = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
            theirs = list(tok(text)["input_ids"])
            if ours != theirs:
                at = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b),
                          min(len(ours), len(theirs)))
                raise ValueError(f"{gguf_file.name}: llama.cpp tokenizes {text[:40]!r}... differently from the HF "
                                 f"tokenizer (first difference at token {at}: {ours[at:at + 5]} vs "
                                 f"{theirs[at:at + 5]})")
    finally:
        llm.close()
