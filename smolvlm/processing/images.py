"""Turn any image source people pass into an RGB PIL image, exactly as the reference (transformers 5.23, PIL backend)
turns that kind of source into pixels.

How each kind of source becomes RGB (the reference treats them differently, and so do we):

- Encoded images (a file path, an http(s) URL, a `data:` URL, a base64 string, raw bytes): decoded by Pillow, EXIF
  orientation applied, then `convert("RGB")`, which *drops* an alpha channel (transparent pixels keep whatever colour
  they store) -- the reference's `load_image`. Raw bytes are not a reference input; we treat them like a file.
- A PIL image object: EXIF orientation is *not* applied (the reference doesn't). If it has alpha (an "A" band, or a
  palette/RGB "transparency" entry) it is composited over opaque white; otherwise `convert("RGB")`.
  (A decoded file then goes through this step too, as in the reference: a palette PNG's transparent colour survives
  `convert("RGB")` as `info["transparency"]`, and those pixels become white.)
- numpy arrays and torch tensors, HxWxC or CxHxW (the channel axis is the first one of length 1, 3 or 4, else the
  last -- the reference's rule), or HxW: 1 channel is repeated, 4 channels are composited over white with the
  reference's rounding. Integer values (or floats holding whole numbers) must lie in 0..255. Floats in [0, 1] are
  scaled by 255 and rounded; the reference instead rescales them twice (a known sharp edge that makes them nearly
  black), so such arrays are the one input whose pixels deliberately differ from the reference.
"""

from __future__ import annotations

import base64
import binascii
import os
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import InputError

FETCH_TIMEOUT_S = 10.0  # per network operation (connect, each read) when downloading an image URL
MAX_IMAGE_BYTES = 64 * 2**20  # largest encoded image we download or decode from base64
NOT_A_SOURCE = "it is not an existing file, an http(s) URL, a data: URL or base64-encoded image data"


def describe(source) -> str:
    """A short name for an image source, for error messages."""
    if isinstance(source, (str, os.PathLike)):
        s = os.fspath(source)
        if s.startswith("data:"):
            return f"data URL ({s[:30]}..., {len(s)} characters)"
        if len(s) > 200 and not os.path.exists(s):
            return f"string '{s[:40]}...' ({len(s)} characters)"
        return repr(s)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"image bytes ({len(source)} bytes)"
    if isinstance(source, Image.Image):
        return f"PIL image (mode {source.mode}, {source.size[0]}x{source.size[1]})"
    if hasattr(source, "shape"):
        return f"{type(source).__name__} of shape {tuple(source.shape)}"
    return type(source).__name__


def load_image(source, timeout: float = FETCH_TIMEOUT_S, max_bytes: int = MAX_IMAGE_BYTES) -> Image.Image:
    """An RGB PIL image from a path, URL, data URL, base64 string, bytes, PIL image, numpy array or torch tensor."""
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, (str, os.PathLike, bytes, bytearray, memoryview)):
        data = _read(source, timeout, max_bytes)
        # A string that is no file, URL or data URL was read as base64: if it isn't an image, say what we expected.
        guessed = isinstance(source, str) and isinstance(data, bytes) and not source.startswith(("http", "data:"))
        image = _decode(data, describe(source), NOT_A_SOURCE if guessed else "not an image Pillow can decode")
    elif hasattr(source, "shape") and hasattr(source, "dtype"):
        return Image.fromarray(array_to_rgb(source), "RGB")
    else:
        raise InputError(
            f"Unsupported image {type(source).__name__}: expected a file path, an http(s) URL, a data URL, a base64 "
            "string, bytes, a PIL image, a numpy array or a torch tensor"
        )
    return to_rgb(image, describe(source))


def to_rgb(image: Image.Image, name: str = "image") -> Image.Image:
    """The reference's `convert_to_rgb` for PIL images: composite transparency over white, else convert to RGB."""
    if image.width == 0 or image.height == 0:
        raise InputError(f"The {name} is empty ({image.width}x{image.height} pixels)")
    try:
        image.load()  # a lazily opened image (Image.open) decodes here, so a truncated file fails with a clear error
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image if image.mode == "RGB" else image.convert("RGB")  # convert("RGB") of RGB is a plain copy
    except (ValueError, OSError) as e:
        raise InputError(f"Can't convert the {name} to RGB: {e}") from e


