"""Bit-identical model inputs (pixel_values, pixel_attention_mask, input_ids, attention_mask) against the reference
processor, for images of every size class, mode and source type, with the real tokenizer and settings."""

import base64

import numpy as np
import pytest
import torch
from PIL import Image

from processing_reference import assert_same_inputs, photo

SMALL = dict(size={"longest_edge": 128}, max_image_size={"longest_edge": 64})  # 2x2 tiles + global, fast


def check(pair, text, images, **kw):
    ours, ref = pair
    expected = ref(text=text, images=images, return_tensors="pt", **kw)
    got = ours(text=text, images=images, **kw)
    assert_same_inputs(got, expected)
    return got


# -- real settings (size 2048, 512 px tiles, 64 tokens per tile) --

@pytest.mark.parametrize(
    "width,height,frames",
    [(1, 1, 17), (300, 200, 13), (1600, 1067, 13), (1, 2000, 5), (2000, 1, 5), (777, 333, 9)],
    ids=["tiny-1x1", "small", "photo", "tall-1x2000", "wide-2000x1", "odd-777x333"],
)
def test_real_settings_sizes(pair, width, height, frames):
    got = check(pair, f"User:<image>Describe {width}x{height}.", photo(width, height, seed=width + height))
    assert got["pixel_values"].shape == (1, frames, 3, 512, 512)


def test_very_large_image(processors):
    got = check(processors["v2"], "<image>", photo(6000, 4000, seed=3))
    assert got["pixel_values"].shape == (1, 13, 3, 512, 512)


def test_batch_with_several_images_and_different_tile_counts(pair):
    images = [[photo(300, 200, 1), photo(40, 700, 2)], [photo(1, 1, 3)]]
    got = check(pair, ["Two: <image> and <image>.", "One <image>"], images, padding=True, padding_side="left")
    assert got["pixel_values"].shape[:2] == (2, 13 + 5)  # 3x4 + 1 and 4x1 + 1 frames; the 1x1 image's 17 is padded
    assert got["pixel_attention_mask"][1, 17:].sum() == 0 and got["pixel_attention_mask"][1, :17].all()
    assert got["pixel_values"][1, 17:].abs().sum() == 0
    assert got["attention_mask"][1, 0] == 0  # left padding


def test_no_split_setting(pair):
    got = check(pair, ["a<image>", "<image>b<image>"], [[photo(1600, 1067, 4)], [photo(50, 80, 5), photo(3, 2, 6)]],
                padding=True, do_image_splitting=False)
    assert got["pixel_values"].shape == (2, 2, 3, 512, 512)


