"""The image processor's pixel work in C++ (csrc/resample.cpp): Pillow's LANCZOS resize of uint8 RGB, bit for bit
but vectorised (Pillow's loops are scalar; both run on one thread), and the tile cut + rescale/normalise table look-up
written straight into the float32 frames.

Built on first use with torch's extension builder (a C++ compiler is needed; ~10 s once, then loaded from
~/.cache/smolvlm in well under a second) for any CPU: the hot loops are compiled for AVX-512, AVX2 and plain x86-64
and picked at load time. Where it can't be built `load()` says None and the image processor keeps Pillow's resize
and numpy's look-up, which give the same pixels. SMOLVLM_KERNELS=0 turns it off, as it does the model's kernels.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import PIL

from ..cpp_build import build

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "resample.cpp"
FLAGS = ["-O3", "-ffp-contract=off"]  # no fused multiply-adds: the LANCZOS weights round exactly as in Pillow's C
# Pillow 13 runs the vertical pass first when the height shrinks by more than twice as many pixels as the width.
PILLOW_VERTICAL_FIRST = int(PIL.__version__.split(".")[0]) >= 13


@functools.cache
def load():
    """The compiled module (`resize`, `tiles_into`), or None where it can't be built (logged once)."""
    if os.environ.get("SMOLVLM_KERNELS", "1") == "0":
        return None
    source = hashlib.sha1(SOURCE.read_bytes()).hexdigest()[:10]  # a changed source builds afresh
    try:
        return build("smolvlm_resample", [SOURCE], f"resample-{source}", FLAGS, what="the C++ image resize",
                     note="~10 s")
    except Exception as e:  # no compiler or ninja, an unwritable cache folder: Pillow's resize gives the same pixels
        log.warning("smolvlm: C++ image resize unavailable, using Pillow's (%s)", str(e).splitlines()[0][:300])
        return None


def resize(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`Image.fromarray(pixels).resize(size, Image.LANCZOS)` as uint8 [H, W, 3] (the same array when the size stays,
    as Pillow's resize to the same size is a copy)."""
    (height, width), (w2, h2) = pixels.shape[:2], size
    if (w2, h2) == (width, height):
        return pixels
    vertical_first = PILLOW_VERTICAL_FIRST and height - h2 > 0 and height - h2 > (width - w2) * 2
    return load().resize(pixels, w2, h2, vertical_first)


def tiles_into(out: np.ndarray, pixels: np.ndarray, lut: np.ndarray, rows: int, cols: int) -> None:
    """out[f, c] = lut[c][tile f of pixels] for the rows x cols tiles (row-major) of uint8 pixels [rows*M, cols*M, 3];
    out: float32 [rows*cols, 3, M, M], contiguous."""
    load().tiles_into(pixels, lut, out, rows, cols)
