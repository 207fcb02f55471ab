"""Importance matrices for llama.cpp's quantizers: the mean squared activation of every input column of every
`blk.*` linear, keyed by the weight's GGUF name.

What llama.cpp does with it (src/llama-quant.cpp and ggml-quants.c of the llama.cpp vendored in
llama-cpp-python 0.3.36): `llama_model_quantize_params.imatrix` is an array of {name, data, size} keyed by the
tensor's GGUF name (`blk.0.attn_q.weight`), `data` the per-column *mean* of x² (size = ne[0] input columns);
each quantizer then weights a weight's rounding error by its column's value (Q4_0/Q4_1/Q5_x, the K-quants,
IQ4_NL; Q8_0 ignores it). A name it does not find is quantized without one, silently; a size that differs is an
error. `llama-imatrix` collects Σx² and the token count per tensor over `blk.*` matrix products and saves them
as a GGUF (`general.type = imatrix`, `<name>.in_sum2` [ncols × 1] and `<name>.counts` [1 × 1], F32, keys
`imatrix.datasets`, `imatrix.chunk_count`, `imatrix.chunk_size`); `llama-quantize --imatrix` divides one by
the other. We write and read that same format (and read the older `.dat` one), so an imatrix kept beside an
artifact can be reused by `llama-quantize --imatrix`.

We compute it with our own PyTorch forward of the profile's HF checkpoint (hooks on every linear inside the
decoder blocks), from the shipped calibration text, captured traffic, or take a user's file.
"""

from __future__ import annotations

import hashlib
import logging
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

log = logging.getLogger("shrinkserve.imatrix")

IMATRIX_NAME = "imatrix.gguf"  # the file inside an imatrix artifact and beside an imatrix-quantized GGUF
# Fewer tokens than this is an error, never a silently weak imatrix (llama-imatrix itself skips matrix products
# over fewer than 16 rows). Little is needed: on the default model 1024 tokens of the shipped calibration text
# took Q4_0's KL to the base on 512 held-out prose tokens from 0.264 to 0.168 (tests/test_imatrix.py).
MIN_TOKENS = 256
# Bump when the computed imatrix changes for the same model and data (part of the imatrix artifact's key).
IMATRIX_FORMAT = "1"

_KEY_DATASETS = "imatrix.datasets"
_KEY_CHUNK_COUNT = "imatrix.chunk_count"
_KEY_CHUNK_SIZE = "imatrix.chunk_size"


class ImatrixError(ValueError):
    """An imatrix that cannot be used for this model or data (named tensor, count, source)."""


