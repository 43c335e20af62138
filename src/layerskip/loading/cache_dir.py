"""Where layerskip keeps converted checkpoints: $LAYERSKIP_CACHE, else $XDG_CACHE_HOME/layerskip, else ~/.cache/layerskip."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    if os.environ.get("LAYERSKIP_CACHE"):
        return Path(os.environ["LAYERSKIP_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "layerskip"
