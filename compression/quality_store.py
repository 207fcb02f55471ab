"""Where a profile's quality record lives: in its artifact's manifest, keyed by how it is run.

Two profiles can share one artifact (the base checkpoint served in bf16 and in float32), and their
quality differs, so the manifest's "quality" maps a variant ("torch:bfloat16", "llamacpp") to a record.
A profile with no artifact of its own (a file or checkpoint served as-is) keeps its record in
`<cache>/quality/<hash of its path>.json`. So a record is found by the artifact's cache `key`, or by the
`path` it is served from when `key` is None: all a caller needs, built or only looked up.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from shrinkserve.compression.cache import ArtifactCache, write_json_atomic
from shrinkserve.compression.profiles import ProfileSpec


def variant(spec: ProfileSpec) -> str:
    return f"torch:{spec.dtype}" if spec.engine == "torch" else str(spec.engine)


def _sidecar(cache: ArtifactCache, path: Path) -> Path:
    return cache.root / "quality" / (hashlib.sha256(str(path).encode()).hexdigest() + ".json")


def load(
    cache: ArtifactCache, spec: ProfileSpec, *, key: str | None, path: Path, eval_set_sha256: str | None = None,
) -> dict | None:
    """The stored record, or None; with `eval_set_sha256`, only a record measured on that eval set."""
    if key is not None:
        records = (cache.manifest(key) or {}).get("quality") or {}
    else:
        sidecar = _sidecar(cache, path)
        records = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    record = records.get(variant(spec))
    if record is None or (eval_set_sha256 is not None and record.get("eval_set_sha256") != eval_set_sha256):
        return None
    return record


def save(cache: ArtifactCache, spec: ProfileSpec, record: dict[str, Any], *, key: str | None, path: Path) -> None:
    if key is not None:
        cache.update_manifest(key, lambda m: {"quality": {**(m.get("quality") or {}), variant(spec): record}})
        return
    sidecar = _sidecar(cache, path)
    sidecar.parent.mkdir(parents=True, exist_ok=True)
    records = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    records[variant(spec)] = record
    write_json_atomic(sidecar, records)
