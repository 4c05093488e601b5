"""Build a C++ extension on first use with torch's builder and cache it under ~/.cache/smolvlm (or XDG_CACHE_HOME).

smolvlm/model/kernels.py (the model's CPU kernels) and smolvlm/processing/resample.py (the image resize) build through
here.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)
STALE_LOCK_S = 600  # the longest build takes ~30 s on 2 cores


def build(name: str, sources: list[Path], folder: str, flags: list[str], ldflags: list[str] = (), what: str = "",
          note: str = ""):
    """The compiled module `name` from `sources`, built in ~/.cache/smolvlm/<folder>-<torch version> unless already
    there (saying so on stderr, naming it `what` (default: `name`), with `note`: how long it takes). Raises what the
    builder raises (no compiler...)."""
    from torch.utils import cpp_extension

    try:  # torch's builder runs `ninja` from PATH; the pip package's binary sits in this environment's bin folder
        import ninja

        if ninja.BIN_DIR not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])
    except ImportError:
        pass
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    directory = cache / "smolvlm" / f"{folder}-{torch.__version__}"
    directory.mkdir(parents=True, exist_ok=True)
    clear_stale_lock(directory)
    if not (directory / f"{name}.so").exists():  # the first run would otherwise stall silently
        print(f"smolvlm: building {what or name}, once, {note} (cached in {directory})", file=sys.stderr, flush=True)
    return cpp_extension.load(name, [str(p) for p in sources], extra_cflags=flags, extra_ldflags=list(ldflags),
                              build_directory=str(directory), verbose=False)


def clear_stale_lock(build: Path) -> None:
    """torch's builder waits for its `lock` file to go away; a build killed mid-way (SIGKILL, power loss) leaves it
    there, and every later load would wait forever. A lock older than any build is removed."""
    lock = build / "lock"
    if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
        log.warning("smolvlm: removing the stale build lock %s (left by a killed build)", lock)
        lock.unlink(missing_ok=True)