class ImatrixOptions(BaseModel):
    """`imatrix:` of a `gguf:<type>` profile: where the activations come from (part of the cache key)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: Literal["calibration", "traffic", "file"] = Field(
        default="calibration", description="calibration: text (default the shipped calibration.txt); traffic: "
                                           "a capture file or directory; file: a llama-imatrix file (GGUF or .dat)")
    path: Path | None = Field(default=None, description="the text, capture or imatrix file")
    max_tokens: int = Field(default=8192, ge=MIN_TOKENS, le=2**22, description="tokens read at most")
    seq_len: int = Field(default=512, ge=16, le=8192, description="longest sequence fed at once")

    @model_validator(mode="after")
    def _check(self) -> ImatrixOptions:
        if self.source in ("traffic", "file") and self.path is None:
            raise ValueError(f"imatrix source {self.source!r} needs 'path'")
        if self.path is not None and not self.path.expanduser().exists():
            raise ValueError(f"imatrix path {self.path} does not exist")
        if self.source == "file" and self.model_fields_set & {"max_tokens", "seq_len"}:
            raise ValueError("imatrix max_tokens / seq_len mean nothing for source 'file' (it is used as it is)")
        return self

    def data_path(self) -> Path:
        """The file or directory read: `path`, or the shipped calibration text."""
        from shrinkserve.compression.calibration import calibration_file

        return calibration_file(self.path)


# ------------------------------------------------------------------------------ the data
@dataclass
class Imatrix:
    """Per GGUF tensor name: Σx² per input column and the number of rows (tokens) summed."""

    sums: dict[str, np.ndarray]
    counts: dict[str, int]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def __post_init__(self) -> None:
        # float32, as the file stores them: an imatrix read back quantizes exactly as the one computed.
        self.sums = {k: np.asarray(v, dtype=np.float32).reshape(-1) for k, v in self.sums.items()}

    def means(self) -> dict[str, np.ndarray]:
        """What llama.cpp's quantizer takes: Σx² / count, float32 (a column never seen: 1, as llama.cpp does)."""
        out = {}
        for name, s in self.sums.items():
            n = self.counts[name]
            out[name] = (s.astype(np.float64) / n).astype(np.float32) if n > 0 else np.ones_like(s)
        return out

    @property
    def tokens(self) -> int:
        return max(self.counts.values(), default=0)

    def digest(self) -> str:
        """sha256 of the values the quantizer gets, by name: what the quantized artifact depends on."""
        h = hashlib.sha256()
        for name, m in sorted(self.means().items()):
            h.update(name.encode() + b"\0")
            h.update(np.ascontiguousarray(m, dtype="<f4").tobytes())
        return h.hexdigest()

    def write_gguf(self, path: Path) -> Path:
        """llama-imatrix's GGUF format (tools/imatrix/imatrix.cpp `save_imatrix`), names in sorted order."""
        import gguf

        writer = gguf.GGUFWriter(path=None, arch="imatrix")  # `arch` only names the architecture key
        writer.add_type("imatrix")
        writer.add_array(_KEY_DATASETS, list(self.datasets) or ["shrinkserve"])
        writer.add_uint32(_KEY_CHUNK_COUNT, int(self.chunk_count))
        writer.add_uint32(_KEY_CHUNK_SIZE, int(self.chunk_size))
        for name in sorted(self.sums):
            s = self.sums[name].reshape(1, -1)  # ggml ne = [ncols, 1]
            writer.add_tensor(f"{name}.in_sum2", s, raw_dtype=gguf.GGMLQuantizationType.F32)
            writer.add_tensor(f"{name}.counts", np.array([[float(self.counts[name])]], dtype=np.float32),
                              raw_dtype=gguf.GGMLQuantizationType.F32)
        path.parent.mkdir(parents=True, exist_ok=True)
        writer.write_header_to_file(path=path)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path

    @classmethod
    def read(cls, path: Path) -> Imatrix:
        """A GGUF imatrix (llama-imatrix's default) or the older `.dat` format."""
        with open(path, "rb") as f:
            magic = f.read(4)
        return _read_gguf(path) if magic == b"GGUF" else _read_dat(path)


def _read_gguf(path: Path) -> Imatrix:
    import gguf

    reader = gguf.GGUFReader(str(path))
    kind = reader.fields.get("general.type")
    if kind is not None and _field_value(kind) != "imatrix":
        raise ImatrixError(f"{path}: a GGUF of type {_field_value(kind)!r}, not an imatrix")
    parts: dict[str, dict[str, np.ndarray]] = {}
    for t in reader.tensors:
        for suffix in (".in_sum2", ".counts", ".in_sum"):
            if t.name.endswith(suffix):
                if t.tensor_type != gguf.GGMLQuantizationType.F32:
                    raise ImatrixError(f"{path}: {t.name} is {t.tensor_type.name}, not F32")
                parts.setdefault(t.name[: -len(suffix)], {})[suffix] = np.array(t.data, dtype=np.float64).reshape(-1)
                break
    if not parts:
        raise ImatrixError(f"{path}: no imatrix entries (no `<tensor>.in_sum2` / `.counts` tensors)")
    sums, counts = {}, {}
    for name, p in sorted(parts.items()):
        if ".in_sum2" not in p or ".counts" not in p:
            raise ImatrixError(f"{path}: entry {name!r} lacks its in_sum2 or counts tensor")
        if p[".counts"].size != 1:
            # One count per expert: a mixture-of-experts imatrix, which none of the models we export has.
            raise ImatrixError(f"{path}: entry {name!r} has {p['.counts'].size} counts (expert tensors are "
                               "not supported)")
        sums[name], counts[name] = p[".in_sum2"], round(float(p[".counts"][0]))
    datasets = _field_value(reader.fields[_KEY_DATASETS]) if _KEY_DATASETS in reader.fields else []
    return Imatrix(sums, counts, list(datasets) if isinstance(datasets, list) else [str(datasets)],
                   int(_field_value(reader.fields[_KEY_CHUNK_COUNT])) if _KEY_CHUNK_COUNT in reader.fields else 0,
                   int(_field_value(reader.fields[_KEY_CHUNK_SIZE])) if _KEY_CHUNK_SIZE in reader.fields else 0)


