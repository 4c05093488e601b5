"""load_image: every kind of source, and an error naming the source for everything that can go wrong."""

import base64
import io
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from processing_reference import photo
from smolvlm.errors import InputError
from smolvlm.processing import load_image


def _encoded(image, fmt="PNG", **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def _same(a: Image.Image, b: Image.Image) -> bool:
    return a.mode == b.mode == "RGB" and a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))


def test_every_source_kind_gives_the_same_pixels(tmp_path, image_server):
    image = photo(31, 17, seed=1)
    data = _encoded(image)
    path = tmp_path / "x.png"
    path.write_bytes(data)
    b64 = base64.b64encode(data).decode()
    url = image_server({"/x.png": data}) + "/x.png"
    wrapped = "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76))  # MIME-style line breaks
    hwc = np.asarray(image)
    for source in (image, str(path), path, url, data, bytearray(data), b64, wrapped, f"data:image/png;base64,{b64}",
                   hwc, hwc.transpose(2, 0, 1), torch.from_numpy(hwc.copy())):
        assert _same(load_image(source), image), type(source)


def test_exif_orientation_applies_to_encoded_images_only():
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    data = _encoded(photo(40, 20), "JPEG", exif=exif)
    assert load_image(data).size == (20, 40)
    assert load_image(Image.open(io.BytesIO(data))).size == (40, 20)  # a PIL object is taken as is (the reference)


def test_alpha_composited_for_objects_dropped_for_files():
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))  # fully transparent
    assert np.asarray(load_image(rgba))[0, 0].tolist() == [255, 255, 255]  # composited over white
    assert np.asarray(load_image(_encoded(rgba)))[0, 0].tolist() == [10, 20, 30]  # alpha dropped, as the reference


def test_unreadable_file(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not an image")
    with pytest.raises(InputError, match=r"Can't read the image '.*notes.png': not an image Pillow can decode"):
        load_image(str(path))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file(tmp_path, fmt):
    path = tmp_path / f"cut.{fmt.lower()}"
    data = _encoded(photo(200, 200), fmt)
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=rf"Can't read the image '.*cut.{fmt.lower()}': .*[Tt]runcated"):
        load_image(str(path))


def test_truncated_file_opened_by_the_caller(tmp_path):
    path = tmp_path / "cut.jpg"
    data = _encoded(photo(200, 200), "JPEG")
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"Can't convert the PIL image \(mode RGB, 200x200\) to RGB: .*truncated"):
        load_image(Image.open(path))


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(InputError, match=r"'missing/cat.png': it is not an existing file, an http\(s\) URL"):
        load_image("missing/cat.png")
    with pytest.raises(InputError, match="no such file"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(InputError, match="not a file"):
        load_image(str(tmp_path))


def test_bad_base64_and_data_urls():
    with pytest.raises(InputError, match="not an existing file, an http\\(s\\) URL, a data: URL or base64"):
        load_image("aGVsbG8=")  # valid base64 of "hello": not an image
    with pytest.raises(InputError, match="expected data:image/...;base64,<data>"):
        load_image("data:image/png,rawdata")
    with pytest.raises(InputError, match="data URL .* not an existing file"):
        load_image("data:image/png;base64,@@@@")


def test_url_failures(image_server):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(InputError, match=rf"Can't download the image 'http://127.0.0.1:{port}/x.png': ConnectError"):
        load_image(f"http://127.0.0.1:{port}/x.png")
    base = image_server({"/big.png": _encoded(photo(64, 64)), "/slow.png": 2.0})
    with pytest.raises(InputError, match=r"Can't download the image '.*/gone.png': HTTP 404"):
        load_image(base + "/gone.png")
    with pytest.raises(InputError, match="larger than the 100 bytes allowed"):
        load_image(base + "/big.png", max_bytes=100)
    with pytest.raises(InputError, match="/slow.png': ReadTimeout"):
        load_image(base + "/slow.png", timeout=0.2)


def test_zero_sized_images():
    with pytest.raises(InputError, match=r"PIL image \(mode RGB, 0x5\) is empty"):
        load_image(Image.new("RGB", (0, 5)))
    with pytest.raises(InputError, match=r"ndarray of shape \(0, 5, 3\) is empty"):
        load_image(np.zeros((0, 5, 3), np.uint8))


def test_decompression_bomb(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    photo(100, 100).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10000 pixels is beyond twice the limit
    with pytest.raises(InputError, match=r"'.*bomb.png' is too large to decode safely"):
        load_image(str(path))


@pytest.mark.parametrize(
    "array,message",
    [
        (np.zeros((2, 2, 2, 3), np.uint8), "expected HxW, HxWxC or CxHxW"),
        (np.zeros((10, 10, 7), np.uint8), "no axis of 1, 3 or 4 channels"),
        (np.full((4, 4, 3), 300.5), r"values range over \[300.5, 300.5\]"),
        (np.full((4, 4, 3), -1, np.int32), r"values range over \[-1, -1\]"),
        (np.full((4, 4, 3), np.nan, np.float32), "NaN"),
        (np.zeros((4, 4, 3), np.complex64), "unsupported dtype complex64"),
    ],
)
def test_bad_arrays(array, message):
    with pytest.raises(InputError, match=message):
        load_image(array)


def test_unsupported_objects_and_conversions():
    with pytest.raises(InputError, match="Unsupported image float"):
        load_image(3.5)
    with pytest.raises(InputError, match="Can't convert the PIL image \\(mode La"):
        load_image(Image.new("La", (2, 2)))


def test_processor_errors_name_the_image(processors):
    ours, _ = processors["v2"]
    with pytest.raises(InputError, match=r"Sample 1, image 0: Can't read the image 'nowhere/x.jpg'"):
        ours(text=["<image>", "<image>"], images=[[photo(8, 8)], ["nowhere/x.jpg"]])
    with pytest.raises(InputError, match="Sample 0, image 0: The image ndarray of shape"):
        ours(text="<image>", images=np.zeros((3, 0, 3), np.uint8))


def test_path_like_and_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    photo(9, 9).save(tmp_path / "h.png")
    assert load_image("~/h.png").size == (9, 9)
    assert load_image(Path(tmp_path / "h.png")).size == (9, 9)
