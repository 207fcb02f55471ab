"""One forward over several sequences on a transformers model: batched linears, per-sequence attention.

The tokens of every sequence in a step are packed into one row ([1, total tokens], each with its own
position id), so every linear layer (bf16 `F.linear`, `shrinkserve.kernels.Int4Linear`/`Int8Linear`)
runs once with M = total tokens. Attention stays per sequence: the model's own attention module calls
`cache.update(k, v, layer)` and then the registered attention function; `PackedStep` is that cache, and
it returns each sequence's whole K/V so `packed_attention` can run SDPA per sequence — no padding, no
mask beyond causality inside a prefill chunk, and a sequence's attention never sees another's keys.

Per-sequence KV lives in `SeqKV`: per-layer buffers that grow by doubling (caches grow with use; nothing
is allocated for an idle slot).

Measured against a padded batch (one SDPA call per layer over left-padded K/V with a mask): see
scripts/bench_torch_batch.py and the README; the packed form is what the engine uses.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ATTN_NAME = "shrinkserve_packed"


class SeqKV:
    """One sequence's keys and values for every layer: [kv_heads, capacity, head_dim] buffers, doubled on need."""

    def __init__(self) -> None:
        self.k: list[torch.Tensor | None] = []
        self.v: list[torch.Tensor | None] = []
        self.length = 0  # positions held (the same for every layer between steps)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: [kv_heads, n, head_dim] at positions length..length+n-1; returns views of all positions."""
        while len(self.k) <= layer:
            self.k.append(None)
            self.v.append(None)
        n = k.shape[1]
        end = self.length + n
        kb, vb = self.k[layer], self.v[layer]
        if kb is None or kb.shape[1] < end:
            cap = max(16, 1 << (end - 1).bit_length())
            nk = k.new_empty((k.shape[0], cap, k.shape[2]))
            nv = v.new_empty((v.shape[0], cap, v.shape[2]))
            if kb is not None and vb is not None:
                nk[:, : self.length] = kb[:, : self.length]
                nv[:, : self.length] = vb[:, : self.length]
            self.k[layer], self.v[layer] = kb, vb = nk, nv
        assert vb is not None
        kb[:, self.length : end] = k
        vb[:, self.length : end] = v
        return kb[:, :end], vb[:, :end]

    def truncate(self, n: int) -> None:
        self.length = min(self.length, n)

    def prefix_copy(self, n: int) -> SeqKV:
        """A new SeqKV holding copies of positions 0..n-1 (room for the doubling to go on)."""
        out = SeqKV()
        cap = max(16, 1 << max(0, n - 1).bit_length())
        for kb, vb in zip(self.k, self.v, strict=True):
            if kb is None or vb is None:
                out.k.append(None)
                out.v.append(None)
                continue
            nk = kb.new_empty((kb.shape[0], cap, kb.shape[2]))
            nv = vb.new_empty((vb.shape[0], cap, vb.shape[2]))
            nk[:, :n] = kb[:, :n]
            nv[:, :n] = vb[:, :n]
            out.k.append(nk)
            out.v.append(nv)
        out.length = n
        return out


@dataclass
class _Seg:
    kv: SeqKV
    start: int  # first token of this sequence in the packed row
    n: int


class PackedKV:
    """What `PackedStep.update` hands the attention function in place of key/value tensors."""

    def __init__(self, segs: list[_Seg], keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        self.segs, self.keys, self.values = segs, keys, values


class PackedStep:
    """Duck-typed transformers cache for one packed forward over several sequences."""

    is_compileable = False

    def __init__(self, seqs: Seq[SeqKV], lengths: Seq[int]) -> None:
        self.segs: list[_Seg] = []
        start = 0
        for kv, n in zip(seqs, lengths, strict=True):
            self.segs.append(_Seg(kv, start, n))
            start += n

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: object, **kwargs: object) -> tuple[PackedKV, PackedKV]:
        keys, values = [], []
        for s in self.segs:
            k, v = s.kv.append(layer_idx, key_states[0, :, s.start : s.start + s.n],
                               value_states[0, :, s.start : s.start + s.n])
            keys.append(k)
            values.append(v)
        packed = PackedKV(self.segs, keys, values)
        return packed, packed

    def finish(self) -> None:
        for s in self.segs:
            s.kv.length += s.n

    def get_seq_length(self, layer_idx: int = 0) -> int:  # asked only when position_ids are missing
        raise RuntimeError("PackedStep needs explicit position_ids")


def packed_attention(module: torch.nn.Module, query: torch.Tensor, key: PackedKV, value: PackedKV,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     **kwargs: object) -> tuple[torch.Tensor, None]:
    """query: [1, heads, total, head_dim]; returns [1, total, heads, head_dim] as transformers expects."""
    outs = []
    for seg, k, v in zip(key.segs, key.keys, key.values, strict=True):
        q = query[:, :, seg.start : seg.start + seg.n]
        mask = None
        if seg.n > 1:  # a prefill chunk after `past` cached positions: causal within the chunk
            past = k.shape[1] - seg.n
            rows = torch.arange(seg.n, device=q.device).unsqueeze(1) + past
            mask = torch.arange(k.shape[1], device=q.device).unsqueeze(0) <= rows
        o = F.scaled_dot_product_attention(q, k.unsqueeze(0), v.unsqueeze(0), attn_mask=mask, scale=scaling,
                                           enable_gqa=True)
        outs.append(o)
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, packed_attention)


def packed_forward(model: torch.nn.Module, work: Seq[tuple[SeqKV, Seq[int], bool]], *,
                   device: str | torch.device = "cpu") -> list[torch.Tensor]:
    """One forward; per item (kv, new ids, all_logits) float32 logits [n or 1, vocab] on `device` (the model's).
    Advances each kv."""
    ids: list[int] = []
    pos: list[int] = []
    keep: list[int] = []
    spans = []
    for kv, new, all_logits in work:
        start = len(ids)
        ids.extend(new)
        pos.extend(range(kv.length, kv.length + len(new)))
        first = len(keep)
        keep.extend(range(start, start + len(new)) if all_logits else [start + len(new) - 1])
        spans.append((first, len(keep)))
    cache = PackedStep([w[0] for w in work], [len(w[1]) for w in work])
    out = model(input_ids=torch.tensor([ids], dtype=torch.long, device=device),
                position_ids=torch.tensor([pos], dtype=torch.long, device=device),
                cache=cache, use_cache=True, logits_to_keep=torch.tensor(keep, dtype=torch.long, device=device))
    cache.finish()
    logits = out.logits[0].float()
    return [logits[a:b] for a, b in spans]