def test_exif_rotated_jpeg(pair, tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    photo(640, 480, seed=7).save(path, exif=exif, quality=90)
    got = check(pair, "<image>", str(path))  # a path: the reference applies the EXIF orientation
    assert got["pixel_values"].shape == (1, 13, 3, 512, 512)  # upright 480x640 -> 1536x2048: 4 rows x 3 cols + 1
    check(pair, "<image>", Image.open(path))  # a PIL object: the reference ignores EXIF, and so do we


# -- every Pillow mode, as PIL objects and as files (small settings) --

def _mode_image(mode: str) -> Image.Image:
    rgb = photo(45, 30, seed=11)
    if mode in ("RGBA", "LA", "PA"):
        alpha = Image.fromarray(np.tile(np.linspace(0, 255, 45, dtype=np.uint8), (30, 1)))
        image = rgb.convert(mode)
        image.putalpha(alpha)
        return image
    if mode == "P+transparency":
        image = rgb.convert("P")
        image.info["transparency"] = int(np.asarray(image)[0, 0])
        return image
    if mode == "RGB+transparency":
        rgb.info["transparency"] = tuple(int(v) for v in np.asarray(rgb)[0, 0])
        return rgb
    if mode in ("I;16", "I"):
        values = np.asarray(rgb.convert("L"), dtype=np.uint16) * 3
        image = Image.fromarray(values.astype(np.uint16))  # I;16
        return image if mode == "I;16" else image.convert("I")
    return rgb.convert(mode)


MODES = ["RGB", "RGBA", "LA", "L", "P", "P+transparency", "PA", "CMYK", "I;16", "I", "F", "1", "YCbCr",
         "RGB+transparency"]


@pytest.mark.parametrize("mode", MODES)
def test_pil_modes(pair, mode):
    check(pair, "<image>", _mode_image(mode), **SMALL)


FILE_MODES = {"RGB": "png", "RGBA": "png", "LA": "png", "L": "png", "P": "png", "P+transparency": "png",
              "I;16": "png", "1": "png", "CMYK": "jpeg", "RGB+transparency": "png"}


@pytest.mark.parametrize("mode", FILE_MODES)
def test_files_of_each_mode(pair, mode, tmp_path):
    """A path goes through the reference's load_image: alpha is dropped, not composited (except a palette's
    transparent colour, which survives convert("RGB") and is then composited)."""
    path = tmp_path / f"image.{FILE_MODES[mode]}"
    _mode_image(mode).save(path)
    check(pair, "<image>", str(path), **SMALL)


def test_alpha_path_vs_object_differ_as_in_the_reference(processors, tmp_path):
    ours, _ = processors["v2"]
    image = _mode_image("RGBA")
    image.save(tmp_path / "a.png")
    from_path = ours(text="<image>", images=str(tmp_path / "a.png"), **SMALL)["pixel_values"]
    from_object = ours(text="<image>", images=image, **SMALL)["pixel_values"]
    assert not torch.equal(from_path, from_object)  # dropped vs composited on white (both match the reference)


def test_encoded_sources_match_the_path(pair, tmp_path):
    path = tmp_path / "image.png"
    _mode_image("RGB").save(path)
    data = path.read_bytes()
    b64 = base64.b64encode(data).decode()
    for source in (b64, f"data:image/png;base64,{b64}"):
        check(pair, "<image>", source, **SMALL)
    ours, ref = pair
    from_bytes = ours(text="<image>", images=data, **SMALL)  # bytes are not a reference input: same as the file
    assert_same_inputs(from_bytes, ref(text="<image>", images=str(path), return_tensors="pt", **SMALL))


# -- arrays and tensors --

def _arrays():
    hwc = np.asarray(photo(45, 30, seed=12))
    alpha = np.tile(np.linspace(0, 255, 45).astype(np.uint8), (30, 1))[..., None]
    rgba = np.concatenate([hwc, alpha], axis=-1)
    return {
        "hwc-uint8": hwc,
        "chw-uint8": hwc.transpose(2, 0, 1).copy(),
        "hw1-uint8": hwc[..., :1].copy(),
        "1hw-uint8": hwc[None, ..., 0].copy(),
        "hwc4-uint8": rgba,
        "chw4-uint8": rgba.transpose(2, 0, 1).copy(),
        "hwc-float-whole": hwc.astype(np.float32),
        "hwc-int64": hwc.astype(np.int64),
        "torch-chw-uint8": torch.from_numpy(hwc.transpose(2, 0, 1).copy()),
        "torch-hwc-float-whole": torch.from_numpy(hwc.astype(np.float32)),
    }


@pytest.mark.parametrize("kind", list(_arrays()))
def test_arrays_and_tensors(pair, kind):
    check(pair, "<image>", _arrays()[kind], **SMALL)


def test_float_arrays_in_unit_range_are_scaled_once(processors):
    """A documented difference: the reference rescales [0, 1] floats twice (nearly black); we scale them once, so
    x / 255 gives exactly the pixels of x."""
    ours, _ = processors["v2"]
    hwc = np.asarray(photo(45, 30, seed=13))
    expected = ours(text="<image>", images=hwc, **SMALL)
    for unit in (hwc.astype(np.float32) / 255, torch.from_numpy(hwc.astype(np.float64) / 255)):
        assert_same_inputs(ours(text="<image>", images=unit, **SMALL), expected)


# -- shrinking as decoded (the server and the video reader free large originals at once) --


@pytest.mark.parametrize("width,height,shrinks", [(4100, 2800, True), (2100, 3001, True), (3001, 1, False),
                                                  (777, 333, False)])
def test_shrunk_images_give_the_references_inputs(pair, width, height, shrinks):
    """ImageProcessor.shrink (the first resize, applied as soon as an image is decoded) leaves the inputs the
    reference makes from the original: it shrinks only to sizes the first resize keeps as they are (not 3001x1,
    resized to 2048x1, which a second resize would make 2048x2), and never enlarges."""
    ours, ref = pair
    image = photo(width, height, seed=width)
    shrunk = ours.image_processor.shrink(image)
    assert (shrunk.width * shrunk.height < width * height) == shrinks
    expected = ref(text="<image>", images=image, return_tensors="pt")
    assert_same_inputs(ours(text="<image>", images=shrunk), expected)
