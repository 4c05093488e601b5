"""The processor's image cache (processing/image_cache.py): outputs equal the uncached processor's, a picture sent
again is not processed again, and keys follow the pixels and the settings, never the file."""

import numpy as np
import torch
from PIL import Image

from smolvlm.generation.feature_cache import LRU
from smolvlm.processing.image_cache import image_key


def picture(seed, size=(700, 500)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def chat(image_sources, text="What is this?"):
    return [{"role": "user", "content": [*({"type": "image", "image": s} for s in image_sources),
                                         {"type": "text", "text": text}]}]


def inputs(processor, conversations, cache=None, **kw):
    kw |= {} if cache is None else {"image_cache": cache}
    return processor.apply_chat_template(conversations, tokenize=True, padding=True, **kw)


def test_outputs_equal_the_uncached_processors_for_batches_and_repeats(pair):
    ours, _ = pair
    cache = LRU(1 << 30)
    a, b = picture(1), picture(2, (300, 900))
    batch = [chat([a, b]), chat([], "Just text."), chat([b], "Again?")]
    expected = inputs(ours, batch)
    for call in range(2):  # the second call finds every picture
        got = inputs(ours, batch, cache)
        for name in ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask"):
            assert torch.equal(got[name], expected[name]), name
        assert cache.misses == 2 and cache.hits == 1 + 3 * call  # b twice in a call: computed once
    keys = got["frame_keys"]
    n = [int(m.flatten(1).any(1).sum()) for m in expected["pixel_attention_mask"]]
    assert [len(k) for k in keys] == n and n[1] == 0
    assert keys[2] == keys[0][-len(keys[2]):]  # b's frames have the same keys in either conversation
    assert len(set(keys[0])) == len(keys[0])
    single = inputs(ours, [chat([a])], cache)
    assert torch.equal(single["pixel_values"], inputs(ours, [chat([a])])["pixel_values"])


def test_a_changed_file_misses_and_the_same_pixels_elsewhere_hit(pair, tmp_path):
    ours, _ = pair
    cache = LRU(1 << 30)
    path, copy = tmp_path / "photo.png", tmp_path / "copy.png"
    image = picture(3)
    image.save(path)
    first = inputs(ours, [chat([str(path)])], cache)
    edited = np.asarray(image).copy()
    edited[10, 20, 1] ^= 1  # one channel of one pixel
    Image.fromarray(edited).save(path)
    second = inputs(ours, [chat([str(path)])], cache)
    assert cache.misses == 2 and cache.hits == 0
    assert torch.equal(second["pixel_values"], inputs(ours, [chat([str(path)])])["pixel_values"])
    assert not set(first["frame_keys"][0]) & set(second["frame_keys"][0])
    image.save(copy)  # the first picture again, under another name
    third = inputs(ours, [chat([str(copy)])], cache)
    assert cache.hits == 1 and third["frame_keys"] == first["frame_keys"]


def test_keys_follow_the_settings(pair):
    ours, _ = pair
    cache = LRU(1 << 30)
    image = picture(4)
    split = inputs(ours, [chat([image])], cache)
    whole = inputs(ours, [chat([image])], cache, do_image_splitting=False)
    assert cache.misses == 2 and len(whole["frame_keys"][0]) == 1
    assert whole["frame_keys"][0][0] not in split["frame_keys"][0]
    assert torch.equal(whole["pixel_values"], inputs(ours, [chat([image])], do_image_splitting=False)["pixel_values"])
    same_size = Image.fromarray(np.asarray(image)[:, ::-1].copy())  # same size and bytes, other pixel order
    assert image_key(same_size, ours.image_processor) != image_key(image, ours.image_processor)
