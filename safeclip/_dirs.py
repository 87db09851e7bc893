"""Where safeclip keeps what it caches (embeddings, prompt embeddings, fetched artifacts): one rule, no imports."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["default_cache_dir"]


def default_cache_dir() -> Path:
    """``$SAFECLIP_CACHE_DIR``, else ``$XDG_CACHE_HOME/safeclip``, else ``~/.cache/safeclip``."""
    env = os.environ.get("SAFECLIP_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "safeclip"
