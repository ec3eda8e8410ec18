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


def source_tag() -> str:
    """`surogate-<hash>` of this package's Python sources: changes whenever an op, its fake or a kernel does."""
    global _SOURCE_TAG
    if _SOURCE_TAG is None:
        import hashlib

        digest = hashlib.sha1()
        package = Path(__file__).resolve().parent
        for path in sorted(package.rglob("*.py")):
            digest.update(str(path.relative_to(package)).encode())
            digest.update(path.read_bytes())
        _SOURCE_TAG = f"surogate-{digest.hexdigest()[:12]}"
    return _SOURCE_TAG


_SOURCE_TAG: str | None = None
