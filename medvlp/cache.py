"""Where medvlp keeps what it builds once: demo datasets, tokenizers, label fractions, previews."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of medvlp's caches: ``$MEDVLP_CACHE`` if set, else ``~/.cache/medvlp``."""
    env = os.environ.get("MEDVLP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "medvlp"
