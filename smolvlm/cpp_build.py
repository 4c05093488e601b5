"""Build a C++ extension on first use with torch's builder and cache it under ~/.cache/smolvlm (or XDG_CACHE_HOME).

smolvlm/processing/resample.py builds its image resize through here; smolvlm/model/kernels.py still has its own copy
of these steps (to move here).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch


def build(name: str, sources: list[Path], folder: str, flags: list[str], ldflags: list[str] = (), note: str = ""):
    """The compiled module `name` from `sources`, built in ~/.cache/smolvlm/<folder>-<torch version> unless already
    there (saying so on stderr, with `note`: how long it takes). Raises what the builder raises (no compiler...)."""
    from torch.utils import cpp_extension

    from .model.kernels import clear_stale_lock

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
        print(f"smolvlm: building {name}, once, {note} (cached in {directory})", file=sys.stderr, flush=True)
    return cpp_extension.load(name, [str(p) for p in sources], extra_cflags=flags, extra_ldflags=list(ldflags),
                              build_directory=str(directory), verbose=False)
