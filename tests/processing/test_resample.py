"""The C++ pixel path (smolvlm/processing/resample.py) against Pillow and against the reference image processor:
every resize bit-identical to Pillow's LANCZOS (both pass orders, up, down, mixed, 1-pixel sides), the tile look-up
identical to numpy's, and the whole image processor identical to the reference with the C++ path and with the Pillow
fallback, across sizes, aspect ratios, longest_edge and tile settings, splitting on and off and video-frame settings."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from processing_reference import FOLDERS, photo
from tiny import compiled_or_fallback
from smolvlm.processing import resample
from smolvlm.processing.image_processor import ImageProcessor

compiled = pytest.mark.skipif(resample.load() is None, reason="the C++ resize can't be built here (no C++ compiler)")


def noise(width: int, height: int, seed: int) -> Image.Image:
    """Uniform noise: the largest LANCZOS overshoots, so the clipping to 0..255 is exercised everywhere."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


PIPELINE = [((512, 512), (2048, 2048)), ((2048, 2048), (512, 512)), ((1536, 1024), (2048, 1366)),
            ((2048, 1366), (2048, 1536)), ((2048, 1536), (512, 512)), ((1, 2000), (2, 2048))]
EDGES = [((1, 1), (7, 5)), ((5, 7), (1, 1)), ((1, 9), (9, 1)), ((300, 2), (3, 300)), ((17, 1), (17, 40))]
VERTICAL_FIRST = [((170, 278), (445, 164)), ((185, 207), (172, 53)), ((40, 400), (38, 30)), ((3, 290), (521, 205))]
SAME_SIZE = [((33, 44), (33, 44)), ((64, 48), (64, 20)), ((64, 48), (20, 48))]  # a copy; one pass only
RANDOM = [((int(a), int(b)), (int(c), int(d)))
          for a, b, c, d in np.random.default_rng(21).integers(1, 400, (40, 4))]


@compiled
@pytest.mark.parametrize("size,new", PIPELINE + EDGES + VERTICAL_FIRST + SAME_SIZE + RANDOM)
def test_resize_matches_pillow(size, new):
    for image in (noise(*size, seed=sum(size)), photo(*size, seed=sum(new))):
        expected = np.asarray(image.resize(new, Image.LANCZOS))
        got = resample.resize(np.asarray(image), new)
        assert got.dtype == np.uint8 and got.shape == expected.shape
        assert np.array_equal(got, expected), f"{size} -> {new}: {(got != expected).sum()} values differ"


@compiled
def test_resize_order_rule_is_pillows():
    """The rule picking the pass order matters: the other order gives different pixels (else the case tests
    nothing)."""
    image = noise(185, 207, seed=1)
    other = np.asarray(image.resize((185, 53), Image.LANCZOS).resize((172, 53), Image.LANCZOS))
    if resample.PILLOW_VERTICAL_FIRST:
        other = np.asarray(image.resize((172, 207), Image.LANCZOS).resize((172, 53), Image.LANCZOS))
    assert not np.array_equal(resample.resize(np.asarray(image), (172, 53)), other)


@compiled
def test_resize_rejects_what_is_not_rgb():
    with pytest.raises(ValueError, match=r"uint8 \[H, W, 3\]"):
        resample.resize(np.zeros((4, 4), np.uint8), (2, 2))


@compiled
@pytest.mark.parametrize("rows,cols", [(1, 1), (2, 3), (4, 1)])
def test_tiles_into_matches_the_lookup(rows, cols):
    processor, m = ImageProcessor(max_image_size=16), 16
    pixels = np.asarray(noise(cols * m, rows * m, seed=rows * cols))
    got = np.full((rows * cols, 3, m, m), np.nan, np.float32)
    resample.tiles_into(got, pixels, processor.lut, rows, cols)
    tiles = pixels.reshape(rows, m, cols, m, 3).transpose(0, 2, 4, 1, 3).reshape(rows * cols, 3, m, m)
    assert np.array_equal(got, processor.lut[np.arange(3)[None, :, None, None], tiles])