def _field_value(f: Any) -> Any:
    """A GGUFReader field as a Python value (a string, a number, or a list of strings)."""
    import gguf

    if f.types and f.types[0] == gguf.GGUFValueType.ARRAY:
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
    if f.types and f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8")
    return f.parts[f.data[0]][0]


def _read_dat(path: Path) -> Imatrix:
    """The legacy format: i32 n; n × (i32 len, name, i32 ncall, i32 nval, f32[nval] = mean·ncall); then
    optionally i32 chunk count, i32 len, dataset name. llama.cpp divides the values by ncall."""
    raw = path.read_bytes()
    try:
        (n,), at = struct.unpack_from("<i", raw, 0), 4
        if n < 1:
            raise ImatrixError(f"{path}: no imatrix entries")
        sums, counts = {}, {}
        for _ in range(n):
            (length,) = struct.unpack_from("<i", raw, at)
            name = raw[at + 4 : at + 4 + length].decode("utf-8")
            at += 4 + length
            ncall, nval = struct.unpack_from("<ii", raw, at)
            at += 8
            values = np.frombuffer(raw, dtype="<f4", count=nval, offset=at).astype(np.float64)
            at += 4 * nval
            sums[name], counts[name] = values, max(ncall, 0)
        chunks, datasets = 0, []
        if at + 4 <= len(raw):
            (chunks,) = struct.unpack_from("<i", raw, at)
            if at + 8 <= len(raw):
                (length,) = struct.unpack_from("<i", raw, at + 4)
                datasets = [raw[at + 8 : at + 8 + length].decode("utf-8", "replace")] if length > 0 else []
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise ImatrixError(f"{path}: neither a GGUF imatrix nor a llama-imatrix .dat file ({exc})") from exc
    return Imatrix(sums, {k: (c if c > 0 else 1) for k, c in counts.items()}, datasets, chunks, 0)


# ------------------------------------------------------------------------------ against a model
def check_against_model(imatrix: Imatrix, model_gguf: Path) -> None:
    """Every entry must name a tensor of the model with as many input columns as it has values, and every
    weight llama.cpp quantizes in the blocks must have an entry: otherwise it would quietly quantize that
    tensor without one (or refuse), under a key that says imatrix."""
    shapes = gguf_tensor_shapes(model_gguf)
    for name, s in sorted(imatrix.sums.items()):
        if name not in shapes:
            near = next((n for n in shapes if n.startswith("blk.")), "blk.0.attn_q.weight")
            raise ImatrixError(f"imatrix entry {name!r} names no tensor of the model {model_gguf.name} (its "
                               f"tensors are named like {near!r}); was it computed for another model?")
        ne = shapes[name]
        columns = ne[0] * (ne[2] if len(ne) > 2 else 1)
        if s.size != columns:
            raise ImatrixError(f"imatrix entry {name!r} has {s.size} values, but the model's tensor {name} has "
                               f"{columns} input columns (shape {ne}); was it computed for another model?")
        m = s / max(imatrix.counts[name], 1)
        if not np.all(np.isfinite(m)) or np.any(m < 0):
            raise ImatrixError(f"imatrix entry {name!r} holds non-finite or negative values")
    for name, ne in sorted(shapes.items()):
        if _quantized_block_weight(name, ne) and name not in imatrix.sums:
            raise ImatrixError(f"imatrix has no entry for tensor {name!r} of {model_gguf.name}: llama.cpp would "
                               "quantize it without one")


