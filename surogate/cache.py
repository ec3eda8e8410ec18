"""The one cache-dir rule: every floor that keeps what it built (the tokenizer, tuned kernel configs)
keeps it under `cache_dir()`, so that one variable moves or clears all of it. Floor 0: imports nothing
of surogate, so any floor may import it."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where surogate caches what it builds: $SUROGATE_CACHE_DIR, else $XDG_CACHE_HOME/surogate, else ~/.cache/surogate."""
    if os.environ.get("SUROGATE_CACHE_DIR"):
        return Path(os.environ["SUROGATE_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "surogate"
