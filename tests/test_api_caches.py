"""The caches through the Python API: a `SmolVLM` keeps them across calls (chat turns, repeated images), answers are
those of `cache_mb=0`, and the cache can be turned off."""

import numpy as np
import pytest
from PIL import Image

import smolvlm
from smolvlm.errors import InputError

N = 12


@pytest.fixture(scope="module")
def pair(tiny_v2):
    return smolvlm.load(tiny_v2, progress=False), smolvlm.load(tiny_v2, progress=False, cache_mb=0)


def picture(seed, size=(200, 150)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


def user(text, *images):
    return {"role": "user", "content": [*({"type": "image", "image": i} for i in images), {"type": "text", "text": text}]}


def test_chat_turns_reuse_earlier_calls_and_answer_as_without_caches(pair):
    cached, plain = pair
    assert plain.caches is None
    history = []
    for i, question in enumerate(["What is this?", "What colours?", "Anything else?"]):
        history.append(user(question, picture(1)) if i == 0 else user(question))
        got, expected = cached.complete(history, max_new_tokens=N), plain.complete(history, max_new_tokens=N)
        assert got.token_ids == expected.token_ids and expected.cached_tokens == 0
        assert (got.cached_tokens > 0) == (i > 0)  # the image's tiles and the earlier turns, from the first call on
        history.append({"role": "assistant", "content": got.text})
    snapshot = cached.caches.snapshot()
    assert snapshot["prefix"]["reused_tokens"] > 0 and snapshot["image_features"]["misses"] == 5  # 4 tiles + global
    assert snapshot["processed_images"]["misses"] == 1 and snapshot["processed_images"]["hits"] == 2  # not re-tiled


def test_a_file_that_changed_between_turns_is_processed_again(pair, tmp_path):
    """Keys follow the pixels: the same path with one pixel edited misses every cache that holds its frames, and the
    answer is the uncached one for the new picture."""
    cached, plain = pair
    images, features = cached.caches.images, cached.caches.features
    counts = images.misses, images.hits, features.misses, features.hits
    path = tmp_path / "photo.png"
    image = picture(5)
    for edit in range(2):
        if edit:
            pixels = np.asarray(image).copy()
            pixels[3, 4, 0] ^= 1
            Image.fromarray(pixels).save(path)
        else:
            image.save(path)
        history = [user("What is this?", str(path))]
        got, expected = cached.complete(history, max_new_tokens=N), plain.complete(history, max_new_tokens=N)
        assert got.token_ids == expected.token_ids and got.cached_tokens < 32  # at most the text before the image
    after = images.misses, images.hits, features.misses, features.hits
    assert [b - a for a, b in zip(counts, after)] == [2, 0, 10, 0]  # each picture's 5 frames, encoded once


def test_a_batch_about_one_image_encodes_it_once_and_streams_agree(pair):
    cached, plain = pair
    cached.caches.clear()
    misses = cached.caches.features.misses
    batch = [[user(q, picture(2))] for q in ["Describe it.", "Count things.", "Any text?"]]
    assert cached.generate(batch, max_new_tokens=N) == plain.generate(batch, max_new_tokens=N)
    assert cached.caches.features.misses - misses == 5
    assert "".join(cached.stream(batch[1], max_new_tokens=N)) == plain.generate(batch[1], max_new_tokens=N)


def test_cache_mb_must_be_a_size(tiny_v2):
    with pytest.raises(InputError, match="cache_mb"):
        smolvlm.load(tiny_v2, progress=False, cache_mb=-1)


def test_a_video_chat_answers_as_without_caches(pair, tmp_path):
    """A video's frames are image frames to the caches: the second turn reuses them and the first turn's answer."""
    from video_files import SPECS, make_video

    cached, plain = pair
    video = make_video(tmp_path / "clock.mp4", SPECS["clock_25fps_4s.mp4"])
    history = [{"role": "user", "content": [{"type": "video", "video": str(video)},
                                            {"type": "text", "text": "What happens?"}]}]
    for i in range(2):
        got, expected = cached.complete(history, max_new_tokens=N), plain.complete(history, max_new_tokens=N)
        assert got.token_ids == expected.token_ids
        assert (got.cached_tokens > 0) == (i > 0)
        history += [{"role": "assistant", "content": got.text}, user("And then?")]


def test_an_engine_given_messages_prepares_them_through_the_processed_image_cache(pair):
    from smolvlm.generation import SamplingParams

    cached, plain = pair
    engine, hits = cached.new_engine(max_batch=2), cached.caches.images.hits
    messages = [user("What is this?", picture(6))]
    results = engine.generate([messages, messages], SamplingParams(max_new_tokens=N))
    assert cached.caches.images.hits - hits == 1  # the second conversation's picture
    expected = plain.complete(messages, max_new_tokens=N).token_ids
    assert results[0].token_ids == results[1].token_ids == expected