def _reference(folder, **settings):
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    return SmolVLMImageProcessorPil.from_pretrained(folder, **settings)


SETTINGS = [
    {},  # the checkpoint's: longest_edge 2048, 512 px tiles
    {"do_image_splitting": False},
    {"size": {"longest_edge": 1536}, "max_image_size": {"longest_edge": 384}},
    {"size": {"longest_edge": 512}, "do_image_splitting": False},  # video frames (video_size 512, unsplit)
    {"size": {"longest_edge": 200}, "max_image_size": {"longest_edge": 64}},
]
IMAGES = [(512, 512), (1536, 1024), (1024, 1536), (333, 777), (4000, 3000), (2000, 1), (1, 3), (640, 360)]


@pytest.fixture(params=["compiled", "fallback"])
def path(request, monkeypatch):
    """Run the image processor on the C++ path or on its Pillow fallback (as where no compiler is found)."""
    return compiled_or_fallback(request, monkeypatch, resample, "the C++ resize can't be built here (no C++ compiler)")


@pytest.mark.parametrize("settings", SETTINGS, ids=["default", "unsplit", "1536-384", "video-512", "small"])
def test_image_processor_matches_the_reference(path, settings):
    folder = FOLDERS["v2"]
    reference = _reference(folder, **settings)
    ours = ImageProcessor.from_dict({**json.loads((folder / "preprocessor_config.json").read_text()),
                                     **settings})
    images = [photo(w, h, seed=w + h) for w, h in IMAGES]
    for image in images:
        expected = reference(image, return_tensors="pt")
        got = ours([[image]])
        assert torch.equal(got.pixel_values, expected["pixel_values"]), (path, image.size, settings)
        assert torch.equal(got.pixel_attention_mask, expected["pixel_attention_mask"])
        frames, rows, cols = ours.frames(image)
        assert torch.equal(frames, got.pixel_values[0]) and [[rows]] == got.rows and [[cols]] == got.cols


def test_a_batch_of_mixed_images_matches_the_reference(path):
    reference = _reference(FOLDERS["v1"])
    ours = ImageProcessor.from_dict(json.loads((FOLDERS["v1"] / "preprocessor_config.json").read_text()))
    images = [[photo(700, 300, seed=1), noise(64, 900, seed=2)], [noise(3, 3, seed=3)]]
    expected = reference(images, return_tensors="pt")
    got = ours(images)
    assert torch.equal(got.pixel_values, expected["pixel_values"])
    assert torch.equal(got.pixel_attention_mask, expected["pixel_attention_mask"])


def test_shrink_is_pillows_resize(path):
    processor = ImageProcessor()  # longest_edge 1456
    image = photo(3000, 2000, seed=5)
    shrunk = processor.shrink(image)
    assert shrunk.mode == "RGB" and shrunk.size == (1456, 970)
    assert np.array_equal(np.asarray(shrunk), np.asarray(image.resize((1456, 970), Image.LANCZOS)))


def test_other_filters_take_pillows_path(monkeypatch):
    """The C++ code is LANCZOS only; a checkpoint asking for another filter gets Pillow's resize of that filter."""
    monkeypatch.setattr(resample, "resize", None)  # would raise if called
    processor = ImageProcessor(resample=int(Image.Resampling.BICUBIC), size={"longest_edge": 64}, max_image_size=32)
    image = photo(50, 40, seed=6)
    grid = image.resize((64, 52), Image.BICUBIC).resize((64, 64), Image.BICUBIC)  # 2 x 2 tiles of 32
    expected = np.asarray(grid.resize((32, 32), Image.BICUBIC)).transpose(2, 0, 1)  # the global image [3, 32, 32]
    got = processor([[image]]).pixel_values[0, -1]
    assert torch.equal(got, torch.from_numpy(processor.lut[np.arange(3)[:, None, None], expected]))