_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type → bytes
_STRING, _ARRAY = 8, 9


def gguf_tensor_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name → ggml shape (ne[0] = input columns) from a GGUF header. gguf.GGUFReader decodes every
    metadata array element by element, 15 s for SmolLM2's vocabulary on a busy 2-core box; this skips them."""
    with open(path, "rb") as f:
        head = f.read(24)
        if head[:4] != b"GGUF":
            raise ImatrixError(f"{path} is not a GGUF file")
        (version,) = struct.unpack_from("<I", head, 4)
        if version < 2:
            raise ImatrixError(f"{path}: GGUF version {version} is not supported")
        n_tensors, n_kv = struct.unpack_from("<QQ", head, 8)
        r = _Reader(f)
        for _ in range(n_kv):
            r.string()
            r.skip_value(r.u32())
        shapes = {}
        for _ in range(n_tensors):
            name = r.string()
            dims = [r.u64() for _ in range(r.u32())]
            r.u32()  # type
            r.u64()  # offset
            shapes[name] = dims
    return shapes


class _Reader:
    def __init__(self, f: Any) -> None:
        self.f = f

    def u32(self) -> int:
        return int(struct.unpack("<I", self.f.read(4))[0])

    def u64(self) -> int:
        return int(struct.unpack("<Q", self.f.read(8))[0])

    def string(self) -> str:
        return self.f.read(self.u64()).decode("utf-8", "replace")

    def skip_value(self, kind: int) -> None:
        if kind == _STRING:
            self.f.seek(self.u64(), 1)
        elif kind == _ARRAY:
            sub, n = self.u32(), self.u64()
            if sub in _SCALAR_SIZES:
                self.f.seek(n * _SCALAR_SIZES[sub], 1)
            else:
                for _ in range(n):
                    self.skip_value(sub)
        elif kind in _SCALAR_SIZES:
            self.f.seek(_SCALAR_SIZES[kind], 1)
        else:
            raise ImatrixError(f"unknown GGUF value type {kind}")


def _quantized_block_weight(name: str, ne: list[int]) -> bool:
    # llama.cpp's tensor_allows_quantization for what our exporter writes: 2-D+ `*.weight`, not a norm.
    return name.startswith("blk.") and name.endswith(".weight") and "_norm" not in name and len(ne) >= 2


# ------------------------------------------------------------------------------ computing it
def hf_to_gguf_names(model: Any) -> dict[str, str]:
    """Module name → GGUF weight name for every linear inside the decoder blocks, through gguf-py's own map
    (the one compression/gguf_export.py writes with). Input columns are the same on both sides: the q/k row
    permutation for llama.cpp's RoPE layout moves output rows only."""
    import gguf
    import torch

    arch = (getattr(model.config, "architectures", None) or [None])[0]
    if arch != "LlamaForCausalLM":
        raise ImatrixError(f"imatrix computation supports LlamaForCausalLM (as the GGUF export does), not {arch!r}")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(model.config.num_hidden_layers))
    out = {}
    for mod_name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or ".layers." not in f".{mod_name}":
            continue
        gguf_name = names.get_name(f"{mod_name}.weight", try_suffixes=(".weight",))
        if gguf_name is None or not gguf_name.startswith("blk."):
            raise ImatrixError(f"linear {mod_name!r} has no GGUF block tensor name")
        out[mod_name] = gguf_name
    if not out:
        raise ImatrixError("the model has no linear layers inside its decoder blocks")
    return out


