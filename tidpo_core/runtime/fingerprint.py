"""Content fingerprints: what made a stored row, so unchanged work is reused and changed work is redone."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

# Files over this size are fingerprinted by name, size and mtime instead of content: hashing a 16 GB
# checkpoint on every materialization would cost more than the work it saves.
_CONTENT_HASH_LIMIT = 256 * 1024 * 1024


def digest(value: Any, length: int = 16) -> str:
    """A stable hash of any JSON-serialisable value (dict keys sorted)."""
    encoded = json.dumps(value, sort_keys=True, default=str).encode()
    return hashlib.sha256(encoded).hexdigest()[:length]


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def model_fingerprint(name_or_path: str | os.PathLike, revision: str | None = None) -> str:
    """Fingerprint of a model: content of a local folder's weights and configs, or hub id + revision."""
    path = Path(name_or_path)
    if not path.exists():
        return digest({"hub_id": str(name_or_path), "revision": revision})
    hasher = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        if file.suffix not in {".safetensors", ".json", ".model", ".txt"}:
            continue
        hasher.update(str(file.relative_to(path)).encode())
        stat = file.stat()
        if stat.st_size > _CONTENT_HASH_LIMIT:
            hasher.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
        else:
            hasher.update(file.read_bytes())
    return hasher.hexdigest()[:16]
