"""Where medvlp keeps what it builds once: demo datasets, tokenizers, label fractions, previews."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of medvlp's caches: ``$MEDVLP_CACHE`` if set, else ``~/.cache/medvlp``."""
    env = os.environ.get("MEDVLP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "medvlp"


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write to a temporary file beside ``path`` and rename it over ``path``: readers (and a run killed
    halfway) never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)
    return path