def collect(model: Any, sequences: Iterable[list[int]], *, progress: Any = None) -> Imatrix:
    """Σx² per input column and the token count of every block linear, over `sequences` (token ids, each fed
    as one causal sequence from position 0)."""
    import torch

    names = hf_to_gguf_names(model)
    modules = dict(model.named_modules())
    sums = {g: torch.zeros(modules[m].in_features, dtype=torch.float64) for m, g in names.items()}
    counts = dict.fromkeys(names.values(), 0)

    def hook(gguf_name: str) -> Any:
        def accumulate(_mod: Any, args: tuple[Any, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            sums[gguf_name] += (x * x).sum(dim=0)
            counts[gguf_name] += x.shape[0]

        return accumulate

    handles = [modules[m].register_forward_pre_hook(hook(g)) for m, g in names.items()]
    chunks = 0
    try:
        device = next(model.parameters()).device
        with torch.inference_mode():
            for ids in sequences:
                model(input_ids=torch.tensor([ids], device=device), use_cache=False)
                chunks += 1
                if progress is not None:
                    progress.update(len(ids))
    finally:
        for h in handles:
            h.remove()
    return Imatrix({g: s.numpy() for g, s in sums.items()}, counts, chunk_count=chunks)


def token_sequences(opts: ImatrixOptions, data: Path, tokenizer: Any) -> tuple[list[list[int]], str]:
    """The sequences the imatrix is computed on, up to `max_tokens`, and what they are (for messages).

    Calibration text: consecutive `seq_len`-token windows of the whole text. Traffic: each record's prompt +
    completion as its own sequence (cut at `seq_len`), decoded and re-tokenized as calibration.py does, so a
    capture of one engine serves a checkpoint of the same base whatever served it."""
    from shrinkserve.compression.calibration import calibration_text
    from shrinkserve.compression.traffic.reader import is_capture_file, read_records
    from shrinkserve.compression.traffic.record import decode_record

    seqs: list[list[int]] = []
    if opts.source == "traffic":
        what = f"the traffic at {data}"
        if not (data.is_dir() or is_capture_file(data) or data.suffix == ".jsonl"):
            raise ImatrixError(f"imatrix source 'traffic': {data} is not a capture file or directory")
        texts: Iterator[str] = (decode_record(r, tokenizer) for r in read_records([data]))
        windows = (list(tokenizer(t, add_special_tokens=False)["input_ids"])[: opts.seq_len] for t in texts)
    else:
        what = f"the calibration text {data}"
        ids = list(tokenizer(calibration_text(data, tokenizer), add_special_tokens=False)["input_ids"])
        windows = (ids[i : i + opts.seq_len] for i in range(0, len(ids), opts.seq_len))
    total = 0
    for w in windows:
        w = w[: opts.max_tokens - total]
        if len(w) < 2:  # a one-token record adds nothing a sequence of it could show
            continue
        seqs.append(w)
        total += len(w)
        if total >= opts.max_tokens:
            break
    if total < MIN_TOKENS:
        hint = "capture more traffic, or use source: calibration" if opts.source == "traffic" else "give more text"
        raise ImatrixError(f"{what} holds {total} tokens, fewer than the {MIN_TOKENS} an importance matrix needs "
                           f"({hint})")
    return seqs, what


def compute_imatrix(model_dir: Path, opts: ImatrixOptions, data: Path, *, threads: int,
                    progress: Any = None) -> Imatrix:
    """The imatrix of the HF checkpoint at `model_dir` on `data` (float32 forward on the CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    seqs, what = token_sequences(opts, data, tokenizer)  # before loading the model: bad data fails fast
    tokens = sum(map(len, seqs))
    log.info("imatrix: %d tokens in %d sequences from %s", tokens, len(seqs), what)
    torch.set_num_threads(max(1, threads))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    bar = progress(total=tokens, desc="imatrix", unit="tok") if progress is not None else None
    try:
        im = collect(model, seqs, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    im.datasets = [f"{opts.source}:{data.name}"]
    im.chunk_size = opts.seq_len
    return im
