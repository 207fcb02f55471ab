"""Where a profile's quality record lives: in its artifact's manifest, keyed by how it is run.

Two profiles can share one artifact (the base checkpoint served in bf16 and in float32), and their
quality differs, so the manifest's "quality" maps a variant ("torch:bfloat16", "llamacpp") to a record.
A profile with no artifact of its own (a file or checkpoint served as-is) keeps its record in
`<cache>/quality/<hash of its path>.json`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from shrinkserve.compression.cache import ArtifactCache, write_json_atomic
from shrinkserve.compression.profiles import BuiltProfile, ProfileSpec


def variant(spec: ProfileSpec) -> str:
    return f"torch:{spec.dtype}" if spec.engine == "torch" else str(spec.engine)


def _sidecar(cache: ArtifactCache, built: BuiltProfile) -> Path:
    return cache.root / "quality" / (hashlib.sha256(str(built.path).encode()).hexdigest() + ".json")


def load(
    cache: ArtifactCache, built: BuiltProfile, spec: ProfileSpec, eval_set_sha256: str | None = None,
) -> dict | None:
    """The stored record, or None; with `eval_set_sha256`, only a record measured on that eval set."""
    if built.key is not None:
        records = (cache.manifest(built.key) or {}).get("quality") or {}
    else:
        path = _sidecar(cache, built)
        records = json.loads(path.read_text()) if path.is_file() else {}
    record = records.get(variant(spec))
    if record is None or (eval_set_sha256 is not None and record.get("eval_set_sha256") != eval_set_sha256):
        return None
    return record


def save(cache: ArtifactCache, built: BuiltProfile, spec: ProfileSpec, record: dict[str, Any]) -> None:
    if built.key is not None:
        cache.update_manifest(built.key, lambda m: {"quality": {**(m.get("quality") or {}), variant(spec): record}})
        return
    path = _sidecar(cache, built)
    path.parent.mkdir(parents=True, exist_ok=True)
    records = json.loads(path.read_text()) if path.is_file() else {}
    records[variant(spec)] = record
    write_json_atomic(path, records)
