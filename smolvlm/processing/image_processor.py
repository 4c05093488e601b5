"""Images -> `pixel_values`: the reference's SmolVLM/Idefics3 image processor (transformers 5.23, PIL backend).

Per image (all resizes are Pillow resizes with the checkpoint's filter, LANCZOS, on uint8 RGB, as the reference's;
resample.py computes LANCZOS ones bit for bit in C++, several times faster, where it can be built):
1. resize the longest edge to `size.longest_edge` (up or down; the other side rounded up to even);
2. split: stretch to whole multiples of the tile side M (`max_image_size.longest_edge`), cut the M x M tiles row by
   row, and append the global image (the stretched image resized to M x M); or, without splitting, resize to M x M;
3. rescale and normalise (float32, bit-identical to the reference's float64-then-float32 arithmetic, done with a
   256-entry lookup table per channel written straight into the output);
4. pad every sample to the batch's largest frame count with all-zero frames (`pixel_attention_mask` 0).

Frames are always M x M (step 2 makes them so), so there is never spatial padding. `do_convert_rgb` and `do_pad` are
always on (every released checkpoint sets both; images are made RGB in images.py).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError, InputError
from . import resample

MAX_IMAGE_SIZE = 4096  # the reference caps the first resize's long side at 4k
RESAMPLE_FILTERS = {int(f): f.name for f in Image.Resampling}  # 0 NEAREST, 1 LANCZOS, 2 BILINEAR, 3 BICUBIC, ...


@dataclass
class ImageBatch:
    pixel_values: torch.Tensor  # float32 [B, I, 3, M, M]; I = most frames in a sample, zero frames pad the others
    pixel_attention_mask: torch.Tensor  # int64 [B, I, M, M]; 1 on real frames
    rows: list[list[int]]  # per sample, per image: tile rows (0 when the image is not split)
    cols: list[list[int]]


@dataclass(frozen=True)
class ImageProcessor:
    """Settings from preprocessor_config.json; defaults are the reference class's for keys a file omits."""

    do_resize: bool = True
    size: dict = dataclasses.field(default_factory=lambda: {"longest_edge": 4 * 364})  # or {"height", "width"}
    max_image_size: int = 364  # tile side M (the file's max_image_size.longest_edge)
    do_image_splitting: bool = True
    resample: int = int(Image.Resampling.LANCZOS)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple = (0.5, 0.5, 0.5)
    image_std: tuple = (0.5, 0.5, 0.5)
    lut: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)  # [3, 256] float32, see __post_init__

    def __post_init__(self):
        # Each uint8 value rescaled and normalised with the reference's exact arithmetic: a float64 product cast to
        # float32 (image_transforms.rescale), then float32 (x - mean) / std (image_transforms.normalize).
        x = np.arange(256, dtype=np.uint8)[:, None].repeat(3, axis=1)  # [256, 3]
        if self.do_rescale:
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            x = x.astype(np.float32)
            x = (x - np.array(self.image_mean, dtype=np.float32)) / np.array(self.image_std, dtype=np.float32)
        object.__setattr__(self, "lut", np.ascontiguousarray(x.astype(np.float32).T))

    @classmethod
    def from_dict(cls, d: dict, source: str = "preprocessor_config.json") -> ImageProcessor:
        kw = {}
        for name in ("do_resize", "do_image_splitting", "do_rescale", "do_normalize"):
            if name in d:
                kw[name] = _bool(d[name], f"{source}: field {name!r}", ConfigError)
        if "size" in d:
            kw["size"] = _size(d["size"], f"{source}: field 'size'", ConfigError)
        if "max_image_size" in d:
            kw["max_image_size"] = _tile(d["max_image_size"], f"{source}: field 'max_image_size'", ConfigError)
        if "resample" in d:
            if d["resample"] not in RESAMPLE_FILTERS or isinstance(d["resample"], bool):
                raise ConfigError(f"{source}: field 'resample' = {d['resample']!r}: expected a Pillow filter number "
                                  f"{RESAMPLE_FILTERS}")
            kw["resample"] = d["resample"]
        if "rescale_factor" in d:
            kw["rescale_factor"] = _number(d["rescale_factor"], f"{source}: field 'rescale_factor'")
        for name in ("image_mean", "image_std"):
            if name in d:
                value = d[name] if isinstance(d[name], list) else [d[name]] * 3
                if len(value) != 3:
                    raise ConfigError(f"{source}: field {name!r} = {d[name]!r}: expected 3 numbers (one per channel)")
                kw[name] = tuple(_number(v, f"{source}: field {name!r}") for v in value)
        if 0 in kw.get("image_std", ()):
            raise ConfigError(f"{source}: field 'image_std' = {d['image_std']!r}: a channel's std is 0")
        return cls(**kw)

    def with_overrides(self, do_resize=None, size=None, max_image_size=None, do_image_splitting=None):
        """A copy with per-call settings (None keeps the checkpoint's); bad values raise InputError."""
        kw = {}
        if do_resize is not None:
            kw["do_resize"] = _bool(do_resize, "do_resize", InputError)
        if do_image_splitting is not None:
            kw["do_image_splitting"] = _bool(do_image_splitting, "do_image_splitting", InputError)
        if size is not None:
            kw["size"] = _size(size, "size", InputError)
        if max_image_size is not None:
            kw["max_image_size"] = _tile(max_image_size, "max_image_size", InputError)
        return dataclasses.replace(self, **kw) if kw else self

    # -- geometry (Python float64 arithmetic and int() truncation, exactly as the reference) --

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after step 1."""
        if "longest_edge" not in self.size:
            return self.size["width"], self.size["height"]
        longest, ratio = self.size["longest_edge"], width / height
        if width >= height:
            width, height = longest, int(longest / ratio)
            height += height % 2
        else:
            width, height = int(longest * ratio), longest
            width += width % 2
        width, height = max(width, 1), max(height, 1)
        ratio = width / height
        if width >= height and width > MAX_IMAGE_SIZE:
            width, height = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE / ratio)
        elif height > width and height > MAX_IMAGE_SIZE:
            width, height = int(MAX_IMAGE_SIZE * ratio), MAX_IMAGE_SIZE
        return max(width, 1), max(height, 1)

    def grid_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) stretched to whole tiles (step 2)."""
        m, ratio = self.max_image_size, width / height
        if width >= height:
            width = math.ceil(width / m) * m
            height = math.ceil(int(width / ratio) / m) * m
        else:
            height = math.ceil(height / m) * m
            width = math.ceil(int(height * ratio) / m) * m
        return width, height

    def num_frames(self, width: int, height: int) -> tuple[int, int, int]:
        """(frames, rows, cols) an image of this size becomes."""
        if self.do_resize:
            width, height = self.resized_size(width, height)
        if not self.do_image_splitting:
            return 1, 0, 0
        width, height = self.grid_size(width, height)
        m = self.max_image_size
        if width > m or height > m:
            return (height // m) * (width // m) + 1, height // m, width // m
        return 1, 0, 0

    # -- pixels --

    def shrink(self, image: Image.Image) -> Image.Image:
        """`image` (RGB, as images.to_rgb makes it) after step 1, when that makes it smaller and leaves step 1 of
        `__call__` a copy (the size is a fixed point of `resized_size`): the same pixels as the whole pipeline on the
        original, so a large image or video frame can be shrunk as soon as it is decoded and the original freed."""
        if not self.do_resize:
            return image
        size = self.resized_size(*image.size)
        if size[0] * size[1] >= image.width * image.height or self.resized_size(*size) != size:
            return image
        if not self._compiled():
            return image.resize(size, resample=self.resample)
        return Image.fromarray(resample.resize(np.asarray(image), size), "RGB")

    def __call__(self, images: list[list[Image.Image]]) -> ImageBatch:
        """Process a batch: one list of RGB PIL images per sample (empty lists allowed)."""
        m = self.max_image_size
        plans = [[self.num_frames(*image.size) for image in sample] for sample in images]
        counts = [sum(n for n, _, _ in sample) for sample in plans]
        # Filled through numpy views: single-threaded fills (torch's would wake its thread pool for each).
        pixel_values = torch.empty((len(images), max(counts), 3, m, m), dtype=torch.float32)
        pixel_attention_mask = torch.from_numpy(np.zeros((len(images), max(counts), m, m), dtype=np.int64))
        out, mask = pixel_values.numpy(), pixel_attention_mask.numpy()
        for b, (sample, count) in enumerate(zip(images, counts)):
            start = 0
            for image, (n, rows, cols) in zip(sample, plans[b]):
                self._frames_into(out[b, start : start + n], image, rows, cols)
                start += n
            out[b, count:] = 0
            mask[b, :count] = 1
        rows = [[r for _, r, _ in sample] for sample in plans]
        cols = [[c for _, _, c in sample] for sample in plans]
        return ImageBatch(pixel_values, pixel_attention_mask, rows, cols)

    def frames(self, image: Image.Image) -> tuple[torch.Tensor, int, int]:
        """One image's frames float32 [n, 3, M, M] (its rows of `__call__`'s pixel_values, without the mask) and its
        tile rows and cols."""
        n, rows, cols = self.num_frames(*image.size)
        frames = torch.empty((n, 3, self.max_image_size, self.max_image_size), dtype=torch.float32)
        self._frames_into(frames.numpy(), image, rows, cols)
        return frames, rows, cols

    def _frames_into(self, out: np.ndarray, image: Image.Image, rows: int, cols: int) -> None:
        """Write one image's frames (tiles row-major, then the global image) into out [n, 3, M, M]. The pixels are
        a PIL image all along (Pillow's resizes), or uint8 [H, W, 3] arrays when the C++ resize runs (resample.py)."""
        m = self.max_image_size
        pixels = np.asarray(image) if self._compiled() else image
        if self.do_resize:
            pixels = self._resize(pixels, self.resized_size(*_dims(pixels)))
        if not self.do_image_splitting:
            self._tiles_into(out[:1], self._resize(pixels, (m, m)), 1, 1)
            return
        grid = self._resize(pixels, self.grid_size(*_dims(pixels)))
        if rows == 0:  # a single tile: the grid image is already M x M
            self._tiles_into(out[:1], grid, 1, 1)
            return
        self._tiles_into(out[: rows * cols], grid, rows, cols)
        self._tiles_into(out[rows * cols : rows * cols + 1], self._resize(grid, (m, m)), 1, 1)

    def _compiled(self) -> bool:
        """Whether the C++ resize (resample.py) does this processor's pixel work: LANCZOS, and the module builds."""
        return self.resample == Image.Resampling.LANCZOS and resample.load() is not None

    def _resize(self, pixels, size: tuple[int, int]):
        if isinstance(pixels, np.ndarray):
            return resample.resize(pixels, size)
        # Pillow's resize to the same size is a copy; skipping it gives the same pixels.
        return pixels if pixels.size == size else pixels.resize(size, resample=self.resample)

    def _tiles_into(self, out: np.ndarray, pixels, rows: int, cols: int) -> None:
        """out[f, c] = lut[c][tile f's channel c] for the rows x cols tiles of pixels (row-major): float32
        [rows*cols, 3, M, M] from uint8 [rows*M, cols*M, 3], one table look-up per value (no float temporaries)."""
        if isinstance(pixels, np.ndarray):
            resample.tiles_into(out, pixels, self.lut, rows, cols)
            return
        m = self.max_image_size
        hwc = np.asarray(pixels).reshape(rows, m, cols, m, 3).transpose(0, 2, 1, 3, 4)  # [R, C, M, M, 3] view
        for c in range(3):
            np.take(self.lut[c], hwc[..., c], out=out.reshape(rows, cols, 3, m, m)[..., c, :, :], mode="clip")


def _dims(pixels) -> tuple[int, int]:
    """(width, height) of a PIL image or a uint8 [H, W, 3] array."""
    return pixels.size if isinstance(pixels, Image.Image) else (pixels.shape[1], pixels.shape[0])


def _bool(value, where: str, error):
    if not isinstance(value, bool):
        raise error(f"{where} = {value!r}: expected true or false")
    return value


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where} = {value!r}: expected a number")
    return float(value)


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _size(value, where: str, error) -> dict:
    """{"longest_edge": N} or {"height": H, "width": W}; longest_edge wins when both are set, as in the reference."""
    if isinstance(value, dict) and _positive_int(value.get("longest_edge")):
        return {"longest_edge": value["longest_edge"]}
    if isinstance(value, dict) and _positive_int(value.get("height")) and _positive_int(value.get("width")):
        return {"height": value["height"], "width": value["width"]}
    raise error(f"{where} = {value!r}: expected {{'longest_edge': N}} or {{'height': H, 'width': W}} (positive "
                "integers)")


def _tile(value, where: str, error) -> int:
    if isinstance(value, dict) and _positive_int(value.get("longest_edge")):
        return value["longest_edge"]
    raise error(f"{where} = {value!r}: expected {{'longest_edge': N}} with N a positive integer (the tile side)")