def array_to_rgb(array) -> np.ndarray:
    """A uint8 HxWx3 array from a numpy array or torch tensor (HxW, HxWxC or CxHxW with C in 1, 3, 4)."""
    name = describe(array)
    if not isinstance(array, np.ndarray):  # torch tensor (on any device, any dtype numpy can't hold like bfloat16)
        array = array.detach().cpu()
        array = (array.float() if array.is_floating_point() else array).numpy()
    if array.ndim == 2:
        array = array[:, :, None]
    elif array.ndim != 3:
        raise InputError(f"Can't use the image {name}: expected HxW, HxWxC or CxHxW")
    if array.shape[0] in (1, 3, 4):  # channels first wins when both ends could be channels, as in the reference
        array = np.moveaxis(array, 0, -1)
    elif array.shape[-1] not in (1, 3, 4):
        raise InputError(f"Can't use the image {name}: no axis of 1, 3 or 4 channels at either end")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise InputError(f"The image {name} is empty (zero height or width)")
    array = _to_uint8(array, name)
    channels = array.shape[-1]
    if channels == 1:
        return np.repeat(array, 3, axis=-1)
    if channels == 4:  # the reference's blend onto white, in float64, rounded half to even
        alpha = array[..., 3:4] / 255
        return np.round(alpha * array[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return np.ascontiguousarray(array)


def _to_uint8(array: np.ndarray, name: str) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating) or array.dtype == bool):
        raise InputError(f"Can't use the image {name}: unsupported dtype {array.dtype}")
    if not np.isfinite(array).all():
        raise InputError(f"Can't use the image {name}: it holds NaN or infinite values")
    lo, hi = array.min(), array.max()
    # Whole numbers (the reference's test: allclose to their int cast) in 0..255 are pixel values, cast as it casts.
    if np.allclose(array, array.astype(np.int64)) and lo >= 0 and hi <= 255:
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating) and lo >= 0 and hi <= 1:
        return np.round(array.astype(np.float64) * 255).astype(np.uint8)
    raise InputError(
        f"Can't use the image {name}: values range over [{lo}, {hi}]; expected whole numbers in 0..255 or floats in "
        "[0, 1]"
    )


def _read(source, timeout: float, max_bytes: int) -> bytes | str:
    """The encoded image a source holds: a local file's path, or the bytes of a URL, data URL, base64 or bytes."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    text = os.fsdecode(os.fspath(source))
    if text.startswith(("http://", "https://")):
        return _download(text, timeout, max_bytes)
    path = os.path.expanduser(text)
    if os.path.isfile(path):
        return path
    if os.path.exists(path):
        raise InputError(f"Can't read the image {describe(source)}: not a file")
    if isinstance(source, os.PathLike):
        raise InputError(f"Can't read the image {describe(source)}: no such file")
    if text.startswith("data:"):
        header, comma, payload = text.partition(",")
        if not comma or not header.endswith(";base64"):
            raise InputError(f"Can't read the image {describe(source)}: expected data:image/...;base64,<data>")
        text = payload
    text = "".join(text.split())  # base64 is often wrapped over lines
    if len(text) * 3 // 4 > max_bytes:
        raise InputError(f"The image {describe(source)} is larger than the {max_bytes} bytes allowed")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InputError(f"Can't read the image {describe(source)}: {NOT_A_SOURCE}") from e


def _download(url: str, timeout: float, max_bytes: int) -> bytes:
    import httpx

    try:
        with httpx.stream("GET", url, timeout=timeout, follow_redirects=True) as response:
            if response.status_code >= 400:
                status = f"HTTP {response.status_code} {response.reason_phrase}"
                raise InputError(f"Can't download the image {url!r}: {status}")
            data = bytearray()
            for chunk in response.iter_bytes():
                data += chunk
                if len(data) > max_bytes:
                    raise InputError(f"The image at {url!r} is larger than the {max_bytes} bytes allowed")
            return bytes(data)
    except httpx.HTTPError as e:
        raise InputError(f"Can't download the image {url!r}: {type(e).__name__}: {e}") from e


def _decode(data: bytes | str, name: str, unidentified: str) -> Image.Image:
    """The reference's `load_image` on an encoded image: open, apply EXIF orientation, convert to RGB."""
    try:
        with open(data, "rb") if isinstance(data, str) else BytesIO(data) as f:
            image = Image.open(f)
            image.load()  # decode now, while the file is open, so a truncated file fails here with its name
        ImageOps.exif_transpose(image, in_place=True)
        return image if image.mode == "RGB" else image.convert("RGB")  # convert("RGB") of RGB is a plain copy
    except Image.DecompressionBombError as e:
        raise InputError(f"The image {name} is too large to decode safely: {e}") from e
    except UnidentifiedImageError as e:
        raise InputError(f"Can't read the image {name}: {unidentified}") from e
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # truncated or corrupt data
        raise InputError(f"Can't read the image {name}: {e}") from e
