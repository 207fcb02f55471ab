"""Tiny teachers and teacher-sampled data for the distillation tests (no real model needed)."""

from __future__ import annotations

from pathlib import Path

import torch

from shrinkserve.compression.distill.data import DistillExample

VOCAB = 64


def tiny_config(layers: int = 6, **kw: object) -> object:
    from transformers import LlamaConfig

    # A large init range makes the random teacher's distributions peaked and its layers distinct, so a
    # pruned student is measurably off and training measurably brings it back.
    args = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                tie_word_embeddings=True, initializer_range=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    args.update(kw)
    return LlamaConfig(**args)


def tiny_teacher(layers: int = 6, seed: int = 0, **kw: object) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(layers, **kw)).eval()


@torch.no_grad()
def sampled_examples(teacher: torch.nn.Module, n: int, *, seed: int = 0, top_k: int = 8, prompt_len: int = 5,
                     response_len: int = 12) -> list[DistillExample]:
    """Random prompts answered by sampling the teacher (all at once), with its top-k + sampled-token logprobs."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, prompt_len), generator=gen)
    k_ids, k_lps, sampled = [], [], []
    for _ in range(response_len):
        lp = torch.log_softmax(teacher(input_ids=ids).logits[:, -1].float(), -1)
        tok = torch.multinomial(lp.exp(), 1, generator=gen)
        top = torch.topk(lp, top_k)
        k_ids.append(top.indices)
        k_lps.append(top.values)
        sampled.append(lp.gather(1, tok)[:, 0])
        ids = torch.cat([ids, tok], dim=1)
    k_ids_t, k_lps_t, sampled_t = torch.stack(k_ids, 1), torch.stack(k_lps, 1), torch.stack(sampled, 1)
    return [DistillExample(ids[i].numpy(), prompt_len, k_ids_t[i].numpy(), k_lps_t[i].numpy(), sampled_t[i].numpy())
            for i in range(n)]


def tiny_tokenizer(vocab: int = VOCAB) -> object:
    """A word-level tokenizer over `vocab` tokens t0..t{vocab-1} (enough for save/load round trips)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(vocab)}
    tk = Tokenizer(models.WordLevel(words, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="t0", pad_token="t0", bos_token="t1",
                                  eos_token="t2")
    tok.chat_template = ("{% for m in messages %}t1 {{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}t3{% endif %}")
    return tok


def save_tiny_teacher(path: Path, layers: int = 6, seed: int = 0) -> Path:
    model = tiny_teacher(layers, seed)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def student_builder(cache: Path, teacher_dir: Path, profiles: dict[str, dict]) -> object:
    """A ProfileBuilder whose only base is the teacher checkpoint at `teacher_dir` (profiles: name → YAML dict)."""
    from shrinkserve.compression.cache import ArtifactCache
    from shrinkserve.compression.profiles import BaseSpec, ProfileBuilder, ProfileSpec

    specs = {name: ProfileSpec.model_validate(p) for name, p in profiles.items()}
    return ProfileBuilder(ArtifactCache(cache), {"teacher": BaseSpec(source=str(teacher_dir))}, specs, threads=1)
